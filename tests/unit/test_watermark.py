"""The text watermark scheme against transformers' own, the key handling, the fingerprint
derivation and the detector CLI."""

import importlib.util
import itertools
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
from lifecycle.watermark.scheme import GreenListCache, WatermarkScheme

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


# ------------------------------------------------------------------------------------------
# The bounded green-list cache against the definition it replaced
# ------------------------------------------------------------------------------------------

BIG_V = 152064  # Qwen2's vocabulary: 19008 bytes a packed green list


def _reference_green(hashing_key: int, vocab: int, gamma: float, prev: int) -> torch.Tensor:
    """The green list as the scheme used to compute it (and transformers does)."""
    rng = torch.Generator(device="cpu")
    rng.manual_seed((hashing_key * prev) % (2**64 - 1))
    return torch.randperm(vocab, generator=rng)[: int(vocab * gamma)]


def _reference_detect(hashing_key, vocab, gamma, tokens, ignore_repeated):
    pairs = list(itertools.pairwise(tokens))
    if ignore_repeated:
        pairs = list(dict.fromkeys(pairs))
    green = sum(bool((_reference_green(hashing_key, vocab, gamma, a) == b).any()) for a, b in pairs)
    n = len(pairs)
    return green, (green - gamma * n) / (n * gamma * (1 - gamma)) ** 0.5


def test_cache_never_exceeds_its_byte_budget_at_a_large_vocabulary():
    budget = 5 * ((BIG_V + 7) // 8) + 100  # room for five lists
    hk = watermark_hashing_key(KEY)
    scheme = WatermarkScheme(hk, BIG_V, 0.25, 2.0, cache_bytes=budget)
    prevs = [3, 151999, 17, 3, 40000, 99, 123456, 17, 7, 8, 9, 3, 150000, 11]
    for i, prev in enumerate(prevs):
        assert scheme.is_green(prev, 5) == bool(
            (_reference_green(hk, BIG_V, 0.25, prev) == 5).any()
        )
        stats = scheme.cache.stats()
        assert stats["bytes"] <= budget and stats["lists"] == min(5, len(set(prevs[: i + 1])))
    # least recently used out first: 3 and 17 are hits once each, 3's last use came after
    # five other lists
    assert scheme.cache.stats()["evictions"] == 7 and scheme.cache.stats()["hits"] == 2
    # more lists in one call than the cache holds: each still the right one
    masks = scheme.green_masks(prevs)
    assert scheme.cache.stats()["bytes"] <= budget
    for prev, mask in zip(prevs, masks, strict=True):
        want = torch.zeros(masks.shape[1] * 8, dtype=torch.bool)
        want[_reference_green(hk, BIG_V, 0.25, prev)] = True
        got = ((mask[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).bool().reshape(-1)
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="cannot hold one list"):
        WatermarkScheme(hk, BIG_V, cache_bytes=1000)


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "randperm"])
@pytest.mark.parametrize("vocab", [96, 281, BIG_V])
def test_green_lists_are_the_randperm_definition(vocab, compiled):
    hk = watermark_hashing_key(KEY)
    cache = GreenListCache(vocab, compiled=compiled)
    scheme = WatermarkScheme(hk, vocab, 0.25, cache=cache)
    rng = torch.Generator().manual_seed(vocab)
    prevs = [0, 1, vocab - 1, vocab + 5, *torch.randint(0, vocab, (6,), generator=rng).tolist()]
    for prev in prevs:
        want = _reference_green(hk, vocab, 0.25, prev)
        assert torch.equal(scheme.green_ids(prev), want.sort().values)
        for tok in [*want[:3].tolist(), 0, vocab - 1, vocab, -1]:
            assert scheme.is_green(prev, tok) == bool((want == tok).any())
    # a γ whose ⌊γV⌋ is not a multiple of 8, and seeds past 2³² (only their low bits seed)
    odd = WatermarkScheme(2**40 + 3, vocab, 0.3, cache=cache)
    for prev in prevs[:4]:
        want = _reference_green(2**40 + 3, vocab, 0.3, prev)
        assert torch.equal(odd.green_ids(prev), want.sort().values)
    if compiled and importlib.util.find_spec("numba"):
        assert cache._kernel, "numba's green lists disagreed with torch.randperm"


def test_bias_logits_and_batched_bias_equal_the_reference():
    hk = watermark_hashing_key(KEY)
    scheme = WatermarkScheme(hk, BIG_V, 0.25, 2.0, cache_bytes=2 * ((BIG_V + 7) // 8))
    logits = torch.randn(4, BIG_V + 64, generator=torch.Generator().manual_seed(0))
    logits[:, :100] = -torch.inf  # masked by an earlier processor: stays masked
    for prev in (5, 151000):
        want = logits[0].clone()
        want[_reference_green(hk, BIG_V, 0.25, prev)] += 2.0
        assert torch.equal(scheme.bias_logits(prev, logits[0]), want)
    # a batch: rows 0, 2, 3 biased (row 3 with another δ, more rows than the cache holds),
    # row 1 untouched
    got = scheme.add_bias_(logits.clone(), [2, 0, 3], [7, 8, 9], [2.0, 2.0, 0.5])
    want = logits.clone()
    for row, prev, delta in [(2, 7, 2.0), (0, 8, 2.0), (3, 9, 0.5)]:
        want[row, _reference_green(hk, BIG_V, 0.25, prev)] += delta
    assert torch.equal(got, want)


def test_detect_is_unchanged_and_reuses_the_cache():
    hk = watermark_hashing_key(KEY)
    rng = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 300, (120,), generator=rng).tolist()
    tokens[10:20] = tokens[30:40]  # repeated pairs
    tokens[50] = 300 + 7  # an id past the vocabulary: never green
    scheme = WatermarkScheme(hk, 300, 0.25, cache_bytes=8 * 38)  # 8 lists: chunked lookups
    for ignore in (True, False):
        green, z = _reference_detect(hk, 300, 0.25, tokens, ignore)
        res = scheme.detect(tokens, ignore_repeated=ignore)
        assert res["green"] == green and res["z"] == pytest.approx(z, abs=1e-12)
        assert scheme.cache.stats()["bytes"] <= 8 * 38
    big = WatermarkScheme(hk, BIG_V, 0.25)
    text = torch.randint(0, 50, (400,), generator=rng).tolist()  # few distinct: Zipf-like
    first = big.detect(text)
    misses = big.cache.stats()["misses"]
    assert big.detect(text) == first and big.cache.stats()["misses"] == misses <= 50


def test_vllm_processor_biases_the_watermarked_rows_of_a_batch(monkeypatch):
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from lifecycle.watermark.vllm_processor import WatermarkLogitsProcessor

    monkeypatch.setenv(KEY_ENV, KEY.decode())
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    vocab = 1000
    cfg = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=SimpleNamespace(vocab_size=vocab)),
        scheduler_config=SimpleNamespace(max_num_seqs=4),
    )
    proc = WatermarkLogitsProcessor(cfg, torch.device("cpu"), False)

    def wm(gamma, delta):
        return SamplingParams(extra_args={"watermark": {"gamma": gamma, "delta": delta}})

    outs = [[], [7], [], [9, 10]]
    added = [(0, wm(0.25, 2.0), [1, 2, 3], outs[0]), (1, SamplingParams(), [4], outs[1])]
    added += [(2, wm(0.5, 1.0), [5], outs[2]), (3, wm(0.25, 3.0), [6], outs[3])]
    proc.update_state(BatchUpdate(batch_size=4, removed=[], moved=[], added=added))
    logits = torch.randn(4, vocab + 24, generator=torch.Generator().manual_seed(0))
    hk = watermark_hashing_key(KEY)

    def reference(batch, rows):  # row -> (γ, δ, previous token)
        want = logits[:batch].clone()
        for row, (gamma, delta, prev) in rows.items():
            want[row, _reference_green(hk, vocab, gamma, prev)] += delta
        return want

    rows = {0: (0.25, 2.0, 3), 1: None, 2: (0.5, 1.0, 5), 3: (0.25, 3.0, 10)}
    got = proc.apply(logits.clone())
    assert torch.equal(got, reference(4, {r: s for r, s in rows.items() if s}))
    outs[0].append(11)  # request 0 decoded a token; 1 finished; 3 moved into its row
    move = (3, 1, MoveDirectionality.UNIDIRECTIONAL)
    proc.update_state(BatchUpdate(batch_size=3, removed=[1], moved=[move], added=[]))
    got = proc.apply(logits[:3].clone())
    assert torch.equal(got, reference(3, {0: (0.25, 2.0, 11), 1: (0.25, 3.0, 10), 2: rows[2]}))
    assert proc.cache_stats()["misses"] == 4 and proc.cache_stats()["hits"] == 2
    with pytest.raises(ValueError, match="gamma"):
        WatermarkLogitsProcessor.validate_params(wm(1.5, 2.0))
