"""Ray Data pipeline vs the same steps in one plain process, same run, same outputs.

    .venv/bin/python bench/data_prep.py [--docs 3000 20000] [--cpus 2]

Both run read → clean → dedup → split → BPE → pack → Parquet on the demo corpus; the script
checks that both manifests are identical, then prints docs/s of each and their ratio. Ray's
start-up is excluded (ray.init before timing); Ray Data's per-dataset overhead is included.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._machine import machine
from lifecycle.config import DataConfig
from lifecycle.data import demo
from lifecycle.data.pipeline import prepare_plain


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, nargs="+", default=[3000, 20000])
    ap.add_argument("--cpus", type=int, default=2)
    a = ap.parse_args()

    import ray

    from tasks.data import run_data_prep

    ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False)
    print(f"machine: {machine()}; Ray with {a.cpus} CPUs")
    for n in a.docs:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            corpus = demo.write_jsonl(demo.generate(n, seed=0), tmp / "corpus.jsonl")
            cfg = DataConfig(inputs=[{"path": str(corpus), "format": "jsonl"}])
            t0 = time.perf_counter()
            plain = prepare_plain(cfg, tmp / "plain")
            t_plain = time.perf_counter() - t0
            t0 = time.perf_counter()
            on_ray = run_data_prep(cfg, tmp / "ray", tmp / "demo")
            t_ray = time.perf_counter() - t0
            same = plain["sha256"] == on_ray["sha256"]
            print(
                f"docs={n:6d}  plain {n / t_plain:8.0f} docs/s ({t_plain:6.2f}s)  "
                f"Ray Data {n / t_ray:8.0f} docs/s ({t_ray:6.2f}s)  "
                f"ratio Ray/plain {t_plain / t_ray:5.2f}  identical outputs: {same}"
            )
    ray.shutdown()


if __name__ == "__main__":
    main()
