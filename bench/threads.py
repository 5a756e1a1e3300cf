"""Two training processes on one machine (two pytest-xdist workers, or two Ray tasks): the
thread layouts compared — each on all the cores' threads (oversubscribed), each on its share
(cores / 2), one on all the cores' threads beside one on its share (the suite's chain beside
the other worker), that mixed layout with a short OpenMP spin before a waiting thread sleeps
(GOMP_SPINCOUNT, `--spin`) and with passive waits (OMP_WAIT_POLICY=PASSIVE), and the
all-cores process alone, with and without the short spin.

    .venv/bin/python bench/threads.py [--reps 3] [--steps 100] [--spin 10000]

Why it matters: tests/conftest.py gives each pytest-xdist worker cores / N threads through
OMP_NUM_THREADS, which the CLI runs, their local Rays, Ray workers and vLLM engines inherit;
a thread that reaches an OpenMP barrier spins (GNU OpenMP: up to 300,000 iterations) while
its peer is descheduled, burning the core the peer needs.

Each process trains the tiny chain model (configs/tiny_cpu.yaml's pretrain.model, vocab 280)
on random 32-token rows, 32 per step, full fine-tuning with AdamW (lifecycle.training's
`train_step`): 5 warm-up steps, then `--steps` timed. A variant's processes start together;
its result is the sum of their steps/s (and the first one's alone). Variants alternate per
repetition; prints every run, medians, the ratios and the machine.
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


Proc = tuple[int, dict[str, str]]
"""One process of a variant: its threads and extra environment (GOMP_SPINCOUNT, say)."""


def run_procs(spec: list[Proc], steps: int) -> list[float]:
    """Steps/s of each process of `spec`, all started together."""
    procs = []
    for t, extra in spec:
        env = {**os.environ, "OMP_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t), **extra}
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
    return rates


def variants(cores: int, spin: str) -> dict[str, list[Proc]]:
    """The thread layouts compared: both processes on all the cores' threads, each on its
    share, one on all beside one on its share (the suite's chain beside the other worker) —
    that one also with a short OpenMP spin (GOMP_SPINCOUNT=`spin`) and with passive waits —
    and the all-cores process alone, with and without the short spin."""
    half = max(1, cores // 2)
    short, passive = {"GOMP_SPINCOUNT": spin}, {"OMP_WAIT_POLICY": "PASSIVE"}
    return {
        "oversubscribed": [(cores, {}), (cores, {})],
        "split": [(half, {}), (half, {})],
        "mixed": [(cores, {}), (half, {})],
        f"mixed spin={spin}": [(cores, short), (half, short)],
        "mixed passive": [(cores, passive), (half, passive)],
        "alone": [(cores, {})],
        f"alone spin={spin}": [(cores, short)],
    }


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--spin", default="10000", help="GOMP_SPINCOUNT of the short-spin variants")
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    vs = variants(cores, a.spin)
    layout = {k: [t for t, _ in v] for k, v in vs.items()}
    print(f"machine: {machine()}; threads per process: {layout}", flush=True)
    got: dict[str, list[list[float]]] = {k: [] for k in vs}
    for rep in range(a.reps):
        order = list(vs) if rep % 2 == 0 else list(reversed(vs))  # alternated
        for name in order:
            t0 = time.perf_counter()
            rates = run_procs(vs[name], a.steps)
            got[name].append(rates)
            print(
                f"rep {rep} {name}: {sum(rates):.1f} steps/s together "
                f"({' + '.join(f'{r:.1f}' for r in rates)}) in {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    print("\nmedians (steps/s): together | first process (the all-cores one where mixed)")
    med = {}
    for name, runs in got.items():
        med[name] = statistics.median(sum(r) for r in runs)
        first = statistics.median(r[0] for r in runs)
        print(f"  {name:24s} {med[name]:7.1f} | {first:7.1f}")
    print(
        f"split / mixed {med['split'] / med['mixed']:.2f}x; mixed spin={a.spin} / mixed "
        f"{med[f'mixed spin={a.spin}'] / med['mixed']:.2f}x; alone spin={a.spin} / alone "
        f"{med[f'alone spin={a.spin}'] / med['alone']:.2f}x; machine: {machine()}"
    )


if __name__ == "__main__":
    main()
