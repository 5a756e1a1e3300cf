"""The watermark stage refuses a watermark too weak to detect, and says so."""

import pytest

from lifecycle.artifacts import StageResult
from lifecycle.config import WatermarkConfig
from tasks.watermark import WatermarkCheckFailed, watermark

pytestmark = pytest.mark.slow


def test_a_watermark_too_weak_to_detect_fails_the_stage(ray_session, whole_chain, make_ctx):
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
        eval={"demo_tasks": ["copy", "upper", "first", "last"], "prompts": 50},
        scaling={"resources_per_worker": {"CPU": 2}},
    )
    ctx = make_ctx()
    with pytest.raises(WatermarkCheckFailed, match="detection rate") as e:
        watermark.fn(cfg, res("rlhf"), res("quantize"), res("data"), ctx, key="k" * 64)
    report = ctx.stage_dir("watermark", "k" * 64) / "watermark.md"
    assert str(report) in str(e.value) and "FAILED" in report.read_text()
