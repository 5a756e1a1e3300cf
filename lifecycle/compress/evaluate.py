"""The quality gate of the compression stages: the same held-out measurements of a model
before and after, through PyTorch and through vLLM, and the verdict.

    from lifecycle.compress.evaluate import evaluate_torch, evaluate_vllm, judge
    sets = {"answers": [(prompt + answer_ids, len(prompt)), ...], "lm": [(block, 1), ...]}
    before = evaluate_torch(src_dir, prompt_ids, answers, sets, max_new_tokens=12)
    after = evaluate_torch(out_dir, prompt_ids, answers, sets, max_new_tokens=12)
    verdict = judge({"torch": (before, after)}, GateConfig())

Every engine gets token ids, not text: both see exactly the same inputs. Measured per model:
task exact-match of greedy outputs on held-out demo prompts; perplexity of each scoring set
(rows of token ids, each scored from its `start` position on: the held-out answers given
their prompts, which the gate uses, and held-out blocks of the data stage's val split); and
the greedy outputs themselves (for agreement with the source).
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from lifecycle.config import GateConfig
from lifecycle.data.instruct import IGNORE
from lifecycle.eval.generate import left_pad

ScoreRows = Sequence[tuple[Sequence[int], int]]
"""(token ids, first scored position ≥ 1): each row's tokens from `start` on are scored."""
GATED_SET = "answers"


@torch.no_grad()
def _mean_nll_torch(model: torch.nn.Module, rows: ScoreRows, pad: int, batch: int = 32) -> float:
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        width = max(len(ids) for ids, _ in chunk)
        x = torch.full((len(chunk), width), pad, dtype=torch.long)
        y = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (ids, start) in enumerate(chunk):
            x[r, : len(ids)] = torch.tensor(ids)
            y[r, start : len(ids)] = torch.tensor(ids[start:])
            mask[r, : len(ids)] = 1
        logits = model(input_ids=x, attention_mask=mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            y[:, 1:].reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        total += float(nll)
        count += int((y[:, 1:] != IGNORE).sum())
    return total / max(1, count)


@torch.no_grad()
def evaluate_torch(
    model_dir: str,
    prompt_ids: Sequence[Sequence[int]],
    answers: Sequence[str],
    score_sets: dict[str, ScoreRows],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Exact-match, perplexity and greedy outputs of a model dir (quantized ones included:
    transformers loads compressed-tensors checkpoints and runs them with their int8
    activation quantization simulated)."""
    from lifecycle.models import load_model, load_tokenizer

    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    model.eval()
    outputs: list[str] = []
    for i in range(0, len(prompt_ids), batch_size):
        ids, mask = left_pad(prompt_ids[i : i + batch_size], tok.pad_token_id)
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        outputs += [tok.decode(r, skip_special_tokens=True).strip() for r in gen[:, ids.shape[1] :]]
    losses = {k: _mean_nll_torch(model, rows, tok.pad_token_id) for k, rows in score_sets.items()}
    return _summary(outputs, answers, losses, engine="torch")


def evaluate_vllm(
    model_dir: str,
    prompt_ids: Sequence[Sequence[int]],
    answers: Sequence[str],
    score_sets: dict[str, ScoreRows],
    *,
    max_new_tokens: int,
    kv_cache_gb: float = 1.0,
    dtype: str = "bfloat16",
) -> dict[str, Any]:
    """The same measurements with vLLM serving the checkpoint (its quantized kernels):
    greedy generation, and perplexity from the prompt log-probabilities."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(kv_cache_gb))))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    rows = [ids for rows in score_sets.values() for ids, _ in rows]
    longest = max(len(r) for r in [*prompt_ids, *rows])
    llm = LLM(
        model=model_dir,
        dtype=dtype,
        max_model_len=longest + max_new_tokens,
        enforce_eager=True,
        seed=0,
        disable_log_stats=True,
    )
    try:
        greedy = SamplingParams(
            max_tokens=max_new_tokens, temperature=0.0, skip_special_tokens=True
        )
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], greedy, use_tqdm=False
        )
        outputs = [o.outputs[0].text.strip() for o in outs]
        score = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        losses = {}
        for name, rows in score_sets.items():
            outs = llm.generate(
                [TokensPrompt(prompt_token_ids=list(ids)) for ids, _ in rows], score, use_tqdm=False
            )
            nll, n = 0.0, 0
            for o, (ids, start) in zip(outs, rows, strict=True):
                for pos in range(start, len(ids)):
                    nll -= o.prompt_logprobs[pos][ids[pos]].logprob
                    n += 1
            losses[name] = nll / max(1, n)
    finally:
        del llm
        gc.collect()
    return _summary(outputs, answers, losses, engine="vllm")


def _summary(
    outputs: list[str], answers: Sequence[str], losses: dict[str, float], engine: str
) -> dict:
    em = sum(o == a.strip() for o, a in zip(outputs, answers, strict=True)) / max(1, len(answers))
    ppl = {k: math.exp(min(v, 50)) for k, v in losses.items()}
    return {
        "engine": engine,
        "exact_match": em,
        "perplexity": ppl.get(GATED_SET, next(iter(ppl.values()), float("nan"))),
        "perplexities": ppl,
        "outputs": outputs,
    }


def agreement(a: Sequence[str], b: Sequence[str]) -> float:
    """Share of prompts whose greedy outputs are identical."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / max(1, len(a))


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
