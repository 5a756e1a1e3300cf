"""Held-out evaluation of a model directory, through PyTorch or through vLLM: the same
measurements for every stage that compares two models (compression before/after, the
watermark's cost, a promotion candidate against the champion).

    from lifecycle.eval.heldout import evaluate_torch, evaluate_vllm
    sets = {"answers": [(prompt + answer_ids, len(prompt)), ...], "lm": [(block, 1), ...]}
    before = evaluate_torch(src_dir, prompt_ids, answers, sets, max_new_tokens=12)
    after = evaluate_vllm(out_dir, prompt_ids, answers, sets, max_new_tokens=12)

Every engine gets token ids, not text: both see exactly the same inputs. Measured per model:
task exact-match of greedy outputs on held-out demo prompts; perplexity of each scoring set
(rows of token ids, each scored from its `start` position on: the held-out answers given
their prompts, which the gate uses, and held-out blocks of the data stage's val split); and
the greedy outputs themselves (for agreement with the source).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence
from typing import Any

import torch

from lifecycle.eval.generate import left_pad
from lifecycle.eval.lm import ScoreRows, nll_rows

GATED_SET = "answers"
"""The scoring set whose perplexity is `perplexity` in the summary (the one gates use)."""


@torch.no_grad()
def evaluate_torch(
    model_dir: str,
    prompt_ids: Sequence[Sequence[int]],
    answers: Sequence[str],
    score_sets: dict[str, ScoreRows],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Exact-match, perplexity and greedy outputs of a model dir (quantized ones included:
    transformers loads compressed-tensors checkpoints and runs them with their int8
    activation quantization simulated), on `device` (default: this task's GPU if it has
    one) in `dtype` (default: as saved)."""
    from lifecycle.models import default_device, load_model, load_tokenizer

    device = torch.device(device or default_device())
    model, tok = load_model(model_dir, device, dtype), load_tokenizer(model_dir)
    model.eval()
    outputs: list[str] = []
    for i in range(0, len(prompt_ids), batch_size):
        ids, mask = left_pad(prompt_ids[i : i + batch_size], tok.pad_token_id)
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        outputs += [tok.decode(r, skip_special_tokens=True).strip() for r in gen[:, ids.shape[1] :]]
    per_row = {k: nll_rows(model, rows, tok.pad_token_id) for k, rows in score_sets.items()}
    return _summary(outputs, answers, per_row, engine="torch")


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
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from lifecycle.vllm_engine import offline_llm

    rows = [ids for rows in score_sets.values() for ids, _ in rows]
    longest = max(len(r) for r in [*prompt_ids, *rows])
    llm = offline_llm(
        model_dir,
        kv_cache_gb=kv_cache_gb,
        dtype=dtype,
        max_model_len=longest + max_new_tokens,
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
        per_row = {}
        for name, rows in score_sets.items():
            outs = llm.generate(
                [TokensPrompt(prompt_token_ids=list(ids)) for ids, _ in rows], score, use_tqdm=False
            )
            per_row[name] = [
                (
                    -sum(
                        o.prompt_logprobs[pos][ids[pos]].logprob for pos in range(start, len(ids))
                    ),
                    len(ids) - start,
                )
                for o, (ids, start) in zip(outs, rows, strict=True)
            ]
    finally:
        del llm
        gc.collect()
    return _summary(outputs, answers, per_row, engine="vllm")


def _summary(
    outputs: list[str],
    answers: Sequence[str],
    per_row: dict[str, list[tuple[float, int]]],
    engine: str,
) -> dict:
    """The measurements, with the per-item figures paired comparisons use: `row_nll` (each
    scoring set's (NLL sum, tokens) per row) beside the greedy `outputs`."""
    em = sum(o == a.strip() for o, a in zip(outputs, answers, strict=True)) / max(1, len(answers))
    losses = {
        k: sum(s for s, _ in rows) / max(1, sum(n for _, n in rows)) for k, rows in per_row.items()
    }
    ppl = {k: math.exp(min(v, 50)) for k, v in losses.items()}
    return {
        "engine": engine,
        "exact_match": em,
        "perplexity": ppl.get(GATED_SET, next(iter(ppl.values()), float("nan"))),
        "perplexities": ppl,
        "outputs": outputs,
        "row_nll": per_row,
    }


def agreement(a: Sequence[str], b: Sequence[str]) -> float:
    """Share of prompts whose greedy outputs are identical."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / max(1, len(a))
