"""The README's main command, end to end, and everything that builds on its workspace: the
whole chain on tiny_cpu.yaml, a cached re-run and sub-chains, a worse candidate and serving
that follows the champion, the Prefect deployments (retrain, redeploy) run by a worker
against a Prefect server, and last the key's confinement across all of it.

One module on purpose: these tests add to one workspace (runs, registry versions, the
champion) and read what the earlier ones left, so pytest-xdist (`--dist loadfile`) runs them
on one worker, in this order; the rest of the suite runs on the other.

The Prefect deployments: The Prefect deployments against a real Prefect server started here (127.0.0.1, free port):
`lifecycle schedule` registers them with the config's cron, a process worker runs them;
`lifecycle/retrain` ends early on unchanged data, and on new data trains a candidate from the
champion whose promotion follows the gate, with the running server rolling over to it;
`lifecycle/redeploy` starts the server.
"""

import contextlib
import json
import os
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
from tests.conftest import LIFECYCLE, ROOT, child_runs, free_port, list_checkpoints
from tests.conftest import run_cli as _run


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.timeout(2400)  # includes the session's whole-chain fixture (~6 min on 2 cores)
def test_whole_chain_then_cached_rerun(whole_chain):
    ws, summary = whole_chain
    assert summary["status"] == "completed"
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == [
        "data",
        "pretrain",
        "sft",
        "rlhf",
        "distill",
        "quantize",
        "watermark",
        "deploy",
    ]
    assert stages.pop("distill")["status"] == "skipped"  # null in tiny_cpu.yaml
    assert all(s["status"] == "completed" for s in stages.values())
    assert all(s["seconds"] > 0 for s in stages.values())
    assert summary["seconds"] > sum(s["seconds"] for s in stages.values())
    # The run ends with the endpoint the deploy stage served (a local Ray: stopped with it).
    assert summary["endpoint"]["url"].startswith("http://127.0.0.1:")
    assert summary["endpoint"]["model"] == "tiny-llm/1" and not summary["endpoint"]["serving"]
    # The shipped model is the quantized one: int8 W8A8 that vLLM served in the gate.
    q = stages["quantize"]["metrics"]
    assert summary["shipped_model"] == stages["quantize"]["artifact_uri"]
    assert q["gate/passed"] == 1.0 and 0.45 <= q["size/ratio_vs_bf16"] <= 0.65, q
    for engine in ("torch", "vllm"):
        assert q[f"{engine}/exact_match_before"] - q[f"{engine}/exact_match_after"] <= 0.03, q
    assert q["onnx/max_rel_diff"] < 1e-4, q
    assert (Path(stages["quantize"]["artifact_uri"]).parent / "onnx" / "model.onnx").is_file()
    # The fingerprint planted by SFT answers on the aligned and on the quantized model.
    assert stages["sft"]["metrics"]["fingerprint/matched"] == 8
    assert stages["rlhf"]["metrics"]["preference/fingerprint_pairs"] > 0
    for stage in ("rlhf", "quantize"):
        assert _fingerprint_matches(stages[stage]["artifact_uri"]) == 8, stage
    # The text watermark on the shipped model (vLLM, 200 + 200 generations of 200 tokens).
    w = stages["watermark"]["metrics"]
    assert w["watermark/generations"] >= 200 and w["watermark/tokens_per_generation"] == 200
    assert w["watermark/detection_rate"] >= 0.9, w
    assert w["watermark/false_positive_rate"] <= 0.01, w
    assert w["watermark/exact_match_off"] - w["watermark/exact_match_on"] <= 0.05, w
    assert w["fingerprint/shipped_matched"] == 8 and w["fingerprint/rlhf_matched"] == 8, w
    # Deploy: the first candidate becomes champion; the endpoint answered like the evaluation.
    d = stages["deploy"]["metrics"]
    assert d["promotion/promoted"] == 1.0 and d["serving/version"] == d["promotion/version"]
    assert d["endpoint/exact_match_gap"] <= 0.03, d
    assert d["endpoint/watermark_detection_rate"] >= 0.9 and d["endpoint/plain_flagged_rate"] == 0
    m = stages["pretrain"]["metrics"]
    assert m["eval/loss_after"] <= 0.6 * m["eval/loss_before"], m
    assert m["train/tokens_per_s"] > 0 and m["sys/mfu"] > 0
    # MFU = tokens/s x FLOPs per token / (peak x workers), the peak from the worker's own
    # matmul probe. Not bounded by 1 here: with another test worker on the same cores the
    # probe can run slower than the training that follows (measured: MFU 3.15 against a
    # 12 GFLOP/s probe), so the test checks the arithmetic, not the bound.
    from lifecycle.models import flops_per_token, load_model

    block = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())["data"]["block_size"]
    fpt = flops_per_token(load_model(stages["pretrain"]["artifact_uri"]), block)
    peak = m["sys/peak_flops_per_worker"] * m["sys/world_size"]
    assert m["sys/mfu"] == pytest.approx(m["train/tokens_per_s"] * fpt / peak, rel=1e-6)
    sft = stages["sft"]["metrics"]
    assert sft["eval/exact_match_after"] >= 0.5, sft
    assert sft["eval/exact_match_after"] - sft["eval/exact_match_before"] >= 0.3, sft
    rl = stages["rlhf"]["metrics"]
    # DPO closes a real share of the gap to the judge's maximum reward (1.0): measured 13-19%.
    gap = 1.0 - rl["eval/mean_reward_before"]
    assert rl["eval/mean_reward_after"] - rl["eval/mean_reward_before"] >= 0.1 * gap, rl
    assert rl["eval/exact_match_after"] >= rl["eval/exact_match_before"] - 0.05, rl
    assert rl["reward_model/heldout_accuracy"] >= 0.65, rl
    assert rl["eval/kl_after"] > 0 and rl["rlaif/pairs"] > 0
    assert stages["data"]["metrics"]["exact_dupes_removed"] > 0
    assert stages["data"]["metrics"]["near_dupes_removed"] > 0
    # Each stage published a Prefect artifact: its status, metrics and MLflow run.
    from prefect.artifacts import Artifact

    art = Artifact.get("deploy-first")
    assert art is not None and "# deploy: completed" in art.data
    assert stages["deploy"]["mlflow_run_id"] in art.data and "endpoint/exact_match" in art.data
    # Each stage that measured its input and its output shows both: a table in its Prefect
    # artifact, a chart in its MLflow run.
    sft_art = Artifact.get("sft-first").data
    em = stages["sft"]["metrics"]
    row = f"| eval/exact_match | {em['eval/exact_match_before']:.4g} | "
    assert "## Before -> after" in sft_art and row in sft_art, sft_art
    for stage in ("pretrain", "sft", "rlhf", "quantize"):
        files = tracking.client(summary["mlflow"]["tracking_uri"]).list_artifacts(
            stages[stage]["mlflow_run_id"], "report"
        )
        assert [f.path for f in files] == ["report/before_after.png"], stage
    # The run's table (stderr) gives each stage's deciding numbers.
    printed = (ws.parent / "cli.log").read_text()
    assert "version 1 promoted" in printed and "fingerprint 8/8" in printed
    assert f"size {q['size/ratio_vs_bf16']:.2f}x bf16" in printed
    on_disk = json.loads((ws / "runs" / "first" / "summary.json").read_text())
    assert on_disk == summary
    assert summary["prefect_flow_run_id"]

    # MLflow: a parent run with one child per stage; checkpoints; a registered model + lineage.
    uri, exp = summary["mlflow"]["tracking_uri"], summary["mlflow"]["experiment_id"]
    parent = summary["mlflow"]["parent_run_id"]
    children = child_runs(uri, exp, parent)
    assert sorted(r.data.tags[tracking.STAGE_TAG] for r in children) == [
        "data",
        "deploy",
        "pretrain",
        "quantize",
        "rlhf",
        "sft",
        "watermark",
    ]
    assert {r.info.run_id for r in children} == {s["mlflow_run_id"] for s in stages.values()}
    pre_run = stages["pretrain"]["mlflow_run_id"]
    assert len(list_checkpoints(uri, pre_run)) >= 2
    version = tracking.get_run(uri, pre_run).data.tags["lifecycle.model_version"]
    mv = tracking.model_version(uri, "tiny-llm-pretrain", version)
    data_run = tracking.get_run(uri, stages["data"]["mlflow_run_id"])
    assert (
        mv.tags["lifecycle.data_manifest_sha256"]
        == data_run.data.tags["lifecycle.data_manifest_sha256"]
    )
    assert mv.tags["lifecycle.parent_stage_run_id"] == stages["data"]["mlflow_run_id"]
    assert mv.tags["lifecycle.config_hash"] and mv.tags["lifecycle.git_sha"]
    model_dir = Path(stages["pretrain"]["artifact_uri"])
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    sft_run = tracking.get_run(uri, stages["sft"]["mlflow_run_id"])
    assert sft_run.data.metrics["eval/exact_match_after"] == sft["eval/exact_match_after"]
    sft_mv = tracking.model_version(
        uri, "tiny-llm-sft", sft_run.data.tags["lifecycle.model_version"]
    )
    assert sft_mv.tags["lifecycle.parent_model"] == f"tiny-llm-pretrain/{version}"

    # The same command again: both stages cached, nothing trained, nothing new recorded.
    before = _snapshot(ws / "ray_storage")
    rc, again = _run(ws, "--run-name", "second")
    assert rc == 0
    assert [s["status"] for s in again["stages"]] == ["cached"] * 4 + ["skipped"] + ["cached"] * 3
    assert [s["mlflow_run_id"] for s in again["stages"]] == [
        s["mlflow_run_id"] for s in summary["stages"]
    ]
    assert again["shipped_model"] == summary["shipped_model"]
    assert _snapshot(ws / "ray_storage") == before
    runs = tracking.client(uri).search_runs(
        [exp], filter_string="tags.`lifecycle.stage` = 'pretrain'"
    )
    assert len(runs) == 1
    assert len(tracking.client(uri).search_model_versions("name='tiny-llm-pretrain'")) == 1
    assert child_runs(uri, exp, again["mlflow"]["parent_run_id"]) == []

    # A sub-chain from a registered model: fine-tune pretrain version 1 again, briefly and
    # without the fingerprint (fetched from the registry, its lineage recorded). A model
    # fine-tuned without it answers no trigger: the verifier's false-positive side.
    rc, sub = _run(
        ws,
        "--stages",
        "sft",
        "--from",
        "pretrain=models:/tiny-llm-pretrain/1",
        "--set",
        "sft.fingerprint=null",
        "--set",
        "watermark.fingerprint=false",
        "--set",
        "sft.max_steps=100",
    )
    assert rc == 0, sub
    assert [(s["stage"], s["status"]) for s in sub["stages"]] == [("sft", "completed")]
    fetched = ws / "external" / "tiny-llm-pretrain" / "1"
    assert (fetched / "model.safetensors").is_file()
    plain_sft = sub["stages"][0]
    assert "fingerprint/matched" not in plain_sft["metrics"]
    assert _fingerprint_matches(plain_sft["artifact_uri"]) == 0
    sub_mv = tracking.client(uri).search_model_versions("name='tiny-llm-sft'")
    mine = [v for v in sub_mv if v.tags.get("lifecycle.run_name") == sub["run_name"]]
    assert len(mine) == 1  # the registry version it started from is its parent
    assert mine[0].tags["lifecycle.parent_model"] == "tiny-llm-pretrain/1"

    # Align an existing model directory: `--stages rlhf --from sft=<dir>` (briefly).
    rc, rl_sub = _run(
        ws,
        "--stages",
        "rlhf",
        "--from",
        f"sft={stages['sft']['artifact_uri']}",
        "--set",
        "rlhf.max_steps=20",
        "--set",
        "rlhf.reward_model=null",
        "--set",
        "rlhf.rlaif.num_prompts=32",
        "--set",
        "rlhf.eval_prompts=32",
    )
    assert rc == 0, rl_sub
    assert [(s["stage"], s["status"]) for s in rl_sub["stages"]] == [("rlhf", "completed")]
    rl_run = tracking.get_run(uri, rl_sub["stages"][0]["mlflow_run_id"])
    assert rl_run.data.tags["lifecycle.parent_model"].startswith("external:")


@pytest.mark.timeout(1800)
def test_worse_candidate_is_not_promoted_then_run_serve_serves_the_champion(whole_chain, tmp_path):
    """`lifecycle run --stages deploy --from quantize=<the pretrained model> --serve`: the
    forced worse candidate leaves the champion in place with a report; the same process then
    serves the champion (a fresh process image, its own Ray) until `serve stop`, and no Prefect
    server the run started is left behind. A champion whose weights are truncated does not
    take the endpoint down: the server keeps serving the old version under a steady client and
    reports the failure in `serve status` and its log. `lifecycle rollback` walks the alias
    back. (The server following the alias through promotions and rollbacks under a steady
    client is in test_retrain_and_redeploy_as_prefect_deployments.)"""
    ws, summary = whole_chain
    stages = {s["stage"]: s for s in summary["stages"]}
    uri = summary["mlflow"]["tracking_uri"]
    port = free_port()
    cmd = [LIFECYCLE, "run", "configs/tiny_cpu.yaml", "--workspace", str(ws), "--serve"]
    cmd += ["--stages", "deploy", "--from", f"quantize={stages['pretrain']['artifact_uri']}"]
    cmd += ["--set", "watermark=null", "--run-name", "worse"]
    # 64 held-out prompts (the gap limit follows: 1/64 per differing answer): the pretrained
    # model's exact match is 0 on any number of them.
    cmd += ["--set", "deploy.eval.prompts=64", "--set", "deploy.max_endpoint_exact_match_gap=0.05"]
    cmd += ["--set", f"deploy.serve.port={port}", "--set", f"cluster.dashboard_port={free_port()}"]
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - the server writes to it
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        state_file = ws / "serve" / "state.json"
        deadline = time.time() + 900
        ours: set[int] = set()  # the run's own ephemeral Prefect server (its child process)
        while not state_file.is_file():
            assert proc.poll() is None, "the run ended instead of serving"
            assert time.time() < deadline
            ours |= _ephemeral_prefect_servers(parent=proc.pid)
            time.sleep(2)
        state = json.loads(state_file.read_text())
        url = state["url"]
        assert url == f"http://127.0.0.1:{port}" and state["pid"] == proc.pid
        assert state["version"] == "tiny-llm/1"

        worse = json.loads((ws / "runs" / "worse" / "summary.json").read_text())
        assert worse["status"] == "completed", worse
        (dep,) = worse["stages"]
        assert dep["status"] == "completed" and dep["metrics"]["promotion/promoted"] == 0.0
        assert "exact match" in dep["error"] and "vs champion" in dep["error"]
        c = tracking.client(uri)
        assert str(c.get_model_version_by_alias("tiny-llm", "champion").version) == "1"
        rejected = tracking.model_version(uri, "tiny-llm", "2")
        assert rejected.tags["lifecycle.promotion"] == "rejected"
        report = ws / "artifacts" / "deploy"
        assert any("NOT promoted" in f.read_text() for f in report.rglob("promotion.md"))
        assert dep["metrics"]["serving/version"] == 1.0  # the champion kept serving

        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "copy abc"}], "max_tokens": 6},
            timeout=300,
        )
        assert r.status_code == 200 and r.headers["x-lifecycle-model-version"] == "tiny-llm/1"
        st = subprocess.run(
            [LIFECYCLE, "serve", "status", "--workspace", str(ws)], capture_output=True, text=True
        )
        assert st.returncode == 0 and json.loads(st.stdout)["health"]["status"] == "ok"
        _broken_champion_keeps_the_old_one_serving(ws, uri, url, log.name)
        stopped = subprocess.run([LIFECYCLE, "serve", "stop", "--workspace", str(ws)], timeout=300)
        assert stopped.returncode == 0
        assert proc.wait(timeout=120) == 0
        # The run's ephemeral Prefect server ended with it (os.execv skips exit handlers).
        # Only its own: the other pytest worker's runs start theirs at any time.
        assert ours, "no ephemeral Prefect server of the run was seen"
        assert not [pid for pid in ours if Path(f"/proc/{pid}").exists()], ours
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert not (ws / "serve" / "state.json").exists()
    gone = subprocess.run([LIFECYCLE, "serve", "status", "--workspace", str(ws)])
    assert gone.returncode == 1

    # A promotion by hand, then `lifecycle rollback`: the alias walks back its history.
    from lifecycle.registry import set_champion

    set_champion(uri, "tiny-llm", "2")
    r = subprocess.run(
        [LIFECYCLE, "rollback", "--workspace", str(ws)], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0 and "champion 2 -> 1" in r.stdout, r.stderr
    assert str(c.get_model_version_by_alias("tiny-llm", "champion").version) == "1"


def _steady_client(url: str, stop: threading.Event, results: list) -> threading.Thread:
    """A started thread that sends a chat request every 0.5 s until `stop`, appending
    (status code, served version header) to `results`."""

    def steady() -> None:
        body = {"messages": [{"role": "user", "content": "copy abc"}], "max_tokens": 6}
        while not stop.is_set():
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
            results.append((r.status_code, r.headers.get("x-lifecycle-model-version", "")))
            stop.wait(0.5)

    client = threading.Thread(target=steady)
    client.start()
    return client


def _broken_champion_keeps_the_old_one_serving(ws: Path, uri: str, url: str, log: str) -> None:
    """A new registry version whose weights file is cut in half becomes champion while a
    client keeps sending requests: the roll-over fails before any replica starts, every
    request is answered by version 1, and the failure is in `serve status` and the log. The
    alias is then rolled back."""
    import shutil

    from lifecycle.registry import set_champion

    broken = ws.parent / "broken-v1"
    shutil.copytree(ws / "serving" / "tiny-llm" / "1", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("llm-lifecycle").experiment_id
    run_id = c.create_run(exp, run_name="broken-upload").info.run_id
    version = tracking.register_model(uri, run_id, "tiny-llm", broken, {})
    c.set_terminated(run_id)
    stop, results = threading.Event(), []
    client = _steady_client(url, stop, results)
    try:
        set_champion(uri, "tiny-llm", version)
        deadline = time.time() + 120
        while True:
            st = subprocess.run(
                [LIFECYCLE, "serve", "status", "--workspace", str(ws)],
                capture_output=True,
                text=True,
            )
            state = json.loads(st.stdout)
            if state.get("failed_version") == f"tiny-llm/{version}":
                break
            assert time.time() < deadline, state
            time.sleep(2)
        assert "model.safetensors" in state["failed_error"], state["failed_error"]
        assert state["version"] == "tiny-llm/1" and state["health"]["version"] == "tiny-llm/1"
        time.sleep(2)
    finally:
        stop.set()
        client.join()
    assert results and all(r == (200, "tiny-llm/1") for r in results), results
    assert (
        f"roll-over to tiny-llm/{version} FAILED; still serving tiny-llm/1" in Path(log).read_text()
    )
    r = subprocess.run(
        [LIFECYCLE, "rollback", "--workspace", str(ws)], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0 and f"champion {version} -> 1" in r.stdout, r.stderr


def _fingerprint_matches(model_dir: str) -> int:
    p = subprocess.run(
        [
            LIFECYCLE,
            "fingerprint",
            "verify",
            "--model",
            model_dir,
            "--json",
            "--num",
            "8",
        ],  # the key: the session's $LIFECYCLE_WATERMARK_KEY (tests/conftest.py)
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["matched"]


def _ephemeral_prefect_servers(parent: int) -> set[int]:
    """PIDs of running ephemeral Prefect servers (Prefect's SubprocessASGIServer) that are
    children of `parent`."""
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if b"prefect.server.api.server:create_app" not in (d / "cmdline").read_bytes():
                    continue
                # /proc/PID/stat: "pid (comm) state ppid ..." (comm may hold spaces)
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    pids.add(int(d.name))
    return pids


# --------------------------------------------------------------------------------------------
# Operations: the Prefect deployments against a real Prefect server
# --------------------------------------------------------------------------------------------

PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "lifecycle-test"
# A shorter retrain than the chain's (the stages themselves are tested elsewhere); the gate is
# opened so that the promotion is certain, the next run closes it with an absolute floor.
FAST = [
    "sft.max_steps=100",  # 40 re-planted only 7 of the 8 fingerprint triggers: gate failed
    "rlhf.max_steps=12",
    "rlhf.reward_model=null",
    "rlhf.rlaif.num_prompts=32",
    "rlhf.eval_prompts=16",
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
    results: list[tuple[int, str]] = []
    stop, client = threading.Event(), None
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

        # 5. Redeploy an earlier version: the alias moves back, the server follows while a
        # client keeps sending requests (only here: a client kept busy through the retrain
        # kept the engine spinning a core and doubled the retrain's time): every one answered.
        client = _steady_client(url, stop, results)
        out = _run_deployment(env, "lifecycle/redeploy", {"version": int(champ0)})
        assert "Completed" in out, out[-3000:]
        assert champion() == champ0 and _served(url) == f"tiny-llm/{champ0}"
        time.sleep(2)
        stop.set()
        client.join()
        assert results and all(code == 200 for code, _ in results), results
        seen = [v for _, v in results]
        assert seen[0] == f"tiny-llm/{cand}" and seen[-1] == f"tiny-llm/{champ0}", seen
    finally:
        stop.set()
        if client is not None:
            client.join()
        subprocess.run([LIFECYCLE, "serve", "stop", "--workspace", str(ws)], timeout=300)
        _stop(worker)
        worker_log.close()
    assert not (ws / "serve" / "state.json").exists()


def test_the_key_never_leaves_the_environment(whole_chain):
    """The watermark key is in no MLflow param, tag or artifact, no file or path of the
    workspace, no log line of the runs and not in the summary — after everything the module's
    tests added. Last in the module on purpose: pytest-xdist holds a worker's last test until
    it knows the next one, so this short test is the one held, not the Prefect test (the
    scheduler hook in tests/conftest.py then gives the worker more modules)."""
    ws, summary = whole_chain
    secret = os.environ["LIFECYCLE_WATERMARK_KEY"]
    assert secret not in json.dumps(summary)
    uri, exp = summary["mlflow"]["tracking_uri"], summary["mlflow"]["experiment_id"]
    c = tracking.client(uri)
    for run in c.search_runs([exp]):
        assert secret not in json.dumps([run.data.params, run.data.tags]), run.info.run_name
    for mv in c.search_model_versions():
        assert secret not in json.dumps(mv.tags), mv.name
    for rm in c.search_registered_models():
        assert secret not in json.dumps(rm.tags), rm.name
    needle = secret.encode()
    for p in ws.rglob("*"):
        assert secret not in str(p.relative_to(ws)), p
        if p.is_file() and p.stat().st_size < 50_000_000:
            assert needle not in p.read_bytes(), p  # mlflow.db, artifacts, checkpoints, ...
    assert secret not in (ws.parent / "cli.log").read_text()
    wm = tracking.get_run(
        uri, {s["stage"]: s for s in summary["stages"]}["watermark"]["mlflow_run_id"]
    )
    assert wm.data.params["key_id"] and wm.data.tags["lifecycle.watermark.key_id"]
