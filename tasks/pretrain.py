"""Pretraining stage on Ray Train: a causal LM trained on the data stage's packed blocks.

Run it alone:  lifecycle run configs/tiny_cpu.yaml --stages pretrain   (data comes from cache)
               lifecycle run configs/tiny_cpu.yaml --stages pretrain --from data=DIR

Builds the model from `pretrain.model` (Llama or Mixtral-style MoE, random init) or continues
a local HF model dir, trains it with DDP or DeepSpeed ZeRO on `pretrain.scaling.num_workers`
workers, records every checkpoint in MLflow against its step, and registers the final HF
safetensors directory (with its tokenizer) as `<registered_model>-pretrain` with lineage tags.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from lifecycle import tracking
from lifecycle.artifacts import RunContext, StageResult
from lifecycle.config import PretrainConfig, config_hash
from lifecycle.registry import register_result
from ray_cluster.train import TrainJob, fit_causal_lm


@task(name="pretrain", cache_policy=NO_CACHE)
def pretrain(cfg: PretrainConfig, ctx: RunContext, key: str, *, data: StageResult) -> StageResult:
    """Trains, evaluates (`eval/*_before`, `eval/*_after`) and registers the pretrained model."""
    data_dir = Path(data.artifact_uri)
    with tracking.stage_run(ctx, "pretrain", params=cfg.model_dump(mode="json")) as run_id:
        metrics, final_ckpt = fit_causal_lm(
            "pretrain",
            cfg,
            TrainJob.of(ctx, "pretrain", key, run_id),
            data_dir=str(data_dir),
            tokenizer_dir=str(data_dir / "tokenizer"),
        )
        with ctx.staging("pretrain", key) as tmp:
            shutil.copytree(final_ckpt / "model", tmp / "model")
        out = ctx.stage_dir("pretrain", key) / "model"
        tracking.log_metrics(ctx.tracking_uri, run_id, metrics, step=cfg.max_steps)
        lineage = {
            "lifecycle.stage": "pretrain",
            "lifecycle.data_manifest_sha256": data.artifact_id or "",
            "lifecycle.config_hash": config_hash(cfg),
            "lifecycle.git_sha": ctx.code_version.split("+", 1)[0],
            "lifecycle.code_version": ctx.code_version,
            "lifecycle.parent_stage_run_id": data.mlflow_run_id or "",
            "lifecycle.run_name": ctx.run_name,
        }
        return register_result(
            ctx,
            run_id,
            "pretrain",
            out,
            lineage,
            f"pretrained by run {ctx.run_name}",
            metrics,
            key,
        )
