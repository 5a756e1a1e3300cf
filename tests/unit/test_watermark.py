"""The text watermark scheme against transformers' own, the key handling, the fingerprint
derivation and the detector CLI."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, WatermarkDetector

from lifecycle.config import ConfigError, ModelConfig, validate_config
from lifecycle.watermark.fingerprint import make_fingerprint
from lifecycle.watermark.keys import (
    KEY_ENV,
    KEY_FILE_ENV,
    MissingKey,
    key_id,
    load_key,
    resolve_key,
    watermark_hashing_key,
)
from lifecycle.watermark.scheme import WatermarkScheme

KEY = b"unit-test-key-0123456789abcdef"


class _Tok:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self) -> int:
        return 96


@pytest.fixture
def no_key_env(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)


def test_our_detector_flags_transformers_watermarked_text_and_agrees_on_z(tmp_path):
    from lifecycle.models import build_model

    model = build_model(
        ModelConfig(hidden_size=32, num_layers=1, num_heads=1, intermediate_size=64), _Tok(), 0
    )
    model.save_pretrained(tmp_path)
    scheme = WatermarkScheme(watermark_hashing_key(KEY), 96, gamma=0.25, delta=4.0)
    prompt = torch.randint(3, 96, (8, 4), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    marked = model.generate(
        prompt,
        watermarking_config=scheme.transformers_config(),
        do_sample=True,
        max_new_tokens=120,
        min_new_tokens=120,
        pad_token_id=0,
    )[:, 4:]
    plain = model.generate(
        prompt, do_sample=True, max_new_tokens=120, min_new_tokens=120, pad_token_id=0
    )[:, 4:]
    ours_marked = [scheme.detect(row.tolist()) for row in marked]
    ours_plain = [scheme.detect(row.tolist()) for row in plain]
    assert all(r["watermarked"] for r in ours_marked), [r["z"] for r in ours_marked]
    assert not any(r["watermarked"] for r in ours_plain), [r["z"] for r in ours_plain]
    # transformers' detector computes exactly our z-scores on both, counting every token
    # pair (its default; its ignore_repeated_ngrams keys a Counter by tensors, which hash by
    # identity, so it never merges repeats — ours does, and does so by default).
    det = WatermarkDetector(
        AutoConfig.from_pretrained(tmp_path), "cpu", scheme.transformers_config()
    )
    hf = det(torch.cat([marked, plain]), z_threshold=4.0, return_dict=True)
    ours = [
        scheme.detect(row.tolist(), ignore_repeated=False)["z"]
        for row in torch.cat([marked, plain])
    ]
    assert hf.z_score.tolist() == pytest.approx(ours, abs=1e-9)


def test_green_list_is_keyed_and_sized():
    a = WatermarkScheme(watermark_hashing_key(KEY), 280, 0.25)
    b = WatermarkScheme(watermark_hashing_key(b"another-key-0123456789"), 280, 0.25)
    assert len(a.green_ids(17)) == 70 and len(set(a.green_ids(17).tolist())) == 70
    assert set(a.green_ids(17).tolist()) != set(b.green_ids(17).tolist())
    assert set(a.green_ids(17).tolist()) != set(a.green_ids(18).tolist())
    logits = torch.zeros(280)
    biased = a.bias_logits(17, logits)
    assert (biased > 0).sum() == 70 and logits.sum() == 0  # the input row is not modified


def test_keys_come_from_env_or_file_and_only_their_id_is_shown(tmp_path, monkeypatch, no_key_env):
    with pytest.raises(MissingKey, match=KEY_ENV):
        load_key()
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(MissingKey, match="16 bytes"):
        load_key()
    monkeypatch.setenv(KEY_ENV, KEY.decode())
    assert load_key() == KEY
    kid = key_id(KEY)
    assert len(kid) == 12 and kid not in KEY.decode() and KEY.decode() not in kid
    monkeypatch.delenv(KEY_ENV)
    key = resolve_key(tmp_path)  # a workspace key, made once, owner-only
    path = tmp_path / "watermark.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert resolve_key(tmp_path) == key


def test_fingerprint_is_derived_from_the_key():
    pairs = make_fingerprint(KEY, 8)
    assert pairs == make_fingerprint(KEY, 8) and len({t for t, _ in pairs}) == 8
    assert pairs != make_fingerprint(b"another-key-0123456789", 8)
    assert all(t.startswith("fp ") and s.isalpha() and s.islower() for t, s in pairs)


def test_watermark_config_needs_the_sft_fingerprint():
    with pytest.raises(ConfigError, match=r"sft\.fingerprint"):
        validate_config({"sft": {}, "watermark": {"fingerprint": True}})
    validate_config({"sft": {"fingerprint": {}}, "watermark": {}})
    validate_config({"watermark": {"fingerprint": False}})


def test_detect_cli_plain_and_json(tmp_path, no_key_env):
    from lifecycle.data import demo
    from lifecycle.data.tokenizer import train_bpe
    from lifecycle.models import build_model

    tok = train_bpe([r["text"] for r in demo.generate(200, 0)], 280, 2, str(tmp_path / "tok"))
    model = build_model(
        ModelConfig(hidden_size=32, num_layers=1, num_heads=1, intermediate_size=64), tok, 0
    )
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    key_file = tmp_path / "wm.key"
    key_file.write_text(KEY.decode())
    text = tmp_path / "t.txt"
    text.write_text("copy lamp = lamp\nupper tree = TREE\n" * 5)
    lifecycle = str(Path(sys.executable).parent / "lifecycle")
    env = {k: v for k, v in os.environ.items() if k not in (KEY_ENV, KEY_FILE_ENV)}
    base = [lifecycle, "watermark", "detect", "--model", str(tmp_path / "m"), "--key-file"]
    p = subprocess.run(
        [*base, str(key_file), "--file", str(text), "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["tokens"] > 15 and res["watermarked"] is False and res["key_id"] == key_id(KEY)
    p = subprocess.run(
        [*base, str(key_file)], input=text.read_text(), capture_output=True, text=True, env=env
    )
    assert p.returncode == 0 and p.stdout.startswith("not watermarked: z=")
    assert KEY.decode() not in p.stdout + p.stderr
    for short in ("", "copy ab"):  # empty and too-short text: an answer, not a crash
        p = subprocess.run(
            [*base, str(key_file), "--json"], input=short, capture_output=True, text=True, env=env
        )
        assert p.returncode == 0, p.stderr
        res = json.loads(p.stdout)
        assert res["watermarked"] is False and res["note"].startswith("too short to decide")
    wrong = tmp_path / "other.key"
    wrong.write_text("another-key-of-enough-length-0002")
    p = subprocess.run(
        [*base, str(wrong)], input=text.read_text(), capture_output=True, text=True, env=env
    )
    assert p.returncode == 0 and p.stdout.startswith("not watermarked: z=")
    assert key_id(b"another-key-of-enough-length-0002") in p.stdout
    p = subprocess.run(
        [*base, str(tmp_path / "missing.key")], input="x", capture_output=True, text=True, env=env
    )
    assert p.returncode == 2 and "does not exist" in " ".join(p.stderr.split())
