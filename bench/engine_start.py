"""What an offline vLLM engine costs to start on CPU: the project's `offline_llm` (engine core
in-process, uni-process executor, no fixed thread binding) against `vllm.LLM` with vLLM's
defaults (an engine-core process and a worker process, `auto` thread binding).

    .venv/bin/python bench/engine_start.py [--model DIR] [--reps 3] [--prompts 64]

Each measurement is a fresh Python process (as in the stages: one Ray task per engine) timed
from its start to its exit: import vLLM, build the engine, greedy-generate 32 tokens for
`--prompts` prompts, shut down. Both variants get the same model, dtype (bf16), max_model_len,
KV cache (1 GiB) and OMP_NUM_THREADS; the order alternates per repetition. The model is
`--model DIR` or a random-init Llama (hidden 256, 4 layers) built here. Prints each run, then
medians, the ratio and the machine; the generated texts of both variants must be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._machine import machine

CHILD = """
import json, sys, time
t0 = time.perf_counter()
variant, model, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
from vllm import SamplingParams
kw = dict(dtype="bfloat16", max_model_len=256, seed=0)
if variant == "project":
    from lifecycle.vllm_engine import offline_llm
    llm = offline_llm(model, kv_cache_gb=1, **kw)
else:
    from vllm import LLM
    llm = LLM(model=model, enforce_eager=True, **kw)
t1 = time.perf_counter()
outs = llm.generate([f"copy word{i}" for i in range(n)],
                    SamplingParams(max_tokens=32, temperature=0.0), use_tqdm=False)
t2 = time.perf_counter()
texts = [o.outputs[0].text for o in outs]
del llm
print("RESULT " + json.dumps({"build_s": t1 - t0, "generate_s": t2 - t1, "texts": texts}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    print(f"machine: {machine()}; OMP_NUM_THREADS={a.threads}", flush=True)
    model = a.model
    if model is None:
        from bench.serve_load import build

        model = build(Path(tempfile.mkdtemp(prefix="engine-start-")), 256, 4)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "VLLM_CPU_KVCACHE_SPACE": "1"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    times: dict[str, list[float]] = {"project": [], "vllm-default": []}
    texts: dict[str, list[str]] = {}
    for rep in range(a.reps):
        order = ["project", "vllm-default"] if rep % 2 == 0 else ["vllm-default", "project"]
        for variant in order:
            t0 = time.perf_counter()
            p = subprocess.run(
                [sys.executable, "-c", CHILD, variant, model, str(a.prompts)],
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            wall = time.perf_counter() - t0
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if p.returncode != 0 or line is None:
                raise RuntimeError(p.stdout[-2000:] + p.stderr[-3000:])
            r = json.loads(line[7:])
            texts.setdefault(variant, r["texts"])
            times[variant].append(wall)
            print(
                f"rep {rep} {variant}: process {wall:.1f} s (import + build {r['build_s']:.1f} s, "
                f"generate {r['generate_s']:.2f} s)",
                flush=True,
            )
    same = texts["project"] == texts["vllm-default"]
    mp, md = statistics.median(times["project"]), statistics.median(times["vllm-default"])
    print(
        f"\nmedian process time: project {mp:.1f} s, vLLM defaults {md:.1f} s, "
        f"ratio {mp / md:.2f}; identical greedy outputs: {same}; machine: {machine()}"
    )
    if not same:
        raise SystemExit("the two engines generated different texts")


if __name__ == "__main__":
    main()
