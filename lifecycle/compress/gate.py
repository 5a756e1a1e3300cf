"""The quality gate of the compression stage: before/after per engine against the limits.

    from lifecycle.compress.gate import judge, gate_markdown
    verdict = judge({"torch": (before, after), "vllm": (v_before, v_after)}, GateConfig(), answers)

`before`/`after` are lifecycle.eval.heldout summaries of the source and the compressed model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lifecycle.config import GateConfig
from lifecycle.eval.heldout import GATED_SET, agreement
from lifecycle.eval.stats import Comparison, compare, perplexity_ratio_margin


def judge(
    pairs: dict[str, tuple[dict[str, Any], dict[str, Any]]],
    gate: GateConfig,
    answers: Sequence[str],
) -> dict[str, Any]:
    """Compares (before, after) per engine against the gate's limits; `answers`: the
    reference answer of each evaluated prompt.

    Returns {"passed": bool, "rows": [...], "failures": [...]}: one row per (engine, metric)
    with before, after, the limit and whether it held; failures say what was lost in words.
    Exact match and answer perplexity are judged per prompt (paired bootstrap: a drop fails
    only when it is beyond the limit at `gate.confidence`; a row's `interval` is the
    difference after - before, in exact-match points or in answer log-likelihood per token);
    greedy agreement is a share of the same prompts, compared as it is.
    """
    rows, failures = [], []
    kw = {"confidence": gate.confidence, "resamples": gate.resamples, "seed": gate.seed}

    def row(
        engine: str,
        metric: str,
        before: float,
        after: float,
        limit: str,
        ok: bool,
        comp: Comparison | None = None,
    ) -> None:
        rows.append(
            {
                "engine": engine,
                "metric": metric,
                "before": before,
                "after": after,
                "limit": limit,
                "ok": ok,
                "interval": None if comp is None else [comp.low, comp.high],
                "bound": None if comp is None else comp.bound,
            }
        )
        if not ok:
            why = f"limit {limit}"
            if comp is not None:
                why += f"; its {comp.confidence:.0%} bound {comp.bound:+.3g}"
            failures.append(f"{engine} {metric}: {before:.4g} -> {after:.4g} ({why})")

    for engine, (before, after) in pairs.items():
        em = compare(
            "exact_match",
            _correct(after, answers),
            _correct(before, answers),
            gate.max_exact_match_drop,
            **kw,
        )
        row(
            engine,
            "exact_match",
            before["exact_match"],
            after["exact_match"],
            f"drop <= {gate.max_exact_match_drop:g}",
            em.passed,
            em,
        )
        ppl = None
        if gate.max_perplexity_ratio is not None:
            (b_rows, a_rows) = (x["row_nll"][GATED_SET] for x in (before, after))
            ppl = compare(
                "answer_log_likelihood",
                [-s / max(n, 1) for s, n in a_rows],
                [-s / max(n, 1) for s, n in b_rows],
                perplexity_ratio_margin(gate.max_perplexity_ratio),
                weights=[max(n, 1) for _, n in b_rows],
                **kw,
            )
        row(
            engine,
            "perplexity",
            before["perplexity"],
            after["perplexity"],
            "not gated"
            if gate.max_perplexity_ratio is None
            else f"ratio <= {gate.max_perplexity_ratio:g}",
            ppl is None or ppl.passed,
            ppl,
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


def _correct(ev: dict[str, Any], answers: Sequence[str]) -> list[float]:
    return [float(o == a.strip()) for o, a in zip(ev["outputs"], answers, strict=True)]


def gate_markdown(title: str, verdict: dict[str, Any], extra: dict[str, Any]) -> str:
    """The gate's table as markdown (an MLflow artifact and, later, a Prefect artifact)."""
    lines = [
        f"# {title}: {'PASSED' if verdict['passed'] else 'FAILED'}",
        "",
        "| engine | metric | before | after | after - before (interval) | limit | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in verdict["rows"]:
        iv = r.get("interval")
        span = "" if iv is None else f"[{iv[0]:+.3g}, {iv[1]:+.3g}]"
        lines.append(
            f"| {r['engine']} | {r['metric']} | {r['before']:.4g} | {r['after']:.4g} "
            f"| {span} | {r['limit']} | {'yes' if r['ok'] else 'NO'} |"
        )
    lines += ["", *(f"- {k}: {v}" for k, v in extra.items())]
    if verdict["failures"]:
        lines += ["", "Lost:", *(f"- {f}" for f in verdict["failures"])]
    return "\n".join(lines) + "\n"
