"""`lifecycle serve`: the champion (or any model) on Ray Serve, following the registry.

    lifecycle serve [--model models:/tiny-llm@champion | models:/NAME/VERSION | DIR]
                    [--port N] [--detach] [--workspace DIR] [--config CONFIG]
    lifecycle serve status            lifecycle serve stop            lifecycle rollback

The server process starts (or joins, with `cluster.address`) Ray, deploys ray_cluster/serve.py's
app for the model and writes `<workspace>/serve/state.json` (pid, url, model version). Given an
alias (`@champion`), it polls the registry: when the alias moves — a promotion by the deploy
stage, or `lifecycle rollback` — it rolls the app over to the new version without dropping
requests (Serve starts the new replica before it stops the old one). A version that does not
start leaves the old one serving: the failure goes to the log and to the state file
(`lifecycle serve status` shows it), and that version is not tried again. SIGTERM or Ctrl-C stops
the app and Ray (when it started it) and removes the state file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lifecycle import tracking
from lifecycle.config import PipelineConfig, ServeConfig
from lifecycle.registry import (
    champion_version,
    key_file_for,
    resolve_model,
    watermark_settings,
    with_adapters,
)

STATE_FILE = "serve/state.json"
LOG_FILE = "serve/serve.log"


class _Stop(Exception):
    pass


def _spec(model: str, uri: str, ws: Path, scfg: ServeConfig, model_id: str) -> Any:
    from ray_cluster.serve import make_spec

    d, label, tags = resolve_model(model, uri, ws)
    wm = watermark_settings(tags) if scfg.watermark else None
    kf = key_file_for(ws, tags.get("lifecycle.watermark.key_id")) if wm else None
    return make_spec(d, scfg, model_id, label, wm, kf)


def serve_forever(
    cfg: PipelineConfig, workspace: str, model: str | None, port: int | None, poll_s: float
) -> None:
    """Deploys, writes the state file, follows an alias until SIGTERM/Ctrl-C."""
    import ray

    from ray_cluster.connect import connect, disconnect
    from ray_cluster.serve import RollOverFailed, deploy_app, shutdown

    ws = Path(workspace).resolve()
    uri = tracking.resolve_uri(cfg.tracking.tracking_uri, ws)
    scfg = cfg.deploy.serve if cfg.deploy else ServeConfig()
    if port is not None:
        scfg = scfg.model_copy(update={"port": port})  # configs are frozen
    name = cfg.tracking.registered_model
    model = model or f"models:/{name}@champion"
    model_id = scfg.model_id or name
    scfg = with_adapters(scfg, uri, ws)  # once: the registry poll below follows the model only
    spec = _spec(model, uri, ws, scfg, model_id)  # bad input fails before Ray starts
    state_path = ws / STATE_FILE
    state_path.parent.mkdir(parents=True, exist_ok=True)

    def stop(*_: Any) -> None:
        raise _Stop

    failed: str | None = None  # a version that did not start: not retried until the alias moves
    started = connect(cfg.cluster)
    # After ray.init: Ray installs its own SIGTERM handler (which aborts the process).
    signal.signal(signal.SIGTERM, stop)
    try:
        url = deploy_app(spec, scfg)
        state = {
            "pid": os.getpid(),
            "url": url,
            "model": model,
            "version": spec.version,
            "started": time.time(),
        }
        _write_state(state_path, state)
        print(f"serving {spec.version} at {url}  (chat page: {url}/)", flush=True)
        while True:
            time.sleep(poll_s)
            if "@" not in model:
                continue
            try:
                new = _spec(model, uri, ws, scfg, model_id)
            except Exception as e:  # the registry is briefly unreachable: keep serving
                print(f"registry check failed ({e}); still serving {spec.version}", flush=True)
                continue
            if new.version not in (spec.version, failed):
                print(f"{model} moved: {spec.version} -> {new.version}; rolling over", flush=True)
                try:
                    deploy_app(new, scfg, previous=spec)
                except RollOverFailed as e:  # the old version still serves
                    failed = new.version
                    state = {**state, "failed_version": failed, "failed_error": str(e)[-2000:]}
                    _write_state(state_path, state)
                    print(
                        f"roll-over to {failed} FAILED; still serving {spec.version}: {e}",
                        flush=True,
                    )
                    continue
                spec, failed = new, None
                state = {**state, "version": spec.version}
                state.pop("failed_version", None)
                state.pop("failed_error", None)
                _write_state(state_path, state)
                print(f"serving {spec.version} at {url}", flush=True)
    except (_Stop, KeyboardInterrupt):
        print("stopping", flush=True)
    finally:
        state_path.unlink(missing_ok=True)
        if ray.is_initialized():
            try:
                shutdown()
            finally:
                disconnect(started)


def _write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def read_state(workspace: str) -> dict[str, Any] | None:
    p = Path(workspace).resolve() / STATE_FILE
    if not p.is_file():
        return None
    state = json.loads(p.read_text())
    try:
        os.kill(state["pid"], 0)
    except ProcessLookupError:
        p.unlink(missing_ok=True)  # a server that died without cleaning up
        return None
    return state


def detach(argv: list[str], workspace: str, timeout_s: float) -> dict[str, Any]:
    """Starts `lifecycle serve ...` (without --detach) in the background and waits until it
    serves; returns its state. Its output goes to <workspace>/serve/serve.log."""
    ws = Path(workspace).resolve()
    (ws / "serve").mkdir(parents=True, exist_ok=True)
    (ws / STATE_FILE).unlink(missing_ok=True)
    log = open(ws / LOG_FILE, "w")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", *argv],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=os.getcwd(),
    )
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = (ws / LOG_FILE).read_text()[-3000:]
            raise RuntimeError(f"the server exited with code {proc.returncode}:\n{tail}")
        state = read_state(workspace)
        if state is not None and state["pid"] == proc.pid:
            return state
        time.sleep(1)
    proc.terminate()
    raise TimeoutError(f"the server did not come up in {timeout_s:.0f} s (log: {ws / LOG_FILE})")


def stop(workspace: str, timeout_s: float = 120) -> dict[str, Any] | None:
    """SIGTERM to the workspace's server; waits until it is gone. None if none runs."""
    state = read_state(workspace)
    if state is None:
        return None
    os.kill(state["pid"], signal.SIGTERM)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            os.kill(state["pid"], 0)
        except ProcessLookupError:
            return state
        time.sleep(0.5)
    os.kill(state["pid"], signal.SIGKILL)
    return state


def follow_champion(
    cfg: PipelineConfig,
    config_path: str | Path,
    overrides: list[str],
    workspace: str,
    start: bool,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Makes the workspace's server serve the current champion, with no downtime: a running
    server (following `@champion`) rolls over by itself and this waits until it has; with none
    running, `start` starts one (detached). Returns {serving, url, version, pid}."""
    import httpx

    ws = Path(workspace).resolve()
    uri = tracking.resolve_uri(cfg.tracking.tracking_uri, ws)
    name = cfg.tracking.registered_model
    champ = champion_version(uri, name)
    if champ is None:
        raise ValueError(f"{name} has no champion at {uri}: run the chain (lifecycle/full) first")
    want = f"{name}/{champ.version}"
    timeout = timeout_s or (cfg.deploy.serve.startup_timeout_s if cfg.deploy else 600.0)
    state = read_state(workspace)
    if state is None:
        if not start:
            return {"serving": False, "url": None, "version": want, "pid": None}
        argv = ["--workspace", str(ws), "--config", str(Path(config_path).resolve())]
        for o in overrides:
            argv += ["--set", o]
        state = detach(argv, workspace, timeout)
    elif "@" not in state["model"]:
        raise ValueError(
            f"the server at {state['url']} serves the pinned {state['model']}, not the champion: "
            "`lifecycle serve stop`, then serve the champion"
        )
    deadline = time.time() + timeout
    while True:
        try:
            served = httpx.get(f"{state['url']}/healthz", timeout=30).json().get("version")
        except httpx.HTTPError:
            served = None
        if served == want:
            return {"serving": True, "url": state["url"], "version": want, "pid": state["pid"]}
        now = read_state(workspace) or {}
        if now.get("failed_version") == want:  # the server tried and kept the old version
            raise RuntimeError(
                f"the server at {state['url']} could not roll over to {want} and still serves "
                f"{served}: {now.get('failed_error', '')}"
            )
        if time.time() > deadline:
            raise TimeoutError(f"the server at {state['url']} serves {served}, not {want}")
        time.sleep(1)
