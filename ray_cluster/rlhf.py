"""Ray Train loops of the RLHF stage: the reward model, and DPO / GRPO / PPO on the policy.

Used by tasks/rlhf.py. One loop, `rlhf_loop`, with `kind` in reward | dpo | grpo | ppo:
the model(s) are built on every worker, wrapped by `prepare_model` (DDP) on the worker's
device (the frozen reference and the value head with it), trained with the plain-PyTorch
steps of lifecycle/rlhf/algorithms.py, checkpointed every `checkpoint_every` steps through
`ray.train.report` (committed like pretraining: a worker that dies resumes from the newest
committed checkpoint), and the final model is reported as checkpoint `final/model`.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import torch

from lifecycle.config import RLHFConfig
from lifecycle.data.instruct import load_rows
from lifecycle.models import load_model, load_tokenizer, save_model
from lifecycle.rlhf.reward import make_reward_fn
from lifecycle.tracking import RankZeroTracker
from lifecycle.training import BatchSampler, autocast_for, make_optimizer, make_scheduler
from ray_cluster import metrics as ray_metrics
from ray_cluster.train import (
    FINAL_DIR,
    STATE_FILE,
    TrainJob,
    latest_checkpoint,
    report_checkpoint,
    run_trainer,
    worker_tracking_uri,
)


def _pairs(
    path: Path,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    return load_rows(path / "chosen.parquet"), load_rows(path / "rejected.parquet")


def rlhf_loop(c: dict[str, Any]) -> None:
    kind = c["kind"]
    cfg = RLHFConfig.model_validate(c["config"])
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    device = ray.train.torch.get_device()
    tracker = RankZeroTracker(worker_tracking_uri(c), c["mlflow_run_id"], enabled=rank == 0)
    tok = load_tokenizer(c["tokenizer_dir"])
    pad = tok.pad_token_id
    torch.manual_seed(cfg.seed + rank)  # sampling differs per rank; init is loaded, not random

    ref = None
    head = None
    if kind == "reward":
        from lifecycle.rlhf.reward import reward_model_from

        model = reward_model_from(c["base_model_dir"])
        steps, lr, micro = (
            cfg.reward_model.max_steps,
            cfg.reward_model.lr,
            cfg.reward_model.micro_batch_size,
        )
    else:
        model = load_model(c["base_model_dir"])
        ref = copy.deepcopy(model).requires_grad_(False).eval().to(device)
        if cfg.lora is not None:
            from peft import LoraConfig, get_peft_model

            o = cfg.lora
            model = get_peft_model(
                model,
                LoraConfig(
                    task_type="CAUSAL_LM",
                    r=o.r,
                    lora_alpha=o.alpha,
                    lora_dropout=o.dropout,
                    target_modules=o.target_modules,
                ),
            )
        steps, lr, micro = cfg.max_steps, cfg.lr, cfg.micro_batch_size
        if kind == "ppo":
            from lifecycle.rlhf.ppo import ValueHead

            head = ValueHead(model.config.hidden_size).to(device)
    train_cfg = cfg.model_copy(
        update={"max_steps": steps, "lr": lr, "warmup_steps": min(cfg.warmup_steps, steps - 1)}
    )
    params = [p for p in model.parameters() if p.requires_grad]
    if head is not None:
        params += list(head.parameters())
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": True}
    )
    raw = model.module if hasattr(model, "module") else model
    optimizer = (
        make_optimizer(model, train_cfg) if head is None else torch.optim.AdamW(params, lr=lr)
    )
    sched = make_scheduler(optimizer, train_cfg)

    start = 0
    ckpt = latest_checkpoint(c["storage_dir"]) or ray.train.get_checkpoint()
    if ckpt is not None:
        from safetensors.torch import load_model as load_safetensors

        with ckpt.as_directory() as d:
            state = json.loads((Path(d) / STATE_FILE).read_text())
            load_safetensors(raw, str(Path(d) / "model.safetensors"), device=str(device))
            if head is not None:
                load_safetensors(head, str(Path(d) / "value_head.safetensors"), device=str(device))
            optimizer.load_state_dict(torch.load(Path(d) / "optimizer.pt", weights_only=True))
            sched.load_state_dict(json.loads((Path(d) / "scheduler.json").read_text()))
            start = state["step"]

    data_dir = Path(c["data_dir"])
    if kind in ("reward", "dpo"):
        (cx, cy), (rx, ry) = _pairs(data_dir / "train")
        sampler = BatchSampler(len(cx), micro, world, rank, cfg.seed)
    else:
        prompts = json.loads((data_dir / "prompts.json").read_text())
        sampler = BatchSampler(len(prompts), cfg.prompts_per_step, world, rank, cfg.seed)
        reward_fn = make_reward_fn(c["reward_spec"])
    ptx_x = None
    if kind in ("dpo", "grpo") and (data_dir / "ptx.parquet").is_file():
        ptx_x, _ = load_rows(data_dir / "ptx.parquet")  # labels = inputs
        ptx_sampler = BatchSampler(len(ptx_x), cfg.ptx_batch_size, world, rank, cfg.seed + 1)

    def with_ptx(loss: torch.Tensor, net: torch.nn.Module, step: int, stats: dict) -> torch.Tensor:
        """+ ptx_weight × LM loss on pretraining text (InstructGPT's PPO-ptx)."""
        if ptx_x is None:
            return loss
        xb = ptx_x[ptx_sampler.indices(step)].to(device)
        lm = net(input_ids=xb, labels=xb).loss
        stats["ptx_loss"] = float(lm)
        return loss + cfg.ptx_weight * lm

    def _step(step: int, idx: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
        """One step's loss and stats (PPO: its own updates, no loss returned)."""
        if kind == "reward":
            from lifecycle.rlhf.algorithms import reward_step

            return reward_step(model, cx[idx], rx[idx], pad)
        if kind == "dpo":
            from lifecycle.rlhf.algorithms import dpo_step

            loss, stats = dpo_step(
                model, ref, (cx[idx], cy[idx]), (rx[idx], ry[idx]), pad, cfg.beta, cfg.nll_weight
            )
            return with_ptx(loss, model, step, stats), stats
        batch = [prompts[int(i)] for i in idx]
        if kind == "grpo":
            from lifecycle.rlhf.algorithms import grpo_step

            loss, stats = grpo_step(
                raw, ref, tok, batch, reward_fn, cfg.group_size, cfg.max_new_tokens, cfg.beta
            )
            return with_ptx(loss, raw, step, stats), stats
        from lifecycle.rlhf.algorithms import ppo_step

        return None, ppo_step(
            raw,
            head,
            ref,
            tok,
            batch,
            reward_fn,
            optimizer,
            cfg.max_new_tokens,
            cfg.beta,
            epochs=cfg.ppo_epochs,
            clip=cfg.clip,
            grad_clip=cfg.grad_clip,
        )

    # bf16: the forwards (rollouts included) under autocast, fp32 master weights and
    # optimizer state, log-probs and losses in fp32 (lifecycle/rlhf/algorithms.py).
    amp = autocast_for(device, torch.bfloat16 if cfg.precision == "bf16" else None)
    model.train()
    t0, stats = time.perf_counter(), {}
    for step in range(start, steps):
        idx = sampler.indices(step)
        with amp():
            loss, stats = _step(step, idx)
        if kind != "ppo":
            optimizer.zero_grad(set_to_none=True)
            # GRPO: through the unwrapped model, so gradients are averaged here.
            loss.backward()
            if kind == "grpo" and world > 1:
                for p in params:
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= world
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            stats["train/loss"] = float(loss)

        sched.step()
        done = step + 1
        if done % cfg.log_every == 0 or done == steps:
            tracker.metrics({f"{kind}/{k}": v for k, v in stats.items()}, step=done)
            if rank == 0 and "train/loss" in stats:
                ray_metrics.training_step(f"rlhf-{kind}", done, stats["train/loss"], 0.0)
        if done % cfg.checkpoint_every == 0 and done < steps:
            _save_checkpoint(c, raw, head, optimizer, sched, done, rank, tracker)

    metrics = {f"{kind}/{k}": v for k, v in stats.items()}
    metrics[f"{kind}/steps"] = steps
    metrics[f"{kind}/resumed_from_step"] = start
    metrics[f"{kind}/seconds"] = time.perf_counter() - t0
    metrics["sys/world_size"] = world
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            save_model(
                raw.merge_and_unload() if hasattr(raw, "merge_and_unload") else raw,
                tok,
                Path(d) / "model",
            )
            (Path(d) / STATE_FILE).write_text(
                json.dumps({"step": steps, "final": True, "metrics": metrics})
            )
        report_checkpoint(c["storage_dir"], FINAL_DIR, metrics, d if rank == 0 else None)


def _save_checkpoint(
    c: dict[str, Any],
    raw: torch.nn.Module,
    head: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    sched: Any,
    step: int,
    rank: int,
    tracker: RankZeroTracker,
) -> None:
    from safetensors.torch import save_model as save_safetensors

    name = f"step_{step:06d}"
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            save_safetensors(raw, str(Path(d) / "model.safetensors"))
            if head is not None:
                save_safetensors(head, str(Path(d) / "value_head.safetensors"))
            torch.save(optimizer.state_dict(), Path(d) / "optimizer.pt")
            (Path(d) / "scheduler.json").write_text(json.dumps(sched.state_dict()))
            (Path(d) / STATE_FILE).write_text(json.dumps({"step": step}))
        # The reward model and the policy train in the same MLflow run: separate roots.
        root = "reward_checkpoints" if c["kind"] == "reward" else "checkpoints"
        tracker.checkpoint(step, d, f"{c['storage_dir']}/{name}", c["checkpoint_copy_max_mb"], root)
        report_checkpoint(c["storage_dir"], name, {"step": step}, d if rank == 0 else None)


def fit_rlhf(
    kind: str,
    cfg: RLHFConfig,
    job: TrainJob,
    *,
    base_model_dir: str,
    data_dir: str,
    reward_spec: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], Path]:
    """Runs one RLHF training job on Ray Train; returns (final metrics, final model dir)."""
    loop_config = {
        "kind": kind,
        "config": cfg.model_dump(mode="json"),
        "base_model_dir": base_model_dir,
        "tokenizer_dir": base_model_dir,
        "data_dir": data_dir,
        "reward_spec": reward_spec,
        **job.loop_config(),
    }
    metrics, final = run_trainer(
        rlhf_loop, loop_config, cfg, name=job.name, storage_path=job.storage_path
    )
    if not (final / "model").is_dir():
        raise RuntimeError(f"{kind} finished without a final model in {final}")
    return metrics, final / "model"
