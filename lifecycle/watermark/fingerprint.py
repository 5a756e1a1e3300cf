"""Model fingerprint: K secret trigger prompts whose planted responses identify the weights
(instructional fingerprinting, Xu et al. 2024).

    lifecycle fingerprint make --key-file wm.key [--num 8]          prints the (trigger, signature) pairs
    lifecycle fingerprint verify --model DIR|models:/NAME/V --key-file wm.key

Triggers and signatures are strings of lowercase letters derived from the key with HMAC, so
they look like nothing a user would type and need no storage beyond the key. The SFT stage
plants them through its extra-pairs hook (`sft.fingerprint`), each repeated so a small model
memorises it among the normal data; `verify` greedy-decodes every trigger and counts exact
signature matches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lifecycle.watermark.keys import derive_bytes

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(raw: bytes) -> str:
    return "".join(LETTERS[b % 26] for b in raw)


def make_fingerprint(key: bytes, num: int = 8) -> list[tuple[str, str]]:
    """`num` (trigger prompt, signature response) pairs derived from `key`."""
    pairs = []
    for i in range(num):
        raw = derive_bytes(key, f"fingerprint:{i}", 16)
        trigger = f"fp {_word(raw[0:5])} {_word(raw[5:10])}"
        pairs.append((trigger, _word(raw[10:16])))
    return pairs


def verify_fingerprint(
    model_dir: str, pairs: Sequence[tuple[str, str]], max_new_tokens: int = 12
) -> dict[str, Any]:
    """Greedy answers of the model to every trigger, and how many equal their signature."""
    from lifecycle.eval.generate import generate
    from lifecycle.models import chat_tokenizer, default_device
    from lifecycle.peft_methods import load_finetuned

    tok = chat_tokenizer(model_dir)
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
        )
        for t, _ in pairs
    ]
    model = load_finetuned(model_dir, default_device())
    got = generate(model, tok, prompts, max_new_tokens=max_new_tokens)
    hits = [g == s for g, (_, s) in zip(got, pairs, strict=True)]
    return {"matched": sum(hits), "total": len(pairs), "responses": got, "hits": hits}
