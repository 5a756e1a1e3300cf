"""The whole chain as one Prefect flow: one task per stage, each cached by its key.

Run it:  lifecycle run configs/tiny_cpu.yaml            (the CLI calls `lifecycle_flow`)

For each stage the flow computes a cache key (hash of the stage's config section, its
upstream artifact ids and the code version). A key seen before returns the stored
StageResult with status `cached` and runs nothing; `force` recomputes. A stage whose section
is null is `skipped`. Stages not requested (`stages=[...]`) but needed upstream come from the
cache or from `sources` (`--from data=DIR`). MLflow gets one parent run per flow run; each
stage task opens its own child run under it.

Adding a stage: a task module in tasks/, a section in lifecycle/config.py, a line below.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from lifecycle import tracking
from lifecycle.artifacts import (
    RunContext,
    StageResult,
    cache_key,
    cache_lookup,
    cache_store,
    code_version,
    paths_fingerprint,
)
from lifecycle.config import STAGES, PipelineConfig, config_hash, validate_config
from lifecycle.watermark.keys import key_id, resolve_key
from ray_cluster import metrics as ray_metrics
from ray_cluster.connect import connect, disconnect
from tasks.data import prepare_data
from tasks.distill import distill
from tasks.pretrain import pretrain
from tasks.quantize import model_upstream, quantize
from tasks.rlhf import align
from tasks.sft import finetune
from tasks.watermark import shipped_model, watermark


def _deploy() -> Any:
    from tasks.deploy import deploy  # Ray Serve and FastAPI load only when a run deploys

    return deploy


MISSING = StageResult("missing", "skipped", error="an upstream stage is missing")


class PipelineFailed(RuntimeError):
    """A requested stage failed; `summary` is the run summary that was written."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


DEPENDS: dict[str, tuple[str, ...]] = {
    "data": (),
    "pretrain": ("data",),
    "sft": ("pretrain", "data"),
    "rlhf": ("sft", "data"),
    "distill": ("rlhf",),
    "quantize": ("rlhf", "distill", "data"),
    "watermark": ("rlhf", "distill", "quantize", "data"),
    "deploy": ("rlhf", "distill", "quantize", "watermark", "data"),
}
"""Each stage's upstream stages, whose StageResults it takes (in this order)."""

USED_IF: dict[tuple[str, str], Callable[[PipelineConfig], bool]] = {
    ("sft", "data"): lambda c: c.sft is not None and c.sft.data.pretrain_mix > 0,
    ("rlhf", "data"): lambda c: c.rlhf is not None and c.rlhf.ptx_weight > 0,
}
"""Upstreams a stage reads only under some settings (passed as None otherwise): SFT and
RLHF read the data stage's pretraining text for `pretrain_mix` / `ptx_weight`."""


def uses_upstream(stage: str, up: str, cfg: PipelineConfig | None) -> bool:
    """Whether `stage` reads `up`'s output under `cfg` (None: only the unconditional ones)."""
    when = USED_IF.get((stage, up))
    return when is None or (cfg is not None and when(cfg))


OPTIONAL: dict[str, frozenset[str]] = {
    "quantize": frozenset({"distill"}),
    "watermark": frozenset({"distill", "quantize"}),
    "deploy": frozenset({"distill", "quantize", "watermark"}),
}
"""Upstream stages a stage can do without (passed as None when disabled in the config)."""


def external_inputs(stage: str, cfg: PipelineConfig) -> list[str]:
    """The files and directories outside the workspace that a stage reads."""
    if stage == "data" and cfg.data is not None:
        return [i.path for i in cfg.data.inputs]
    if stage == "sft" and cfg.sft is not None:
        return [i.path for i in cfg.sft.data.inputs]
    if stage == "rlhf" and cfg.rlhf is not None:
        judge = cfg.rlhf.rlaif.llm_judge if cfg.rlhf.rlaif else None
        return [i.path for i in cfg.rlhf.inputs] + ([judge.model_dir] if judge else [])
    return []


def uses_key(stage: str, cfg: PipelineConfig) -> bool:
    """Whether a stage's output depends on the watermark key."""
    return stage == "watermark" or (
        stage in ("sft", "rlhf") and cfg.sft is not None and cfg.sft.fingerprint is not None
    )


def needed_stages(
    requested: list[str], sources: dict[str, str], cfg: PipelineConfig | None = None
) -> set[str]:
    """The requested stages and what they need upstream (under `cfg`, when given), stopping
    at `--from` sources."""
    need: set[str] = set()

    def visit(stage: str) -> None:
        if stage in need:
            return
        need.add(stage)
        if stage not in sources:
            for up in DEPENDS[stage]:
                if uses_upstream(stage, up, cfg):
                    visit(up)

    for stage in requested:
        visit(stage)
    return need


class _Chain:
    """Runs stages in order, keeping the results and deciding cached / skipped / failed."""

    def __init__(
        self,
        cfg: PipelineConfig,
        ctx: RunContext,
        requested: list[str],
        force: bool,
        sources: dict[str, str],
    ) -> None:
        self.cfg, self.ctx, self.requested, self.force = cfg, ctx, requested, force
        self.sources = sources
        self.results: dict[str, StageResult] = {}
        self.log = get_run_logger()
        self.failed = False
        self.started_ray: bool | None = None  # connected lazily: an all-cached run needs no Ray
        self.stage_metrics: list[tuple[str, str, float | None]] = []
        self.seconds: dict[str, float] = {}  # wall time of each stage that ran
        self.ray_connect_s: float | None = None
        self.needed = needed_stages(requested, sources, cfg)

    def close(self) -> None:
        if self.started_ray is not None:
            disconnect(self.started_ray)

    def key(self, stage: str, upstream: list[StageResult]) -> str:
        section = self.cfg.section(stage)
        h = config_hash(section)
        paths = external_inputs(stage, self.cfg)
        if paths:  # the contents of files it reads are part of what a stage depends on
            h = config_hash({"config": h, "inputs": paths_fingerprint(paths)})
        if uses_key(stage, self.cfg):  # the watermark key (its id; never the key itself)
            h = config_hash({"config": h, "key_id": key_id(resolve_key(self.ctx.workspace))})
        return cache_key(stage, h, upstream, self.ctx.code_version)

    def run(
        self, stage: str, call: Callable[[str, list[StageResult]], StageResult]
    ) -> StageResult | None:
        """Runs (or finds in the cache) one stage; `call(key, upstream_results)` runs it."""
        if stage not in self.needed:
            return None
        upstream = DEPENDS[stage]
        section = self.cfg.section(stage)
        if stage in self.sources:
            src = self.sources[stage]
            artifact_id = f"external:{src}"
            if src.startswith("models:/"):  # a registered version (an alias: its version now)
                mv = tracking.model_version_of(self.ctx.tracking_uri, src)
                ref = f"{mv.name}/{mv.version}"
                dest = Path(self.ctx.workspace) / "external" / ref
                src = str(tracking.fetch_model(self.ctx.tracking_uri, f"models:/{ref}", dest))
                artifact_id = f"registry:{ref}"  # lineage: downstream versions name it parent
            res = StageResult(stage, "cached", artifact_uri=src, artifact_id=artifact_id)
            self.results[stage] = res
            return res
        optional = OPTIONAL.get(stage, frozenset())
        ups = [
            None
            if (u in optional and self._disabled(u)) or not uses_upstream(stage, u, self.cfg)
            else self.results.get(u, MISSING if u not in optional else None)
            for u in upstream
        ]
        present = [u for u in ups if u is not None]
        if section is None or any(u is MISSING for u in ups):
            why = "disabled in the config" if section is None else "an upstream stage is missing"
            return self._finish(stage, StageResult(stage, "skipped", error=why))
        if self.failed or any(u.status in ("failed", "skipped") for u in present):
            return self._finish(stage, StageResult(stage, "skipped", error="upstream failed"))
        key = self.key(stage, present)
        cached = (
            None
            if (self.force and stage in self.requested)
            else cache_lookup(self.ctx.workspace, stage, key)
        )
        if cached is not None:
            self.log.info("%s: cached (run %s)", stage, cached.mlflow_run_id)
            return self._finish(stage, cached)
        if stage not in self.requested:
            raise ValueError(
                f"stage {stage!r} is needed upstream but has no cached result for this config; "
                f"add it to --stages or pass --from {stage}=PATH"
            )
        if self.force:
            shutil.rmtree(
                Path(self.ctx.ray_storage) / self.ctx.train_name(stage, key), ignore_errors=True
            )
        self.log.info("%s: running", stage)
        t0 = time.time()
        try:
            if self.started_ray is None:
                t_ray = time.time()
                self.started_ray = connect(self.cfg.cluster)
                self.ray_connect_s = time.time() - t_ray
                self._flush_metrics()
            res = call(key, ups)
        except Exception as e:
            self.log.error("%s: failed: %s", stage, e)
            self.failed = True
            return self._finish(
                stage,
                StageResult(stage, "failed", error=f"{type(e).__name__}: {e}"),
                time.time() - t0,
            )
        cache_store(self.ctx.workspace, stage, key, res)
        self.log.info("%s: completed in %.1fs", stage, time.time() - t0)
        return self._finish(stage, res, time.time() - t0)

    def _flush_metrics(self) -> None:
        """Stage status/duration as Ray metrics, once Ray is up (cached stages come first)."""
        if self.started_ray is None:
            return
        for args in self.stage_metrics:
            ray_metrics.stage_finished(*args)
        self.stage_metrics.clear()

    def _disabled(self, stage: str) -> bool:
        res = self.results.get(stage)
        return self.cfg.section(stage) is None or (res is not None and res.status == "skipped")

    def _finish(self, stage: str, res: StageResult, seconds: float | None = None) -> StageResult:
        self.results[stage] = res
        if seconds is not None:
            self.seconds[stage] = seconds
        self.stage_metrics.append((stage, res.status, seconds))
        self._flush_metrics()
        tags = {f"lifecycle.stage.{stage}.status": res.status}
        if res.mlflow_run_id:
            tags[f"lifecycle.stage.{stage}.run_id"] = res.mlflow_run_id
        tracking.set_tags(self.ctx.tracking_uri, self.ctx.parent_run_id, tags)
        if stage in self.requested:
            create_markdown_artifact(
                stage_markdown(res, self.ctx),
                key=f"{stage}-{slug(self.ctx.run_name)}",
                description=f"{stage}: {res.status}",
            )
        return res


def slug(text: str) -> str:
    """Lowercase letters, digits and dashes (what Prefect accepts as an artifact key)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "run"


def mlflow_run_url(ctx: RunContext, run_id: str) -> str:
    """The run's page in the MLflow UI (for a file/SQLite store: the default local UI)."""
    uri = ctx.tracking_uri
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{ctx.experiment_id}/runs/{run_id}"


def stage_markdown(res: StageResult, ctx: RunContext) -> str:
    """The Prefect artifact of a stage: status, its MLflow run, artifact and metrics."""
    lines = [f"# {res.stage}: {res.status}", ""]
    if res.error:
        lines += [f"**{res.error}**", ""]
    if res.mlflow_run_id:
        lines.append(f"MLflow run: [{res.mlflow_run_id}]({mlflow_run_url(ctx, res.mlflow_run_id)})")
    if res.artifact_uri:
        lines.append(f"Artifact: `{res.artifact_uri}`")
    if res.metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in sorted(res.metrics.items())]
    return "\n".join(lines) + "\n"


def endpoint(chain: _Chain, cfg: PipelineConfig, uri: str) -> dict[str, Any] | None:
    """Where the deploy stage served the champion: URL, model version, whether it still
    serves (only with `deploy.keep_serving` on a persistent cluster: a local Ray ends with the
    run; `lifecycle serve` or `lifecycle run --serve` serve on)."""
    dep = chain.results.get("deploy")
    if dep is None or dep.status not in ("completed", "cached") or not dep.mlflow_run_id:
        return None
    tags = tracking.get_run(uri, dep.mlflow_run_id).data.tags
    keep = cfg.deploy is not None and cfg.deploy.keep_serving and cfg.cluster.address is not None
    return {
        "url": tags.get("lifecycle.endpoint"),
        "model": tags.get("lifecycle.serving_model"),
        "serving": keep and dep.status == "completed",
    }


MODEL_STAGES = ("pretrain", "sft", "rlhf", "distill", "quantize")
"""Stages whose artifact is the model to ship (the last one that completed wins)."""


def _ok(r: StageResult) -> bool:
    """Completed, cached, or switched off in the config."""
    return r.status in ("completed", "cached") or (
        r.status == "skipped" and r.error == "disabled in the config"
    )


@flow(name="lifecycle")
def lifecycle_flow(
    config: dict[str, Any],
    workspace: str = ".lifecycle",
    run_name: str | None = None,
    stages: list[str] | None = None,
    force: bool = False,
    sources: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Runs the chain described by `config` (a raw config dict, validated here)."""
    t_start = time.time()
    cfg = validate_config(config)
    ws = Path(workspace).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    run_name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    requested = list(stages or STAGES)
    unknown = sorted(set(requested) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}: choose from {list(STAGES)}")
    sources = dict(sources or {})

    uri = cfg.tracking.tracking_uri or tracking.default_tracking_uri(ws)
    exp_id = tracking.ensure_experiment(uri, cfg.tracking.experiment, ws / "mlartifacts")
    code = code_version()
    parent = tracking.start_run(
        uri,
        exp_id,
        run_name,
        tags={
            "lifecycle.run_name": run_name,
            "lifecycle.code_version": code,
            "lifecycle.config_hash": config_hash(cfg),
            "lifecycle.stages": ",".join(requested),
            "lifecycle.prefect_flow_run_id": str(flow_run.id),
        },
    )
    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json"))
    tracking.log_text_file(uri, parent, config_yaml, "config.yaml")
    run_dir = ws / "runs" / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_yaml)  # what `lifecycle run --resume` reruns
    ctx = RunContext(
        run_name=run_name,
        workspace=str(ws),
        tracking_uri=uri,
        experiment_id=exp_id,
        parent_run_id=parent,
        registered_model=cfg.tracking.registered_model,
        code_version=code,
        checkpoint_copy_max_mb=cfg.tracking.checkpoint_copy_max_mb,
    )
    opts = {"retries": cfg.flow.retries, "retry_delay_seconds": cfg.flow.retry_delay_s}
    chain = _Chain(cfg, ctx, requested, force, sources)
    # The SFT fingerprint's trigger count: RLHF keeps the triggers, watermark checks them.
    triggers = cfg.sft.fingerprint.num_triggers if cfg.sft and cfg.sft.fingerprint else None
    try:
        chain.run("data", lambda key, up: prepare_data.with_options(**opts)(cfg.data, ctx, key))
        chain.run(
            "pretrain",
            lambda key, up: pretrain.with_options(**opts)(cfg.pretrain, up[0], ctx, key),
        )
        chain.run(
            "sft",
            lambda key, up: finetune.with_options(**opts)(cfg.sft, up[0], ctx, key, data=up[1]),
        )
        chain.run(
            "rlhf",
            lambda key, up: align.with_options(**opts)(
                cfg.rlhf, up[0], ctx, key, triggers, data=up[1]
            ),
        )
        chain.run(
            "distill",
            lambda key, up: distill.with_options(**opts)(cfg.distill, up[0], ctx, key),
        )
        chain.run(
            "quantize",
            lambda key, up: quantize.with_options(**opts)(
                cfg.quantize, model_upstream(up[0], up[1]), up[2], ctx, key
            ),
        )
        chain.run(
            "watermark",
            lambda key, up: watermark.with_options(**opts)(
                cfg.watermark,
                up[0],
                shipped_model(up[2], up[1], up[0]),
                up[3],
                ctx,
                key,
                triggers,
            ),
        )
        chain.run(
            "deploy",
            lambda key, up: _deploy().with_options(**opts)(
                cfg.deploy,
                shipped_model(up[2], up[1], up[0]),
                cfg.watermark if up[3] is not None else None,
                up[4],
                ctx,
                key,
            ),
        )
    except BaseException:
        tracking.end_run(uri, parent, "FAILED")  # e.g. a needed upstream result is missing
        raise
    finally:
        chain.close()

    shown = [chain.results[s] for s in STAGES if s in requested and s in chain.results]
    ok = all(_ok(r) for r in shown)
    shipped = next(
        (
            chain.results[s].artifact_uri
            for s in reversed(MODEL_STAGES)
            if s in chain.results and chain.results[s].status in ("completed", "cached")
        ),
        None,
    )
    summary = {
        "run_name": run_name,
        "shipped_model": shipped,
        "status": "completed" if ok else "failed",
        "mlflow": {"tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent},
        "prefect_flow_run_id": str(flow_run.id),
        "endpoint": endpoint(chain, cfg, uri),
        "seconds": round(time.time() - t_start, 3),
        "ray_connect_s": chain.ray_connect_s,
        "stages": [
            {
                **{
                    k: r.to_dict()[k]
                    for k in (
                        "stage",
                        "status",
                        "artifact_uri",
                        "mlflow_run_id",
                        "metrics",
                        "error",
                    )
                },
                "seconds": chain.seconds.get(r.stage),
            }
            for r in shown
        ],
    }
    out = ws / "runs" / run_name / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    tracking.log_artifact(uri, parent, out)
    tracking.end_run(uri, parent, "FINISHED" if ok else "FAILED")
    if not ok:
        bad = [r.stage for r in shown if not _ok(r)]
        raise PipelineFailed(f"stages not completed: {', '.join(bad)}", summary)
    return summary
