"""The Prefect deployments against a real Prefect server started here (127.0.0.1, free port):
`lifecycle schedule` registers them with the config's cron, a process worker runs them;
`lifecycle/retrain` ends early on unchanged data, and on new data trains a candidate from the
champion whose promotion follows the gate, with the running server rolling over to it;
`lifecycle/redeploy` starts the server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from lifecycle import tracking
from tests.conftest import LIFECYCLE, ROOT, free_port

# These tests add to the session's whole-chain workspace (runs, registry versions, the
# champion) and read what the earlier ones left: one pytest-xdist worker runs them in order.
pytestmark = pytest.mark.xdist_group("chain")

PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "lifecycle-test"
# A shorter retrain than the chain's (the stages themselves are tested elsewhere); the gate is
# opened so that the promotion is certain, the next run closes it with an absolute floor.
FAST = [
    "sft.max_steps=100",
    "rlhf.max_steps=30",
    "rlhf.reward_model.max_steps=60",
    "rlhf.rlaif.num_prompts=64",
    "rlhf.eval_prompts=32",
    "quantize.onnx=false",
    "quantize.vllm.enabled=false",
    "watermark.generations=40",
    "deploy.eval.prompts=64",  # the gap limit follows: 1/64 per differing answer
    "deploy.reward_samples=1",
    "deploy.max_endpoint_exact_match_gap=0.05",
    "deploy.gate.max_exact_match_drop=1",
    "deploy.gate.max_perplexity_ratio=1000",
    "deploy.gate.max_reward_drop=10",
]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free 127.0.0.1 port with its own home; yields the env that
    points clients at it."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    log = open(home / "server.log", "w")  # noqa: SIM115 - the server writes to it
    proc = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the Prefect server did not come up"
            time.sleep(1)
        yield env
    finally:
        _stop(proc)
        log.close()


def _api(env: dict, path: str, body: dict | None = None) -> list | dict:
    r = httpx.post(f"{env['PREFECT_API_URL']}/{path}", json=body or {}, timeout=30)
    r.raise_for_status()
    return r.json()


def _run_deployment(env: dict, name: str, params: dict) -> str:
    """`prefect deployment run NAME --watch` (the worker runs it); its final state's name."""
    p = subprocess.run(
        [PREFECT, "deployment", "run", name, "--params", json.dumps(params), "--watch"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    out = p.stdout + p.stderr
    assert "finished" in out, out[-3000:]
    return out


def _outcome(ws: Path, kind: str) -> dict:
    """The newest `<ws>/runs/*/<kind>.json` (what a retrain or redeploy run decided)."""
    files = sorted((ws / "runs").glob(f"*/{kind}.json"), key=lambda f: f.stat().st_mtime)
    assert files, f"no {kind}.json in {ws / 'runs'}"
    return json.loads(files[-1].read_text())


def _served(url: str) -> str:
    return httpx.get(f"{url}/healthz", timeout=30).json()["version"]


@pytest.mark.timeout(2400)
def test_retrain_and_redeploy_as_prefect_deployments(whole_chain, prefect_server, tmp_path):
    ws, summary = whole_chain
    env = prefect_server
    uri = summary["mlflow"]["tracking_uri"]
    c = tracking.client(uri)

    def versions() -> list[int]:
        return sorted(int(v.version) for v in c.search_model_versions("name='tiny-llm'"))

    def champion() -> str:
        return str(c.get_model_version_by_alias("tiny-llm", "champion").version)

    def ports() -> list[str]:  # each run's own Ray dashboard port (a server may run beside it)
        return [f"cluster.dashboard_port={free_port()}"]

    # Registration: three deployments of the flow `lifecycle`, the retrain on the config's cron.
    p = subprocess.run(
        [
            LIFECYCLE,
            "schedule",
            "configs/tiny_cpu.yaml",
            "--workspace",
            str(ws),
            "--work-pool",
            POOL,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    registered = {d["name"]: d for d in json.loads(p.stdout)}
    assert set(registered) == {"lifecycle/full", "lifecycle/retrain", "lifecycle/redeploy"}
    cron = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())["operations"]
    cron = cron["retrain"]["cron"]
    deps = {d["name"]: d for d in _api(env, "deployments/filter")}
    assert set(deps) == {"full", "retrain", "redeploy"}
    assert all(d["work_pool_name"] == POOL for d in deps.values())
    assert [s["schedule"]["cron"] for s in deps["retrain"]["schedules"]] == [cron]
    assert deps["full"]["schedules"] == [] and deps["redeploy"]["schedules"] == []
    assert deps["retrain"]["parameters"]["workspace"] == str(ws)
    flows = {f["id"]: f["name"] for f in _api(env, "flows/filter")}
    assert {flows[d["flow_id"]] for d in deps.values()} == {"lifecycle"}

    worker_log = open(tmp_path / "worker.log", "w")  # noqa: SIM115
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", POOL],
        cwd=ROOT,
        env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"},  # picks runs up sooner than 10 s
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = None
    try:
        # The full chain's deployment, here for its data stage only: cached from the chain.
        out = _run_deployment(env, "lifecycle/full", {"stages": ["data"], "overrides": ports()})
        assert "Completed" in out, out[-3000:]
        newest = max((ws / "runs").glob("*/summary.json"), key=lambda f: f.stat().st_mtime)
        ran = json.loads(newest.read_text())
        assert [(s["stage"], s["status"]) for s in ran["stages"]] == [("data", "cached")]

        # 1. Unchanged data: the retrain ends early and says so; nothing is registered.
        before, champ0 = versions(), champion()
        out = _run_deployment(env, "lifecycle/retrain", {"overrides": ports()})
        assert "Completed" in out, out[-3000:]
        unchanged = _outcome(ws, "retrain")
        assert unchanged["status"] == "unchanged", unchanged
        assert "data unchanged" in unchanged["message"]
        assert versions() == before and champion() == champ0

        # 2. Redeploy: no server runs, so one is started for the champion.
        out = _run_deployment(env, "lifecycle/redeploy", {"overrides": ports()})
        assert "Completed" in out, out[-3000:]
        red = _outcome(ws, "redeploy")
        url, pid = red["url"], red["pid"]
        assert red["serving"] and _served(url) == f"tiny-llm/{champ0}"

        # 3. New data: a candidate trained from the champion's weights; the (open) gate
        # passes, the alias moves, and the running server rolls over to it.
        new = tmp_path / "new.jsonl"
        from lifecycle.data.demo import generate, write_jsonl

        write_jsonl(generate(300, seed=11), new)
        params = {"data_source": str(new), "data_format": "jsonl", "overrides": FAST + ports()}
        out = _run_deployment(env, "lifecycle/retrain", params)
        assert "Completed" in out, out[-3000:]
        res = _outcome(ws, "retrain")
        assert res["status"] == "promoted", res
        cand = res["candidate"].split("/")[1]
        assert int(cand) == max(versions()) and champion() == cand
        assert res["data_manifest_sha256"] != unchanged["data_manifest_sha256"]
        mv = tracking.model_version(uri, "tiny-llm", cand)
        assert mv.tags["lifecycle.promotion"] == "promoted"
        assert mv.tags["lifecycle.data_manifest_sha256"] == res["data_manifest_sha256"]
        # Lineage: the retrained SFT model's parent is the champion's trainable ancestor.
        run = json.loads((ws / "runs" / res["run_name"] / "summary.json").read_text())
        statuses = {s["stage"]: s["status"] for s in run["stages"]}
        assert statuses["sft"] == statuses["rlhf"] == statuses["quantize"] == "completed"
        sft = next(s for s in run["stages"] if s["stage"] == "sft")
        assert (
            tracking.get_run(uri, sft["mlflow_run_id"]).data.tags["lifecycle.parent_model"]
            == res["base_model"]
        )
        assert res["base_model"].startswith("tiny-llm-rlhf/")
        ep = res["endpoint"]
        assert ep["serving"] and ep["url"] == url and ep["pid"] == pid  # same server, rolled
        assert _served(url) == f"tiny-llm/{cand}"

        # 4. The same data and base again, forced, under an exact-match floor no model
        # reaches: only the deploy stage runs again, the candidate is rejected, the alias stays.
        params = {
            "base_model": f"models:/{res['base_model']}",
            "data_source": str(new),
            "data_format": "jsonl",
            "always": True,
            "overrides": [*FAST, "deploy.gate.min_exact_match=1.0", *ports()],
        }
        out = _run_deployment(env, "lifecycle/retrain", params)
        assert "Completed" in out, out[-3000:]
        rej = _outcome(ws, "retrain")
        assert rej["status"] == "rejected" and "below the floor 1" in rej["reasons"], rej
        assert champion() == cand and _served(url) == f"tiny-llm/{cand}"
        rerun = json.loads((ws / "runs" / rej["run_name"] / "summary.json").read_text())
        statuses = {s["stage"]: s["status"] for s in rerun["stages"]}
        assert statuses["deploy"] == "completed"
        assert all(statuses[s] == "cached" for s in ("data", "sft", "rlhf", "quantize"))
        rejected = tracking.model_version(uri, "tiny-llm", rej["candidate"].split("/")[1])
        assert rejected.tags["lifecycle.promotion"] == "rejected"

        # 5. Redeploy an earlier version: the alias moves back, the server follows.
        out = _run_deployment(env, "lifecycle/redeploy", {"version": int(champ0)})
        assert "Completed" in out, out[-3000:]
        assert champion() == champ0 and _served(url) == f"tiny-llm/{champ0}"
    finally:
        subprocess.run([LIFECYCLE, "serve", "stop", "--workspace", str(ws)], timeout=300)
        _stop(worker)
        worker_log.close()
    assert not (ws / "serve" / "state.json").exists()
