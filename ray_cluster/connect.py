"""Connecting to Ray: a local Ray (dashboard on 127.0.0.1) or an existing cluster.

`cluster.address: null` starts a local Ray for this process and stops it afterwards (Ray's
token authentication on, as Ray 2.60 defaults, with its token file made private; a taken
dashboard port is replaced by a free one, printed);
`auto` joins the cluster this machine belongs to; `ray://host:10001` joins over Ray Client.
Over Ray Client the project's packages are shipped with the job (py_modules), so worker
nodes need the dependencies but not this checkout.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import ray
from filelock import FileLock

from lifecycle.config import ClusterConfig


def connect(cfg: ClusterConfig) -> bool:
    """Initialises Ray if needed; returns True when this call started a local Ray."""
    if ray.is_initialized():
        return False
    if cfg.address is None:
        private_ray_token()
        # Two runs starting at once would both find the port free and the second Ray's
        # dashboard would then fail to bind it: local starts on this machine take turns.
        with _local_start_lock():
            port = cfg.dashboard_port
            if cfg.include_dashboard and not port_free(cfg.dashboard_host, port):
                # another local Ray (another run on this machine) has it: ours takes a free one
                port = free_port(cfg.dashboard_host)
                print(
                    f"Ray dashboard port {cfg.dashboard_port} is in use (another Ray on this "
                    f"machine): this run's dashboard is http://{cfg.dashboard_host}:{port}",
                    file=sys.stderr,
                    flush=True,
                )
            ray.init(
                num_cpus=cfg.num_cpus,
                include_dashboard=cfg.include_dashboard,
                dashboard_host=cfg.dashboard_host,
                dashboard_port=port,
                log_to_driver=True,
                _metrics_export_port=cfg.metrics_export_port,
            )
        return True
    # Over Ray Client the cluster has none of our code: ship the packages with the job.
    runtime_env = _ship_code() if cfg.address.startswith("ray://") else None
    ray.init(address=cfg.address, runtime_env=runtime_env)
    return False


def _local_start_lock() -> FileLock:
    """A lock per user of this machine, held while a local Ray picks its ports and starts."""
    return FileLock(Path(tempfile.gettempdir()) / f"lifecycle-ray-start-{os.getuid()}.lock")


def private_ray_token() -> Path | None:
    """The token file of Ray's token authentication (on by default for a local `ray.init` in
    Ray 2.60), made readable by its owner only: Ray writes `~/.ray/auth_token` with the
    process umask (0644: every user of the machine could read the token and then run code
    on this Ray). Creates it (0600) when missing; None when auth is off or the token comes
    from $RAY_AUTH_TOKEN."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get(
        "RAY_AUTH_TOKEN"
    ):
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.is_file():
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def port_free(host: str, port: int) -> bool:
    """Whether `host:port` can be bound now (port 0: always)."""
    if port == 0:
        return True
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` free now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ship_code() -> dict[str, Any]:
    import flows
    import lifecycle
    import ray_cluster
    import tasks

    return {"py_modules": [lifecycle, tasks, ray_cluster, flows]}


def disconnect(started: bool) -> None:
    if started and ray.is_initialized():
        ray.shutdown()
