"""The watermark key: read from an env var or a key file, never from the YAML, never logged.

    LIFECYCLE_WATERMARK_KEY=... lifecycle run ...        (or LIFECYCLE_WATERMARK_KEY_FILE=path)
    lifecycle watermark keygen --out wm.key               (32 random bytes, hex, mode 0600)

What may be recorded (MLflow, logs) is `key_id(key)`: the first 12 hex digits of
sha256("key-id:" + key). Integers for the green-list seed and the fingerprint triggers are
derived from the key with HMAC-SHA256 under distinct labels.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_ENV = "LIFECYCLE_WATERMARK_KEY"
KEY_FILE_ENV = "LIFECYCLE_WATERMARK_KEY_FILE"


class MissingKey(ValueError):
    """No watermark key was given where one is needed."""


def load_key(key_file: str | Path | None = None) -> bytes:
    """The key from `key_file`, else $LIFECYCLE_WATERMARK_KEY_FILE, else $LIFECYCLE_WATERMARK_KEY."""
    path = key_file or os.environ.get(KEY_FILE_ENV)
    if path:
        p = Path(path)
        if not p.is_file():
            raise MissingKey(f"watermark key file {p} does not exist")
        key = p.read_bytes().strip()
    else:
        key = os.environ.get(KEY_ENV, "").strip().encode()
    if len(key) < 16:
        raise MissingKey(
            "no watermark key (at least 16 bytes): set "
            f"{KEY_ENV} or {KEY_FILE_ENV}, or pass --key-file "
            "(make one with `lifecycle watermark keygen --out FILE`)"
        )
    return key


def resolve_key(workspace: str | Path) -> bytes:
    """The configured key (env var or key file); without one, the workspace's own
    `watermark.key`, made on first use (a local demo run needs no set-up; production sets
    the env var so that every run and the serving replicas share one key)."""
    if os.environ.get(KEY_FILE_ENV) or os.environ.get(KEY_ENV):
        return load_key()
    path = Path(workspace) / "watermark.key"
    if not path.is_file():
        with contextlib.suppress(FileExistsError):  # made by a concurrent run
            new_key_file(path)
    return load_key(path)


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"key-id:" + key).hexdigest()[:12]


def derive_int(key: bytes, label: str, bits: int = 62) -> int:
    """A positive integer of `bits` bits from the key, independent per label."""
    digest = hmac.new(key, label.encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") % (2**bits - 1) + 1


def derive_bytes(key: bytes, label: str, n: int) -> bytes:
    out, i = b"", 0
    while len(out) < n:
        out += hmac.new(key, f"{label}:{i}".encode(), hashlib.sha256).digest()
        i += 1
    return out[:n]


def new_key_file(path: str | Path) -> Path:
    """Writes a fresh random key (hex) readable by the owner only."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return p


def watermark_hashing_key(key: bytes) -> int:
    """The integer that seeds the green lists (transformers' `hashing_key`)."""
    return derive_int(key, "text-watermark")
