"""RLHF generation cost: its share of one GRPO step, and batched Ray sampling vs one at a time.

    .venv/bin/python bench/rlhf_generation.py [--prompts 128] [--k 4] [--cpus 2]

Same model (tiny_cpu.yaml's architecture, random init: every response runs to
max_new_tokens, so the token counts are equal), same prompts, same run:
1. one GRPO step (8 prompts × group 4): seconds in `rollout` vs in the loss, backward and
   optimizer step;
2. sampling K responses for every prompt: one `generate` call per prompt and sample in one
   process, vs `ray_cluster.generate.sample_responses` (batches of 64, `--cpus` Ray tasks).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench._machine import machine
from lifecycle.config import ModelConfig, ScalingConfig
from lifecycle.data import demo
from lifecycle.data.instruct import prompt_and_answer
from lifecycle.data.preference import ProgramJudge
from lifecycle.data.tokenizer import train_bpe
from lifecycle.models import build_model, save_model
from lifecycle.rlhf import algorithms

MAX_NEW = 12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--cpus", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.cpus)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = train_bpe([r["text"] for r in demo.generate(300, 0)], 280, 2, tmp / "tok")
        model = build_model(
            ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256),
            tok,
            seed=0,
        )
        save_model(model, tok, tmp / "m")
        prompts = [
            prompt_and_answer(ex["messages"], tok)[0]
            for ex in demo.instruction_examples(a.prompts, 0)
        ]

        # 1. generation's share of a GRPO step
        judge = ProgramJudge()
        reward = lambda ps, rs: [judge.score(p, r) for p, r in zip(ps, rs, strict=True)]  # noqa: E731
        ref = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        real_rollout, spent = algorithms.rollout, {"gen": 0.0}

        def timed_rollout(*args, **kw):
            t = time.perf_counter()
            out = real_rollout(*args, **kw)
            spent["gen"] += time.perf_counter() - t
            return out

        algorithms.rollout = timed_rollout
        steps, t0 = 3, time.perf_counter()
        for i in range(steps):
            loss, _ = algorithms.grpo_step(
                model, ref, tok, prompts[i * 8 : i * 8 + 8], reward, 4, MAX_NEW, 0.05
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        total = time.perf_counter() - t0
        algorithms.rollout = real_rollout

        # 2. one at a time vs batched on Ray
        t0 = time.perf_counter()
        n_tok = 0
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
                for _ in range(a.k):
                    out = model.generate(
                        input_ids=ids,
                        max_new_tokens=MAX_NEW,
                        do_sample=True,
                        top_k=0,
                        pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id,
                    )
                    n_tok += out.shape[1] - ids.shape[1]
        single_tps = n_tok / (time.perf_counter() - t0)

        import ray

        from ray_cluster.generate import sample_responses

        ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False)
        sample_responses(
            str(tmp / "m"), prompts[:2], 2, num_workers=1, scaling=ScalingConfig(), max_new_tokens=2
        )  # warm the workers' imports
        t0 = time.perf_counter()
        outs = sample_responses(
            str(tmp / "m"),
            prompts,
            a.k,
            num_workers=a.cpus,
            scaling=ScalingConfig(resources_per_worker={"CPU": 1}),
            max_new_tokens=MAX_NEW,
            batch_size=64,
            engine="transformers",
        )
        ray_s = time.perf_counter() - t0
        ray.shutdown()
        ray_tok = sum(len(tok(r, add_special_tokens=False)["input_ids"]) for rs in outs for r in rs)
    print(f"machine: {machine()}; {a.cpus} cores")
    print(
        f"GRPO step (8 prompts x 4 samples, {MAX_NEW} new tokens): {total / steps:.2f} s/step, "
        f"generation {spent['gen'] / total:.0%}, loss+backward+step {1 - spent['gen'] / total:.0%}"
    )
    print(f"one at a time : {single_tps:8.0f} new tokens/s ({a.prompts} prompts x {a.k})")
    print(
        f"Ray batched   : {ray_tok / ray_s:8.0f} new tokens/s ({ray_s:.2f}s, {a.cpus} tasks, "
        f"batches of 64; decoded-token count)"
    )
    print(f"ratio batched / one at a time: {ray_tok / ray_s / single_tps:.1f}")


if __name__ == "__main__":
    main()
