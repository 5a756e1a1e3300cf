"""A run killed during RLHF and resumed: `lifecycle run --resume NAME` reruns the run as it
was asked for (config, stages, `--from` sources) and training goes on from its last committed
checkpoint. Its own workspace, starting from the whole chain's pretrained model and data (read
only), so it runs beside the chain module's tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import LIFECYCLE, ROOT, free_port
from tests.conftest import run_cli as _run


@pytest.mark.timeout(2400)  # may wait for the session's whole chain
def test_a_run_killed_during_rlhf_resumes_from_its_checkpoint(whole_chain, tmp_path):
    """The driver is killed (SIGKILL to its process group) once DPO has committed a
    checkpoint; `--resume` reruns the same sub-chain from the same sources: SFT comes back
    cached and DPO goes on from the checkpoint, not from step 0."""
    _, summary = whole_chain
    chain = {s["stage"]: s for s in summary["stages"]}
    ws = tmp_path / "ws"
    sources = ["--from", f"pretrain={chain['pretrain']['artifact_uri']}"]
    sources += ["--from", f"data={chain['data']['artifact_uri']}"]
    longer = ["--set", "rlhf.max_steps=300", "--set", "rlhf.checkpoint_every=50"]
    cmd = [LIFECYCLE, "run", "configs/tiny_cpu.yaml", "--workspace", str(ws), "--json"]
    cmd += ["--run-name", "killed", "--stages", "sft,rlhf", *sources, *longer]
    metrics_port = free_port()
    cmd += ["--set", f"cluster.dashboard_port={free_port()}"]
    cmd += ["--set", f"cluster.metrics_export_port={metrics_port}"]

    def committed() -> set[Path]:  # the policy's checkpoints (not the reward model's)
        return set((ws / "ray_storage").glob("rlhf-[0-9a-f]*/step_*/COMMITTED"))

    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    seen = ""  # Ray's Prometheus endpoint of the run, scraped while it trains
    try:
        deadline = time.time() + 1500
        while not committed():
            assert proc.poll() is None, "the run ended before DPO checkpointed"
            assert time.time() < deadline
            with contextlib.suppress(OSError):
                url = f"http://127.0.0.1:{metrics_port}/metrics"
                with urllib.request.urlopen(url, timeout=5) as r:
                    ours = [ln for ln in r.read().decode().splitlines() if "lifecycle_" in ln]
                    seen += "\n".join(ours) + "\n"
            time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    status = [ln for ln in seen.splitlines() if ln.startswith("ray_lifecycle_stage_status{")]
    assert any(
        'stage="sft"' in ln and 'status="completed"' in ln and ln.endswith(" 1.0") for ln in status
    ), status
    assert "ray_lifecycle_train_loss{" in seen and 'stage="rlhf-reward"' in seen
    assert (ws / "runs" / "killed" / "config.yaml").is_file()
    assert not (ws / "runs" / "killed" / "summary.json").exists()

    # `--resume` reruns the run as it was asked for: its config, its stages and its sources,
    # under its name; SFT comes back cached, DPO goes on from its checkpoint.
    rc, resumed = _run(ws, "--resume", "killed")
    assert rc == 0, resumed
    assert resumed["run_name"] == "killed"
    got = {s["stage"]: s for s in resumed["stages"]}
    assert list(got) == ["sft", "rlhf"]
    assert got["sft"]["status"] == "cached"
    rl = got["rlhf"]
    assert rl["status"] == "completed" and rl["metrics"]["dpo/steps"] == 300
    assert rl["metrics"]["dpo/resumed_from_step"] >= 50, rl["metrics"]
    assert Path(rl["artifact_uri"], "model.safetensors").is_file()
