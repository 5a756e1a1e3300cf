"""The quality gate of the compression stage: before/after per engine against the limits.

    from lifecycle.compress.gate import judge, gate_markdown
    verdict = judge({"torch": (before, after), "vllm": (v_before, v_after)}, GateConfig())

`before`/`after` are lifecycle.eval.heldout summaries of the source and the compressed model.
"""

from __future__ import annotations

from typing import Any

from lifecycle.config import GateConfig
from lifecycle.eval.heldout import agreement


def judge(
    pairs: dict[str, tuple[dict[str, Any], dict[str, Any]]], gate: GateConfig
) -> dict[str, Any]:
    """Compares (before, after) per engine against the gate's limits.

    Returns {"passed": bool, "rows": [...], "failures": [...]}: one row per (engine, metric)
    with before, after, the limit and whether it held; failures say what was lost in words.
    """
    rows, failures = [], []

    def row(engine: str, metric: str, before: float, after: float, limit: str, ok: bool):
        rows.append(
            {
                "engine": engine,
                "metric": metric,
                "before": before,
                "after": after,
                "limit": limit,
                "ok": ok,
            }
        )
        if not ok:
            failures.append(f"{engine} {metric}: {before:.4g} -> {after:.4g} (limit {limit})")

    for engine, (before, after) in pairs.items():
        drop = before["exact_match"] - after["exact_match"]
        row(
            engine,
            "exact_match",
            before["exact_match"],
            after["exact_match"],
            f"drop <= {gate.max_exact_match_drop:g}",
            drop <= gate.max_exact_match_drop + 1e-9,
        )
        ratio = after["perplexity"] / before["perplexity"]
        row(
            engine,
            "perplexity",
            before["perplexity"],
            after["perplexity"],
            "not gated"
            if gate.max_perplexity_ratio is None
            else f"ratio <= {gate.max_perplexity_ratio:g}",
            gate.max_perplexity_ratio is None or ratio <= gate.max_perplexity_ratio,
        )
        agree = agreement(before["outputs"], after["outputs"])
        row(
            engine,
            "greedy_agreement",
            1.0,
            agree,
            "not gated" if gate.min_agreement is None else f">= {gate.min_agreement:g}",
            gate.min_agreement is None or agree >= gate.min_agreement,
        )
    return {"passed": not failures, "rows": rows, "failures": failures}


def gate_markdown(title: str, verdict: dict[str, Any], extra: dict[str, Any]) -> str:
    """The gate's table as markdown (an MLflow artifact and, later, a Prefect artifact)."""
    lines = [
        f"# {title}: {'PASSED' if verdict['passed'] else 'FAILED'}",
        "",
        "| engine | metric | before | after | limit | ok |",
        "|---|---|---|---|---|---|",
    ]
    for r in verdict["rows"]:
        lines.append(
            f"| {r['engine']} | {r['metric']} | {r['before']:.4g} | {r['after']:.4g} "
            f"| {r['limit']} | {'yes' if r['ok'] else 'NO'} |"
        )
    lines += ["", *(f"- {k}: {v}" for k, v in extra.items())]
    if verdict["failures"]:
        lines += ["", "Lost:", *(f"- {f}" for f in verdict["failures"])]
    return "\n".join(lines) + "\n"
