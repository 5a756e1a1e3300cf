"""Two training processes on one machine (two pytest-xdist workers, or two Ray tasks): each
with all the cores' threads (oversubscribed) against each with its share (cores / 2).

    .venv/bin/python bench/threads.py [--reps 3] [--steps 100]

Why it matters: tests/conftest.py gives each pytest-xdist worker cores / N threads through
OMP_NUM_THREADS, which the CLI runs, their local Rays, Ray workers and vLLM engines inherit.

Each process trains the tiny chain model (configs/tiny_cpu.yaml's pretrain.model, vocab 280)
on random 32-token rows, 32 per step, full fine-tuning with AdamW (lifecycle.training's
`train_step`): 5 warm-up steps, then `--steps` timed. Both processes start together; the
result is the sum of their steps/s. Variants alternate per repetition; prints every run,
medians, the ratio and the machine.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._machine import machine

CHILD = """
import sys, time, torch
from lifecycle.config import ModelConfig, SFTConfig, load_config
from lifecycle.models import build_model
from lifecycle.training import make_optimizer, make_scheduler, train_step

steps = int(sys.argv[1])
mc = load_config("configs/tiny_cpu.yaml").pretrain.model
cfg = SFTConfig(method="full", max_steps=steps + 5, warmup_steps=1)

class Tok:  # build_model reads the vocabulary size and special ids only
    vocab_size, pad_token_id, bos_token_id, eos_token_id = 280, 0, 1, 2
    def __len__(self): return 280

torch.manual_seed(0)
model = build_model(mc, Tok(), 0)
opt, g = make_optimizer(model, cfg), torch.Generator().manual_seed(0)
sch = make_scheduler(opt, cfg)
x = torch.randint(3, 280, (steps + 5, 32, 32), generator=g)
for i in range(steps + 5):
    if i == 5:
        t0 = time.perf_counter()
    train_step(model, opt, sch, [(x[i], x[i], None)], grad_clip=1.0)
print(f"RESULT {steps / (time.perf_counter() - t0)}")
"""


def run_pair(threads: int | tuple[int, int], steps: int) -> float:
    """Steps/s of two processes together, with `threads` each (or per process)."""
    pair = threads if isinstance(threads, tuple) else (threads, threads)
    procs = []
    for t in pair:
        env = {**os.environ, "OMP_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t)}
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", CHILD, str(steps)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=Path(__file__).resolve().parent.parent,
            )
        )
    rates = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            raise RuntimeError(err[-3000:])
        rates.append(float(line.split()[1]))
    return sum(rates)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    half = max(1, cores // 2)
    variants = {"oversubscribed": cores, "split": half, "mixed": (cores, half)}
    print(f"machine: {machine()}; two processes; threads each: {variants}", flush=True)
    got: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(a.reps):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))  # alternated
        for name in order:
            t0 = time.perf_counter()
            rate = run_pair(variants[name], a.steps)
            got[name].append(rate)
            print(
                f"rep {rep} {name}: {rate:.1f} steps/s (both processes) "
                f"in {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    o, s = statistics.median(got["oversubscribed"]), statistics.median(got["split"])
    m = statistics.median(got["mixed"])
    print(
        f"\nmedian steps/s of the pair: oversubscribed ({cores} threads each) {o:.1f}, "
        f"split ({half} each) {s:.1f}, mixed ({cores} + {half}) {m:.1f}; "
        f"split / oversubscribed {s / o:.2f}x, split / mixed {s / m:.2f}x; machine: {machine()}"
    )


if __name__ == "__main__":
    main()
