"""Faults and abuse: each case asserts the safe outcome.

- A local cluster (`lifecycle cluster up`, defaults): token auth on, its token file private,
  the dashboard on 127.0.0.1; every port Ray 2.60 binds to all interfaces (GCS, raylet, the
  Ray Client server on the machine's address) refuses a driver without the token.
- A server refuses a non-loopback bind without an API key; the detector's per-caller rate
  limit. (The detector's minimum length and its verdict-only answer are checked against a
  running server in tests/stages/test_serve.py, which starts one for many checks.)
- One writer per workspace: a second run exits 2 naming the first and writes nothing.
- Two runs at once, each on its own workspace, both complete (the second local Ray takes a
  free dashboard port); a tracking URI with a password (given as $MLFLOW_TRACKING_URI, where
  it belongs) reaches no file of either workspace, no MLflow record, no Prefect record, no
  Ray log and no process's arguments, while the training workers still log to it.
- A run killed with SIGKILL, then run again: its orphaned MLflow runs are marked KILLED, no
  JSON or YAML it wrote is half-written, and a corrupt cache entry is recomputed.
- Names that would leave the workspace (`--run-name ../x`, `models:/N@a/../../x`) are
  refused; a registry download that does not match its registered digest is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from lifecycle import tracking
from lifecycle.artifacts import StageResult, cache_lookup, cache_store, dir_manifest
from lifecycle.config import ConfigError, ServeConfig, validate_config
from tests.conftest import LIFECYCLE, ROOT, free_port


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LIFECYCLE, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
    )


def _listening(pids: list[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket the processes listen on."""
    inodes = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes[link[8:-1]] = pid
    out = []
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = row.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                addr, port = f[1].split(":")
                comm = Path(f"/proc/{inodes[f[9]]}/comm").read_text().strip()
                cmd = Path(f"/proc/{inodes[f[9]]}/cmdline").read_bytes().replace(b"\0", b" ")
                out.append((addr, int(port, 16), f"{comm} {cmd.decode(errors='replace')}"))
    return out


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


@pytest.mark.timeout(900)
def test_a_local_cluster_by_default_refuses_drivers_without_its_token(tmp_path):
    """`lifecycle cluster up` without options: token auth, a 0600 token, the dashboard on
    127.0.0.1. Ray 2.60 binds the GCS and raylet ports to every interface and starts its Ray
    Client server on the machine's address (it replaces a 127.0.0.1 node address by that
    address): each of those refuses a driver that lacks the token."""
    from ray_cluster import local_cluster

    ws = tmp_path / "ws"
    up = _cli("cluster", "up", "--workers", "0", "--workspace", str(ws))
    assert up.returncode == 0, up.stderr
    state = json.loads(up.stdout)
    try:
        assert state["auth"] and (Path(state["token_path"]).stat().st_mode & 0o777) == 0o600
        listening = _listening(local_cluster.cluster_pids(state))
        dash_port = int(state["dashboard"].rsplit(":", 1)[1])
        assert [a for a, p, _ in listening if p == dash_port] == ["0100007F"], listening
        open_ports = {p: what for a, p, what in listening if a not in LOOPBACK}
        gcs = state["gcs_port"]
        assert gcs in open_ports and "gcs_server" in open_ports[gcs], listening
        client = [p for p, what in open_ports.items() if "ray.util.client.server" in what]
        node_ip = next(
            a.split("=", 1)[1] for a in open_ports[client[0]].split() if a.startswith("--host=")
        )
        probes = {  # a driver through the GCS; a Ray Client driver (one try, no retries)
            f"{node_ip}:{gcs}": "import ray, sys; ray.init(address=sys.argv[1])",
            f"{node_ip}:{client[0]}": "import sys; from ray.util.client import ray\n"
            "ray.connect(sys.argv[1], connection_retries=0)",
        }
        wrong = tmp_path / "wrong_token"
        wrong.write_text("0" * 64)
        bad_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(wrong)}
        no_env = {k: v for k, v in os.environ.items() if "RAY_AUTH" not in k}
        for address, connect in probes.items():
            probe = [sys.executable, "-c", connect + "\nprint(ray.cluster_resources())", address]
            ok = subprocess.run(
                probe,
                env={**os.environ, **local_cluster.auth_env(state)},
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert ok.returncode == 0 and "lifecycle_node_0" in ok.stdout, ok.stderr[-2000:]
            for env in (bad_env, no_env):
                bad = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=300)
                assert bad.returncode != 0 and "lifecycle_node_0" not in bad.stdout, address
        logs = Path(state["temp_dir"]).glob("session_*/logs/ray_client_server*.err")
        refused = "".join(p.read_text(errors="replace") for p in logs)
        assert "Authentication required" in refused or "nauthenticated" in refused
    finally:
        down = _cli("cluster", "down", "--workspace", str(ws))
    assert down.returncode == 0 and not local_cluster.cluster_pids(state)


def test_tracking_credentials_stay_out_of_the_config_and_the_records(monkeypatch, tmp_path):
    from lifecycle import tracking

    with pytest.raises(ConfigError, match=r"holds a password.*MLFLOW_TRACKING_URI"):
        validate_config({"tracking": {"tracking_uri": "postgresql://u:s3cret@db:5432/mlflow"}})
    assert tracking.redact("postgresql://u:s3cret@db:5432/mlflow") == (
        "postgresql://u:***@db:5432/mlflow"
    )
    assert tracking.redact("sqlite:////ws/mlflow.db") == "sqlite:////ws/mlflow.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_uri(None, tmp_path) == tracking.default_tracking_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://u:s3cret@db/mlflow")
    assert tracking.resolve_uri(None, tmp_path) == "postgresql://u:s3cret@db/mlflow"
    assert tracking.resolve_uri("http://mlflow:5000", tmp_path) == "http://mlflow:5000"


def test_detector_rate_limit_is_a_sliding_minute_per_caller_with_bounded_memory():
    from ray_cluster.serve import _RateLimit

    lim = _RateLimit(3, callers=2)
    assert [lim.take("a", t) for t in (0, 1, 2)] == [0, 0, 0]
    assert lim.take("a", 30) == 30  # the oldest call leaves the window at t = 60
    assert lim.take("b", 30) == 0  # another caller has its own allowance
    assert lim.take("a", 60.5) == 0  # one slot back
    lim.take("c", 61)  # a third caller: the longest idle one ("b") is forgotten
    assert list(lim.calls) == ["a", "c"]


def test_a_network_bind_without_an_api_key_is_refused(monkeypatch, capsys):
    from ray_cluster.serve import API_KEY_ENV, check_open_bind

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    for host in ("127.0.0.1", "localhost", "::1"):
        check_open_bind(ServeConfig(host=host))
    for host in ("0.0.0.0", "10.1.2.3", "my-node"):
        with pytest.raises(ValueError, match=rf"host is {host} .*LIFECYCLE_API_KEY is not set"):
            check_open_bind(ServeConfig(host=host))
    check_open_bind(ServeConfig(host="0.0.0.0", allow_unauthenticated=True))
    assert "without an API key" in capsys.readouterr().out
    monkeypatch.setenv(API_KEY_ENV, "k" * 32)
    check_open_bind(ServeConfig(host="0.0.0.0"))


def test_a_run_that_would_serve_on_the_network_without_a_key_stops_before_any_stage(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LIFECYCLE_API_KEY", "COLUMNS")}
    ws = tmp_path / "ws"
    p = subprocess.run(
        [LIFECYCLE, "run", "configs/tiny_cpu.yaml", "--workspace", str(ws),
         "--set", "deploy.serve.host=0.0.0.0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 2, p.stderr[-2000:]
    assert "deploy.serve.host is 0.0.0.0" in p.stderr and "LIFECYCLE_API_KEY" in p.stderr
    assert not (ws / "runs").exists() and not (ws / "cache").exists()  # nothing ran


def test_the_local_ray_token_is_readable_by_its_owner_only(monkeypatch, tmp_path):
    from ray_cluster.connect import private_ray_token

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    made = private_ray_token()  # none yet: created 0600
    assert made == tmp_path / ".ray" / "auth_token"
    assert made.stat().st_mode & 0o777 == 0o600 and len(made.read_text()) == 64
    made.chmod(0o644)  # as Ray writes it under umask 022
    token = made.read_text()
    assert private_ray_token() == made and made.stat().st_mode & 0o777 == 0o600
    assert made.read_text() == token  # the same token: running clusters keep working
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert private_ray_token() is None


def test_run_names_and_registry_uris_that_would_leave_the_workspace_are_refused(tmp_path):
    from lifecycle import tracking
    from lifecycle.artifacts import check_run_name

    for ok in ("first", "tiny-20261206-193530", "a.b_c-1"):
        assert check_run_name(ok) == ok
    for bad in ("../x", "/x", "a/b", "..", "a..b", ".hidden", "", "x" * 129, "a b"):
        with pytest.raises(ValueError, match="names a directory under runs/"):
            check_run_name(bad)
    uri = tracking.default_tracking_uri(tmp_path)
    for bad in ("models:/N@a/../../x", "models:/../x/1", "models:/x/1/", "models:/x", "runs:/x"):
        with pytest.raises(ValueError, match="expected models:/NAME/VERSION or models:/NAME@"):
            tracking.model_version_of(uri, bad)
    with pytest.raises(ValueError, match="not in the registry"):
        tracking.model_version_of(uri, "models:/nothing/1")


def test_a_corrupt_cache_entry_is_a_miss_with_a_warning(tmp_path):
    from lifecycle.artifacts import _cache_file

    r = StageResult("data", "completed", artifact_uri=str(tmp_path), artifact_id="x")
    cache_store(tmp_path, "data", "k", r)
    assert cache_lookup(tmp_path, "data", "k") == r.with_status("cached")
    f = _cache_file(tmp_path, "data", "k")
    assert [p.name for p in f.parent.iterdir()] == ["k.json"]  # no temp file left behind
    f.write_text('{"stage": "data", "status": "comp')  # cut short
    with pytest.warns(UserWarning, match="unreadable cache entry, treated as a miss"):
        assert cache_lookup(tmp_path, "data", "k") is None
    cache_store(tmp_path, "data", "k", r)  # the rerun's result replaces it
    assert cache_lookup(tmp_path, "data", "k") == r.with_status("cached")


def test_runs_of_a_dead_lifecycle_process_are_marked_killed(tmp_path):
    import subprocess
    import sys

    from lifecycle import tracking

    uri = tracking.default_tracking_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "t", tmp_path / "art")
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_owner = f"{tracking.owner_tag().split(':')[0]}:{gone.stdout.strip()}:1"
    dead = tracking.start_run(uri, exp, "dead", tags={tracking.OWNER_TAG: dead_owner})
    dead_stage = tracking.start_run(uri, exp, "dead/sft", parent_run_id=dead)
    alive = tracking.start_run(uri, exp, "alive", tags={tracking.OWNER_TAG: tracking.owner_tag()})
    other_host = tracking.start_run(uri, exp, "x", tags={tracking.OWNER_TAG: "elsewhere:1:1"})
    untagged = tracking.start_run(uri, exp, "old")
    assert sorted(tracking.end_orphaned_runs(uri, exp)) == sorted([dead, dead_stage])
    status = {r: tracking.get_run(uri, r).info.status for r in (dead, dead_stage, alive)}
    assert status == {dead: "KILLED", dead_stage: "KILLED", alive: "RUNNING"}
    for r in (other_host, untagged):
        assert tracking.get_run(uri, r).info.status == "RUNNING"
    assert tracking.end_orphaned_runs(uri, exp) == []


def test_one_writer_per_workspace(tmp_path):
    """A second `lifecycle run` on a workspace that another process writes stops at once with
    a message naming the holder; the lock ends with its holder, SIGKILL included."""
    import os
    import signal
    import subprocess
    import sys

    from lifecycle.artifacts import WorkspaceBusy, workspace_lock
    from tests.conftest import LIFECYCLE, ROOT

    ws = tmp_path / "ws"
    hold = (
        "import sys, time\nfrom lifecycle.artifacts import workspace_lock\n"
        "with workspace_lock(sys.argv[1], 'lifecycle run first'):\n"
        "    print('held', flush=True)\n    time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(ws)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(
                WorkspaceBusy, match=rf"in use by lifecycle run first \(pid {holder.pid} "
            ),
            workspace_lock(ws, "second"),
        ):
            pass
        env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
        p = subprocess.run(
            [LIFECYCLE, "run", "configs/tiny_cpu.yaml", "--workspace", str(ws), "--stages", "data"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert p.returncode == 2, p.stderr[-2000:]
        line = [ln for ln in p.stderr.splitlines() if "is in use by" in ln]
        assert len(line) == 1 and f"pid {holder.pid}" in line[0] and "--workspace" in line[0]
        assert not (ws / "runs").exists()  # it wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with workspace_lock(ws, "third"):  # released with its (killed) holder
        assert "third" in (ws / ".lock.json").read_text()


def test_registry_downloads_are_checked_against_the_registered_digest(tmp_path):
    import shutil

    from lifecycle import tracking

    uri = tracking.default_tracking_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "t", tmp_path / "art")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"w" * 4096)
    run = tracking.start_run(uri, exp, "r")
    version = tracking.register_model(uri, run, "m", model, {})
    mv = tracking.model_version(uri, "m", version)
    assert mv.tags[tracking.DIGEST_TAG] == dir_manifest(model)["digest"]

    dest = tmp_path / "ws" / "serving" / "m" / version
    assert tracking.fetch_model(uri, f"models:/m/{version}", dest) == dest
    assert (dest / "model.safetensors").read_bytes() == b"w" * 4096
    # A copy cut short behind our back (and not sealed) is fetched again, with a warning.
    (dest / "model.safetensors").write_bytes(b"w" * 100)
    dest.with_name(f".{dest.name}.digest").unlink()
    with pytest.warns(UserWarning, match="differs from models:/m/1's registered files"):
        tracking.fetch_model(uri, f"models:/m/{version}", dest)
    assert (dest / "model.safetensors").read_bytes() == b"w" * 4096
    # Files changed at the source: the download is refused and nothing is left behind.
    src = Path(mv.source.removeprefix("file://")) / "model.safetensors"
    src.write_bytes(b"x" * 4096)
    other = tmp_path / "ws2" / "m" / version
    with pytest.raises(ValueError, match="do not match the digest registered with the version"):
        tracking.fetch_model(uri, f"models:/m/{version}", other)
    assert not other.exists()
    shutil.rmtree(tmp_path / "ws2")


# --------------------------------------------------------------------------------------------
# Two runs at once on two workspaces, a tracking password, and a run killed with SIGKILL
# --------------------------------------------------------------------------------------------

SHORT = ["data.demo.num_docs=400", "pretrain.max_steps=20", "pretrain.warmup_steps=2"]
SHORT += ["pretrain.log_every=5"]


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """`mlflow server` on a free 127.0.0.1 port (no auth of its own: the client sends the
    URI's user and password as basic auth, which is what a password in the URI is for)."""
    home = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(home / "server.log", "w")  # noqa: SIM115 - the server writes to it
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}"]
    cmd += ["--default-artifact-root", str(home / "artifacts")]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            assert time.time() < deadline, "the MLflow server did not come up"
            time.sleep(1)
        yield home, port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


class _ArgvWatch:
    """Reads every process's command line every 0.2 s until stopped; `hits` are those that
    contained `needle`."""

    def __init__(self, needle: str) -> None:
        self.needle, self.hits, self.stop = needle.encode(), [], threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.is_set():
            for d in Path("/proc").iterdir():
                if d.name.isdigit():
                    with contextlib.suppress(OSError):
                        cmd = (d / "cmdline").read_bytes()
                        if self.needle in cmd:
                            self.hits.append(cmd.replace(b"\0", b" ").decode(errors="replace"))
            self.stop.wait(0.2)

    def close(self) -> list[str]:
        self.stop.set()
        self.thread.join()
        return self.hits


def _ray_temp_dir() -> Path:
    """Where a local Ray puts its sessions: Ray's own rule ($RAY_TMPDIR, $TMPDIR, /tmp)."""
    from ray._common.utils import get_default_ray_temp_dir

    return Path(get_default_ray_temp_dir())


def _files_holding(root: Path, needle: bytes) -> list[str]:
    found = []
    for p in root.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file() and p.stat().st_size < 50_000_000 and needle in p.read_bytes():
                found.append(str(p))
    return found


def _start_run(ws: Path, env: dict, out: Path, *args: str) -> subprocess.Popen:
    cmd = [LIFECYCLE, "run", "configs/tiny_cpu.yaml", "--workspace", str(ws), "--json", *args]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=open(out.with_suffix(".json"), "w"),
        stderr=open(out.with_suffix(".err"), "w"),
        start_new_session=True,
    )


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def two_runs(tracking_server, tmp_path_factory):
    """Runs A (data, pretrain) and B (data) at the same time, each on its own workspace,
    asking for the same dashboard port, with $MLFLOW_TRACKING_URI holding a password."""
    home, port = tracking_server
    password = f"pw-{secrets.token_hex(12)}"
    uri = f"http://alice:{password}@127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    root = tmp_path_factory.mktemp("two-runs")
    ray_tmp = _ray_temp_dir()
    sessions_before = set(ray_tmp.glob("session_2*"))
    dash = str(free_port())
    watch = _ArgvWatch(password)
    try:
        a = _start_run(
            root / "a", env, root / "a-out", "--run-name", "a", "--stages", "data,pretrain",
            *_sets(*SHORT, f"cluster.dashboard_port={dash}"),
        )  # fmt: skip
        b = _start_run(
            root / "b", env, root / "b-out", "--run-name", "b", "--stages", "data",
            *_sets(*SHORT, f"cluster.dashboard_port={dash}"),
        )  # fmt: skip
        rcs = (a.wait(timeout=900), b.wait(timeout=900))
    finally:
        for p in (a, b):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        argv_hits = watch.close()
    return {
        "root": root,
        "env": env,
        "uri": uri,
        "password": password,
        "server_home": home,
        "rcs": rcs,
        "argv_hits": argv_hits,
        "ray_sessions": set(ray_tmp.glob("session_2*")) - sessions_before,
    }


@pytest.mark.timeout(1200)
def test_two_runs_at_once_and_the_tracking_password_reaches_no_record(two_runs):
    root, uri, password = two_runs["root"], two_runs["uri"], two_runs["password"]
    errs = {n: (root / f"{n}-out.err").read_text() for n in ("a", "b")}
    assert two_runs["rcs"] == (0, 0), {n: e[-3000:] for n, e in errs.items()}
    summaries = {n: json.loads((root / f"{n}-out.json").read_text()) for n in ("a", "b")}
    assert [s["status"] for s in summaries["a"]["stages"]] == ["completed", "completed"]
    assert [s["status"] for s in summaries["b"]["stages"]] == ["completed"]
    # Both asked for one dashboard port: the second local Ray took a free one and said so.
    moved = [n for n, e in errs.items() if "is in use (another Ray on this machine)" in e]
    assert len(moved) == 1, errs
    # The training workers logged to the server (the URI reached them by reference) ...
    shown = tracking.redact(uri)
    assert shown == uri.replace(password, "***")
    c = tracking.client(uri)
    pre = next(s for s in summaries["a"]["stages"] if s["stage"] == "pretrain")
    assert [m.step for m in c.get_metric_history(pre["mlflow_run_id"], "train/loss")][-1] == 20
    # ... and the password is in no record: summaries, workspaces, MLflow's database and
    # artifacts, Prefect's database, the Ray sessions' files, any process's arguments.
    for s in summaries.values():
        assert s["mlflow"]["tracking_uri"] == shown and password not in json.dumps(s)
    needle = password.encode()
    places = [root, two_runs["server_home"], Path(os.environ["PREFECT_HOME"])]
    places += sorted(two_runs["ray_sessions"])
    assert two_runs["ray_sessions"], f"no Ray session of the runs under {_ray_temp_dir()}"
    for place in places:
        assert _files_holding(place, needle) == [], place
    for n in ("a", "b"):
        assert password not in errs[n]
    assert two_runs["argv_hits"] == []


@pytest.mark.timeout(1200)
def test_a_run_killed_with_sigkill_then_run_again(two_runs):
    """A run of workspace A killed mid-pretraining (SIGKILL to its process group): the next
    run there marks its MLflow runs KILLED, finds every JSON/YAML whole, and the data stage's
    cache entry that was cut short before it is recomputed (with a warning), not trusted."""
    root, env, uri = two_runs["root"], two_runs["env"], two_runs["uri"]
    ws = root / "a"
    entries = list((ws / "cache" / "data").glob("*.json"))
    assert len(entries) == 1
    entries[0].write_text(entries[0].read_text()[:40])  # a write cut short
    longer = [*SHORT[:1], "pretrain.max_steps=3000", f"cluster.dashboard_port={free_port()}"]
    c = _start_run(ws, env, root / "c-out", "--run-name", "c", *_sets(*longer),
                   "--stages", "data,pretrain")  # fmt: skip
    client = tracking.client(uri)
    try:
        deadline = time.time() + 600
        while True:
            assert c.poll() is None, (root / "c-out.err").read_text()[-3000:]
            runs = client.search_runs(
                [e.experiment_id for e in client.search_experiments()],
                filter_string="tags.`lifecycle.run_name` = 'c'",
            )
            stages = {r.data.tags.get(tracking.STAGE_TAG): r for r in runs}
            pre = stages.get("pretrain")
            if pre is not None and client.get_metric_history(pre.info.run_id, "train/loss"):
                break  # pretraining is under way
            assert time.time() < deadline, "run c did not start pretraining"
            time.sleep(1)
    finally:
        os.killpg(c.pid, signal.SIGKILL)  # the driver and the local Ray it started
        c.wait()
    err = (root / "c-out.err").read_text()
    assert "unreadable cache entry, treated as a miss" in err, err[-3000:]
    assert stages["data"].info.status == "FINISHED"  # recomputed, then recorded
    assert not (ws / "runs" / "c" / "summary.json").exists()

    p = subprocess.run(
        [LIFECYCLE, "run", "configs/tiny_cpu.yaml", "--workspace", str(ws), "--json",
         "--run-name", "d", "--stages", "data", *_sets(*SHORT[:1])],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert [s["status"] for s in json.loads(p.stdout)["stages"]] == ["cached"]
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`lifecycle.run_name` = 'c'",
    )
    status = {r.data.tags.get(tracking.STAGE_TAG, "parent"): r.info.status for r in runs}
    assert status == {"parent": "KILLED", "data": "FINISHED", "pretrain": "KILLED"}, status
    for f in ws.rglob("*.json"):
        json.loads(f.read_text())  # whole: every JSON the runs wrote parses
    for f in (ws / "runs").rglob("*.yaml"):
        assert isinstance(yaml.safe_load(f.read_text()), dict), f
