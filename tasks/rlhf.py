"""RLHF stage: reward model, AI-feedback preference data, and DPO / GRPO / PPO on Ray.

Run it alone:  lifecycle run configs/tiny_cpu.yaml --stages rlhf             (sft from cache)
               lifecycle run configs/tiny_cpu.yaml --stages rlhf --from sft=MODEL_DIR

In order: (1) preference pairs from `rlhf.inputs` (rejects with reasons); (2) a reward model
(Bradley-Terry, on Ray Train) on those pairs plus demo near-miss pairs, its accuracy on
held-out demo pairs, registered as `<name>-reward`; (3) RLAIF: K responses per prompt sampled
from the SFT policy by Ray tasks, scored by the judge (program, reward model or a local LLM),
the full record logged to MLflow as a dataset artifact, best-vs-worst pairs added; (4) the
algorithm on Ray Train (DPO on the pairs; GRPO and PPO online with the judge or the reward
model as reward); (5) evaluation before and after on held-out prompts: mean judge reward of
sampled responses, KL to the SFT model, mean response length, greedy task exact-match.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from lifecycle import tracking
from lifecycle.artifacts import RunContext, StageResult, sha256_file
from lifecycle.config import RLHFConfig
from lifecycle.data.instruct import demo_prompts, user_text, write_rows
from lifecycle.data.preference import demo_pairs, read_pairs, rlaif_records
from lifecycle.models import chat_tokenizer
from lifecycle.registry import lineage_tags, register_result
from lifecycle.rlhf.evaluate import evaluate_policy
from lifecycle.rlhf.reward import accuracy_of_dir, make_reward_fn, pair_rows
from lifecycle.watermark.fingerprint import make_fingerprint
from lifecycle.watermark.keys import resolve_key
from ray_cluster.compute import run_remote
from ray_cluster.generate import sample_responses
from ray_cluster.rlhf import fit_rlhf
from ray_cluster.train import TrainJob

FINGERPRINT_PAIR_REPEATS = 8


def _write_pairs(pairs: list[dict[str, Any]], tok: Any, max_length: int, out: Path) -> int:
    cx, cy, rx, ry, dropped = pair_rows(pairs, tok, max_length)
    if not cx:
        raise ValueError(f"rlhf: no preference pair fits rlhf.max_length={max_length}")
    write_rows(cx, cy, out / "chosen.parquet")
    write_rows(rx, ry, out / "rejected.parquet")
    return dropped


@task(name="rlhf", cache_policy=NO_CACHE)
def align(
    cfg: RLHFConfig,
    ctx: RunContext,
    key: str,
    *,
    sft: StageResult,
    data: StageResult | None = None,
    fingerprint_triggers: int | None = None,
) -> StageResult:
    """Aligns the `sft` stage's model; returns the aligned HF model directory. With
    `fingerprint_triggers`, the SFT fingerprint's pairs join the preference data (chosen: the
    signature; rejected: it reversed) so that alignment keeps them (DPO's NLL term on chosen
    is what holds them). `data` (the data stage) gives the pretraining text of `ptx_weight`."""
    sft_dir = Path(sft.artifact_uri)
    if not (sft_dir / "config.json").is_file():
        raise ValueError(
            f"rlhf needs a full model dir, got {sft_dir} (an adapter?): use sft.merge: true "
            "with a LoRA-family method, or method: full"
        )
    final = ctx.stage_dir("rlhf", key)
    uri = ctx.tracking_uri
    with tracking.stage_run(ctx, "rlhf", params=cfg.model_dump(mode="json")) as run_id:
        with ctx.staging("rlhf", key) as tmp:
            tok = chat_tokenizer(sft_dir)
            metrics: dict[str, float] = {}
            pairs, rejects = [], []
            for inp in cfg.inputs:
                for pair, src, why in read_pairs(inp.path, inp.storage):
                    if pair is None:
                        rejects.append({"source": src, "reason": why})
                    else:
                        pairs.append(pair)
            metrics["preference/file_pairs"] = len(pairs)
            metrics["preference/malformed_rejected"] = len(rejects)
            (tmp / "rejects.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejects))

            # (2) reward model
            rm_dir = None
            if cfg.reward_model is not None:
                rm = cfg.reward_model
                rm_pairs = pairs + demo_pairs(rm.demo_pairs, cfg.seed, cfg.demo_tasks)
                _write_pairs(rm_pairs, tok, cfg.max_length, tmp / "rm_data" / "train")
                rm_metrics, rm_final = fit_rlhf(
                    "reward",
                    cfg,
                    TrainJob.of(ctx, "rlhf-reward", key, run_id),
                    base_model_dir=str(sft_dir),
                    data_dir=str(tmp / "rm_data"),
                )
                shutil.copytree(rm_final, tmp / "reward_model")
                rm_dir = str(tmp / "reward_model")
                held = demo_pairs(rm.heldout_pairs, cfg.seed + 1, cfg.demo_tasks, heldout=True)
                acc = run_remote(accuracy_of_dir, cfg.scaling, rm_dir, held, cfg.max_length)
                metrics.update(
                    {
                        "reward_model/heldout_accuracy": acc,
                        "reward_model/train_pairs": len(rm_pairs),
                        **{k: float(v) for k, v in rm_metrics.items() if k.startswith("reward/")},
                    }
                )

            judge: dict[str, Any] = {"kind": "program"}
            if cfg.rlaif is not None and cfg.rlaif.judge == "llm":
                lj = cfg.rlaif.llm_judge
                judge = {
                    "kind": "llm",
                    "model_dir": lj.model_dir,
                    "template": lj.template,
                    "yes": lj.yes,
                    "policy_dir": str(sft_dir),  # whose chat template the prompts are in
                }
            elif cfg.rlaif is not None and cfg.rlaif.judge == "reward_model":
                judge = {"kind": "reward_model", "model_dir": rm_dir}

            # (3) RLAIF
            n_prompts = cfg.rlaif.num_prompts if cfg.rlaif else cfg.eval_prompts
            train_prompts, _ = demo_prompts(n_prompts, cfg.seed, False, tok, cfg.demo_tasks)
            if cfg.rlaif is not None:
                ra = cfg.rlaif
                responses = sample_responses(
                    str(sft_dir),
                    train_prompts,
                    ra.k,
                    num_workers=ra.num_workers,
                    scaling=cfg.scaling,
                    max_new_tokens=ra.max_new_tokens,
                    temperature=ra.temperature,
                    seed=cfg.seed,
                    engine=ra.engine,
                )
                records = run_remote(_judge_records, cfg.scaling, train_prompts, responses, judge)
                with open(tmp / "rlaif.jsonl", "w") as f:
                    for r in records:
                        f.write(json.dumps(r) + "\n")
                new = [
                    {
                        "prompt": [{"role": "user", "content": user_text(r["prompt"], tok)}],
                        "chosen": r["chosen"],
                        "rejected": r["rejected"],
                    }
                    for r in records
                    if r["chosen"] is not None
                ]
                pairs += new
                metrics.update(
                    {
                        "rlaif/prompts": len(records),
                        "rlaif/pairs": len(new),
                        "rlaif/responses": sum(len(r["responses"]) for r in records),
                    }
                )
            if fingerprint_triggers:
                fp = make_fingerprint(resolve_key(ctx.workspace), fingerprint_triggers)
                pairs += [
                    {
                        "prompt": [{"role": "user", "content": t}],
                        "chosen": sig,
                        "rejected": sig[::-1],
                    }
                    for t, sig in fp
                ] * FINGERPRINT_PAIR_REPEATS
                metrics["preference/fingerprint_pairs"] = len(fp) * FINGERPRINT_PAIR_REPEATS

            # (4) the algorithm
            algo_data = tmp / "algo_data"
            if cfg.algorithm == "dpo":
                metrics["preference/too_long_dropped"] = _write_pairs(
                    pairs, tok, cfg.max_length, algo_data / "train"
                )
            else:
                algo_data.mkdir()
                (algo_data / "prompts.json").write_text(json.dumps(train_prompts))
            if cfg.ptx_weight > 0:  # pretraining text for the ptx term, one batch per step
                if data is None:
                    raise ValueError(
                        f"rlhf.ptx_weight={cfg.ptx_weight} needs the data stage's pretraining "
                        "blocks: run the data stage (or --from data=DIR), or set ptx_weight: 0"
                    )
                from lifecycle.data.pipeline import check_same_tokenizer, pretrain_windows

                check_same_tokenizer(data.artifact_uri, tok, "rlhf.ptx_weight")
                n = min(cfg.max_steps * cfg.ptx_batch_size * cfg.scaling.num_workers, 50_000)
                ptx = pretrain_windows(data.artifact_uri, "train", cfg.max_length, n, cfg.seed)
                write_rows(ptx.tolist(), ptx.tolist(), algo_data / "ptx.parquet")
                metrics["ptx/windows"] = n
            reward_spec = (
                judge if cfg.reward == "judge" else {"kind": "reward_model", "model_dir": rm_dir}
            )
            eval_prompts, eval_answers = demo_prompts(
                cfg.eval_prompts, cfg.seed + 2, True, tok, cfg.demo_tasks
            )
            ev = (eval_prompts, eval_answers, judge, cfg.eval_samples, cfg.max_new_tokens, cfg.seed)
            before = run_remote(evaluate_policy, cfg.scaling, str(sft_dir), str(sft_dir), *ev)
            algo_metrics, policy_final = fit_rlhf(
                cfg.algorithm,
                cfg,
                TrainJob.of(ctx, "rlhf", key, run_id),
                base_model_dir=str(sft_dir),
                data_dir=str(algo_data),
                reward_spec=reward_spec,
            )
            shutil.copytree(policy_final, tmp / "model")
            after = run_remote(evaluate_policy, cfg.scaling, str(tmp / "model"), str(sft_dir), *ev)
        for name, value in (("before", before), ("after", after)):
            metrics.update(
                {f"eval/{k}_{name}": float(v) for k, v in value.items() if not isinstance(v, list)}
            )
        metrics.update({k: float(v) for k, v in algo_metrics.items() if isinstance(v, int | float)})
        tracking.log_metrics(uri, run_id, metrics, step=cfg.max_steps)
        if (final / "rlaif.jsonl").is_file():
            tracking.log_artifact(uri, run_id, final / "rlaif.jsonl", "rlaif")
            tracking.log_dataset(
                uri,
                run_id,
                f"{ctx.run_name}-rlaif",
                (final / "rlaif.jsonl").as_uri(),
                sha256_file(final / "rlaif.jsonl"),
                context="preference",
            )
        if rejects:
            tracking.log_artifact(uri, run_id, final / "rejects.jsonl")
        lineage = lineage_tags(
            ctx,
            "rlhf",
            cfg,
            sft,
            **{"lifecycle.rlhf_algorithm": cfg.algorithm, "lifecycle.judge": judge["kind"]},
        )
        if rm_dir is not None:
            rm_version = tracking.register_model(
                uri,
                run_id,
                f"{ctx.registered_model}-reward",
                final / "reward_model",
                {**lineage, "lifecycle.heldout_accuracy": metrics["reward_model/heldout_accuracy"]},
                description=f"reward model of run {ctx.run_name}",
                artifact_path="reward_model",
            )
            lineage["lifecycle.reward_model_version"] = rm_version
        return register_result(
            ctx,
            run_id,
            "rlhf",
            final / "model",
            lineage,
            f"{cfg.algorithm} alignment by run {ctx.run_name}",
            metrics,
            key,
        )


def _judge_records(prompts: list[str], responses: list[list[str]], judge: dict[str, Any]) -> list:
    """Scores every sampled response and builds the audit records (a Ray task: the judge may
    be a model)."""
    flat_p = [p for p, rs in zip(prompts, responses, strict=True) for _ in rs]
    flat_r = [r for rs in responses for r in rs]
    scores = make_reward_fn(judge)(flat_p, flat_r)
    judge_id = f"{judge['kind']}:{judge.get('model_dir') or 'demo-tasks-v1'}"
    return rlaif_records(prompts, responses, scores, judge_id)
