"""What every model-producing stage records the same way: lineage tags, registration of its
model in the MLflow registry, and the StageResult that points downstream stages at it.

Registered names are `<tracking.registered_model>-<suffix>` with the suffix per stage below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lifecycle import tracking
from lifecycle.artifacts import RunContext, StageResult
from lifecycle.config import config_hash

REGISTRY_SUFFIX = {
    "pretrain": "pretrain",
    "sft": "sft",
    "rlhf": "rlhf",
    "distill": "distilled",
    "quantize": "quantized",
}


def registered_name(ctx: RunContext, stage: str) -> str:
    return f"{ctx.registered_model}-{REGISTRY_SUFFIX[stage]}"


def parent_model(ctx: RunContext, upstream: StageResult) -> str:
    """`NAME/VERSION` of the model version the upstream stage registered, or
    `external:<dir>` for a model that came from outside the run and the registry (`--from`)."""
    if upstream.artifact_id and upstream.artifact_id.startswith("registry:"):
        return upstream.artifact_id.removeprefix("registry:")  # `--from STAGE=models:/...`
    version = ""
    if upstream.mlflow_run_id:
        tags = tracking.get_run(ctx.tracking_uri, upstream.mlflow_run_id).data.tags
        version = tags.get("lifecycle.model_version", "")
    if version and upstream.stage in REGISTRY_SUFFIX:
        return f"{registered_name(ctx, upstream.stage)}/{version}"
    return f"external:{upstream.artifact_uri}"


def lineage_tags(
    ctx: RunContext, stage: str, cfg: BaseModel, upstream: StageResult, **extra: Any
) -> dict[str, str]:
    """The tags a stage's run and its registered model version carry."""
    return {
        "lifecycle.stage": stage,
        "lifecycle.parent_model": parent_model(ctx, upstream),
        "lifecycle.parent_stage_run_id": upstream.mlflow_run_id or "",
        "lifecycle.config_hash": config_hash(cfg),
        "lifecycle.git_sha": ctx.code_version.split("+", 1)[0],
        "lifecycle.code_version": ctx.code_version,
        "lifecycle.run_name": ctx.run_name,
        **{k: str(v) for k, v in extra.items()},
    }


def register_result(
    ctx: RunContext,
    run_id: str,
    stage: str,
    model_dir: Path,
    lineage: dict[str, str],
    description: str,
    metrics: dict[str, float],
    key: str,
) -> StageResult:
    """Registers `model_dir` as the stage's model version, tags the run with it, and returns
    the completed StageResult pointing at it."""
    name = registered_name(ctx, stage)
    version = tracking.register_model(
        ctx.tracking_uri, run_id, name, model_dir, lineage, description=description
    )
    tracking.set_tags(ctx.tracking_uri, run_id, {**lineage, "lifecycle.model_version": version})
    return StageResult(
        stage=stage,
        status="completed",
        artifact_uri=str(model_dir),
        mlflow_run_id=run_id,
        metrics={k: float(v) for k, v in metrics.items()},
        artifact_id=f"{name}/{version}:{key[:16]}",
    )


def kept_upstream(
    stage: str, upstream: StageResult, run_id: str, metrics: dict[str, float], why: str
) -> StageResult:
    """A gate failed and the stage was told to go on: completed, with `why` as its error and
    the upstream model as its artifact, so downstream stages use the model it did not replace."""
    return StageResult(
        stage=stage,
        status="completed",
        artifact_uri=upstream.artifact_uri,
        mlflow_run_id=run_id,
        metrics=metrics,
        artifact_id=upstream.artifact_id,
        error=why,
    )
