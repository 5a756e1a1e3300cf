"""The pieces of causal-LM training in plain PyTorch: data rows, the deterministic batch
sampler, the schedule, the optimizer, the loss of one micro-batch (LM or distillation), one
optimizer step with gradient accumulation, and the held-out loss.

    from lifecycle.training import BatchSampler, LMData, lm_loss, make_optimizer, train_step

No Ray, Prefect or MLflow here: ray_cluster/train.py runs these on Ray Train workers (DDP or
DeepSpeed), and the same functions run on any device and dtype in one process
(scripts/gpu_check.py, tests/unit/test_plain_torch.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lifecycle.config import TrainingConfig
from lifecycle.data.instruct import load_rows
from lifecycle.eval.lm import nll_sum, padding_mask

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
"""(input ids, labels, attention mask or None) of one micro-batch."""


@dataclass
class LMData:
    """Token rows for a causal LM. Pretraining: packed blocks, labels = inputs, no padding.
    SFT: padded rows with their own labels (IGNORE outside assistant turns)."""

    train_x: torch.Tensor
    val_x: torch.Tensor
    train_y: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    pad_id: int | None = None

    @classmethod
    def load(cls, kind: str, data_dir: str, pad_id: int | None) -> LMData:
        if kind == "pretrain":
            from lifecycle.data.pipeline import load_blocks

            return cls(load_blocks(data_dir, "train"), load_blocks(data_dir, "val"))
        tx, ty = load_rows(Path(data_dir) / "train.parquet")
        vx, vy = load_rows(Path(data_dir) / "val.parquet")
        return cls(tx, vx, ty, vy, pad_id)

    def _batch(
        self, x: torch.Tensor, y: torch.Tensor | None, idx: torch.Tensor, device: Any
    ) -> Batch:
        xb = x[idx].to(device)
        if y is None:
            return xb, xb, None
        return xb, y[idx].to(device), padding_mask(xb, self.pad_id)

    def train_batch(self, idx: torch.Tensor, device: Any = "cpu") -> Batch:
        return self._batch(self.train_x, self.train_y, idx, device)

    def val_batch(self, idx: torch.Tensor, device: Any = "cpu") -> Batch:
        return self._batch(self.val_x, self.val_y, idx, device)


class BatchSampler:
    """Global batch `step` → this rank's rows: a pure function of (seed, step, rank).

    Each epoch is a seeded permutation; resuming at step k continues with the same batches an
    uninterrupted run would have seen.
    """

    def __init__(self, n: int, micro_batch: int, world: int, rank: int, seed: int) -> None:
        self.n, self.micro, self.world, self.rank, self.seed = n, micro_batch, world, rank, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, micro_step: int) -> torch.Tensor:
        start = (micro_step * self.world + self.rank) * self.micro
        pos = torch.arange(start, start + self.micro)
        epochs, offsets = pos // self.n, pos % self.n
        return torch.stack(
            [self._perm(int(e))[int(o)] for e, o in zip(epochs, offsets, strict=True)]
        )


def lr_lambda(cfg: TrainingConfig) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to `min_lr_ratio` of the peak at `max_steps`."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return f


def make_optimizer(model: torch.nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only, over the trainable parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def autocast_for(device: torch.device, dtype: torch.dtype | None) -> Callable[[], Any]:
    """A context factory: mixed precision in `dtype` on `device`'s type (off for None)."""

    def ctx() -> Any:
        if dtype is None or dtype == torch.float32:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=dtype)

    return ctx


def lm_loss(
    net: Any,
    batch: Batch,
    teacher: torch.nn.Module | None = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """The training loss of one micro-batch: the causal-LM loss on its labels, or with a
    teacher the distillation loss (lifecycle.compress.distill.distill_loss)."""
    x, y, mask = batch
    if teacher is None:
        return net(input_ids=x, attention_mask=mask, labels=y).loss
    from lifecycle.compress.distill import distill_loss

    logits = net(input_ids=x, attention_mask=mask).logits
    with torch.no_grad():
        t_logits = teacher(input_ids=x, attention_mask=mask).logits
    return distill_loss(logits, t_logits, y, mask, temperature, alpha)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    micro_batches: Sequence[Batch],
    *,
    grad_clip: float,
    loss_fn: Callable[[Any, Batch], torch.Tensor] = lm_loss,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    no_sync: Callable[[], Any] | None = None,
    before_zero_grad: Callable[[], None] | None = None,
) -> float:
    """One optimizer step over `micro_batches` (gradient accumulation): each micro-batch's
    loss / n is back-propagated, gradients are clipped, the optimizer and the schedule step.
    `no_sync` (DDP's) skips the gradient all-reduce on every micro-batch but the last;
    `before_zero_grad` runs while this step's gradients are still there (AdaLoRA's budget).
    Returns the mean micro-batch loss."""
    n = len(micro_batches)
    total = 0.0
    for i, batch in enumerate(micro_batches):
        last = i == n - 1
        sync = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with sync:
            with autocast():
                loss = loss_fn(model, batch)
            (loss / n).backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    scheduler.step()
    if before_zero_grad is not None:
        before_zero_grad()
    optimizer.zero_grad(set_to_none=True)
    return total / n


@torch.no_grad()
def evaluate(
    model: Any,
    data: LMData,
    batch: int,
    max_batches: int,
    rank: int = 0,
    world: int = 1,
    device: Any = "cpu",
    autocast: Callable[[], Any] = contextlib.nullcontext,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
) -> float:
    """Mean loss per target token over the first `max_batches` val batches, split across
    ranks (`all_reduce` sums a tensor over them: torch.distributed's, on a process group)."""
    model.eval()
    n = min(len(data.val_x), batch * max_batches)
    mine = torch.arange(n)[rank::world]
    # Every rank runs the same number of forwards: under ZeRO-3 each one is a collective.
    n_iter = math.ceil(math.ceil(n / world) / batch)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(n_iter):
        idx = mine[i * batch : (i + 1) * batch]
        counted = len(idx) > 0
        if not counted:  # this rank ran out of rows: a forward to keep in step, not counted
            idx = torch.arange(1)
        x, y, mask = data.val_batch(idx, device)
        with autocast():
            nll, tokens = nll_sum(model, x, y, mask)
        if counted:
            total += torch.tensor([nll, tokens], dtype=torch.float64, device=device)
    if all_reduce is not None:
        all_reduce(total)
    model.train()
    return float(total[0] / total[1])


def measure_peak_flops(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seconds: float = 0.5
) -> float:
    """FLOP/s of `dtype` matmuls on `device` (this worker's threads on CPU, its GPU on CUDA):
    the MFU denominator when the config gives no `peak_flops`. An estimate of what the
    training's own kernels could reach, not the vendor's datasheet number."""
    device = torch.device(device)
    n = 512 if device.type == "cpu" else 4096
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b
    sync()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
        if device.type != "cpu" and iters % 16 == 0:
            sync()
    sync()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def deepspeed_config(cfg: TrainingConfig, world: int) -> dict[str, Any]:
    """The DeepSpeed config of a training section (ZeRO stage, offload, batch sizes, bf16)."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum_steps * world,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
