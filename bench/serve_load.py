"""Serving under load: our endpoint (Ray Serve → vLLM's own OpenAI app) against bare vLLM
(`vllm serve` with the same arguments), both driven by vLLM's own benchmark client.

    .venv/bin/python bench/serve_load.py [--model DIR] [--hidden 256] [--layers 4]
        [--clients 1,8,32] [--prompts-per-client 4] [--input-len 32] [--output-len 64]
        [--reps 3] [--threads 2]

One run, one machine, one model (`--model DIR`, or a random-init Llama built here with a
tokenizer trained on the demo corpus). Three servers are up at once, each on 127.0.0.1, and
only one has load at any time:

- `ours`: ray_cluster/serve.py as deployed (Serve proxy → replica → vLLM's app), watermark off;
- `ours+wm`: a second Serve app on the same proxy, watermark on (its cost, reported apart);
- `vllm`: `python -m vllm.entrypoints.launchers.api_server.entry` with `vllm_argv(spec)` and
  `vllm_env(spec)` — the engine arguments and environment our replica parses.

Same threads and CPU binding for all: `OMP_NUM_THREADS=--threads` in the environment Ray and
the bare server start from, and vllm_env's thread binding (`nobind`).

Load: `vllm.benchmarks.serve` (random dataset, `--ignore-eos` so every request makes
`--output-len` tokens, `--max-concurrency C`, C × prompts-per-client prompts, seed = the
repetition). For each repetition and client count every server gets one level, in an order
rotated per repetition and level. While a level runs, the running-requests gauge is sampled:
bare vLLM's `/metrics` (`vllm:num_requests_running`) and, for ours, the same gauge on Ray's
Prometheus endpoint (`ray_vllm_num_requests_running`, exported every second here); its maximum
above 1 shows that the engine batched.

Printed: one JSON line per level, then medians over repetitions (output tokens/s, TTFT and TPOT
medians), failed requests, the gauge's maximum, and the ratios ours / vllm and ours+wm / ours.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._machine import machine

BENCH_CLIENT = (
    "import sys; from vllm.benchmarks.serve import add_cli_args, main; "
    "from vllm.utils.argparse_utils import FlexibleArgumentParser as P; "
    "p = P(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))"
)


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


def get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            get(url)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(url)


class GaugeMax:
    """The largest value of a Prometheus gauge (lines matching `pattern`) seen while active."""

    def __init__(self, url: str, pattern: str) -> None:
        self.url, self.re = url, re.compile(pattern)
        self.max, self._stop = 0.0, threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                for line in get(self.url).splitlines():
                    if self.re.match(line):
                        self.max = max(self.max, float(line.rsplit(" ", 1)[1]))
            except (OSError, ValueError):
                pass
            self._stop.wait(0.5)

    def __enter__(self) -> GaugeMax:
        self._t.start()
        return self

    def __exit__(self, *_: object) -> None:
        time.sleep(1.5)  # one more export of Ray's metrics
        self._stop.set()
        self._t.join()


def bench_level(url: str, model: str, tokenizer: str, c: int, rep: int, args, out: Path) -> dict:
    name = f"r{rep}-c{c}-{model}.json"
    cmd = [sys.executable, "-c", BENCH_CLIENT, "--backend", "openai", "--base-url", url]
    cmd += ["--model", model, "--tokenizer", tokenizer, "--dataset-name", "random"]
    cmd += ["--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len)]
    cmd += ["--ignore-eos", "--num-prompts", str(c * args.prompts_per_client)]
    cmd += ["--max-concurrency", str(c), "--seed", str(rep), "--save-result"]
    cmd += ["--result-dir", str(out), "--result-filename", name]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(p.stdout[-2000:] + p.stderr[-2000:])
    return json.loads((out / name).read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--prompts-per-client", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    print(f"machine: {machine()}; OMP_NUM_THREADS={args.threads}", flush=True)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before Ray and the bare server start
    os.environ.setdefault("LIFECYCLE_WATERMARK_KEY", "bench-key-not-secret-0001")
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    model_dir = args.model or build(tmp, args.hidden, args.layers)

    import ray

    from lifecycle.config import ServeConfig
    from ray_cluster.serve import (
        deploy_app,
        free_port,
        make_spec,
        shutdown,
        vllm_argv,
        vllm_env,
    )

    cfg = ServeConfig(
        port=0,
        max_ongoing_requests=max(clients),
        max_queued_requests=256,
        max_tokens=256,
        resources_per_replica={"CPU": args.threads},
    )
    wm = {"gamma": 0.25, "delta": 2.0, "z_threshold": 4.0}
    spec = make_spec(model_dir, cfg, "m", "bench")
    spec_wm = make_spec(model_dir, cfg, "m-wm", "bench-wm", wm)
    metrics_port = free_port()
    ray.init(
        num_cpus=2 * args.threads,  # both Serve apps' replicas placed (one loaded at a time)
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.launchers.api_server.entry",
            *vllm_argv(spec),
            *("--host", "127.0.0.1", "--port", str(port)),
        ],
        env={**os.environ, **vllm_env(spec)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    bare = f"http://127.0.0.1:{port}"
    rows: list[dict] = []
    try:
        ours = deploy_app(spec, cfg, name="bench", route_prefix="/")
        ours_wm = deploy_app(spec_wm, cfg, name="bench-wm", route_prefix="/wm")
        wait_http(f"{bare}/health", 600, proc)
        ray_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        servers = {
            "ours": (ours, "m", ray_metrics, r'ray_vllm_num_requests_running\{.*model_name="m"'),
            "vllm": (bare, "m", f"{bare}/metrics", r"vllm:num_requests_running\{"),
            "ours+wm": (
                ours_wm,
                "m-wm",
                ray_metrics,
                r'ray_vllm_num_requests_running\{.*model_name="m-wm"',
            ),
        }
        for url, model, *_ in servers.values():  # warm-up, not recorded
            bench_level(url, model, model_dir, 2, 99, args, tmp)
        names = list(servers)
        for rep in range(args.reps):
            for i, c in enumerate(clients):
                k = (rep + i) % len(names)
                for name in names[k:] + names[:k]:
                    url, model, murl, pattern = servers[name]
                    with GaugeMax(murl, pattern) as g:
                        r = bench_level(url, model, model_dir, c, rep, args, tmp)
                    row = {
                        "server": name,
                        "clients": c,
                        "rep": rep,
                        "completed": r["completed"],
                        "failed": r.get("failed", 0),
                        "output_tok_s": r["output_throughput"],
                        "median_ttft_ms": r["median_ttft_ms"],
                        "median_tpot_ms": r["median_tpot_ms"],
                        "max_running": g.max,
                    }
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        for app in ("bench-wm", "bench"):
            shutdown(app)
        ray.shutdown()

    def med(server: str, c: int, key: str) -> float:
        return statistics.median(
            r[key] for r in rows if r["server"] == server and r["clients"] == c
        )

    print(
        f"\nmodel: {model_dir}; {args.input_len} prompt + {args.output_len} output tokens per "
        f"request, {args.prompts_per_client} requests per client, {args.reps} repetitions; "
        f"OMP_NUM_THREADS={args.threads}; machine: {machine()}"
    )
    print(
        "| clients | ours tok/s | vLLM tok/s | **ours / vLLM** | ours TTFT / TPOT ms | "
        "vLLM TTFT / TPOT ms | ours+wm tok/s | ours+wm / ours | max running (ours, vLLM) "
        "| failed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in clients:
        o, v, w = (med(s, c, "output_tok_s") for s in ("ours", "vllm", "ours+wm"))
        failed = sum(r["failed"] for r in rows if r["clients"] == c)
        run_o = max(r["max_running"] for r in rows if r["server"] == "ours" and r["clients"] == c)
        run_v = max(r["max_running"] for r in rows if r["server"] == "vllm" and r["clients"] == c)
        print(
            f"| {c} | {o:.0f} | {v:.0f} | **{o / v:.2f}x** | "
            f"{med('ours', c, 'median_ttft_ms'):.0f} / {med('ours', c, 'median_tpot_ms'):.1f} | "
            f"{med('vllm', c, 'median_ttft_ms'):.0f} / {med('vllm', c, 'median_tpot_ms'):.1f} | "
            f"{w:.0f} | {w / o:.2f}x | {run_o:.0f}, {run_v:.0f} | {failed} |"
        )


if __name__ == "__main__":
    main()
