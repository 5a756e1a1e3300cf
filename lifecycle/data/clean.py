"""Record-level data prep: parsing with rejects, normalisation, redaction, filters, MinHash.

These are plain functions over Python values. The data stage maps them over Ray Data blocks
(tasks/data.py); bench/data_prep.py runs the same functions in a plain loop as the baseline.
The global steps (exact and near dedup, which need to see every document) are here too and run
on the driver: `Deduplicator` keeps the first occurrence in input order.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_BLANKS = re.compile(r"\n{3,}")
EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}(?!\w)"
)


def doc_id(input_idx: int, file_idx: int, record_idx: int) -> str:
    """A sortable id that encodes input order: first occurrence wins in dedup."""
    return f"{input_idx:03d}:{file_idx:06d}:{record_idx:09d}"


def reject(did: str, source: str, reason: str) -> dict[str, Any]:
    return {"doc_id": did, "source": source, "text": None, "reason": reason}


def parse_lines(
    data: bytes, source: str, input_idx: int, file_idx: int, fmt: str, text_field: str
) -> Iterator[dict[str, Any]]:
    """Records of one jsonl or text file. A bad record becomes a reject, never an exception.

    `text` files are one document per file; `jsonl` files one JSON object per line.
    """
    if fmt == "text":
        try:
            yield {
                "doc_id": doc_id(input_idx, file_idx, 0),
                "source": source,
                "text": data.decode("utf-8"),
                "reason": None,
            }
        except UnicodeDecodeError as e:
            yield reject(doc_id(input_idx, file_idx, 0), source, f"undecodable bytes: {e.reason}")
        return
    for i, line in enumerate(data.split(b"\n")):
        did = doc_id(input_idx, file_idx, i)
        if not line.strip():
            continue
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield reject(did, f"{source}:{i + 1}", f"undecodable bytes: {e.reason} at {e.start}")
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            yield reject(did, f"{source}:{i + 1}", f"bad JSON: {e.msg} at column {e.colno}")
            continue
        yield record_from_value(obj, did, f"{source}:{i + 1}", text_field)


def record_from_value(obj: Any, did: str, source: str, text_field: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        return reject(did, source, f"not an object: got {type(obj).__name__}")
    if text_field not in obj:
        return reject(did, source, f"missing field {text_field!r}")
    value = obj[text_field]
    if not isinstance(value, str):
        return reject(did, source, f"field {text_field!r} is {type(value).__name__}, not a string")
    return {"doc_id": did, "source": source, "text": value, "reason": None}


def normalize(text: str, form: str = "NFKC") -> str:
    """Unicode normalisation, unified newlines, collapsed spaces, no trailing blanks."""
    text = unicodedata.normalize(form, text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES.sub(" ", ln).strip() for ln in text.split("\n")]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def redact(text: str, emails: bool, phones: bool) -> tuple[str, int]:
    n = 0
    if emails:
        text, k = EMAIL.subn("<EMAIL>", text)
        n += k
    if phones:
        text, k = PHONE.subn("<PHONE>", text)
        n += k
    return text, n


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def in_val_split(sha: str, val_fraction: float) -> bool:
    """Deterministic split by document hash: the same text always lands on the same side."""
    return int(sha[:8], 16) / 0xFFFFFFFF < val_fraction


def minhash_values(text: str, shingle_size: int, num_perm: int) -> np.ndarray:
    m = MinHash(num_perm=num_perm, seed=1)
    k = shingle_size
    shingles = {text[i : i + k].encode("utf-8") for i in range(max(1, len(text) - k + 1))}
    m.update_batch(list(shingles))
    return m.hashvalues


def clean_record(rec: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Normalise, redact, filter and fingerprint one parsed record.

    `cfg` is DataConfig.model_dump(): plain values so Ray ships it cheaply to workers.
    Output keys: doc_id, source, text, reason, sha, minhash, redactions.
    """
    out = {**rec, "sha": None, "minhash": None, "redactions": 0}
    if rec["text"] is None:
        return out
    text = normalize(rec["text"], cfg["normalize"])
    text, n = redact(text, cfg["redact"]["emails"], cfg["redact"]["phones"])
    out["redactions"] = n
    if not cfg["min_chars"] <= len(text) <= cfg["max_chars"]:
        out.update(
            text=None,
            reason=f"filtered: length {len(text)} outside [{cfg['min_chars']}, {cfg['max_chars']}]",
        )
        return out
    out["text"] = text
    out["sha"] = text_sha(text)
    nd = cfg["near_dedup"]
    if nd["enabled"]:
        out["minhash"] = minhash_values(text, nd["shingle_size"], nd["num_perm"])
    return out


@dataclass
class Deduplicator:
    """Exact (sha256 of normalised text) and near (MinHash LSH) dedup, first occurrence wins."""

    exact: bool
    near: bool
    threshold: float = 0.8
    num_perm: int = 128
    _seen: set[str] = field(default_factory=set)
    _lsh: MinHashLSH | None = None
    _kept: dict[str, LeanMinHash] = field(default_factory=dict)
    exact_removed: int = 0
    near_removed: int = 0

    def __post_init__(self) -> None:
        if self.near:
            # Recall-weighted bands: false candidates are cheap (the Jaccard check drops them),
            # missed duplicates are not.
            self._lsh = MinHashLSH(
                threshold=self.threshold, num_perm=self.num_perm, weights=(0.1, 0.9)
            )

    def keep(self, doc: str, sha: str, hashvalues: np.ndarray | None) -> bool:
        if self.exact and sha in self._seen:
            self.exact_removed += 1
            return False
        if self._lsh is not None:
            values = np.asarray(hashvalues, dtype=np.uint32)
            mh = LeanMinHash(seed=1, hashvalues=values, scheme="affine32")
            # LSH bands give candidates; the estimated Jaccard decides, so a candidate that
            # merely shares a band is not dropped.
            if any(mh.jaccard(self._kept[c]) >= self.threshold for c in self._lsh.query(mh)):
                self.near_removed += 1
                return False
            self._lsh.insert(doc, mh)
            self._kept[doc] = mh
        self._seen.add(sha)
        return True


def pack(token_lists: list[list[int]], eos_id: int, block_size: int) -> list[list[int]]:
    """Concatenates documents with EOS after each and cuts fixed-length blocks.

    The tail shorter than a block is dropped (at most block_size - 1 tokens per call).
    """
    flat: list[int] = []
    for toks in token_lists:
        flat.extend(toks)
        flat.append(eos_id)
    n = len(flat) // block_size
    return [flat[i * block_size : (i + 1) * block_size] for i in range(n)]
