"""Ray Train overhead: the pretrain stage's Ray Train path vs a bare PyTorch loop, same run.

    .venv/bin/python bench/train_overhead.py [--steps 300] [--cpus 2]

Both train the same model (configs/tiny_cpu.yaml's pretrain.model) on the same packed blocks
with the same sampler, optimizer and schedule, on the same number of cores: the bare loop in
this process with torch.set_num_threads(cpus), Ray Train with one worker holding `cpus` CPUs.
Steady-state tokens/s excludes the first step of each; the end-to-end figure for Ray Train
also includes starting the worker group, loading data and the checkpoint/report at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

import torch

from bench._machine import machine
from lifecycle import tracking
from lifecycle.config import load_config
from lifecycle.data.pipeline import load_blocks, prepare_plain
from lifecycle.models import build_model, load_tokenizer
from lifecycle.training import BatchSampler, lr_lambda, make_optimizer

ROOT = Path(__file__).resolve().parent.parent


def bare_loop(cfg, data_dir: Path, threads: int) -> float:
    torch.set_num_threads(threads)
    tok = load_tokenizer(data_dir / "tokenizer")
    blocks = load_blocks(data_dir, "train")
    model = build_model(cfg.model, tok, cfg.seed)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    sampler = BatchSampler(len(blocks), cfg.micro_batch_size, 1, 0, cfg.seed)
    model.train()
    timed, t_first = 0, 0.0
    for step in range(cfg.max_steps):
        x = blocks[sampler.indices(step)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if step == 0:
            t_first = time.perf_counter()  # as in the Ray loop: the first step is not timed
        else:
            timed += 1
    return timed * cfg.micro_batch_size * blocks.shape[1] / (time.perf_counter() - t_first)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--cpus", type=int, default=2)
    a = ap.parse_args()
    full = load_config(
        ROOT / "configs/tiny_cpu.yaml",
        [
            f"pretrain.max_steps={a.steps}",
            f"pretrain.checkpoint_every={a.steps}",
            f"pretrain.scaling.resources_per_worker={{CPU: {a.cpus}}}",
            "pretrain.log_every=50",
        ],
    )
    cfg = full.pretrain
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare_plain(full.data, tmp / "data")
        bare_first = bare_loop(cfg, tmp / "data", a.cpus)

        import ray

        from ray_cluster.train import TrainJob, fit_causal_lm

        ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False)
        uri = tracking.default_tracking_uri(tmp)
        exp = tracking.ensure_experiment(uri, "bench", tmp / "mlartifacts")
        run_id = tracking.start_run(uri, exp, "bench")
        t0 = time.perf_counter()
        metrics, _ = fit_causal_lm(
            "pretrain",
            cfg,
            TrainJob(str(tmp / "ray"), "bench", uri, run_id, 0),
            data_dir=str(tmp / "data"),
            tokenizer_dir=str(tmp / "data" / "tokenizer"),
        )
        wall = time.perf_counter() - t0
        ray.shutdown()
        # Bare loop before and after Ray: their spread is the noise floor of the ratio.
        bare_second = bare_loop(cfg, tmp / "data", a.cpus)
    bare = (bare_first + bare_second) / 2
    tokens = cfg.max_steps * cfg.micro_batch_size * full.data.block_size
    ray_tps = metrics["train/tokens_per_s"]
    print(f"machine: {machine()}")
    print(
        f"model: {cfg.model.arch} hidden={cfg.model.hidden_size} layers={cfg.model.num_layers} "
        f"params={int(metrics['model/params'])}; steps={cfg.max_steps}; cores={a.cpus}"
    )
    print(
        f"bare PyTorch loop        : {bare:10.0f} tokens/s (runs before/after Ray: "
        f"{bare_first:.0f} / {bare_second:.0f})"
    )
    print(f"Ray Train (steady state) : {ray_tps:10.0f} tokens/s")
    print(f"ratio Ray Train / bare   : {ray_tps / bare:10.3f}")
    print(
        f"Ray Train end to end     : {tokens / wall:10.0f} tokens/s ({wall:.1f}s for "
        f"{tokens} tokens, incl. worker start-up, eval, checkpoint)"
    )


if __name__ == "__main__":
    main()
