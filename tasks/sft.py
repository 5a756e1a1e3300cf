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

import shutil
from collections.abc import Sequence
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from lifecycle import tracking
from lifecycle.artifacts import RunContext, StageResult
from lifecycle.config import SFTConfig
from lifecycle.data.instruct import Pair, prepare_instructions
from lifecycle.eval.generate import evaluate_model
from lifecycle.models import chat_tokenizer
from lifecycle.registry import lineage_tags, register_result
from lifecycle.watermark.fingerprint import make_fingerprint, verify_fingerprint
from lifecycle.watermark.keys import key_id, resolve_key
from ray_cluster.compute import run_remote
from ray_cluster.train import TrainJob, fit_causal_lm


@task(name="sft", cache_policy=NO_CACHE)
def finetune(
    cfg: SFTConfig,
    ctx: RunContext,
    key: str,
    *,
    pretrain: StageResult,
    data: StageResult | None = None,
    extra_pairs: Sequence[Pair] = (),
) -> StageResult:
    """Fine-tunes the `pretrain` stage's model; `extra_pairs` (prompt, response) join the
    training set; `data` (the data stage) gives the pretraining text of
    `sft.data.pretrain_mix`."""
    base = Path(pretrain.artifact_uri)
    final = ctx.stage_dir("sft", key)
    with tracking.stage_run(ctx, "sft", params=cfg.model_dump(mode="json")) as run_id:
        with ctx.staging("sft", key) as tmp:
            tok = chat_tokenizer(base)
            data_dir = tmp / "data"
            data_dir.mkdir()
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
            if data is not None and cfg.data.pretrain_mix > 0:
                from lifecycle.data.pipeline import check_same_tokenizer

                check_same_tokenizer(data.artifact_uri, tok, "sft.data.pretrain_mix")
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
                TrainJob.of(ctx, "sft", key, run_id),
                data_dir=str(data_dir),
                tokenizer_dir=str(data_dir / "tokenizer"),
                base_model_dir=str(base),
            )
            for sub in ("adapter", "model"):
                if (final_ckpt / sub).is_dir():
                    shutil.copytree(final_ckpt / sub, tmp / sub)
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
            pretrain,
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
