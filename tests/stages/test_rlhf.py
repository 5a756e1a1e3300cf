"""Pulse tests of the RLHF stage on Ray: RLAIF audit artifact, reward model, each algorithm."""

import json
from pathlib import Path

import pytest

from lifecycle import tracking
from lifecycle.config import RLHFConfig
from lifecycle.models import load_model
from tasks.rlhf import align
from tests.conftest import list_checkpoints


@pytest.mark.parametrize("algorithm", ["dpo", "grpo", "ppo"])
def test_rlhf_stage(ray_session, tiny_model, make_ctx, tmp_path, algorithm):
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(
        json.dumps({"prompt": "copy ab", "chosen": "ab", "rejected": "ba"})
        + "\n"
        + json.dumps({"prompt": "copy ab"})
        + "\n"
    )
    with_rm = algorithm == "dpo"
    cfg = RLHFConfig(
        algorithm=algorithm,
        demo_tasks=["copy", "first"],
        inputs=[{"path": str(prefs)}],
        rlaif={"num_prompts": 16, "k": 3, "max_new_tokens": 4, "num_workers": 2},
        reward_model={"max_steps": 4, "demo_pairs": 32, "heldout_pairs": 16} if with_rm else None,
        max_steps=4,
        warmup_steps=1,
        micro_batch_size=4,
        prompts_per_step=4,
        group_size=2,
        max_new_tokens=4,
        eval_prompts=8,
        eval_samples=2,
        checkpoint_every=2,
        log_every=1,
        scaling={"num_workers": 1, "resources_per_worker": {"CPU": 1}},
        # GRPO trains LoRA adapters on the policy (merged into the saved model).
        lora={"r": 4, "alpha": 8} if algorithm == "grpo" else None,
    )
    ctx = make_ctx()
    res = align.fn(cfg, ctx, algorithm[0] * 64, sft=tiny_model)
    m = res.metrics
    assert m["preference/file_pairs"] == 1 and m["preference/malformed_rejected"] == 1
    for k in ("mean_reward", "kl", "response_len", "exact_match"):
        assert f"eval/{k}_before" in m and f"eval/{k}_after" in m
    assert m["eval/kl_before"] == pytest.approx(0.0, abs=1e-6)  # the SFT model against itself
    final = Path(res.artifact_uri).parent

    # RLAIF audit: every sampled response with its score; chosen beats rejected in every pair.
    recs = [json.loads(x) for x in (final / "rlaif.jsonl").read_text().splitlines()]
    assert len(recs) == 16 and all(len(r["responses"]) == len(r["scores"]) == 3 for r in recs)
    assert all(r["judge"] == "program:demo-tasks-v1" for r in recs)
    pairs = [r for r in recs if r["chosen"] is not None]
    assert all(r["chosen_score"] > r["rejected_score"] for r in pairs)
    assert m["rlaif/pairs"] == len(pairs)

    # The policy moved; the SFT model (the reference) on disk did not.
    before, after = load_model(tiny_model.artifact_uri), load_model(res.artifact_uri)
    moved = [n for n, p in after.state_dict().items() if not p.equal(before.state_dict()[n])]
    assert moved
    if algorithm == "grpo":  # LoRA merged: the saved model is a plain HF model, same shapes
        assert set(after.state_dict()) == set(before.state_dict())
    uri = ctx.tracking_uri
    run = tracking.get_run(uri, res.mlflow_run_id)
    assert run.data.tags["lifecycle.rlhf_algorithm"] == algorithm
    arts = {a.path for a in tracking.client(uri).list_artifacts(res.mlflow_run_id, "rlaif")}
    assert arts == {"rlaif/rlaif.jsonl"}
    assert list_checkpoints(uri, res.mlflow_run_id)  # checkpoints tracked
    if with_rm:
        rm_version = run.data.tags["lifecycle.reward_model_version"]
        tags = tracking.model_version(uri, "test-llm-reward", rm_version).tags
        # the registered reward model carries the held-out accuracy its stage measured
        assert float(tags["lifecycle.heldout_accuracy"]) == pytest.approx(
            m["reward_model/heldout_accuracy"]
        )
