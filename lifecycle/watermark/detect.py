"""Detecting the text watermark in a piece of text (the CLI's and, later, the API's detector).

    from lifecycle.watermark.detect import detect_text
    detect_text("some text", model_dir="path/to/model", key=b"...", gamma=0.25)

The text is tokenized with the model's tokenizer (the watermark lives in token ids) and every
token after the first is scored against its predecessor's green list.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lifecycle.watermark.keys import key_id, watermark_hashing_key
from lifecycle.watermark.scheme import WatermarkScheme

MIN_TOKENS = 16
"""Fewer scored (previous, next) pairs than this and the verdict is 'too short to decide'."""


def with_verdict(res: dict[str, Any]) -> dict[str, Any]:
    """Adds `min_tokens` and, for too little text, a `note` and watermarked = False."""
    res = {**res, "min_tokens": MIN_TOKENS}
    if res["tokens"] < MIN_TOKENS:
        res["watermarked"] = False
        res["note"] = (
            f"too short to decide: {res['tokens']} scored tokens, at least {MIN_TOKENS} needed"
        )
    return res


def detect_text(
    text: str, model_dir: str | Path, key: bytes, gamma: float = 0.25, z_threshold: float = 4.0
) -> dict[str, Any]:
    """z-score, p-value, green fraction and verdict of `text` under `key` (a wrong key reads
    as 'not watermarked': z near 0; the result names the key id that was used)."""
    from lifecycle.models import load_tokenizer

    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    ids = load_tokenizer(model_dir)(text, add_special_tokens=False)["input_ids"]
    scheme = WatermarkScheme(watermark_hashing_key(key), vocab, gamma)
    res = {**scheme.detect(ids, z_threshold), "gamma": gamma, "key_id": key_id(key)}
    return with_verdict(res)
