"""The Prefect deployments: `lifecycle/full`, `lifecycle/retrain` and `lifecycle/redeploy`.

prefect.yaml lists them; `lifecycle schedule CONFIG` registers them with a Prefect server
(the retrain cron from the config's `operations.retrain`), a process worker runs them:

    prefect server start                                   # UI: http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    lifecycle schedule configs/tiny_cpu.yaml               # or: prefect deploy --all
    prefect worker start --pool lifecycle
    prefect deployment run lifecycle/retrain --param data_source=/data/new.txt

Run one alone, without a server (Prefect's ephemeral API), e.g. a retrain:

    python -c "from flows.deployments import retrain; print(retrain(data_source='new.txt'))"

- full: the whole chain of one config (`lifecycle run` as a deployment).
- retrain: the champion's trainable weights (its lineage's last unquantized model) + the data
  stage with a new source → if the dataset's manifest sha256 equals the one the newest
  candidate was trained on, it ends early and says so; else sft → rlhf → (distill) →
  quantize → watermark → deploy (evaluation against the champion, gated promotion) → the
  workspace's server rolls over to the new champion with no downtime (or one is started).
- redeploy: the workspace's server serves the champion (optionally after moving the alias to
  a given version): a rolling update, or a new server when none runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.chain import lifecycle_flow, slug
from flows.serving import follow_champion
from lifecycle import tracking
from lifecycle.config import PipelineConfig, find_config, load_config
from lifecycle.registry import (
    champion_version,
    data_manifest_sha256,
    fetch_version,
    last_trained_data,
    set_champion,
    trainable_base,
)
from lifecycle.stages import retrain_stages

ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = ROOT / "prefect.yaml"
DEFAULT_CONFIG = "configs/tiny_cpu.yaml"


def _load(config: str, overrides: list[str] | None) -> tuple[Path, PipelineConfig]:
    path = find_config(config).resolve()
    return path, load_config(path, overrides or [])


def _uri(cfg: PipelineConfig, workspace: str) -> str:
    return tracking.resolve_uri(cfg.tracking.tracking_uri, Path(workspace).resolve())


@flow(name="lifecycle", log_prints=True)
def full(
    config: str = DEFAULT_CONFIG,
    workspace: str = ".lifecycle",
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """The chain of one config file (or `stages` of it), as `lifecycle run` runs it."""
    _, cfg = _load(config, overrides)
    return lifecycle_flow(
        config=cfg.model_dump(mode="json"), workspace=workspace, stages=stages, force=force
    )


@flow(name="lifecycle", log_prints=True)
def retrain(
    config: str = DEFAULT_CONFIG,
    workspace: str = ".lifecycle",
    data_source: str | None = None,
    data_format: str | None = None,
    base_model: str | None = None,
    overrides: list[str] | None = None,
    always: bool = False,
    serve: bool | None = None,
) -> dict[str, Any]:
    """Retrains the champion on the config's data plus `data_source`; see the module doc.
    `always` retrains even when the data did not change; `serve` (default: the config's
    operations.retrain.serve) starts a server for the champion when none runs."""
    log = get_run_logger()
    config_path, cfg = _load(config, overrides)
    missing = [s for s in ("data", "sft", "deploy") if cfg.section(s) is None]
    if missing:
        raise ValueError(f"retrain needs the {', '.join(missing)} section(s) of {config_path}")
    op = cfg.operations.retrain
    ws = Path(workspace).resolve()
    uri, name = _uri(cfg, workspace), cfg.tracking.registered_model
    source = data_source or op.data_source
    if source is not None and not Path(source).exists():
        raise ValueError(f"data_source {source}: no such file or directory")
    base = trainable_base(uri, base_model or f"models:/{name}@champion")
    _, base_dir = fetch_version(uri, f"models:/{base}", ws / "external")

    raw = cfg.model_dump(mode="json")
    if source is not None:
        fmt = data_format or op.data_format
        raw["data"]["inputs"].append({"path": str(Path(source).resolve()), "format": fmt})
    raw["data"]["tokenizer"]["path"] = str(base_dir)  # the base model's vocabulary
    run_name = f"{cfg.name}-retrain-{time.strftime('%Y%m%d-%H%M%S')}"
    data = lifecycle_flow(
        config=raw, workspace=workspace, run_name=f"{run_name}-data", stages=["data"]
    )
    sha = data_manifest_sha256(data["stages"][0]["artifact_uri"])
    last = last_trained_data(uri, name)
    result: dict[str, Any] = {
        "run_name": run_name,
        "base_model": base,
        "data_source": source,
        "data_manifest_sha256": sha,
        "last_trained": {"version": last[0], "data_manifest_sha256": last[1]} if last else None,
    }
    if last is not None and last[1] == sha and not always:
        result["status"] = "unchanged"
        result["message"] = (
            f"data unchanged (manifest {sha[:12]}, as for {name} version {last[0]}): "
            "nothing to retrain"
        )
    else:
        summary = lifecycle_flow(
            config=raw,
            workspace=workspace,
            run_name=run_name,
            stages=retrain_stages(),
            sources={"pretrain": f"models:/{base}"},
        )
        dep = next(s for s in summary["stages"] if s["stage"] == "deploy")
        candidate = f"{name}/{int(dep['metrics']['promotion/version'])}"
        promoted = dep["metrics"]["promotion/promoted"] == 1.0
        champ = champion_version(uri, name)
        result.update(
            status="promoted" if promoted else "rejected",
            candidate=candidate,
            champion=f"{name}/{champ.version}",
            reasons=dep["error"],
            message=f"{candidate} "
            + ("promoted to champion" if promoted else f"not promoted: {dep['error']}"),
        )
        start = op.serve if serve is None else serve
        result["endpoint"] = follow_champion(
            cfg, config_path, list(overrides or []), workspace, start
        )
    log.info("retrain %s: %s", run_name, result["message"])
    _publish(ws, run_name, "retrain", result)
    return result


@flow(name="lifecycle", log_prints=True)
def redeploy(
    config: str = DEFAULT_CONFIG,
    workspace: str = ".lifecycle",
    version: int | None = None,
    overrides: list[str] | None = None,
    start: bool = True,
) -> dict[str, Any]:
    """The workspace's server serves the champion (`version`: make that version the champion
    first, recorded in the history `lifecycle rollback` walks): a rolling update with no
    downtime, or a new server (detached) when none runs and `start`."""
    config_path, cfg = _load(config, overrides)
    uri, name = _uri(cfg, workspace), cfg.tracking.registered_model
    if version is not None:
        mv = tracking.model_version_of(uri, f"models:/{name}/{version}")
        champ = champion_version(uri, name)
        if champ is None or str(champ.version) != str(mv.version):
            set_champion(uri, name, str(mv.version))
    result = follow_champion(cfg, config_path, list(overrides or []), workspace, start)
    result["message"] = (
        f"serving {result['version']} at {result['url']}"
        if result["serving"]
        else f"champion is {result['version']}; no server runs (start=False)"
    )
    get_run_logger().info("redeploy: %s", result["message"])
    run_name = f"{cfg.name}-redeploy-{time.strftime('%Y%m%d-%H%M%S')}"
    _publish(Path(workspace).resolve(), run_name, "redeploy", result)
    return result


def _publish(ws: Path, run_name: str, kind: str, result: dict[str, Any]) -> None:
    """`<ws>/runs/<run_name>/<kind>.json` and a Prefect markdown artifact of the outcome."""
    out = ws / "runs" / run_name / f"{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    lines = [f"# {kind}: {result.get('status', 'done')}", "", result["message"], ""]
    lines += [f"- **{k}**: `{v}`" for k, v in result.items() if k not in ("message", "status")]
    create_markdown_artifact(
        "\n".join(lines) + "\n", key=f"{kind}-{slug(run_name)}", description=result["message"]
    )


def deployment_specs() -> list[dict[str, Any]]:
    """The deployments prefect.yaml declares."""
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


def register(
    config: str,
    overrides: list[str],
    workspace: str,
    work_pool: str | None = None,
    paused: bool = False,
) -> list[dict[str, Any]]:
    """Registers prefect.yaml's deployments with the Prefect server at PREFECT_API_URL, for
    `config` (retrain cron from its operations.retrain) and `workspace`; creates the process
    work pool when it does not exist. Returns [{name, id, schedule}]."""
    from prefect import Flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.schedules import Cron

    config_path, cfg = _load(config, overrides)
    pool = work_pool or cfg.operations.work_pool
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    op = cfg.operations.retrain
    out = []
    for spec in deployment_specs():
        fl = Flow.from_source(source=str(ROOT), entrypoint=spec["entrypoint"])
        params = {
            **spec.get("parameters", {}),
            "config": str(config_path),
            "workspace": str(Path(workspace).resolve()),
            "overrides": list(overrides),
        }
        schedules = []
        if spec["name"] == "retrain" and op.cron is not None:
            schedules = [Cron(op.cron, timezone=op.timezone)]
        dep_id = fl.deploy(
            name=spec["name"],
            work_pool_name=pool,
            build=False,
            push=False,
            parameters=params,
            description=spec.get("description"),
            tags=spec.get("tags"),
            schedules=schedules,
            paused=paused,
            print_next_steps=False,
        )
        out.append(
            {
                "name": f"{fl.name}/{spec['name']}",
                "id": str(dep_id),
                "schedule": f"{op.cron} ({op.timezone})" if schedules else None,
                "work_pool": pool,
            }
        )
    return out
