"""A head and 2 worker nodes on this machine (`lifecycle cluster up`): STRICT_SPREAD puts one
training worker per node, and killing a worker node's raylet mid-training does not fail the
run (it resumes from its checkpoint on the remaining nodes). Token auth (the default)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import LIFECYCLE, ROOT

pytestmark = pytest.mark.timeout(1500)

PLACEMENT = """
import json, sys, time, ray
from ray.util.state import list_actors
address = sys.argv[1]
ray.init(address=address, log_to_driver=False)
deadline = time.time() + 600
while time.time() < deadline:
    acts = list_actors(address=address, detail=True,
                       filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    if len(acts) == 2:
        index = {n["NodeID"]: next(int(k.rsplit("_", 1)[1]) for k in n["Resources"]
                                   if k.startswith("lifecycle_node_"))
                 for n in ray.nodes() if n["Alive"]}
        print(json.dumps(sorted(index[a.node_id] for a in acts)))
        break
    time.sleep(1)
"""


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LIFECYCLE, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
    )


def test_strict_spread_and_a_killed_worker_node(tmp_path):
    from ray_cluster import local_cluster

    ws = tmp_path / "ws"
    up = _cli("cluster", "up", "--workers", "2", "--cpus-per-node", "1", "--workspace", str(ws))
    assert up.returncode == 0, up.stderr
    state = json.loads(up.stdout)
    try:
        assert [n["role"] for n in state["nodes"]] == ["head", "worker", "worker"]
        env = {**os.environ, **local_cluster.auth_env(state)}
        st = _cli("cluster", "status", "--workspace", str(ws), env=env)
        assert st.returncode == 0 and st.stdout.count("node_") >= 3, st.stdout + st.stderr

        run = [LIFECYCLE, "run", "configs/tiny_cpu.yaml", "--workspace", str(ws), "--json"]
        run += ["--stages", "data,pretrain", "--set", f"cluster.address={state['address']}"]
        # Placement and recovery are under test, not learning: a small corpus and batch.
        for kv in (
            "data.demo.num_docs=600",
            "pretrain.micro_batch_size=4",
            "pretrain.scaling.num_workers=2",
            "pretrain.scaling.placement_strategy=STRICT_SPREAD",
            "pretrain.scaling.resources_per_worker={CPU: 1}",
            "pretrain.max_steps=90",
            "pretrain.checkpoint_every=30",
            "pretrain.max_failures=2",
        ):
            run += ["--set", kv]
        proc = subprocess.Popen(
            run, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        placed = subprocess.run(
            [sys.executable, "-c", PLACEMENT, state["address"]],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        nodes = json.loads(placed.stdout.strip().splitlines()[-1])
        assert len(set(nodes)) == 2, nodes  # one training worker per node

        # After the first checkpoint: kill the raylet of a worker node that hosts a worker.
        deadline = time.time() + 900
        while not list((ws / "ray_storage").glob("pretrain-*/step_*/COMMITTED")):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(1)
        victim = max(nodes)
        assert victim > 0  # never the head
        os.kill(raylet_pid(state, victim), signal.SIGKILL)
        out, _ = proc.communicate(timeout=1200)
        assert proc.returncode == 0, out[-2000:]
        summary = json.loads(out)
        pre = {s["stage"]: s for s in summary["stages"]}["pretrain"]
        assert pre["status"] == "completed" and pre["metrics"]["train/steps"] == 90
        assert pre["metrics"]["train/resumed_from_step"] >= 30, pre["metrics"]
        assert pre["metrics"]["sys/world_size"] == 2
    finally:
        down = _cli("cluster", "down", "--workspace", str(ws))
    assert down.returncode == 0, down.stderr
    assert not local_cluster.cluster_pids(state)  # every process of the cluster ended
    assert not (ws / "cluster" / "state.json").exists()


def raylet_pid(state: dict, node_index: int) -> int | None:
    """The raylet of one node (to kill it: a node failure)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (
            "raylet/raylet" in cmd
            and f"lifecycle_node_{node_index}," in cmd
            and f":{state['gcs_port']}" in cmd
        ):
            return int(proc.name)
    return None
