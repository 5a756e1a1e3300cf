"""The model registry as the project uses it: names, lineage, the champion alias and its
history, and the settings a served version carries.

    from lifecycle import registry
    registry.champion_version(uri, "tiny-llm")          # the version `@champion` names
    registry.rollback(uri, "tiny-llm")                  # `lifecycle rollback`
    registry.resolve_model("models:/tiny-llm@champion", uri, workspace)

- Every model stage registers its model as `<tracking.registered_model>-<suffix>` (suffix in
  lifecycle/stages.py) with lineage tags (`lifecycle.parent_model` = `NAME/VERSION` of the
  model it came from, or `external:<dir>` for one from outside the registry).
- The deploy stage registers each candidate as a version of `<tracking.registered_model>`
  (the serving registry: its source is the shipped stage's version, not a copy), tagged with
  the dataset it was trained on (`lifecycle.data_manifest_sha256`) and the watermark
  settings (`lifecycle.watermark.*`, never the key: its id only).
- `@champion` is what serving follows; every move is appended to the registered model's
  `lifecycle.champion_history` tag, which `rollback` walks back.

MLflow itself is reached only through lifecycle/tracking.py.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lifecycle import tracking
from lifecycle.artifacts import RunContext, StageResult
from lifecycle.config import ServeConfig, config_hash
from lifecycle.stages import STAGES, stage, trainable_stages
from lifecycle.watermark.keys import KEY_ENV, KEY_FILE_ENV, key_id, load_key

CHAMPION = "champion"
HISTORY_TAG = "lifecycle.champion_history"
DATA_TAG = "lifecycle.data_manifest_sha256"
"""On every candidate version: the dataset it was trained on (`lifecycle/retrain` compares)."""
WATERMARK_PREFIX = "lifecycle.watermark."


# --------------------------------------------------------------------------------------------
# Stage models: registration and lineage
# --------------------------------------------------------------------------------------------


def registered_name(ctx: RunContext, stage_name: str) -> str:
    suffix = stage(stage_name).registry_suffix
    if suffix is None:
        raise ValueError(f"stage {stage_name!r} registers no model")
    return f"{ctx.registered_model}-{suffix}"


def parent_model(ctx: RunContext, upstream: StageResult) -> str:
    """`NAME/VERSION` of the model version the upstream stage registered, or
    `external:<dir>` for a model that came from outside the run and the registry (`--from`)."""
    if upstream.artifact_id and upstream.artifact_id.startswith("registry:"):
        return upstream.artifact_id.removeprefix("registry:")  # `--from STAGE=models:/...`
    version = ""
    if upstream.mlflow_run_id:
        tags = tracking.get_run(ctx.tracking_uri, upstream.mlflow_run_id).data.tags
        version = tags.get("lifecycle.model_version", "")
    suffix = stage(upstream.stage).registry_suffix if upstream.stage in STAGES else None
    if version and suffix is not None:
        return f"{registered_name(ctx, upstream.stage)}/{version}"
    return f"external:{upstream.artifact_uri}"


def lineage_tags(
    ctx: RunContext, stage_name: str, cfg: BaseModel, upstream: StageResult, **extra: Any
) -> dict[str, str]:
    """The tags a stage's run and its registered model version carry."""
    return {
        "lifecycle.stage": stage_name,
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
    stage_name: str,
    model_dir: Path,
    lineage: dict[str, str],
    description: str,
    metrics: dict[str, float],
    key: str,
) -> StageResult:
    """Registers `model_dir` as the stage's model version, tags the run with it, and returns
    the completed StageResult pointing at it."""
    name = registered_name(ctx, stage_name)
    version = tracking.register_model(
        ctx.tracking_uri, run_id, name, model_dir, lineage, description=description
    )
    tracking.set_tags(ctx.tracking_uri, run_id, {**lineage, "lifecycle.model_version": version})
    return StageResult(
        stage=stage_name,
        status="completed",
        artifact_uri=str(model_dir),
        mlflow_run_id=run_id,
        metrics={k: float(v) for k, v in metrics.items()},
        artifact_id=f"{name}/{version}:{key[:16]}",
    )


def kept_upstream(
    stage_name: str, upstream: StageResult, run_id: str, metrics: dict[str, float], why: str
) -> StageResult:
    """A gate failed and the stage was told to go on: completed, with `why` as its error and
    the upstream model as its artifact, so downstream stages use the model it did not replace."""
    return StageResult(
        stage=stage_name,
        status="completed",
        artifact_uri=upstream.artifact_uri,
        mlflow_run_id=run_id,
        metrics=metrics,
        artifact_id=upstream.artifact_id,
        error=why,
    )


# --------------------------------------------------------------------------------------------
# Fetching registered versions into the workspace
# --------------------------------------------------------------------------------------------


def fetch_version(tracking_uri: str, model_uri: str, dest_root: str | Path) -> tuple[Any, Path]:
    """(ModelVersion, local dir) of `models:/NAME/VERSION` or `models:/NAME@ALIAS` (an alias is
    resolved to its version now), downloaded once into `<dest_root>/NAME/VERSION`."""
    mv = tracking.model_version_of(tracking_uri, model_uri)
    dest = Path(dest_root) / mv.name / str(mv.version)
    return mv, tracking.fetch_model(tracking_uri, f"models:/{mv.name}/{mv.version}", dest)


def resolve_model(model: str, tracking_uri: str, workspace: Path) -> tuple[Path, str, dict]:
    """(local dir, version label, model-version tags) of a model reference: a registry URI
    (fetched into `<workspace>/serving/`) or a local model directory."""
    if not model.startswith("models:/"):
        d = Path(model).resolve()
        if not (d / "config.json").is_file():
            raise ValueError(f"{model}: not a model directory (no config.json)")
        return d, f"dir:{d.name}", {}
    mv, d = fetch_version(tracking_uri, model, workspace / "serving")
    return d, f"{mv.name}/{mv.version}", dict(mv.tags)


_RUN_REF = re.compile(r"runs:/([0-9a-f]{32})/([\w.-]+(?:/[\w.-]+)*)")


def resolve_adapter(ref: str, tracking_uri: str, workspace: Path) -> Path:
    """The local dir of a PEFT adapter named by `ref`: a registered version
    (`models:/NAME/VERSION`, `models:/NAME@ALIAS`) or a run's artifact dir (`runs:/RUN_ID/adapter`,
    where the SFT stage logs its adapter), fetched into `<workspace>/serving/`, or a local dir.
    ValueError when it is not an adapter (no adapter_config.json)."""
    if ref.startswith("models:/"):
        _, d = fetch_version(tracking_uri, ref, workspace / "serving")
    elif ref.startswith("runs:/"):
        m = _RUN_REF.fullmatch(ref)
        if m is None or ".." in m.group(2).split("/"):
            raise ValueError(f"{ref}: not an adapter reference runs:/<32-hex run id>/<path>")
        dest = workspace / "serving" / "runs" / m.group(1) / m.group(2)
        d = tracking.fetch_run_artifacts(tracking_uri, ref, dest)
    else:
        d = Path(ref).resolve()
    if not (d / "adapter_config.json").is_file():
        raise ValueError(f"{ref}: not a PEFT adapter (no adapter_config.json in {d})")
    return d


def with_adapters(serve_cfg: ServeConfig, tracking_uri: str, workspace: Path) -> ServeConfig:
    """`serve_cfg` with every LoRA adapter reference (deploy.serve.lora.adapters) made a local
    dir by `resolve_adapter`: what the replicas load."""
    if serve_cfg.lora is None or not serve_cfg.lora.adapters:
        return serve_cfg
    adapters = {
        k: str(resolve_adapter(v, tracking_uri, workspace))
        for k, v in serve_cfg.lora.adapters.items()
    }
    lora = serve_cfg.lora.model_copy(update={"adapters": adapters})
    return serve_cfg.model_copy(update={"lora": lora})


def trainable_base(tracking_uri: str, model_uri: str) -> str:
    """`NAME/VERSION` of the model a retrain starts from: `model_uri` itself when it is a
    version of a trainable stage (full-precision weights), else the nearest such ancestor in
    its lineage (the champion is usually a quantized model: retraining starts from the
    weights it came from)."""
    trainable = trainable_stages()
    mv = tracking.model_version_of(tracking_uri, model_uri)
    path = []
    while True:
        stage_name = mv.tags.get("lifecycle.stage", "?")
        if stage_name in trainable:
            return f"{mv.name}/{mv.version}"
        path.append(f"{mv.name}/{mv.version} ({stage_name})")
        parent = mv.tags.get("lifecycle.parent_model", "")
        if not parent or parent.startswith("external:") or len(path) > 16:
            raise ValueError(
                f"{model_uri}: no trainable model in its lineage ({' <- '.join(path)}"
                f"{' <- ' + parent if parent else ''}): pass base_model=models:/NAME/VERSION"
            )
        mv = tracking.model_version_of(tracking_uri, f"models:/{parent}")


# --------------------------------------------------------------------------------------------
# The serving registry: candidates, champion, history, rollback
# --------------------------------------------------------------------------------------------


def data_manifest_sha256(data_dir: str | Path | None) -> str:
    """The content id of a data stage's output (its manifest's sha256)."""
    return json.loads((Path(str(data_dir)) / "manifest.json").read_text())["sha256"]


def register_candidate(
    tracking_uri: str,
    run_id: str,
    name: str,
    shipped: StageResult,
    source_ref: str,
    tags: dict[str, str],
) -> str:
    """A new version of the serving registry `name`: the shipped stage's registered version
    as its source (`source_ref` = NAME/VERSION), or a copy of a model from outside."""
    if source_ref.startswith("external:"):
        return tracking.register_model(tracking_uri, run_id, name, shipped.artifact_uri, tags)
    src_name, src_version = source_ref.rsplit("/", 1)
    src = tracking.model_version(tracking_uri, src_name, src_version)
    if tracking.DIGEST_TAG in src.tags:  # the same files: the same digest
        tags = {**tags, tracking.DIGEST_TAG: src.tags[tracking.DIGEST_TAG]}
    return tracking.create_version(tracking_uri, name, src.source, run_id, tags)


def champion_version(tracking_uri: str, name: str) -> Any | None:
    """The model version the `champion` alias points at, or None."""
    return tracking.version_by_alias(tracking_uri, name, CHAMPION)


def champion_history(tracking_uri: str, name: str) -> list[str]:
    """Versions that were champion, oldest first (the last one is the champion)."""
    tags = tracking.registered_model_tags(tracking_uri, name)
    if tags is None:
        raise ValueError(f"no registered model {name!r} at {tracking_uri}: deploy first")
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def set_champion(tracking_uri: str, name: str, version: str, push: bool = True) -> None:
    """Moves the alias; `push` records the version in the history (rollback pops it)."""
    hist = champion_history(tracking_uri, name)
    if push:
        hist.append(str(version))
    tracking.set_alias(tracking_uri, name, CHAMPION, str(version))
    tracking.set_registered_model_tag(tracking_uri, name, HISTORY_TAG, json.dumps(hist))


def rollback(tracking_uri: str, name: str) -> tuple[str, str]:
    """Moves `champion` back to the previous one; returns (from_version, to_version)."""
    hist = champion_history(tracking_uri, name)
    if len(hist) < 2:
        raise ValueError(
            f"{name}: no earlier champion to roll back to (champion history {hist or 'empty'})"
        )
    current, previous = hist[-1], hist[-2]
    tracking.set_alias(tracking_uri, name, CHAMPION, previous)
    tracking.set_registered_model_tag(tracking_uri, name, HISTORY_TAG, json.dumps(hist[:-1]))
    tracking.set_model_version_tags(
        tracking_uri, name, current, {"lifecycle.promotion": "rolled_back"}
    )
    return current, previous


def last_trained_data(tracking_uri: str, name: str) -> tuple[str, str] | None:
    """(version, dataset sha256) of the newest version of `name` that records its data."""
    versions = tracking.search_versions(tracking_uri, name)
    tagged = [(int(v.version), v.tags[DATA_TAG]) for v in versions if DATA_TAG in v.tags]
    if not tagged:
        return None
    version, sha = max(tagged)
    return str(version), sha


# --------------------------------------------------------------------------------------------
# The watermark a served version carries
# --------------------------------------------------------------------------------------------


def watermark_tags(settings: dict[str, Any], kid: str) -> dict[str, str]:
    """The `lifecycle.watermark.*` tags of a version: settings and the key's id (never the key)."""
    return {
        **{f"{WATERMARK_PREFIX}{k}": str(v) for k, v in settings.items()},
        f"{WATERMARK_PREFIX}key_id": kid,
    }


def watermark_settings(mv_tags: dict[str, str]) -> dict[str, float] | None:
    """The `lifecycle.watermark.*` tags of a model version as the server's settings."""
    if f"{WATERMARK_PREFIX}gamma" not in mv_tags:
        return None
    return {
        "gamma": float(mv_tags[f"{WATERMARK_PREFIX}gamma"]),
        "delta": float(mv_tags[f"{WATERMARK_PREFIX}delta"]),
        "z_threshold": float(mv_tags.get(f"{WATERMARK_PREFIX}z_threshold", 4.0)),
    }


def key_file_for(workspace: str | Path, want_key_id: str | None) -> str | None:
    """The watermark key file the server's engine reads (None: $LIFECYCLE_WATERMARK_KEY in
    the environment); checks that the key is the one the model version was verified with."""
    path = os.environ.get(KEY_FILE_ENV) or (
        None if os.environ.get(KEY_ENV) else str(Path(workspace) / "watermark.key")
    )
    key = load_key(path)
    if want_key_id and key_id(key) != want_key_id:
        raise ValueError(
            f"the watermark key here (id {key_id(key)}) is not the one this model version was "
            f"checked with (id {want_key_id}): set {KEY_FILE_ENV} to that key's file"
        )
    return str(Path(path).resolve()) if path else None
