"""Evaluation suites: named sets of (prompt, reference answer) items and the metrics measured
on them, run on a model directory in-process (transformers, batched).

    lifecycle eval MODEL_DIR|models:/NAME/VERSION|http://HOST:PORT --suite NAME [--json]

    from lifecycle.eval.suites import suite_items, run_suite
    items = suite_items(cfg.eval_suites["tasks"], cfg, tokenizer)
    result = run_suite(model_dir, cfg.eval_suites["tasks"], cfg)   # means, n, per-item scores

Sources (lifecycle.config.EvalSuite): `demo` (held-out demo-task pairs), `heldout` (the
records of `sft.data.inputs` that the SFT stage keeps out of training: the same hash split,
`lifecycle.data.instruct.is_val`), `files` (chat / Alpaca / prompt-answer records), and
`lm_eval` (lm-evaluation-harness task files: lifecycle/eval/harness.py). Each
item's prompt is rendered with the model's own chat template. Metrics: exact match, token F1
and ROUGE-L of the greedy answer (lifecycle/eval/metrics.py) and the answer's NLL per token
given the prompt (`answer_nll`, reported with its perplexity). Per-item scores come back
too, for paired gates (lifecycle/eval/stats.py). Through an OpenAI-compatible endpoint
(`run_suite_on_endpoint`) the conversation goes to its chat API, which applies the served
model's template; answer NLL is not measured there (listed as unmeasured).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lifecycle.config import EvalFile, EvalSuite, InstructInput, PipelineConfig


def _file_items(f: EvalFile) -> list[tuple[list[dict[str, str]], str]]:
    """(messages without the reference turn, reference) of every record; a malformed record
    is an error naming its line (an eval set with silent holes measures something else)."""
    from lifecycle.data.instruct import iter_objects, to_chat

    out = []
    for obj, src, why in iter_objects(f.path, f.storage, "eval"):
        if why is None and f.format == "prompt_answer":
            ok = isinstance(obj, dict) and all(
                isinstance(obj.get(k), str) and obj[k].strip() for k in ("prompt", "answer")
            )
            why = None if ok else "needs non-empty string fields 'prompt' and 'answer'"
            msgs = [{"role": "user", "content": obj["prompt"]}] if ok else None
            ref = obj["answer"] if ok else ""
        elif why is None:
            chat, why = to_chat(obj, f.format)
            msgs, ref = (chat[:-1], chat[-1]["content"]) if chat else (None, "")
        if why is not None:
            raise ValueError(f"eval file {src}: {why}")
        out.append((msgs, ref))
    return out


def suite_messages(suite: EvalSuite, cfg: PipelineConfig) -> list[tuple[list[dict[str, str]], str]]:
    """(the conversation up to the answer, reference answer) of each item, at most
    `max_items`."""
    from lifecycle.data import demo
    from lifecycle.data.instruct import is_val, read_records

    pairs: list[tuple[list[dict[str, str]], str]] = []
    if suite.source == "demo":
        for ex in demo.instruction_examples(suite.max_items, suite.seed, suite.demo_tasks, True):
            pairs.append((ex["messages"][:-1], ex["messages"][-1]["content"]))
    elif suite.source == "heldout":
        assert cfg.sft is not None  # the config check says so
        for inp in cfg.sft.data.inputs:
            for msgs, _src, why in read_records(InstructInput.model_validate(inp)):
                if why is None and is_val(msgs, cfg.sft.data.val_fraction):
                    pairs.append((msgs[:-1], msgs[-1]["content"]))
    else:
        for f in suite.files:
            pairs += _file_items(f)
    if not pairs:
        raise ValueError(f"the {suite.source} suite has no items")
    return pairs[: suite.max_items]


def suite_items(
    suite: EvalSuite, cfg: PipelineConfig, tokenizer: Any
) -> tuple[list[str], list[str]]:
    """(prompts rendered with `tokenizer`'s chat template, reference answers) of a suite."""
    from lifecycle.data.instruct import render

    pairs = suite_messages(suite, cfg)
    return [render(tokenizer, m, add_generation_prompt=True) for m, _ in pairs], [
        a for _, a in pairs
    ]


ENDPOINT_METRICS = ("exact_match", "token_f1", "rouge_l")
"""What an OpenAI-compatible endpoint's chat API lets a suite measure (no answer NLL)."""


def run_suite_on_endpoint(
    url: str,
    suite: EvalSuite,
    cfg: PipelineConfig,
    api_key: str | None,
    in_flight: int = 8,
    tokenizer: str | Path | None = None,
) -> dict[str, Any]:
    """A suite through any OpenAI-compatible server (`url` without /v1; the project's own
    included): greedy chat completions, `in_flight` at a time; the first model it lists.
    Metrics it cannot measure that way are listed under `unmeasured`. An lm_eval suite goes
    through the completions API instead (lifecycle/eval/harness.py), its prompts tokenized
    with `tokenizer` (the served model's dir)."""
    if suite.source == "lm_eval":
        from lifecycle.eval.harness import run_harness_on_endpoint

        if tokenizer is None:
            raise ValueError(
                "an lm_eval suite through an endpoint needs the served model's tokenizer "
                "(--tokenizer MODEL_DIR): lm-eval scores token log-probabilities"
            )
        return run_harness_on_endpoint(url, suite, tokenizer, api_key, in_flight)
    import concurrent.futures

    import openai

    from lifecycle.eval.metrics import score_all

    pairs = suite_messages(suite, cfg)
    client = openai.OpenAI(base_url=f"{url.rstrip('/')}/v1", api_key=api_key or "none")
    model = client.models.list().data[0].id

    def one(messages: list[dict[str, str]]) -> str:
        r = client.chat.completions.create(
            model=model, messages=messages, max_tokens=suite.max_new_tokens, temperature=0.0
        )
        return (r.choices[0].message.content or "").strip()

    with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
        outputs = list(pool.map(one, [m for m, _ in pairs]))
    measured = [m for m in suite.metrics if m in ENDPOINT_METRICS]
    items = score_all(measured, outputs, [a for _, a in pairs])
    return {
        "metrics": {k: sum(v) / len(v) for k, v in items.items()},
        "n": len(pairs),
        "items": items,
        "outputs": outputs,
        "model_id": model,
        "unmeasured": [m for m in suite.metrics if m not in ENDPOINT_METRICS],
    }


def run_suite(
    model_path: str | Path,
    suite: EvalSuite,
    cfg: PipelineConfig,
    device: Any = None,
    dtype: Any = None,
) -> dict[str, Any]:
    """A suite on a model dir (or PEFT adapter dir) in this process: {"metrics": {name:
    mean}, "n": items, "items": {name: per-item scores}, "outputs": greedy answers}."""
    if suite.source == "lm_eval":
        from lifecycle.eval.harness import run_harness

        return run_harness(model_path, suite, device, dtype)
    from lifecycle.eval.generate import generate
    from lifecycle.eval.lm import nll_rows
    from lifecycle.eval.metrics import score_all
    from lifecycle.models import default_device, load_tokenizer
    from lifecycle.peft_methods import load_finetuned

    tok = load_tokenizer(str(model_path))
    prompts, answers = suite_items(suite, cfg, tok)
    model = load_finetuned(str(model_path), device or default_device(), dtype)
    text_metrics = [m for m in suite.metrics if m != "answer_nll"]
    outputs = generate(
        model, tok, prompts, max_new_tokens=suite.max_new_tokens, batch_size=suite.batch_size
    )
    items = score_all(text_metrics, outputs, answers)
    metrics = {k: sum(v) / len(v) for k, v in items.items()}
    if "answer_nll" in suite.metrics:
        rows = []
        for p, a in zip(prompts, answers, strict=True):
            ids = tok(p, add_special_tokens=False)["input_ids"]
            rows.append((ids + tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                         len(ids)))  # fmt: skip
        per_row = nll_rows(model, rows, tok.pad_token_id, batch=suite.batch_size)
        items["answer_nll"] = [s / max(n, 1) for s, n in per_row]
        mean = sum(s for s, _ in per_row) / max(1, sum(n for _, n in per_row))
        metrics["answer_nll"] = mean
        metrics["answer_perplexity"] = math.exp(min(mean, 50))
    return {"metrics": metrics, "n": len(prompts), "items": items, "outputs": outputs}
