"""Gates with statistics: a paired bootstrap over the same evaluation items.

A gate compares a candidate with a baseline (the model before a stage, or the registry's
champion) on one metric, item by item. A margin on the mean alone decides by chance when
the margin is near the noise (200 prompts: one differing answer is 0.005); here the candidate
fails only when its drop is beyond the margin *with the stated confidence*:

    resample the items with replacement (the same indices for both models), take the mean
    difference candidate - baseline each time; the one-sided upper confidence bound of that
    difference is its `confidence` quantile. Fail when the bound is below -max_drop: even the
    optimistic end of the interval is a drop larger than allowed.

Per-item scores are "higher is better" (exact match, F1, ROUGE-L, accuracy, reward); a
perplexity ratio is gated as a drop of minus the per-item answer NLL with margin ln(ratio),
since exp(mean NLL) is the perplexity.

    from lifecycle.eval.stats import compare
    c = compare("exact_match", cand_scores, base_scores, max_drop=0.02, confidence=0.95)
    c.passed, c.low, c.high

Plain Python + numpy; no model, no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Comparison:
    """One gated metric: means, the bootstrap interval of their difference, the verdict."""

    metric: str
    candidate: float
    baseline: float
    diff: float  # mean(candidate - baseline), higher is better
    low: float  # two-sided `confidence` interval of diff
    high: float
    bound: float  # one-sided upper `confidence` bound of diff: the decision's number
    max_drop: float
    confidence: float
    n: int
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """One readable line: `exact_match: 0.760 vs 0.770, diff -0.010 [-0.030, +0.010]
        (95%), allowed drop 0.02: pass`."""
        verdict = "pass" if self.passed else "FAIL"
        return (
            f"{self.metric}: {self.candidate:.4g} vs {self.baseline:.4g}, diff {self.diff:+.4g} "
            f"[{self.low:+.4g}, {self.high:+.4g}] ({self.confidence:.0%}, n={self.n}), "
            f"allowed drop {self.max_drop:g}: {verdict}"
        )


def _check(candidate: Sequence[float], baseline: Sequence[float]) -> np.ndarray:
    c = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if c.shape != b.shape or c.ndim != 1:
        raise ValueError(
            f"paired scores need one score per item for both models: got {c.shape} and {b.shape}"
        )
    if c.size == 0:
        raise ValueError("no items to compare")
    if not (np.isfinite(c).all() and np.isfinite(b).all()):
        raise ValueError("scores must be finite numbers")
    return c - b


def _weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w <= 0).any():
        raise ValueError(f"weights: one positive number per item ({n}), got shape {w.shape}")
    return w


def paired_bootstrap(
    candidate: Sequence[float],
    baseline: Sequence[float],
    resamples: int = 2000,
    seed: int = 0,
    weights: Sequence[float] | None = None,
) -> np.ndarray:
    """`resamples` bootstrap means of candidate - baseline, items resampled in pairs.
    `weights` (one per item, e.g. its token count) make each mean a weighted one."""
    diff = _check(candidate, baseline)
    w = _weights(weights, diff.size)
    rng = np.random.default_rng(seed)
    # Chunks keep memory at ~8 MB whatever the number of items.
    per_chunk = max(1, 1_000_000 // diff.size)
    means = []
    for start in range(0, resamples, per_chunk):
        k = min(per_chunk, resamples - start)
        idx = rng.integers(0, diff.size, size=(k, diff.size))
        means.append((diff[idx] * w[idx]).sum(axis=1) / w[idx].sum(axis=1))
    return np.concatenate(means)


def compare(
    metric: str,
    candidate: Sequence[float],
    baseline: Sequence[float],
    max_drop: float,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
    weights: Sequence[float] | None = None,
) -> Comparison:
    """The gate's decision on one metric (scores per item, higher is better; `weights`: a
    weighted mean, as for per-token quantities)."""
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    if max_drop < 0 or not math.isfinite(max_drop):
        raise ValueError(f"max_drop must be a finite number >= 0, got {max_drop}")
    means = paired_bootstrap(candidate, baseline, resamples, seed, weights)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    bound = float(np.quantile(means, confidence))
    w = _weights(weights, len(candidate))
    c = float(np.dot(candidate, w) / w.sum())
    b = float(np.dot(baseline, w) / w.sum())
    return Comparison(
        metric=metric,
        candidate=c,
        baseline=b,
        diff=c - b,
        low=float(low),
        high=float(high),
        bound=bound,
        max_drop=max_drop,
        confidence=confidence,
        n=len(candidate),
        passed=bound >= -max_drop,
    )


def perplexity_ratio_margin(max_ratio: float) -> float:
    """The allowed drop of minus the per-item NLL that a perplexity ratio limit means."""
    if max_ratio < 1:
        raise ValueError(f"a perplexity ratio limit is >= 1, got {max_ratio}")
    return math.log(max_ratio)


def markdown(title: str, comparisons: Sequence[Comparison]) -> str:
    """A gate report: one row per metric with its interval and verdict."""
    ok = all(c.passed for c in comparisons)
    lines = [
        f"# {title}: {'passed' if ok else 'FAILED'}",
        "",
        "| metric | candidate | baseline | diff | interval | allowed drop | n | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        lines.append(
            f"| {c.metric} | {c.candidate:.4g} | {c.baseline:.4g} | {c.diff:+.4g} | "
            f"[{c.low:+.4g}, {c.high:+.4g}] ({c.confidence:.0%}) | {c.max_drop:g} | {c.n} | "
            f"{'pass' if c.passed else '**FAIL**'} |"
        )
    lines += [
        "",
        "A metric fails only when the one-sided upper confidence bound of the paired "
        "bootstrap difference (candidate - baseline, same items) is below minus the allowed "
        "drop.",
    ]
    return "\n".join(lines) + "\n"
