"""Pulse tests of the pretraining stage on Ray Train: DDP with a worker killed, ZeRO, MoE."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lifecycle import tracking
from lifecycle.config import PretrainConfig
from lifecycle.models import build_model, load_model, load_tokenizer
from tasks.pretrain import pretrain
from tests.conftest import list_checkpoints, metric_history

MODEL = {
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


def _cfg(**kw) -> PretrainConfig:
    base = dict(
        model=MODEL,
        max_steps=20,
        micro_batch_size=8,
        warmup_steps=2,
        log_every=5,
        checkpoint_every=10,
        eval_batches=2,
        peak_flops=1e10,
    )
    base.update(kw)
    return PretrainConfig.model_validate(base)


def _worker_pids() -> list[int]:
    """PIDs of the live Ray Train workers of this session's Ray (named by its GCS address:
    another Ray may run on the machine, a CLI run's or another test worker's)."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    return [a.pid for a in actors]


def test_ddp_worker_killed_resumes_from_checkpoint(ray_session, tiny_data, make_ctx):
    cfg = _cfg(
        max_steps=160,
        checkpoint_every=20,
        log_every=10,
        max_failures=2,
        scaling={"num_workers": 2, "resources_per_worker": {"CPU": 1}},
    )
    ctx = make_ctx()
    key = "e" * 64
    storage = Path(ctx.ray_storage) / ctx.train_name("pretrain", key)
    out, errors = [], []

    def run():
        try:
            out.append(pretrain.fn(cfg, ctx, key, data=tiny_data))
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    # Wait for the second checkpoint's files: by then Ray Train has registered the first one
    # (a checkpoint counts once every worker's report has reached the controller).
    deadline = time.time() + 300
    while not (storage / "step_000040" / "train_state.json").exists():
        assert time.time() < deadline and t.is_alive(), f"no checkpoint: {errors}"
        time.sleep(0.1)
    pids = _worker_pids()
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGKILL)  # a real process death, not an exception
    t.join(600)
    assert not errors, errors
    res = out[0]
    m = res.metrics
    assert m["sys/world_size"] == 2
    assert m["train/steps"] == 160
    assert m["train/resumed_from_step"] >= 20  # restarted from a checkpoint, not from step 0
    assert m["eval/loss_after"] < m["eval/loss_before"]

    # MLflow: checkpoints recorded against their steps, the model registered with lineage.
    uri = ctx.tracking_uri
    assert len(list_checkpoints(uri, res.mlflow_run_id)) >= 2
    run = tracking.get_run(uri, res.mlflow_run_id)
    assert run.data.tags[tracking.PARENT_TAG] == ctx.parent_run_id
    losses = metric_history(uri, res.mlflow_run_id, "train/loss")
    assert max(s for s, _ in losses) == 160
    version = run.data.tags["lifecycle.model_version"]
    mv = tracking.model_version(uri, "test-llm-pretrain", version)
    assert mv.tags["lifecycle.data_manifest_sha256"] == tiny_data.artifact_id
    assert mv.tags["lifecycle.git_sha"] and mv.tags["lifecycle.config_hash"]
    assert "lifecycle.parent_stage_run_id" in mv.tags

    # The final model is an HF safetensors dir with its tokenizer, and it was trained.
    model_dir = Path(res.artifact_uri)
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    tok = load_tokenizer(model_dir)
    init = build_model(cfg.model, tok, cfg.seed).state_dict()
    trained = load_file(model_dir / "model.safetensors")
    assert all(
        torch.equal(init[k], trained[k]) is False for k in trained if k.endswith("q_proj.weight")
    )


@pytest.mark.parametrize(("zero_stage", "arch"), [(1, "llama"), (3, "mixtral")])
def test_deepspeed_zero_on_cpu(ray_session, tiny_data, make_ctx, zero_stage, arch):
    cfg = _cfg(
        model={**MODEL, "arch": arch, "num_experts": 4, "experts_per_token": 2},
        deepspeed={"zero_stage": zero_stage},
        scaling={"num_workers": 2, "resources_per_worker": {"CPU": 1}},
    )
    ctx = make_ctx()
    res = pretrain.fn(cfg, ctx, f"{zero_stage}" * 64, data=tiny_data)
    m = res.metrics
    assert m["sys/world_size"] == 2
    assert m["eval/loss_after"] < m["eval/loss_before"]
    model = load_model(res.artifact_uri)
    assert type(model).__name__ == (
        "MixtralForCausalLM" if arch == "mixtral" else "LlamaForCausalLM"
    )
    x = torch.randint(0, 100, (1, 8))
    assert torch.isfinite(model(input_ids=x).logits).all()
    ckpts = list_checkpoints(ctx.tracking_uri, res.mlflow_run_id)
    assert ckpts == [10]
