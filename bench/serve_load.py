"""Serving under load: our Ray Serve + vLLM endpoint vs a transformers `generate` server
(one request at a time) and vs vLLM's own OpenAI server, on the same model, in one run.

    .venv/bin/python bench/serve_load.py [--model DIR] [--hidden 256] [--layers 4]
                                         [--clients 1,8,32] [--max-tokens 64]

The model is `--model DIR` (an HF dir with tokenizer) or a random-init Llama built here with a
tokenizer trained on the demo corpus. Three servers, one after another (2 cores: never two at
once), each bound to 127.0.0.1 on a free port:

- `ours`: ray_cluster/serve.py (Ray Serve proxy → replica → vLLM AsyncLLM), watermark off so
  that the comparison with bare vLLM is like for like (`ours+wm`: with it, reported too);
- `vllm`: `python -m vllm.entrypoints.openai.api_server` (the engine without Ray Serve);
- `hf`: a FastAPI server around transformers `generate`, one request at a time (a lock).

For each client count C, C concurrent clients (threads) send `/v1/completions` requests with
a 16-token prompt and `max_tokens` output tokens (`min_tokens` = `max_tokens`, so every request
makes the same number of tokens; greedy) until each has sent `--requests-per-client` (at least
one). Reported per server and C: generated tokens/s over the wall time, p50/p99 request
latency; then the ratios ours/hf and ours/vllm. Prints JSON lines and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import BaseModel

from bench._machine import machine

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build(out: Path, hidden: int, layers: int) -> str:
    from lifecycle.config import ModelConfig
    from lifecycle.data import demo
    from lifecycle.data.tokenizer import train_bpe
    from lifecycle.models import build_model, save_model

    tok = train_bpe([r["text"] for r in demo.generate(300, 0)], 280, 2, str(out / "tok"))
    mc = ModelConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=max(1, hidden // 64),
        intermediate_size=hidden * 4,
        max_position_embeddings=256,
    )
    return str(save_model(build_model(mc, tok, 0), tok, out / "model"))


# ---- the baseline: transformers generate, one request at a time ---------------------------


class HFBody(BaseModel):
    prompt: list[int]
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 0.0
    model: str | None = None


def hf_server(model_dir: str, port: int) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI

    from lifecycle.models import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(model_dir).eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/v1/completions")
    def complete(b: HFBody) -> dict:
        with lock, torch.no_grad():
            ids = torch.tensor([b.prompt])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=b.max_tokens,
                min_new_tokens=b.min_tokens,
                do_sample=False,
            )
        n = out.shape[1] - ids.shape[1]
        return {"choices": [{"text": ""}], "usage": {"completion_tokens": n}}

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---- the load generator --------------------------------------------------------------------


def load(url: str, clients: int, per_client: int, max_tokens: int, model: str) -> dict:
    import httpx

    lat: list[float] = []
    tokens = 0
    errors = 0
    lock = threading.Lock()

    def client(i: int) -> None:
        nonlocal tokens, errors
        with httpx.Client(timeout=600) as c:
            for r in range(per_client):
                body = {
                    "model": model,
                    "prompt": [5 + (i * 7 + r * 3 + j) % 200 for j in range(16)],
                    "max_tokens": max_tokens,
                    "min_tokens": max_tokens,
                    "temperature": 0.0,
                }
                t0 = time.perf_counter()
                resp = c.post(f"{url}/v1/completions", json=body)
                dt = time.perf_counter() - t0
                with lock:
                    if resp.status_code != 200:
                        errors += 1
                        continue
                    lat.append(dt)
                    tokens += resp.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {
        "clients": clients,
        "requests": len(lat),
        "errors": errors,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(lat) if lat else float("nan"),
        "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
    }


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(url)


def run_levels(name: str, url: str, model: str, args: argparse.Namespace) -> list[dict]:
    rows = []
    load(url, 2, 1, args.max_tokens, model)  # warm-up
    for c in args.clients:
        per = max(1, args.requests_per_client if c > 1 else 8)
        r = {"server": name, **load(url, c, per, args.max_tokens, model)}
        print(json.dumps(r), flush=True)
        rows.append(r)
    return rows


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--hf-server", default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hf_server:
        hf_server(args.hf_server, args.port)
        return
    args.clients = [int(c) for c in args.clients.split(",")]
    print(f"machine: {machine()}", flush=True)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    model_dir = args.model or build(tmp, args.hidden, args.layers)
    rows: list[dict] = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    # 1. ours: Ray Serve + vLLM (watermark off, then on)
    import ray

    from lifecycle.config import ServeConfig
    from ray_cluster.serve import deploy_app, make_spec, shutdown

    # (the replicas' engines read the watermark key from the environment Ray starts them in)
    os.environ.setdefault("LIFECYCLE_WATERMARK_KEY", "bench-key-not-secret-0001")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = ServeConfig(port=0, max_ongoing_requests=32, max_queued_requests=256, max_tokens=256)
        url = deploy_app(make_spec(model_dir, cfg, "m", "bench"), cfg)
        rows += run_levels("ours", url, "m", args)
        wm = {"gamma": 0.25, "delta": 2.0, "z_threshold": 4.0}
        url = deploy_app(make_spec(model_dir, cfg, "m", "bench-wm", wm), cfg)
        rows += run_levels("ours+wm", url, "m", args)
    finally:
        shutdown()
        ray.shutdown()

    # 2. bare vLLM OpenAI server, same engine settings
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model_dir,
            "--served-model-name",
            "m",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-model-len",
            "256",
            "--max-num-seqs",
            "32",
            "--dtype",
            "bfloat16",
            "--enforce-eager",
            "--disable-log-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 600, proc)
        rows += run_levels("vllm", f"http://127.0.0.1:{port}", "m", args)
    finally:
        stop(proc)

    # 3. transformers generate, one request at a time
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--hf-server", model_dir, "--port", str(port)],
        env=env,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 300, proc)
        rows += run_levels("hf", f"http://127.0.0.1:{port}", "m", args)
    finally:
        stop(proc)

    by = {(r["server"], r["clients"]): r for r in rows}
    print(f"\nmodel: {model_dir}; {args.max_tokens} tokens per request; machine: {machine()}")
    print(
        "| clients | ours tok/s | ours p50 / p99 s | ours+wm tok/s | vLLM tok/s | "
        "HF generate tok/s | HF p50 / p99 s | ours / HF | ours / vLLM |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for c in args.clients:
        o, w, v, h = (by[(s, c)] for s in ("ours", "ours+wm", "vllm", "hf"))
        print(
            f"| {c} | {o['tokens_per_s']:.0f} | {o['p50_s']:.2f} / {o['p99_s']:.2f} | "
            f"{w['tokens_per_s']:.0f} | {v['tokens_per_s']:.0f} | {h['tokens_per_s']:.0f} | "
            f"{h['p50_s']:.2f} / {h['p99_s']:.2f} | "
            f"{o['tokens_per_s'] / h['tokens_per_s']:.2f}x | "
            f"{o['tokens_per_s'] / v['tokens_per_s']:.2f}x |"
        )


if __name__ == "__main__":
    main()
