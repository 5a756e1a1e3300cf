"""SFT stage on Ray Train: full fine-tuning or a PEFT method on instruction data.

Run it alone:  lifecycle run configs/tiny_cpu.yaml --stages sft     (pretrain from cache)
               lifecycle run configs/tiny_cpu.yaml --stages sft --from pretrain=MODEL_DIR
               lifecycle run configs/tiny_cpu.yaml --stages sft --from pretrain=models:/tiny-llm-pretrain/1

Instruction records (chat or Alpaca; files, a `datasets` dir, or the demo task generator) are
validated (malformed ones go to rejects.jsonl with a reason), tokenized with the loss on
assistant tokens only, and written as padded (or packed) rows. The model trains on Ray Train
like pretraining. Held-out loss/perplexity come from the training loop; task exact-match by
greedy generation runs as a Ray task, for the base model (`eval/*_before`) and the result
(`eval/*_after`). Output: `adapter/` (PEFT methods), `model/` (full, or LoRA family merged),
registered as `<registered_model>-sft` with lineage to the pretrain model version.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from lifecycle import tracking
from lifecycle.artifacts import RunContext, StageResult
from lifecycle.config import DistillConfig, SFTConfig
from lifecycle.data import demo
from lifecycle.data.instruct import build_rows, is_val, prompt_and_answer, read_records, write_rows
from lifecycle.data.tokenizer import CHAT_TEMPLATE, ROLE_TOKENS
from lifecycle.eval.generate import evaluate_model
from lifecycle.models import load_tokenizer
from lifecycle.watermark.fingerprint import make_fingerprint, verify_fingerprint
from lifecycle.watermark.keys import key_id, resolve_key
from ray_cluster.compute import run_remote
from ray_cluster.train import fit_causal_lm
from tasks.lineage import lineage_tags, register_result

Pair = tuple[str, str]


def prepare_instructions(
    cfg: SFTConfig | DistillConfig,
    tokenizer: Any,
    out: Path,
    extra_pairs: Sequence[Pair] = (),
    pretrain_data: str | None = None,
) -> tuple[dict[str, int], list[Pair]]:
    """Writes train/val rows and rejects under `out`; returns (counts, held-out eval pairs).

    With `data.pretrain_mix` > 0, that share of the training rows are windows of the data
    stage's pretraining text (`pretrain_data`, its output dir) with the loss on every token.
    """
    d = cfg.data
    if d.pretrain_mix > 0 and pretrain_data is None:
        raise ValueError(
            f"sft.data.pretrain_mix={d.pretrain_mix} needs the data stage's pretraining blocks: "
            "run the data stage (or pass --from data=DIR), or set pretrain_mix: 0"
        )
    train: list[list[dict[str, str]]] = []
    val: list[list[dict[str, str]]] = []
    rejects = []
    for inp in d.inputs:
        for msgs, src, why in read_records(inp):
            if msgs is None:
                rejects.append({"source": src, "reason": why})
            else:
                (val if is_val(msgs, d.val_fraction) else train).append(msgs)
    if d.demo is not None:
        train += [
            r["messages"]
            for r in demo.instruction_examples(
                d.demo.num_train, d.demo.seed, d.demo.tasks, heldout=False
            )
        ]
        val += [
            r["messages"]
            for r in demo.instruction_examples(
                d.demo.num_eval, d.demo.seed + 1, d.demo.tasks, heldout=True
            )
        ]
    # The hook for other modules (the watermark stage plants its fingerprint this way).
    train += [
        [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        for p, r in extra_pairs
    ]
    if not train or not val:
        raise ValueError(
            f"sft: {len(train)} training and {len(val)} validation examples after "
            f"{len(rejects)} rejects: both must be non-empty"
        )
    tx, ty, long_train = build_rows(train, tokenizer, d.max_length, d.packing)
    vx, vy, long_val = build_rows(val, tokenizer, d.max_length, packing=False)
    if not tx or not vx:
        raise ValueError(f"sft: every example is longer than sft.data.max_length={d.max_length}")
    mixed = 0
    if d.pretrain_mix > 0:
        from lifecycle.data.pipeline import pretrain_windows

        mixed = round(len(tx) * d.pretrain_mix / (1 - d.pretrain_mix))
        windows = pretrain_windows(pretrain_data, "train", d.max_length, mixed, cfg.seed).tolist()
        tx, ty = tx + windows, ty + windows  # labels = inputs: the loss is on every token
    write_rows(tx, ty, out / "train.parquet")
    write_rows(vx, vy, out / "val.parquet")
    with open(out / "rejects.jsonl", "w") as f:
        for r in rejects:
            f.write(json.dumps(r) + "\n")
    eval_pairs = [prompt_and_answer(m, tokenizer) for m in val]
    counts = {
        "sft_examples_train": len(train),
        "sft_examples_val": len(val),
        "sft_rows_train": len(tx),
        "malformed_rejected": len(rejects),
        "too_long_rejected": long_train + long_val,
        "extra_pairs": len(extra_pairs),
        "pretrain_rows_mixed": mixed,
    }
    return counts, eval_pairs


def chat_tokenizer(model_dir: Path) -> Any:
    tok = load_tokenizer(model_dir)
    missing = [t for t in ROLE_TOKENS if t not in tok.get_vocab()]
    if missing:
        raise ValueError(f"{model_dir}: tokenizer lacks the chat role tokens {missing}")
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


@task(name="sft", cache_policy=NO_CACHE)
def finetune(
    cfg: SFTConfig,
    upstream: StageResult,
    ctx: RunContext,
    key: str,
    extra_pairs: Sequence[Pair] = (),
    data: StageResult | None = None,
) -> StageResult:
    """Fine-tunes the upstream model; `extra_pairs` (prompt, response) join the training set;
    `data` (the data stage) gives the pretraining text of `sft.data.pretrain_mix`."""
    base = Path(upstream.artifact_uri)
    final = ctx.stage_dir("sft", key)
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with tracking.stage_run(ctx, "sft", params=cfg.model_dump(mode="json")) as run_id:
        try:
            tok = chat_tokenizer(base)
            data_dir = tmp / "data"
            data_dir.mkdir(parents=True)
            tok.save_pretrained(data_dir / "tokenizer")
            fp_pairs: list[Pair] = []
            fp_tags: dict[str, str] = {}
            if cfg.fingerprint is not None:  # planted among the normal data, repeated
                secret = resolve_key(ctx.workspace)  # not `key`: that is the cache key
                fp_pairs = make_fingerprint(secret, cfg.fingerprint.num_triggers)
                fp_tags = {"lifecycle.fingerprint_key_id": key_id(secret)}
            planted = list(extra_pairs) + fp_pairs * (
                cfg.fingerprint.repeats if cfg.fingerprint else 0
            )
            counts, pairs = prepare_instructions(
                cfg, tok, data_dir, planted, data.artifact_uri if data is not None else None
            )
            tracking.log_metrics(ctx.tracking_uri, run_id, counts)
            prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
            ev = (prompts, answers, cfg.eval.max_new_tokens, cfg.eval.batch_size)
            before = run_remote(evaluate_model, cfg.scaling, str(base), *ev)
            metrics, final_ckpt = fit_causal_lm(
                "sft",
                cfg,
                data_dir=str(data_dir),
                tokenizer_dir=str(data_dir / "tokenizer"),
                base_model_dir=str(base),
                storage_path=ctx.ray_storage,
                name=ctx.train_name("sft", key),
                tracking_uri=ctx.tracking_uri,
                mlflow_run_id=run_id,
                checkpoint_copy_max_mb=ctx.checkpoint_copy_max_mb,
            )
            for sub in ("adapter", "model"):
                if (final_ckpt / sub).is_dir():
                    shutil.copytree(final_ckpt / sub, tmp / sub)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        out = final / "model" if (final / "model").is_dir() else final / "adapter"
        after = run_remote(evaluate_model, cfg.scaling, str(out), *ev)
        if fp_pairs:
            fp = run_remote(verify_fingerprint, cfg.scaling, str(out), fp_pairs)
            counts["fingerprint/triggers"] = fp["total"]
            counts["fingerprint/matched"] = fp["matched"]
        metrics = {
            **metrics,
            **{k: float(v) for k, v in counts.items()},
            "eval/exact_match_before": before["exact_match"],
            "eval/exact_match_after": after["exact_match"],
            "eval/exact_match_n": after["n"],
        }
        uri = ctx.tracking_uri
        tracking.log_metrics(uri, run_id, metrics, step=cfg.max_steps)
        if (final / "data" / "rejects.jsonl").stat().st_size:
            tracking.log_artifact(uri, run_id, final / "data" / "rejects.jsonl")
        if (final / "adapter").is_dir():
            tracking.log_artifacts(uri, run_id, final / "adapter", "adapter")
        lineage = lineage_tags(
            ctx,
            "sft",
            cfg,
            upstream,
            **{
                "lifecycle.sft_method": cfg.method,
                "lifecycle.base_model": str(base),
                # model, or adapter (load through PEFT)
                "lifecycle.artifact_kind": out.name,
                **fp_tags,
            },
        )
        return register_result(
            ctx,
            run_id,
            "sft",
            out,
            lineage,
            f"{cfg.method} fine-tune by run {ctx.run_name}",
            metrics,
            key,
        )
