"""Bring your own model, killed during RLHF and resumed: configs/finetune_cpu.yaml with
`--from pretrain=DIR` on a tiny Qwen2 (grouped-query attention, q/k/v biases, untied
embeddings, ChatML template: lifecycle/tiny.py) — the data stage tokenizes with its tokenizer,
SFT and DPO render with its template. `lifecycle run --resume NAME` reruns the run as it was
asked for (config, stages, `--from` sources) and training goes on from its last committed
checkpoint. Its own workspace, beside the chain module's tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import LIFECYCLE, ROOT, free_port
from tests.conftest import run_cli as _run


@pytest.mark.timeout(1800)
def test_a_model_dir_fine_tuned_killed_during_rlhf_resumes_from_its_checkpoint(tmp_path):
    """The driver is killed (SIGKILL to its process group) once DPO has committed a
    checkpoint; `--resume` reruns the same sub-chain from the same sources: data and SFT come
    back cached and DPO goes on from the checkpoint, not from step 0."""
    from lifecycle.tiny import build

    model_dir = build("qwen2", tmp_path / "qwen2")
    ws = tmp_path / "ws"
    sources = ["--from", f"pretrain={model_dir}"]
    short = ["sft.max_steps=100", "rlhf.reward_model=null", "rlhf.rlaif.num_prompts=128"]
    short += ["rlhf.eval_prompts=32", "rlhf.max_steps=60", "rlhf.checkpoint_every=20"]
    # A random-init model does not learn 8 trigger signatures in 100 steps: no fingerprint.
    short += ["sft.fingerprint=null", "watermark.fingerprint=false"]
    short += ["quantize.eval.prompts=64", "watermark.generations=60", "deploy.eval.prompts=64"]
    cmd = [LIFECYCLE, "run", "configs/finetune_cpu.yaml", "--workspace", str(ws), "--json"]
    cmd += ["--run-name", "killed", "--stages", "data,sft,rlhf", *sources]
    cmd += [a for o in short for a in ("--set", o)]
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
    assert "ray_lifecycle_train_loss{" in seen and 'stage="sft"' in seen
    assert (ws / "runs" / "killed" / "config.yaml").is_file()
    assert not (ws / "runs" / "killed" / "summary.json").exists()

    # `--resume` reruns the run as it was asked for: its config, its stages and its sources,
    # under its name; SFT comes back cached, DPO goes on from its checkpoint.
    rc, resumed = _run(ws, "--resume", "killed")
    assert rc == 0, resumed
    assert resumed["run_name"] == "killed"
    got = {s["stage"]: s for s in resumed["stages"]}
    assert list(got) == ["data", "sft", "rlhf"]
    assert got["data"]["status"] == got["sft"]["status"] == "cached"
    rl = got["rlhf"]
    assert rl["status"] == "completed" and rl["metrics"]["dpo/steps"] == 60
    assert rl["metrics"]["dpo/resumed_from_step"] >= 20, rl["metrics"]
    assert Path(rl["artifact_uri"], "model.safetensors").is_file()
    # The killed attempt's MLflow runs did not stay RUNNING: the resume marked its parent
    # run and its interrupted DPO stage run KILLED (their process was gone).
    from lifecycle import tracking

    uri, exp = resumed["mlflow"]["tracking_uri"], resumed["mlflow"]["experiment_id"]
    runs = tracking.client(uri).search_runs(
        [exp], filter_string="tags.`lifecycle.run_name` = 'killed'"
    )
    killed = {
        r.data.tags.get(tracking.STAGE_TAG, "parent") for r in runs if r.info.status == "KILLED"
    }
    assert killed == {"parent", "rlhf"}, [(r.info.run_name, r.info.status) for r in runs]
    assert not [r for r in runs if r.info.status == "RUNNING"]

    # The rest of the chain on the fine-tuned Qwen2, the stages a model dir changes: W8A8
    # (GQA-aware folds, biases) served by vLLM in the gate, the watermark through vLLM, and
    # the promoted endpoint answering the openai client in the model's ChatML template.
    sets = [a for o in short for a in ("--set", o)]
    rc, rest = _run(
        ws,
        "--run-name",
        "rest",
        "--stages",
        "quantize,watermark,deploy",
        *sources,
        *sets,
        config="configs/finetune_cpu.yaml",
    )
    assert rc == 0, rest
    got = {s["stage"]: s for s in rest["stages"]}
    assert [got[s]["status"] for s in ("quantize", "watermark", "deploy")] == ["completed"] * 3
    q, d = got["quantize"]["metrics"], got["deploy"]["metrics"]
    assert q["gate/passed"] == 1.0 and q["size/ratio_vs_bf16"] < 0.8, q
    assert d["promotion/promoted"] == 1.0 and rest["endpoint"]["model"] == "finetuned-llm/1"
    assert d["endpoint/requests"] > 0 and d["endpoint/plain_flagged_rate"] == 0, d
    cfg = yaml.safe_load((ROOT / "configs" / "finetune_cpu.yaml").read_text())
    assert d["endpoint/watermark_detection_rate"] >= cfg["watermark"]["min_detection_rate"], d
