"""Distillation stage (optional, between RLHF and compression): a smaller student trained on
Ray Train against the aligned teacher's logits, kept only if it passes its quality gate.

Run it alone:  lifecycle run configs/tiny_cpu.yaml --stages distill --set distill.max_steps=300
               (with a `distill:` section in the YAML; rlhf from cache or --from rlhf=DIR)

The student (architecture and sizes in `distill.student`) starts from the teacher's weights
where they fit (lifecycle/compress/distill.py) and trains on the instruction data with
α·T²·KL(teacher ‖ student) + (1 − α)·LM loss. Gate: student task exact-match on held-out demo
prompts ≥ `min_exact_match_ratio` × the teacher's. Passed: registered as `<name>-distilled`
with lineage to the teacher, and it replaces the teacher downstream. Failed: the stage fails
with the numbers, or (`on_fail: keep_teacher`) completes and hands the teacher downstream.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from lifecycle import tracking
from lifecycle.artifacts import RunContext, StageResult
from lifecycle.config import DistillConfig
from lifecycle.data.instruct import demo_prompts, prepare_instructions
from lifecycle.eval.generate import evaluate_model
from lifecycle.models import chat_tokenizer
from lifecycle.registry import kept_upstream, lineage_tags, register_result
from ray_cluster.compute import run_remote
from ray_cluster.train import TrainJob, fit_causal_lm


class DistillGateFailed(RuntimeError):
    """The student kept less of the teacher's quality than the gate asks."""


@task(name="distill", cache_policy=NO_CACHE)
def distill(cfg: DistillConfig, ctx: RunContext, key: str, *, rlhf: StageResult) -> StageResult:
    """Distills the `rlhf` stage's (teacher) model into the configured student."""
    upstream = rlhf
    teacher = Path(upstream.artifact_uri)
    if not (teacher / "config.json").is_file():
        raise ValueError(f"distill needs a full HF teacher model dir, got {teacher}")
    final = ctx.stage_dir("distill", key)
    uri = ctx.tracking_uri
    with tracking.stage_run(ctx, "distill", params=cfg.model_dump(mode="json")) as run_id:
        with ctx.staging("distill", key) as tmp:
            tok = chat_tokenizer(teacher)
            data_dir = tmp / "data"
            data_dir.mkdir()
            tok.save_pretrained(data_dir / "tokenizer")
            counts, _ = prepare_instructions(cfg, tok, data_dir)
            train_metrics, final_ckpt = fit_causal_lm(
                "distill",
                cfg,
                TrainJob.of(ctx, "distill", key, run_id),
                data_dir=str(data_dir),
                tokenizer_dir=str(data_dir / "tokenizer"),
                base_model_dir=str(teacher),
            )
            shutil.copytree(final_ckpt / "model", tmp / "model")
            e = cfg.eval
            prompts, answers = demo_prompts(e.prompts, e.seed, True, tok, e.demo_tasks)
            ev = (prompts, answers, e.max_new_tokens, e.batch_size)
            t_eval = run_remote(evaluate_model, cfg.scaling, str(teacher), *ev)
            s_eval = run_remote(evaluate_model, cfg.scaling, str(tmp / "model"), *ev)
            t_params = run_remote(_num_params, cfg.scaling, str(teacher))
        s_params = float(train_metrics["model/params"])
        ratio = s_eval["exact_match"] / max(1e-9, t_eval["exact_match"])
        passed = ratio >= cfg.min_exact_match_ratio
        metrics = {
            **{k: float(v) for k, v in train_metrics.items() if isinstance(v, int | float)},
            **{k: float(v) for k, v in counts.items()},
            "eval/teacher_exact_match": t_eval["exact_match"],
            "eval/student_exact_match": s_eval["exact_match"],
            "eval/exact_match_ratio": ratio,
            "model/teacher_params": float(t_params),
            "model/student_params": s_params,
            "model/params_ratio": s_params / t_params,
            "gate/passed": float(passed),
        }
        tracking.log_metrics(uri, run_id, metrics, step=cfg.max_steps)
        lineage = lineage_tags(
            ctx, "distill", cfg, upstream, **{"lifecycle.gate_passed": str(passed).lower()}
        )
        lineage["lifecycle.teacher_model"] = lineage["lifecycle.parent_model"]
        tracking.set_tags(uri, run_id, lineage)
        if not passed:
            message = (
                f"distillation gate failed: student exact-match {s_eval['exact_match']:.3f} is "
                f"{ratio:.2f} of the teacher's {t_eval['exact_match']:.3f} (needs >= "
                f"{cfg.min_exact_match_ratio:g}) with {s_params / t_params:.2f} of its parameters"
            )
            if cfg.on_fail == "fail":
                raise DistillGateFailed(message)
            return kept_upstream(
                "distill", upstream, run_id, metrics, f"{message}; keeping the teacher {teacher}"
            )
        return register_result(
            ctx,
            run_id,
            "distill",
            final / "model",
            lineage,
            f"student distilled from {lineage['lifecycle.teacher_model']}",
            metrics,
            key,
        )


def _num_params(model_dir: str) -> int:
    from lifecycle.models import load_model

    return sum(p.numel() for p in load_model(model_dir).parameters())
