"""The whole chain as one Prefect flow: one task per stage, each cached by its key.

Run it:  lifecycle run configs/tiny_cpu.yaml            (the CLI calls `lifecycle_flow`)

For each stage the flow computes a cache key (hash of the stage's config section, its
upstream artifact ids and the code version). A key seen before returns the stored
StageResult with status `cached` and runs nothing; `force` recomputes. A stage whose section
is null is `skipped`. Stages not requested (`stages=[...]`) but needed upstream come from the
cache or from `sources` (`--from data=DIR`). MLflow gets one parent run per flow run; each
stage task opens its own child run under it.

The stage graph (order, upstreams, which task, what it is passed) is lifecycle/stages.py's
table; this module only walks it. Adding a stage: see that module's docstring.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import time
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
    check_run_name,
    code_version,
    paths_fingerprint,
    workspace_lock,
    write_atomic,
)
from lifecycle.config import PipelineConfig, config_hash, validate_config
from lifecycle.registry import fetch_version
from lifecycle.stages import (
    BY_NAME,
    STAGE_TABLE,
    STAGES,
    Stage,
    model_stages,
    needed_stages,
    uses_upstream,
)
from lifecycle.watermark.keys import key_id, resolve_key
from ray_cluster import metrics as ray_metrics
from ray_cluster.connect import connect, disconnect


def task_of(st: Stage) -> Any:
    """The stage's Prefect task, imported when it runs (Ray Serve, vLLM and FastAPI load
    only in a run that deploys)."""
    module, name = st.task.split(":")
    return getattr(importlib.import_module(module), name)


REQUEST_FILE = "request.json"
"""Beside a run's config.yaml: the stages (null: all) and `--from` sources it was asked for."""

MISSING = StageResult("missing", "skipped", error="an upstream stage is missing")


class PipelineFailed(RuntimeError):
    """A requested stage failed; `summary` is the run summary that was written."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


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
        st = BY_NAME[stage]
        h = config_hash(self.cfg.section(stage))
        paths = st.inputs(self.cfg)
        if paths:  # the contents of files it reads are part of what a stage depends on
            h = config_hash({"config": h, "inputs": paths_fingerprint(paths)})
        if st.uses_key(self.cfg):  # the watermark key (its id; never the key itself)
            h = config_hash({"config": h, "key_id": key_id(resolve_key(self.ctx.workspace))})
        return cache_key(stage, h, upstream, self.ctx.code_version)

    def _stand_in(self, st: Stage, upstream: list[StageResult]) -> StageResult | None:
        """The cached result of the stage's stand-in config, if it has one and it passes."""
        alt = st.stand_in(self.cfg)
        if alt is None:
            return None
        given = self.cfg
        self.cfg = alt.config
        try:
            cached = cache_lookup(self.ctx.workspace, st.name, self.key(st.name, upstream))
        finally:
            self.cfg = given
        return cached if cached is not None and alt.accepts(cached) else None

    def run(self, st: Stage, opts: dict[str, Any]) -> StageResult | None:
        """Runs (or finds in the cache) one stage: its task is called with its section, the
        run context, its cache key, its upstream results by name and its extras."""
        stage = st.name
        if stage not in self.needed:
            return None
        section = self.cfg.section(stage)
        if stage in self.sources:
            src = self.sources[stage]
            artifact_id = f"external:{src}"
            if src.startswith("models:/"):  # a registered version (an alias: its version now)
                mv, local = fetch_version(
                    self.ctx.tracking_uri, src, Path(self.ctx.workspace) / "external"
                )
                src = str(local)
                artifact_id = f"registry:{mv.name}/{mv.version}"  # downstream names it parent
            res = StageResult(stage, "cached", artifact_uri=src, artifact_id=artifact_id)
            self.results[stage] = res
            return res
        ups = {
            u: None
            if (u in st.optional and self._disabled(u)) or not uses_upstream(stage, u, self.cfg)
            else self.results.get(u, MISSING if u not in st.optional else None)
            for u in st.upstream
        }
        present = [u for u in ups.values() if u is not None]
        if section is None or any(u is MISSING for u in ups.values()):
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
        if cached is None and stage not in self.requested:
            cached = self._stand_in(st, present)
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
            res = task_of(st).with_options(**opts)(
                section, self.ctx, key, **ups, **st.extras(self.cfg)
            )
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
        if res.status == "completed" and res.mlflow_run_id:
            self._report(res)
        if stage in self.requested:
            create_markdown_artifact(
                stage_markdown(res, self.ctx),
                key=f"{stage}-{slug(self.ctx.run_name)}",
                description=f"{stage}: {res.status}",
            )
        return res

    def _report(self, res: StageResult) -> None:
        """The stage's before/after chart in its MLflow run (report/before_after.png). A
        chart that cannot be drawn is a warning, not a failed stage: the model is made."""
        import tempfile

        from lifecycle.eval.report import before_after, before_after_png

        pairs = before_after(res.metrics)
        if not pairs:
            return
        try:
            with tempfile.TemporaryDirectory() as d:
                png = before_after_png(
                    pairs, f"{res.stage}: before -> after", Path(d) / "before_after.png"
                )
                tracking.log_artifact(self.ctx.tracking_uri, res.mlflow_run_id, png, "report")
        except Exception as e:  # reported; the stage's result stands
            self.log.warning(f"{res.stage}: before/after chart not recorded: {e!r}")


def slug(text: str) -> str:
    """Lowercase letters, digits and dashes (what Prefect accepts as an artifact key)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "run"


def mlflow_run_url(ctx: RunContext, run_id: str) -> str:
    """The run's page in the MLflow UI (for a file/SQLite store: the default local UI)."""
    uri = re.sub(r"^(https?://)[^/@]*@", r"\1", ctx.tracking_uri)  # never a user or password
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
    from lifecycle.eval.report import before_after, before_after_markdown

    pairs = before_after(res.metrics)
    if pairs:
        lines += ["", "## Before -> after", "", before_after_markdown(pairs)]
        if res.mlflow_run_id and res.status == "completed":
            lines.append("Chart: `report/before_after.png` in the MLflow run.")
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
    """Runs the chain described by `config` (a raw config dict, validated here), as the one
    writer of its workspace (a second run there stops at once, naming this one)."""
    t_start = time.time()
    cfg = validate_config(config)
    ws = Path(workspace).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    run_name = check_run_name(run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    requested = list(stages or STAGES)
    unknown = sorted(set(requested) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}: choose from {list(STAGES)}")
    if "deploy" in requested and cfg.deploy is not None:
        from ray_cluster.serve import check_open_bind

        check_open_bind(cfg.deploy.serve)  # now, not after hours of training
    with workspace_lock(ws, f"lifecycle run {run_name}"):
        return _run_chain(cfg, ws, run_name, requested, stages, force, dict(sources or {}), t_start)


def _run_chain(
    cfg: PipelineConfig,
    ws: Path,
    run_name: str,
    requested: list[str],
    stages: list[str] | None,
    force: bool,
    sources: dict[str, str],
    t_start: float,
) -> dict[str, Any]:

    uri = tracking.resolve_uri(cfg.tracking.tracking_uri, ws)
    exp_id = tracking.ensure_experiment(uri, cfg.tracking.experiment, ws / "mlartifacts")
    code = code_version()
    orphans = tracking.end_orphaned_runs(uri, exp_id)
    if orphans:
        get_run_logger().warning(
            "marked %d MLflow run(s) KILLED: their `lifecycle run` process on this host is "
            "gone (%s)",
            len(orphans),
            ", ".join(orphans),
        )
    parent = tracking.start_run(
        uri,
        exp_id,
        run_name,
        tags={
            tracking.OWNER_TAG: tracking.owner_tag(),
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
    # What `lifecycle run --resume` reruns: the config, and the stages and sources asked for.
    write_atomic(run_dir / "config.yaml", config_yaml)
    request = {"stages": stages, "sources": sources}
    write_atomic(run_dir / REQUEST_FILE, json.dumps(request, indent=2))
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
    try:
        for st in STAGE_TABLE:
            chain.run(st, opts)
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
            for s in reversed(model_stages())
            if s in chain.results and chain.results[s].status in ("completed", "cached")
        ),
        None,
    )
    summary = {
        "run_name": run_name,
        "shipped_model": shipped,
        "status": "completed" if ok else "failed",
        "mlflow": {
            "tracking_uri": tracking.redact(uri),
            "experiment_id": exp_id,
            "parent_run_id": parent,
        },
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
    write_atomic(out, json.dumps(summary, indent=2))
    tracking.log_artifact(uri, parent, out)
    tracking.end_run(uri, parent, "FINISHED" if ok else "FAILED")
    if not ok:
        bad = [r.stage for r in shown if not _ok(r)]
        raise PipelineFailed(f"stages not completed: {', '.join(bad)}", summary)
    return summary
