"""Ray Train: the causal-LM training loop per worker, and the TorchTrainer that runs it.

Used by tasks/pretrain.py, tasks/sft.py and tasks/distill.py; run a stage alone with
`lifecycle run CONFIG --stages pretrain`. The loss, the optimizer step, the sampler and the
held-out loss are plain PyTorch in lifecycle/training.py; this module is the Ray glue.

Ray touches the loop at three points: (1) the model is wrapped by `prepare_model` (DDP) or by
a DeepSpeed engine (ZeRO 1/2/3), (2) each worker reads its own slice of every global batch,
(3) `ray.train.report` hands checkpoints to Ray Train storage every `checkpoint_every` steps.
A worker that dies makes Ray Train restart the group (`FailureConfig.max_failures`); the loop
then resumes from `ray.train.get_checkpoint()`: model, optimizer, scheduler and the step, and
since batches are a pure function of (seed, step), the data order continues exactly.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig
from ray.train.torch import TorchConfig, TorchTrainer

from lifecycle.artifacts import RunContext
from lifecycle.config import (
    DistillConfig,
    PretrainConfig,
    ScalingConfig,
    SFTConfig,
    TrainingConfig,
)
from lifecycle.models import build_model, flops_per_token, load_tokenizer, num_params, save_model
from lifecycle.tracking import RankZeroTracker, redact
from lifecycle.training import (
    BatchSampler,
    LMData,
    autocast_for,
    deepspeed_config,
    evaluate,
    lm_loss,
    make_optimizer,
    make_scheduler,
    measure_peak_flops,
    train_step,
)
from ray_cluster import metrics as ray_metrics

STATE_FILE = "train_state.json"
COMMIT_FILE = "COMMITTED"
FINAL_DIR = "final"


# --------------------------------------------------------------------------------------------
# The loop each Ray Train worker runs
# --------------------------------------------------------------------------------------------


def causal_lm_loop(c: dict[str, Any]) -> None:
    """Per-worker training loop. `c` holds plain values only (see `fit_causal_lm`).

    `kind` "pretrain" trains a model built from config on packed blocks; "sft" fine-tunes
    `base_model_dir` with the configured method on padded instruction rows; "distill" trains
    a student built from config against the logits of the teacher in `base_model_dir`.
    """
    kind = c["kind"]
    cfg = CONFIGS[kind].model_validate(c["config"])
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    device = ray.train.torch.get_device()
    tracker = RankZeroTracker(worker_tracking_uri(c), c["mlflow_run_id"], enabled=rank == 0)

    tokenizer = load_tokenizer(c["tokenizer_dir"])
    data = LMData.load(kind, c["data_dir"], tokenizer.pad_token_id)
    teacher = None
    if kind == "pretrain":
        model = build_model(cfg.model, tokenizer, cfg.seed)
        fpt = flops_per_token(model, data.train_x.shape[1])
    elif kind == "distill":
        from lifecycle.compress.distill import student_from_teacher
        from lifecycle.models import load_model

        teacher = load_model(c["base_model_dir"]).to(device).eval().requires_grad_(False)
        model = student_from_teacher(teacher, cfg, tokenizer)
        # The teacher's forward is part of every step's work.
        fpt = (
            flops_per_token(model, data.train_x.shape[1])
            + flops_per_token(teacher, data.train_x.shape[1]) / 3
        )
    else:
        from lifecycle.peft_methods import apply_method, load_base

        base = load_base(c["base_model_dir"], cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # adapter init is random: same on every rank
            model = apply_method(base, cfg)
        # Frozen base weights cost no weight gradients (full SFT: all are trainable).
        trainable = num_params(model, trainable_only=True)
        fpt = flops_per_token(model, data.train_x.shape[1], trainable)
    use_ds = cfg.deepspeed.zero_stage > 0
    # DeepSpeed casts the model itself; otherwise bf16 is autocast around each forward.
    dtype = torch.bfloat16 if cfg.precision == "bf16" and not use_ds else None
    autocast = autocast_for(device, dtype)

    if use_ds:
        import deepspeed

        optimizer = make_optimizer(model, cfg)
        engine, optimizer, _, sched = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=make_scheduler(optimizer, cfg),
            config=deepspeed_config(cfg, world),
        )
        net = engine
    else:
        # Frozen bases and virtual-token methods leave parameters without gradients.
        ddp = {"find_unused_parameters": True} if kind == "sft" else None
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp)
        optimizer = make_optimizer(model, cfg)
        sched = make_scheduler(optimizer, cfg)
        net = model
    raw = net.module if hasattr(net, "module") else net

    def all_reduce(t: torch.Tensor) -> None:
        """Sum over ranks, in place (through the device: NCCL reduces only GPU tensors)."""
        if world > 1:
            on = t.to(device)
            torch.distributed.all_reduce(on)
            t.copy_(on)

    ev = dict(rank=rank, world=world, device=device, autocast=autocast, all_reduce=all_reduce)

    # ---- resume ---------------------------------------------------------------------------
    start_step, state = 0, {}
    # Ray Train registers a checkpoint when the controller next polls the workers; a worker
    # that dies in between loses that registration although the files are safe in storage.
    # The newest *committed* checkpoint in storage is the better resume point.
    ckpt = latest_checkpoint(c["storage_dir"]) or ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = json.loads((Path(d) / STATE_FILE).read_text())
            if use_ds:
                engine.load_checkpoint(str(Path(d) / "ds"), tag="ds")
            else:
                from safetensors.torch import load_model

                load_model(raw, str(Path(d) / "model.safetensors"), device=str(device))
                optimizer.load_state_dict(torch.load(Path(d) / "optimizer.pt", weights_only=True))
                sched.load_state_dict(json.loads((Path(d) / "scheduler.json").read_text()))
        start_step = state["step"]
    resumed_from = start_step

    if "loss_before" in state:
        loss_before = state["loss_before"]
    else:
        loss_before = evaluate(net, data, cfg.micro_batch_size, cfg.eval_batches, **ev)
    tracker.metrics(
        {"eval/loss_before": loss_before, "eval/perplexity_before": math.exp(min(loss_before, 50))},
        step=0,
    )
    if resumed_from:
        tracker.metrics({"train/resumed_from_step": resumed_from}, step=resumed_from)

    probe = torch.bfloat16 if cfg.precision == "bf16" else torch.float32  # DeepSpeed too
    peak = cfg.peak_flops or measure_peak_flops(device, probe)
    sampler = BatchSampler(len(data.train_x), cfg.micro_batch_size, world, rank, cfg.seed)
    # Tokens processed (padding included for SFT rows): what the hardware did.
    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * world * data.train_x.shape[1]
    # Throughput counts every step after the first (which pays one-off costs), with all the
    # loop does between them: logging and checkpoints included.
    timed_steps, t_first = 0, 0.0
    loss_acc = torch.zeros(2, dtype=torch.float64)
    net.train()

    def loss_fn(net: Any, batch: Any) -> torch.Tensor:
        return lm_loss(net, batch, teacher, *distill_args)

    distill_args = (cfg.temperature, cfg.alpha) if kind == "distill" else ()
    # AdaLoRA reallocates its rank budget from this step's gradients.
    adalora = kind == "sft" and cfg.method == "adalora"
    for step in range(start_step, cfg.max_steps):
        batches = [
            data.train_batch(sampler.indices(step * cfg.grad_accum_steps + m), device)
            for m in range(cfg.grad_accum_steps)
        ]
        if use_ds:
            losses = []
            for batch in batches:
                loss = loss_fn(engine, batch)
                engine.backward(loss)
                engine.step()  # DeepSpeed counts micro-steps and steps at the boundary
                losses.append(loss.item())
            last_loss = sum(losses) / len(losses)
        else:
            last_loss = train_step(
                model,
                optimizer,
                sched,
                batches,
                grad_clip=cfg.grad_clip,
                loss_fn=loss_fn,
                autocast=autocast,
                # Gradients are all-reduced once per step, on the last micro-batch.
                no_sync=model.no_sync if world > 1 else None,
                before_zero_grad=partial(raw.base_model.update_and_allocate, step)
                if adalora
                else None,
            )
        loss_acc += torch.tensor([last_loss * len(batches), len(batches)], dtype=torch.float64)
        if step == start_step:
            t_first = time.perf_counter()
        else:
            timed_steps += 1
        timed_s = time.perf_counter() - t_first
        done = step + 1

        if done % cfg.log_every == 0 or done == cfg.max_steps:
            all_reduce(loss_acc)
            tps = tokens_per_step * timed_steps / timed_s if timed_steps else 0.0
            if rank == 0:  # Ray's Prometheus endpoint (ray_cluster/metrics.py)
                ray_metrics.training_step(kind, done, float(loss_acc[0] / loss_acc[1]), tps)
            tracker.metrics(
                {
                    "train/loss": float(loss_acc[0] / loss_acc[1]),
                    "train/lr": sched.get_last_lr()[0],
                    "train/tokens_per_s": tps,
                    "sys/mfu": tps * fpt / (peak * world),
                },
                step=done,
            )
            loss_acc.zero_()

        if done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
            state = {"step": done, "loss_before": loss_before}
            with tempfile.TemporaryDirectory() as d:
                if use_ds:
                    engine.save_checkpoint(str(Path(d) / "ds"), tag="ds")
                elif rank == 0:
                    from safetensors.torch import save_model as save_safetensors

                    save_safetensors(raw, str(Path(d) / "model.safetensors"))
                    torch.save(optimizer.state_dict(), Path(d) / "optimizer.pt")
                    (Path(d) / "scheduler.json").write_text(json.dumps(sched.state_dict()))
                if rank == 0:
                    (Path(d) / STATE_FILE).write_text(json.dumps(state))
                name = f"step_{done:06d}"
                tracker.checkpoint(
                    done, d, f"{c['storage_dir']}/{name}", c["checkpoint_copy_max_mb"]
                )
                has_files = use_ds or rank == 0
                report_checkpoint(
                    c["storage_dir"],
                    name,
                    {"step": done, "train/loss": last_loss},
                    d if has_files else None,
                )

    # ---- final evaluation and model ------------------------------------------------------
    loss_after = evaluate(net, data, cfg.micro_batch_size, cfg.eval_batches, **ev)
    tps = tokens_per_step * timed_steps / timed_s if timed_steps else 0.0
    metrics = {
        "eval/loss_before": loss_before,
        "eval/loss_after": loss_after,
        "eval/perplexity_before": math.exp(min(loss_before, 50)),
        "eval/perplexity_after": math.exp(min(loss_after, 50)),
        "train/tokens_per_s": tps,
        "sys/mfu": tps * fpt / (peak * world),
        "sys/peak_flops_per_worker": peak,
        "sys/world_size": world,
        "train/steps": cfg.max_steps,
        "train/resumed_from_step": resumed_from,
        "model/params": num_params(raw),
    }
    if kind == "sft":
        from lifecycle.peft_methods import trainable_parameters

        metrics["model/trainable_params"], _ = trainable_parameters(raw)
    tracker.metrics(
        {k: v for k, v in metrics.items() if k.startswith(("eval/", "sys/"))}, step=cfg.max_steps
    )
    full_state = None
    if use_ds and cfg.deepspeed.zero_stage == 3:
        full_state = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            if full_state is not None:
                full_state = {k: v.float() for k, v in full_state.items()}
            if kind in ("pretrain", "distill") or full_state is not None:
                save_model(raw, tokenizer, Path(d) / "model", state_dict=full_state)
            else:
                from lifecycle.peft_methods import save_outputs

                save_outputs(raw, tokenizer, Path(d), cfg)
            (Path(d) / STATE_FILE).write_text(
                json.dumps({"step": cfg.max_steps, "final": True, "metrics": metrics})
            )
        report_checkpoint(c["storage_dir"], FINAL_DIR, metrics, d if rank == 0 else None)


CONFIGS: dict[str, type[TrainingConfig]] = {
    "pretrain": PretrainConfig,
    "sft": SFTConfig,
    "distill": DistillConfig,
}


def report_checkpoint(
    storage_dir: str, name: str, metrics: dict[str, Any], local_dir: str | None
) -> None:
    """Every rank reports (those with files pass their dir); then rank 0 commits: report()
    has returned on every rank, so all files are persisted."""
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(local_dir) if local_dir else None,
        checkpoint_dir_name=name,
    )
    if ray.train.get_context().get_world_rank() == 0:
        _commit(storage_dir, name)


def _commit(storage_dir: str, name: str) -> None:
    """Marks a persisted checkpoint complete (a file written after every rank's upload)."""
    fs, root = pyarrow.fs.FileSystem.from_uri(_as_uri(storage_dir))
    with fs.open_output_stream(f"{root}/{name}/{COMMIT_FILE}") as f:
        f.write(b"ok\n")


def _as_uri(path: str) -> str:
    return path if "://" in path else Path(path).resolve().as_uri()


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


def latest_checkpoint(storage_dir: str | Path) -> ray.train.Checkpoint | None:
    """The newest committed mid-run checkpoint in `storage_dir` (this attempt's or an earlier
    run's): a resume point. A committed `final/` is handled by `run_trainer`."""
    fs, root = pyarrow.fs.FileSystem.from_uri(_as_uri(str(storage_dir)))
    if fs.get_file_info(root).type != pyarrow.fs.FileType.Directory:
        return None
    best, best_step = None, -1
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root)):
        if info.base_name == FINAL_DIR:
            continue
        if fs.get_file_info(f"{info.path}/{COMMIT_FILE}").type != pyarrow.fs.FileType.File:
            continue
        with fs.open_input_stream(f"{info.path}/{STATE_FILE}") as f:
            step = json.loads(f.read())["step"]
        if step > best_step:
            best, best_step = info.path, step
    return None if best is None else ray.train.Checkpoint(best, filesystem=fs)


def scaling_config(s: ScalingConfig) -> ray.train.ScalingConfig:
    resources = dict(s.resources_per_worker) if s.resources_per_worker else None
    return ray.train.ScalingConfig(
        num_workers=s.num_workers,
        use_gpu=s.use_gpu,
        resources_per_worker=resources,
        placement_strategy=s.placement_strategy,
    )


def run_trainer(
    loop: Any, loop_config: dict[str, Any], cfg: TrainingConfig, *, name: str, storage_path: str
) -> tuple[dict[str, Any], Path]:
    """Runs `loop` on a TorchTrainer placed by `cfg.scaling`, with checkpoints kept under
    `<storage_path>/<name>/` (passed to the loop as `storage_dir`); returns (final metrics,
    final checkpoint dir) and raises the run's error. A run whose `final/` was already
    committed (same name: same cache key) is returned as it is, without training again."""
    final = Path(storage_path) / name / FINAL_DIR
    if "://" not in storage_path and (final / COMMIT_FILE).is_file():
        return json.loads((final / STATE_FILE).read_text())["metrics"], final
    trainer = TorchTrainer(
        loop,
        train_loop_config={**loop_config, "storage_dir": str(Path(storage_path) / name)},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=scaling_config(cfg.scaling),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            # +1: the final model is reported as a checkpoint too and must survive pruning.
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints + 1),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return dict(result.metrics), Path(result.checkpoint.path)


@dataclass(frozen=True)
class TrainJob:
    """Where a training job keeps its checkpoints (`<storage_path>/<name>/`) and which MLflow
    run it records into."""

    storage_path: str
    name: str
    tracking_uri: str
    mlflow_run_id: str
    checkpoint_copy_max_mb: float

    @classmethod
    def of(cls, ctx: RunContext, name: str, key: str, mlflow_run_id: str) -> TrainJob:
        """The job `name` of a stage run: checkpoints under the run's Ray storage, keyed by
        the stage's cache key (a rerun with the same key resumes them)."""
        return cls(
            ctx.ray_storage,
            ctx.train_name(name, key),
            ctx.tracking_uri,
            mlflow_run_id,
            ctx.checkpoint_copy_max_mb,
        )

    def loop_config(self) -> dict[str, Any]:
        """What the workers need of the job. Ray Train records `train_loop_config` in its run
        state (the dashboard's Train page shows it), so a tracking URI with a password goes
        by object reference: the config shows the redacted URI and the reference's id, the
        worker resolves it (`worker_tracking_uri`)."""
        shown = redact(self.tracking_uri)
        out: dict[str, Any] = {
            "tracking_uri": shown,
            "mlflow_run_id": self.mlflow_run_id,
            "checkpoint_copy_max_mb": self.checkpoint_copy_max_mb,
        }
        if shown != self.tracking_uri:
            out["tracking_uri_ref"] = ray.put(self.tracking_uri)
        return out


def worker_tracking_uri(c: dict[str, Any]) -> str:
    """The tracking URI of a training loop's config `c` (see `TrainJob.loop_config`)."""
    ref = c.get("tracking_uri_ref")
    return ray.get(ref) if ref is not None else c["tracking_uri"]


def fit_causal_lm(
    kind: str,
    cfg: PretrainConfig | SFTConfig | DistillConfig,
    job: TrainJob,
    *,
    data_dir: str,
    tokenizer_dir: str,
    base_model_dir: str | None = None,
) -> tuple[dict[str, Any], Path]:
    """Runs the loop on Ray Train; returns (final metrics, final checkpoint directory).

    The final directory holds `model/` (an HF model dir) and, for PEFT methods, `adapter/`.
    A job whose earlier attempt died mid-way (same name: same cache key) resumes from the
    newest committed checkpoint it left; delete its directory to start over (`lifecycle run
    --force` does).
    """
    loop_config = {
        "kind": kind,
        "config": cfg.model_dump(mode="json"),
        "data_dir": data_dir,
        "tokenizer_dir": tokenizer_dir,
        "base_model_dir": base_model_dir,
        **job.loop_config(),
    }
    metrics, final = run_trainer(
        causal_lm_loop, loop_config, cfg, name=job.name, storage_path=job.storage_path
    )
    if not any((final / sub).is_dir() for sub in ("model", "adapter")):
        raise RuntimeError(f"training finished without a final model in {final}")
    return metrics, final
