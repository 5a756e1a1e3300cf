"""Per-item text metrics and the paired-bootstrap gate (lifecycle/eval/metrics.py, stats.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lifecycle.eval.metrics import exact_match, normalize, rouge_l, score_all, token_f1
from lifecycle.eval.stats import compare, markdown, paired_bootstrap, perplexity_ratio_margin


def test_text_metrics_score_each_pair():
    assert exact_match(" lamp\n", "lamp") == 1.0 and exact_match("Lamp", "lamp") == 0.0
    assert normalize("The  Cat, sat!") == "cat sat"
    # SQuAD F1: prediction "cat sat" against "cat sat on mat": precision 1, recall 1/2.
    assert token_f1("The cat sat.", "a cat sat on mat") == pytest.approx(2 / 3)
    assert token_f1("dog", "cat") == 0.0 and token_f1("", "") == 1.0 and token_f1("", "x") == 0.0
    # ROUGE-L: LCS "the cat on the mat" is 5 of 6 tokens on each side.
    assert rouge_l("the cat lay on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    got = score_all(["exact_match", "token_f1"], ["a b", "c"], ["a b", "d"])
    assert got == {"exact_match": [1.0, 0.0], "token_f1": [1.0, 0.0]}
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['bleu'\]"):
        score_all(["bleu"], ["a"], ["a"])
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        score_all(["exact_match"], ["a", "b"], ["a"])


def _models(rng: np.random.Generator, n: int, p_cand: float, p_base: float):
    """Per-item 0/1 scores of two models whose chances of being right differ by item
    difficulty (shared) and by model skill: paired, as real evaluations are."""
    difficulty = rng.uniform(-1.5, 1.5, n)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    cand = rng.random(n) < 1 / (1 + np.exp(difficulty - logit(p_cand)))
    base = rng.random(n) < 1 / (1 + np.exp(difficulty - logit(p_base)))
    return cand.astype(float), base.astype(float)


def test_an_equal_candidate_passes_and_a_damaged_one_fails_with_its_interval():
    # The same model again (greedy answers repeat): the difference is 0 on every resample.
    same = [1.0, 0.0, 1.0, 1.0] * 50
    c = compare("exact_match", same, same, max_drop=0.02)
    assert c.passed and c.low == c.high == c.bound == 0.0
    # Equally good models answering independently (200 items, the deploy gate's 0.02 margin
    # at 95%): accepted in at least 19 of 20 seeded repeats.
    passed = 0
    for seed in range(20):
        cand, base = _models(np.random.default_rng(seed), 200, 0.76, 0.76)
        passed += compare("exact_match", cand, base, max_drop=0.02, seed=seed).passed
    assert passed >= 19, passed
    # A clearly damaged candidate (0.30 vs 0.76) fails, its whole interval below the margin.
    cand, base = _models(np.random.default_rng(99), 200, 0.30, 0.76)
    bad = compare("exact_match", cand, base, max_drop=0.02)
    assert not bad.passed and bad.high < -0.02 and bad.low <= bad.diff <= bad.high
    report = markdown("deploy gate", [c, bad])
    assert report.startswith("# deploy gate: FAILED") and "**FAIL**" in report
    assert f"[{bad.low:+.4g}, {bad.high:+.4g}] (95%)" in report
    assert "FAIL" in bad.line() and "pass" in c.line()


def test_the_interval_covers_the_true_difference_at_its_confidence():
    # 400 experiments with a known skill gap: the 90% interval holds the true mean
    # difference in about 90% of them (measured over 1000: 0.884; the percentile bootstrap
    # runs slightly narrow). The binomial spread of 400 trials is 0.015.
    rng = np.random.default_rng(1)
    n, true_cand, true_base, covered = 300, 0.7, 0.6, 0
    for seed in range(400):
        cand = (rng.random(n) < true_cand).astype(float)
        base = (rng.random(n) < true_base).astype(float)
        c = compare("m", cand, base, max_drop=0.0, confidence=0.9, resamples=1000, seed=seed)
        covered += c.low <= true_cand - true_base <= c.high
    assert 0.85 <= covered / 400 <= 0.95, covered


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"one score per item for both models: got \(3,\)"):
        paired_bootstrap([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="no items"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap([1.0, float("nan")], [1.0, 0.0])
    with pytest.raises(ValueError, match=r"confidence must be in \[0.5, 1\)"):
        compare("m", [1.0], [1.0], max_drop=0.0, confidence=1.0)
    with pytest.raises(ValueError, match="max_drop must be"):
        compare("m", [1.0], [1.0], max_drop=-0.1)
    assert perplexity_ratio_margin(1.05) == pytest.approx(math.log(1.05))
    with pytest.raises(ValueError, match="ratio limit is >= 1"):
        perplexity_ratio_margin(0.9)


def test_the_compression_gate_judges_each_engine_per_prompt():
    from lifecycle.compress.gate import gate_markdown, judge
    from lifecycle.config import GateConfig

    answers = [f"w{i}" for i in range(200)]

    def summary(outputs: list[str], nll: float) -> dict:
        rows = [(nll * 3, 3)] * len(outputs)
        return {
            "exact_match": sum(o == a for o, a in zip(outputs, answers, strict=True)) / 200,
            "perplexity": math.exp(nll),
            "outputs": outputs,
            "row_nll": {"answers": rows},
        }

    src = summary([a if i % 4 else "x" for i, a in enumerate(answers)], 1.0)  # EM 0.75
    # Unchanged answers and likelihoods: passes even a gate with no margin at all.
    strict = GateConfig(max_exact_match_drop=0.0, max_perplexity_ratio=1.0)
    same = judge({"torch": (src, src)}, strict, answers)
    assert same["passed"] and [r["interval"] for r in same["rows"][:2]] == [[0, 0], [0, 0]]
    # Two answers of 200 lost (0.01) under the shipped 0.05 margin: within it.
    two = [("x" if i in (1, 2) else o) for i, o in enumerate(src["outputs"])]
    assert judge({"vllm": (src, summary(two, 1.0))}, GateConfig(), answers)["passed"]
    # A fifth of the answers lost and every answer less likely (perplexity x e^0.3 = 1.35):
    # both fail at the 1.2 ratio / 0.05 drop, each with its bound.
    bad = summary([("x" if i % 5 == 1 else o) for i, o in enumerate(src["outputs"])], 1.3)
    verdict = judge({"torch": (src, bad)}, GateConfig(max_perplexity_ratio=1.2), answers)
    assert not verdict["passed"] and len(verdict["failures"]) == 2, verdict["failures"]
    assert verdict["failures"][0].startswith("torch exact_match: 0.75 -> ")
    assert "its 95% bound" in verdict["failures"][1] and "ratio <= 1.2" in verdict["failures"][1]
    table = gate_markdown("quantize w8a8", verdict, {})
    assert table.startswith("# quantize w8a8: FAILED") and "| torch | perplexity |" in table


def test_before_after_report_pairs_each_metric_and_draws_a_panel_for_each(tmp_path):
    from matplotlib.image import imread

    from lifecycle.eval.report import before_after, before_after_markdown, before_after_png

    metrics = {
        "eval/exact_match_before": 0.1, "eval/exact_match_after": 0.7,
        "eval/loss_before": 3.0, "eval/loss_after": 1.5,
        "eval/kl_before": float("nan"), "eval/kl_after": 0.2,  # not finite: left out
        "torch/perplexity_before": 2.0,  # no after: left out
        "train/loss": 1.0,
    }  # fmt: skip
    pairs = before_after(metrics)
    assert pairs == [("eval/exact_match", 0.1, 0.7), ("eval/loss", 3.0, 1.5)]
    table = before_after_markdown(pairs)
    assert "| eval/exact_match | 0.1 | 0.7 | +0.6 |" in table
    assert "| eval/loss | 3 | 1.5 | -1.5 |" in table
    png = before_after_png(pairs * 3, "sft", tmp_path / "r" / "chart.png")  # 6 panels
    height, width, _ = imread(png).shape
    assert (width, height) == (4 * 320, 2 * 260)  # 4 columns x 2 rows at 100 dpi
    with pytest.raises(ValueError, match="no before/after metric pairs"):
        before_after_png([], "x", tmp_path / "none.png")
