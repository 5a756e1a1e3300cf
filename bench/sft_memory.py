"""LoRA vs full fine-tuning: peak memory and tokens/s on the same model, same run.

    .venv/bin/python bench/sft_memory.py [--hidden 512] [--layers 8] [--steps 20] [--batch 4]

Each method trains in its own child process (so one's peak does not hide the other's) on
the same random-init Llama, the same padded instruction rows and the same threads; the child
samples its resident memory every 2 ms during training and reports the peak above what it held
once the model was built (gradients, optimizer state, activations), and steady-state tokens/s. The model is larger than tiny_cpu's so optimizer state
(what LoRA saves) is visible against the activations.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._machine import machine


def child(method: str, hidden: int, layers: int, steps: int, threads: int, batch: int) -> dict:
    import tempfile

    import psutil
    import torch

    from lifecycle.config import ModelConfig, SFTConfig
    from lifecycle.data import demo
    from lifecycle.data.instruct import build_rows
    from lifecycle.data.tokenizer import train_bpe
    from lifecycle.models import build_model
    from lifecycle.peft_methods import apply_method, trainable_parameters
    from lifecycle.training import make_optimizer

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        tok = train_bpe([r["text"] for r in demo.generate(300, 0)], 280, 2, d)
    msgs = [r["messages"] for r in demo.instruction_examples(256, 0)]
    ids, labels, _ = build_rows(msgs, tok, 32, packing=False)
    ids, labels = torch.tensor(ids), torch.tensor(labels)
    mask = (ids != tok.pad_token_id).long()
    cfg = SFTConfig(method=method, lr=1e-4, warmup_steps=0)
    mc = ModelConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=8,
        intermediate_size=hidden * 4,
        max_position_embeddings=64,
    )
    model = apply_method(build_model(mc, tok, 0), cfg)
    opt = make_optimizer(model, cfg)
    proc = psutil.Process()
    base_rss = proc.memory_info().rss
    peak = [base_rss]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t_first = 0.0
    for step in range(steps):
        sl = slice((step * batch) % len(ids), (step * batch) % len(ids) + batch)
        loss = model(input_ids=ids[sl], attention_mask=mask[sl], labels=labels[sl]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if step == 0:
            t_first = time.perf_counter()
    tps = (steps - 1) * batch * ids.shape[1] / (time.perf_counter() - t_first)
    done.set()
    sampler.join()
    peak_mb = (peak[0] - base_rss) / 2**20
    trainable, total = trainable_parameters(model)
    return {
        "method": method,
        "tokens_per_s": tps,
        "peak_mb": peak_mb,
        "trainable": trainable,
        "total": total,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--batch", type=int, default=4, help="small: weights, not activations, dominate"
    )
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.hidden, a.layers, a.steps, a.threads, a.batch)))
        return
    res = {}
    for method in ("full", "lora"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                method,
                "--hidden",
                str(a.hidden),
                "--layers",
                str(a.layers),
                "--steps",
                str(a.steps),
                "--threads",
                str(a.threads),
                "--batch",
                str(a.batch),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        res[method] = json.loads(out.stdout.strip().splitlines()[-1])
    full, lora = res["full"], res["lora"]
    print(f"machine: {machine()}; {a.threads} threads")
    print(
        f"model: llama hidden={a.hidden} layers={a.layers} params={full['total']:,}; "
        f"batch {a.batch} x 32 tokens; {a.steps} steps"
    )
    for r in (full, lora):
        print(
            f"{r['method']:5s}: trainable {r['trainable']:>12,}  peak +{r['peak_mb']:8.1f} MB  "
            f"{r['tokens_per_s']:8.0f} tokens/s"
        )
    print(
        f"ratio lora/full: peak memory {lora['peak_mb'] / full['peak_mb']:.2f}, "
        f"tokens/s {lora['tokens_per_s'] / full['tokens_per_s']:.2f}"
    )


if __name__ == "__main__":
    main()
