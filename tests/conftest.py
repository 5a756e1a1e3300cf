"""Shared fixtures: one local Ray per test session, an isolated Prefect home, tiny data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# Threads: pytest-xdist runs N workers on this machine's cores, so each worker, and every
# process it starts (the CLI runs, their local Rays, Ray workers and vLLM engines inherit the
# variable; Ray keeps an OMP_NUM_THREADS it finds), computes on cores/N threads. OpenMP
# teams that outnumber the cores spin against each other: two training processes on 2 cores
# made 23 steps/s together with 2 threads each, 87 with 1 each (bench/threads.py).
_THREADS = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _THREADS)

# Priorities: Ray starts its worker processes at nice 15, so every Ray Train worker, Ray task
# and Serve replica of the suite (the chain's training included) yielded to any driver,
# server or CLI process of either pytest worker (checked: a task under `nice -n 5` ran at 19;
# docs/benchmarks.md has the suite figures, which this moves between the workers). With 0,
# Ray leaves its workers at the niceness they inherit: the chain module's worker at 0, the
# other worker's processes at its +N below (LIFECYCLE_TEST_NICE), as that rule intends.
os.environ.setdefault("RAY_worker_niceness", "0")

# Before anything imports prefect: its ephemeral API keeps its database under PREFECT_HOME.
_PREFECT_HOME = tempfile.mkdtemp(prefix="lifecycle-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# One fixed watermark key for the session (the fingerprint SFT plants derives from it): runs
# are reproducible, as they are for a team that sets its key once.
os.environ["LIFECYCLE_WATERMARK_KEY"] = "llm-lifecycle-test-session-key-0001"
os.environ.pop("LIFECYCLE_WATERMARK_KEY_FILE", None)

import pytest  # noqa: E402

from lifecycle import tracking  # noqa: E402
from lifecycle.artifacts import RunContext, StageResult, code_version  # noqa: E402
from lifecycle.config import DataConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = free_port()
"""The session Ray's Prometheus endpoint: http://127.0.0.1:METRICS_PORT/metrics."""


def scrape(port: int, wanted: list[str], timeout: float = 120) -> str:
    """Ray's Prometheus text once every `wanted` substring is in it (metrics are exported
    every few seconds), or AssertionError naming what is missing."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text = r.read().decode()
        except OSError:
            text = ""
        missing = [w for w in wanted if w not in text]
        if not missing:
            return text
        assert time.time() < deadline, f"not on the metrics endpoint: {missing}"
        time.sleep(3)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every in-process test (dashboard on a free 127.0.0.1 port)."""
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),
        _metrics_export_port=METRICS_PORT,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> StageResult:
    """A small tokenized dataset made by the plain (no Ray) pipeline: fast, same format."""
    from lifecycle.data.pipeline import prepare_plain

    out = tmp_path_factory.mktemp("tiny-data") / "data"
    cfg = DataConfig(
        demo={"num_docs": 600, "seed": 1},
        block_size=64,
        tokenizer={"vocab_size": 320},
        val_fraction=0.1,
    )
    manifest = prepare_plain(cfg, out)
    return StageResult("data", "completed", artifact_uri=str(out), artifact_id=manifest["sha256"])


@pytest.fixture(scope="session")
def tiny_model(tiny_data, tmp_path_factory) -> StageResult:
    """A random-init 2-layer Llama with the tiny data's (chat-ready) tokenizer, as an upstream
    StageResult for the SFT and RLHF stage tests."""
    from lifecycle.config import ModelConfig
    from lifecycle.models import build_model, load_tokenizer, save_model

    tok = load_tokenizer(Path(tiny_data.artifact_uri) / "tokenizer")
    model = build_model(
        ModelConfig(
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        tok,
        seed=0,
    )
    out = save_model(model, tok, tmp_path_factory.mktemp("tiny-model") / "model")
    return StageResult("upstream", "completed", artifact_uri=str(out), artifact_id="tiny-model")


# Reading MLflow back (what tests check; the project itself only writes these).


def list_checkpoints(tracking_uri: str, run_id: str, root: str = "checkpoints") -> list[int]:
    """Steps of the checkpoints recorded under `root/step_N` of a run."""
    arts = tracking.client(tracking_uri).list_artifacts(run_id, root)
    return sorted(int(a.path.rsplit("_", 1)[1]) for a in arts if a.is_dir)


def child_runs(tracking_uri: str, experiment_id: str, parent_run_id: str) -> list:
    return tracking.client(tracking_uri).search_runs(
        [experiment_id], filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent_run_id}'"
    )


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    history = tracking.client(tracking_uri).get_metric_history(run_id, key)
    return [(m.step, m.value) for m in history]


LIFECYCLE = str(Path(sys.executable).parent / "lifecycle")  # the installed console script


def run_cli(ws: Path, *extra: str, config: str = "configs/tiny_cpu.yaml") -> tuple[int, dict]:
    """`lifecycle run CONFIG --json ...` in a subprocess: (exit code, summary)."""
    cmd = [
        LIFECYCLE,
        "run",
        config,
        "--workspace",
        str(ws),
        "--json",
        "--set",
        f"cluster.dashboard_port={free_port()}",
        *extra,
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    with open(
        ws.parent / "cli.log", "a"
    ) as log:  # what the run printed: the key-leak test reads it
        log.write(p.stderr)
    assert p.stdout.strip(), p.stderr[-3000:]
    return p.returncode, json.loads(p.stdout)  # stdout holds the summary JSON and nothing else


@pytest.fixture(scope="session")
def whole_chain(tmp_path_factory) -> tuple[Path, dict]:
    """The README's main command run once per test session: (workspace, summary). The
    integration tests check and extend it; the compression stage tests start from its
    aligned model and data.

    Under pytest-xdist the workers share one run: the first to ask runs it under a file lock
    in the session's shared temp dir, the others wait and read its summary. Tests that add to
    its workspace (new runs, registry versions, the champion) all live in one module,
    tests/integration/test_cli_chain.py, which `--dist loadfile` runs on one worker in order;
    elsewhere the chain is only read."""
    from filelock import FileLock

    reuse = os.environ.get("LIFECYCLE_TEST_CHAIN")  # local iteration: a finished chain's
    if reuse:  # whole_chain.json (copy the chain dir first: the tests add to its workspace)
        got = json.loads(Path(reuse).read_text())
        return Path(got["workspace"]), got["summary"]
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's temp dir, above each worker's own
    done = shared / "whole_chain.json"
    with FileLock(str(shared / "whole_chain.lock")):
        if not done.is_file():
            ws = shared / "chain" / "ws"
            ws.parent.mkdir(parents=True, exist_ok=True)
            # The worker's share of the threads, like every other process of the suite:
            # the other worker is busy throughout, and beside it a 2-thread training
            # process made 18 steps/s where a 1-thread one made 43 (bench/threads.py,
            # mixed vs split: its OpenMP threads spin at every barrier while their peer
            # is descheduled). Alone, 2 threads gained 5% on this tiny model (45 vs 43).
            rc, summary = run_cli(ws, "--run-name", "first")
            assert rc == 0, summary
            done.write_text(json.dumps({"workspace": str(ws), "summary": summary}))
    got = json.loads(done.read_text())
    return Path(got["workspace"]), got["summary"]


@pytest.fixture
def make_ctx(tmp_path):
    """A RunContext with its own workspace, MLflow experiment and parent run."""

    def make(name: str = "test") -> RunContext:
        ws = tmp_path / "ws"
        ws.mkdir(exist_ok=True)
        uri = tracking.default_tracking_uri(ws)
        exp = tracking.ensure_experiment(uri, "tests", ws / "mlartifacts")
        parent = tracking.start_run(uri, exp, name)
        return RunContext(
            run_name=name,
            workspace=str(ws),
            tracking_uri=uri,
            experiment_id=exp,
            parent_run_id=parent,
            registered_model="test-llm",
            code_version=code_version(),
            checkpoint_copy_max_mb=64,
        )

    return make


# Scheduling on two pytest-xdist workers (pyproject addopts: `-n 2 --dist loadfile
# --no-loadscope-reorder`). The chain module runs on one worker from the first minute to the
# last; everything else runs on the other, chain-independent modules first so that worker
# does not idle while the chain it waits for is still running.
CHAIN_MODULE = "tests/integration/test_cli_chain.py"


def pytest_collection_modifyitems(config, items):
    def order(item) -> int:
        if item.nodeid.startswith(CHAIN_MODULE):
            return 0
        return 2 if "whole_chain" in getattr(item, "fixturenames", ()) else 1

    # A module whose any test reads the chain goes with the chain readers (loadfile keeps a
    # module on one worker; its tests stay in their order).
    module_order: dict[str, int] = {}
    for it in items:
        mod = it.nodeid.split("::")[0]
        module_order[mod] = max(module_order.get(mod, 0), order(it))
    items.sort(key=lambda it: module_order[it.nodeid.split("::")[0]])  # stable


def pytest_xdist_make_scheduler(config, log):
    """xdist's loadfile scheduler, except that the chain module's worker takes no other
    module while more than one chain test is pending: by default a worker is topped up
    whenever two or fewer of its tests are pending, which queued modules behind the
    ~5-minute Prefect test."""
    from xdist.scheduler import LoadFileScheduling

    class ChainWorkerAlone(LoadFileScheduling):
        def _reschedule(self, node) -> None:
            work = self.assigned_work.get(node, {})

            def pending(chain: bool) -> int:
                return sum(
                    not d
                    for scope, done in work.items()
                    if scope.startswith(CHAIN_MODULE) == chain
                    for d in done.values()
                )

            if pending(True) and self.workqueue:
                # A worker holds its last pending test until it knows the next one (or is
                # told to shut down): with only the chain's last test left it would idle
                # until the queue empties (measured: 321 s). One more module lets it go on;
                # that module runs after the chain's last test.
                if pending(True) == 1 and pending(False) == 0:
                    self._assign_work_unit(node)
                return
            super()._reschedule(node)

    return ChainWorkerAlone(config, log)


# The chain module is the suite's critical path (its worker runs it from the first minute
# to the last); everything else fills the time around it. So the other worker, and every
# process it starts, runs at a lower CPU priority (nice +N): when both compete for the cores
# the chain goes first, and the other worker's tests take the cores whenever the chain waits
# (engine and Ray starts, I/O). A worker lowers itself at its first test outside the chain
# module, if it has run no chain test (niceness cannot be raised back without privileges).
# LIFECYCLE_TEST_NICE=0 turns it off.
_NICE = int(os.environ.get("LIFECYCLE_TEST_NICE", "5"))
_ran_chain = False
_niced = False


def pytest_runtest_setup(item):
    global _ran_chain, _niced
    if not os.environ.get("PYTEST_XDIST_WORKER") or _niced:
        return
    if item.nodeid.startswith(CHAIN_MODULE):
        _ran_chain = True
    elif not _ran_chain and _NICE > 0:
        os.nice(_NICE)
        _niced = True


# Where the suite's time goes: LIFECYCLE_TEST_TIMELINE=FILE appends one line per test phase,
# "worker start end phase nodeid" (epoch seconds), and one per worker for its session start
# and end, so idle stretches between tests show up (pytest's --durations counts tests only).
_TIMELINE = os.environ.get("LIFECYCLE_TEST_TIMELINE")


def _timeline(line: str) -> None:
    if _TIMELINE:
        with open(_TIMELINE, "a") as f:
            f.write(f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')} {line}\n")


def pytest_sessionstart(session):
    import time

    _timeline(f"{time.time():.1f} {time.time():.1f} session-start -")


def pytest_sessionfinish(session):
    import time

    _timeline(f"{time.time():.1f} {time.time():.1f} session-finish -")


def pytest_runtest_logreport(report):
    if _TIMELINE and os.environ.get("PYTEST_XDIST_WORKER"):  # once, where the test ran
        stop = report.start + report.duration
        _timeline(f"{report.start:.1f} {stop:.1f} {report.when} {report.nodeid}")
