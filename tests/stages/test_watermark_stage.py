"""The watermark stage on the whole chain's quantized model: transformers' detector agrees
with ours on what our vLLM path generated, and a watermark too weak to detect fails the stage."""

import json

import pytest
import torch
from transformers import AutoConfig, WatermarkDetector

from lifecycle.artifacts import StageResult
from lifecycle.config import WatermarkConfig
from lifecycle.watermark.keys import resolve_key, watermark_hashing_key
from lifecycle.watermark.scheme import WatermarkScheme
from tasks.watermark import WatermarkCheckFailed, watermark

pytestmark = pytest.mark.slow


@pytest.mark.timeout(2400)  # may wait for the session's whole chain
def test_vllm_watermark_read_by_transformers_and_a_weak_one_fails(
    ray_session, whole_chain, make_ctx
):
    _, summary = whole_chain
    stages = {s["stage"]: s for s in summary["stages"]}

    def res(name: str) -> StageResult:
        s = stages[name]
        return StageResult(name, "completed", artifact_uri=s["artifact_uri"], artifact_id=name)

    cfg = WatermarkConfig(
        delta=0.05,  # far too small a bias for 64 tokens to show it
        generations=24,
        max_tokens=64,
        fingerprint=False,
        ignore_repeated=False,  # transformers' detector default, for the comparison below
        eval={"demo_tasks": ["copy", "upper", "first", "last"], "prompts": 50},
        scaling={"resources_per_worker": {"CPU": 2}},
    )
    ctx = make_ctx()
    with pytest.raises(WatermarkCheckFailed, match="detection rate") as e:
        watermark.fn(
            cfg, ctx, "k" * 64, rlhf=res("rlhf"), quantize=res("quantize"), data=res("data")
        )
    out = ctx.stage_dir("watermark", "k" * 64)
    assert str(out / "watermark.md") in str(e.value)
    assert "FAILED" in (out / "watermark.md").read_text()

    # transformers' WatermarkDetector, given the same settings, computes the same z-scores
    # on the tokens our vLLM logits processor produced.
    report = json.loads((out / "watermark.json").read_text())
    model_dir = stages["quantize"]["artifact_uri"]
    scheme = WatermarkScheme(watermark_hashing_key(resolve_key(ctx.workspace)), 280, 0.25, 0.05)
    det = WatermarkDetector(
        AutoConfig.from_pretrained(model_dir), "cpu", scheme.transformers_config()
    )
    hf = det(torch.tensor(report["tokens_on"]), z_threshold=4.0, return_dict=True)
    assert hf.z_score.tolist() == pytest.approx(report["z_on"], abs=1e-6)
    assert len(report["tokens_on"]) == 24 and all(len(t) == 64 for t in report["tokens_on"])
