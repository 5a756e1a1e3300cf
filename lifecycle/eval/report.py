"""Before/after reports of a stage's evaluation: the metric pairs a stage measured on its
input and on its output (`NAME_before` / `NAME_after`: held-out loss and perplexity,
exact match, mean reward, KL, answer perplexity per engine, ...), as a Markdown table and
as a PNG chart (one panel per metric: its own scale, two bars, the values written on them).

    from lifecycle.eval.report import before_after, before_after_markdown, before_after_png
    pairs = before_after(result.metrics)
    before_after_png(pairs, "sft", "before_after.png")

flows/chain.py attaches both to every stage that measured such pairs: the PNG to the stage's
MLflow run (`report/before_after.png`), the table to its Prefect artifact.
"""

from __future__ import annotations

import math
from pathlib import Path

Pair = tuple[str, float, float]
"""(metric name without the suffix, before, after)."""


def before_after(metrics: dict[str, float]) -> list[Pair]:
    """Every `NAME_before` with its `NAME_after`, both finite, in name order."""
    out = []
    for key in sorted(metrics):
        if not key.endswith("_before"):
            continue
        name = key[: -len("_before")]
        after = metrics.get(f"{name}_after")
        before = metrics[key]
        if after is not None and math.isfinite(before) and math.isfinite(after):
            out.append((name, float(before), float(after)))
    return out


def before_after_markdown(pairs: list[Pair]) -> str:
    """A Markdown table: metric | before | after | change."""
    lines = ["| metric | before | after | change |", "|---|---|---|---|"]
    for name, b, a in pairs:
        lines.append(f"| {name} | {b:.4g} | {a:.4g} | {a - b:+.4g} |")
    return "\n".join(lines) + "\n"


def before_after_png(pairs: list[Pair], title: str, path: str | Path) -> Path:
    """A chart of `pairs`: a small panel per metric (each on its own scale), written to
    `path` (matplotlib's Agg backend: no display needed)."""
    if not pairs:
        raise ValueError("no before/after metric pairs to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, b, a) in zip(axes.flat, pairs, strict=False):
        bars = ax.bar(["before", "after"], [b, a], color=["#9e9e9e", "#1f77b4"])
        ax.bar_label(bars, labels=[f"{b:.3g}", f"{a:.3g}"], fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.margins(y=0.2)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(pairs) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
