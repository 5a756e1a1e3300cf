"""Model building/loading and MLflow checkpoint records, without Ray."""

import json
from pathlib import Path

import pytest
import torch

from lifecycle import tracking
from lifecycle.config import ModelConfig
from lifecycle.data.tokenizer import SPECIAL_TOKENS, train_bpe
from lifecycle.models import build_model, flops_per_token, load_model, save_model
from tests.conftest import list_checkpoints


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [f"reverse word{i} = {i}drow" for i in range(200)]
    return train_bpe(texts, 300, 2, tmp_path_factory.mktemp("tok"))


def test_tokenizer_has_the_fixed_special_tokens(tokenizer):
    vocab = tokenizer.get_vocab()
    assert all(t in vocab for t in SPECIAL_TOKENS)
    ids = tokenizer("reverse abc = cba")["input_ids"]
    assert tokenizer.decode(ids) == "reverse abc = cba"


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_build_is_seeded_and_round_trips_through_safetensors(tokenizer, tmp_path, arch):
    cfg = ModelConfig(arch=arch, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64)
    a, b = build_model(cfg, tokenizer, seed=3), build_model(cfg, tokenizer, seed=3)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    save_model(a, tokenizer, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert not list((tmp_path / "m").glob("*.bin"))
    c = build_model(cfg.model_copy(update={"init_from": str(tmp_path / "m")}), tokenizer, seed=0)
    x = torch.randint(0, len(tokenizer), (1, 6))
    assert torch.allclose(a(input_ids=x).logits, c(input_ids=x).logits)
    assert flops_per_token(a, 64) > 6 * 32 * 64  # at least the MLP matmuls


def test_init_from_rejects_smaller_vocab_and_missing_weights(tokenizer, tmp_path):
    small = build_model(
        ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
        tokenizer,
        seed=0,
    )
    small.resize_token_embeddings(100)
    save_model(small, tokenizer, tmp_path / "small")
    cfg = ModelConfig(init_from=str(tmp_path / "small"))
    with pytest.raises(ValueError, match="vocabulary"):
        build_model(cfg, tokenizer, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path / "empty")


def test_checkpoint_recorded_by_copy_or_by_reference(tmp_path):
    uri = tracking.default_tracking_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "t", tmp_path / "art")
    run = tracking.start_run(uri, exp, "r")
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "model.safetensors").write_bytes(b"x" * 2000)
    tracking.log_checkpoint(uri, run, 10, ck, "file:///storage/step_10", copy_max_mb=1)
    tracking.log_checkpoint(uri, run, 20, ck, "file:///storage/step_20", copy_max_mb=0.001)
    assert list_checkpoints(uri, run) == [10, 20]
    c = tracking.client(uri)
    copied = {a.path for a in c.list_artifacts(run, "checkpoints/step_000010")}
    by_ref = {a.path for a in c.list_artifacts(run, "checkpoints/step_000020")}
    assert copied == {
        "checkpoints/step_000010/model.safetensors",
        "checkpoints/step_000010/manifest.json",
    }
    assert by_ref == {"checkpoints/step_000020/manifest.json"}
    local = c.download_artifacts(run, "checkpoints/step_000020/manifest.json", str(tmp_path))
    manifest = json.loads(Path(local).read_text())
    assert manifest["uri"] == "file:///storage/step_20" and manifest["copied"] is False
    assert manifest["files"]["model.safetensors"]["bytes"] == 2000


def test_stage_run_ends_failed_on_error(tmp_path):
    from lifecycle.artifacts import RunContext

    uri = tracking.default_tracking_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "t", tmp_path / "art")
    parent = tracking.start_run(uri, exp, "p")
    ctx = RunContext("p", str(tmp_path), uri, exp, parent, "m", "v")
    with pytest.raises(RuntimeError), tracking.stage_run(ctx, "data") as run_id:
        raise RuntimeError("boom")
    assert tracking.get_run(uri, run_id).info.status == "FAILED"
    assert tracking.get_run(uri, run_id).data.tags[tracking.PARENT_TAG] == parent


def test_flops_of_a_peft_model_count_no_weight_gradients_for_frozen_weights(tokenizer):
    """LoRA: every weight costs its forward and the backward through its activations (4 per
    weight per token), only the adapters their weight gradients (2 more): not 6N."""
    from peft import LoraConfig, get_peft_model

    from lifecycle.models import num_params
    from lifecycle.training import measure_peak_flops

    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    model = get_peft_model(
        build_model(cfg, tokenizer, seed=0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    n, t = num_params(model), num_params(model, trainable_only=True)
    attention = 12 * 2 * 32 * 64
    full, peft = flops_per_token(model, 64), flops_per_token(model, 64, trainable=t)
    assert 0 < t < n and full - peft == 2 * (n - t)  # tied embeddings: all of n are matmuls
    assert peft == 4 * n + 2 * t + attention
    assert measure_peak_flops("cpu", torch.bfloat16, seconds=0.05) > 0
