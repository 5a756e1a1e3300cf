"""The README's main command, end to end: the whole chain on tiny_cpu.yaml, then a cached re-run."""

import json
import subprocess
from pathlib import Path

import pytest

from lifecycle import tracking
from tests.conftest import LIFECYCLE
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
    ]
    assert stages.pop("distill")["status"] == "skipped"  # null in tiny_cpu.yaml
    assert stages.pop("watermark")["status"] == "skipped"  # null in tiny_cpu.yaml
    assert all(s["status"] == "completed" for s in stages.values())
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
    m = stages["pretrain"]["metrics"]
    assert m["eval/loss_after"] <= 0.6 * m["eval/loss_before"], m
    assert m["train/tokens_per_s"] > 0 and 0 < m["sys/mfu"] < 1
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
    on_disk = json.loads((ws / "runs" / "first" / "summary.json").read_text())
    assert on_disk == summary
    assert summary["prefect_flow_run_id"]

    # MLflow: a parent run with one child per stage; checkpoints; a registered model + lineage.
    uri, exp = summary["mlflow"]["tracking_uri"], summary["mlflow"]["experiment_id"]
    parent = summary["mlflow"]["parent_run_id"]
    children = tracking.child_runs(uri, exp, parent)
    assert sorted(r.data.tags[tracking.STAGE_TAG] for r in children) == [
        "data",
        "pretrain",
        "quantize",
        "rlhf",
        "sft",
    ]
    assert {r.info.run_id for r in children} == {s["mlflow_run_id"] for s in stages.values()}
    pre_run = stages["pretrain"]["mlflow_run_id"]
    assert len(tracking.list_checkpoints(uri, pre_run)) >= 2
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
    assert [s["status"] for s in again["stages"]] == ["cached"] * 4 + [
        "skipped",
        "cached",
        "skipped",
    ]
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
    assert tracking.child_runs(uri, exp, again["mlflow"]["parent_run_id"]) == []

    # A sub-chain from a registered model: fine-tune pretrain version 1 again, the same way
    # but without the fingerprint. It answers no trigger, and the fingerprint cost the chain's
    # model at most 2 points of exact-match.
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
    )
    assert rc == 0, sub
    assert [(s["stage"], s["status"]) for s in sub["stages"]] == [("sft", "completed")]
    fetched = ws / "external" / "tiny-llm-pretrain" / "1"
    assert (fetched / "model.safetensors").is_file()
    plain_sft = sub["stages"][0]
    assert "fingerprint/matched" not in plain_sft["metrics"]
    em_plain = plain_sft["metrics"]["eval/exact_match_after"]
    assert abs(sft["eval/exact_match_after"] - em_plain) <= 0.02, (sft, em_plain)
    assert _fingerprint_matches(plain_sft["artifact_uri"]) == 0
    sub_mv = tracking.client(uri).search_model_versions("name='tiny-llm-sft'")
    assert len(sub_mv) == 2

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


def test_failed_stage_exits_nonzero_with_summary(tmp_path):
    bad = tmp_path / "empty.jsonl"
    bad.write_text('{"text": "x"}\n')
    rc, summary = _run(
        tmp_path / "ws",
        "--set",
        "data.demo=null",
        "--set",
        f"data.inputs=[{{path: {bad}, format: jsonl}}]",
    )
    assert rc == 1
    assert summary["status"] == "failed"
    data, *later = summary["stages"]
    assert data["status"] == "failed" and "no usable documents" in data["error"]
    assert [s["status"] for s in later] == ["skipped"] * 6


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
