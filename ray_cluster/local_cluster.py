"""A multi-node Ray cluster on one machine: a head and N worker nodes, each its own raylet
(`ray start` on distinct ports), for trying placement and node failure without a cloud.

    lifecycle cluster up --workers 2 [--cpus-per-node 1] [--gpus-per-node 0] [--no-auth]
    lifecycle cluster status
    lifecycle cluster down
    lifecycle run configs/tiny_cpu.yaml --set cluster.address=127.0.0.1:PORT

State in `<workspace>/cluster/state.json` (address, ports, the temp dir the nodes share).
Every node gets a custom resource `lifecycle_node_<i>` (head: `lifecycle_node_0`) so that a
config can pin work to one. Ray's token authentication is on unless `--no-auth` (printed):
`RAY_AUTH_MODE=token` with a fresh 0600 token in `<workspace>/cluster/auth_token`; a driver
needs both variables, which `up` prints. Only the dashboard binds 127.0.0.1: Ray 2.60 has
no option to bind its GCS and raylet ports to one interface (they listen on all of them), and
it replaces a 127.0.0.1 node address by the machine's own (`resolve_ip_for_localhost`), where
the head's Ray Client server listens (port 10001) — which is why the token is the default:
each of those ports refuses a driver without it (tests/integration/test_faults.py). `down` ends the cluster's processes by PID:
those whose command line names its temp dir or its GCS port, never another Ray on the machine.
In production: ray_cluster/cluster.yaml (`ray up`) or ray_cluster/kuberay/.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STATE = "cluster/state.json"


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(int(s.getsockname()[1]))
    for s in socks:
        s.close()
    return ports


def _ray() -> str:
    return str(Path(sys.executable).with_name("ray"))


def auth_env(state: dict[str, Any]) -> dict[str, str]:
    """The environment a process needs to talk to the cluster."""
    if state.get("auth"):
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": state["token_path"]}
    return {}  # --no-auth: whatever the user's environment says


def _start(args: list[str], env: dict[str, str], log: Path) -> None:
    with open(log, "a") as f:
        p = subprocess.run(
            [_ray(), "start", *args, "--disable-usage-stats"],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    if p.returncode != 0:
        raise RuntimeError(f"ray start {' '.join(args[:2])} failed: see {log}")


def up(
    workspace: str | Path, workers: int, cpus_per_node: int, gpus_per_node: int, auth: bool
) -> dict[str, Any]:
    """Starts the head and `workers` worker nodes; returns the state (also written)."""
    ws = Path(workspace).resolve()
    state_path = ws / STATE
    if state_path.is_file():
        raise RuntimeError(f"a cluster is already up for {ws} ({state_path}): `cluster down`")
    state_path.parent.mkdir(parents=True, exist_ok=True)
    # Short: Ray's socket paths live under it and must stay below the OS limit.
    temp = Path(tempfile.mkdtemp(prefix="lc-", dir="/tmp"))
    gcs, dash, *node_ports = _free_ports(2 + 4 * (workers + 1))
    worker_base = 11000 + 1000 * secrets.randbelow(19)  # each node: 200 worker ports from here
    state: dict[str, Any] = {
        "address": f"127.0.0.1:{gcs}",
        "gcs_port": gcs,
        "dashboard": f"http://127.0.0.1:{dash}",
        "temp_dir": str(temp),
        "auth": auth,
        "nodes": [],
    }
    if auth:
        token = ws / "cluster" / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        state["token_path"] = str(token)
    env = {**os.environ, **auth_env(state)}
    log = ws / "cluster" / "cluster.log"
    state_path.write_text(json.dumps(state, indent=2))  # `down` can clean up a half start
    try:
        for i in range(workers + 1):
            nm, om, metrics, _ = node_ports[4 * i : 4 * i + 4]
            common = [
                f"--num-cpus={cpus_per_node}",
                f"--num-gpus={gpus_per_node}",
                f"--node-manager-port={nm}",
                f"--object-manager-port={om}",
                f"--metrics-export-port={metrics}",
                f"--min-worker-port={worker_base + 200 * i}",
                f"--max-worker-port={worker_base + 200 * i + 199}",
                f"--resources={json.dumps({f'lifecycle_node_{i}': 1})}",
            ]
            if i == 0:
                args = [
                    "--head",
                    f"--port={gcs}",
                    f"--temp-dir={temp}",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}",
                    *common,
                ]
            else:
                args = [f"--address={state['address']}", *common]
            _start(args, env, log)
            state["nodes"].append(
                {"index": i, "role": "head" if i == 0 else "worker", "metrics_port": metrics}
            )
            state_path.write_text(json.dumps(state, indent=2))
    except BaseException:
        down(ws)
        raise
    return state


def read_state(workspace: str | Path) -> dict[str, Any] | None:
    p = Path(workspace).resolve() / STATE
    return json.loads(p.read_text()) if p.is_file() else None


def cluster_pids(state: dict[str, Any]) -> list[int]:
    """PIDs of this cluster's processes: their command line names its temp dir or GCS port."""
    marks = (state["temp_dir"], f":{state['gcs_port']}")
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(m in cmd for m in marks) and "lifecycle cluster" not in cmd:
            pids.append(int(proc.name))
    return pids


def status(workspace: str | Path) -> dict[str, Any] | None:
    """The state plus Ray's view of the nodes (alive, resources)."""
    state = read_state(workspace)
    if state is None:
        return None
    env = {**os.environ, **auth_env(state)}
    p = subprocess.run(
        [_ray(), "status", f"--address={state['address']}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return {**state, "ray_status": p.stdout if p.returncode == 0 else p.stderr[-2000:]}


def down(workspace: str | Path, timeout_s: float = 30) -> dict[str, Any] | None:
    """Ends the cluster's processes (SIGTERM, then SIGKILL) and removes its state."""
    ws = Path(workspace).resolve()
    state = read_state(ws)
    if state is None:
        return None
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in cluster_pids(state):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + timeout_s
        while cluster_pids(state) and time.time() < deadline:
            time.sleep(0.5)
        if not cluster_pids(state):
            break
    (ws / STATE).unlink(missing_ok=True)
    return state
