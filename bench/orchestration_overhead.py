"""Orchestration overhead: the whole tiny chain's wall time vs the time its stages spend working.

    .venv/bin/python bench/orchestration_overhead.py [--config configs/tiny_cpu.yaml]
                                                     [--workspace DIR] [--set KEY=VALUE]...

Runs `lifecycle run CONFIG --json` in a fresh workspace (what a user runs) and splits its
wall time using the run summary and MLflow:

- stage body: the span of the stage's MLflow run (the stage task's own work: its Ray Data /
  Ray Train / Ray tasks and the MLflow logging inside it; Ray's worker start-up inside a
  stage counts here: bench/train_overhead.py measures that against bare PyTorch).
- Ray start: connecting to (here: starting) Ray, before the first stage that runs
  (`ray_connect_s` in the summary).
- Prefect per stage: the stage's wall time as the flow saw it (`seconds` in the summary,
  around the Prefect task call) minus its body (and minus the Ray start for the first).
- in the flow, outside stages: the flow's time minus the stages' (the MLflow experiment and
  parent run, the summary, Prefect artifacts).
- start-up and exit: the process's wall time minus the flow's (imports, Prefect's engine and
  ephemeral API, Ray shutdown).

Overhead = wall − Σ stage bodies; the goal is under 15% of the wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._machine import machine
from lifecycle import tracking

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/tiny_cpu.yaml")
    ap.add_argument("--workspace", default=None, help="default: a fresh temp dir")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    ws = Path(args.workspace or tempfile.mkdtemp(prefix="bench-orch-")) / "ws"
    cmd = [str(Path(sys.executable).parent / "lifecycle"), "run", args.config]
    cmd += ["--workspace", str(ws), "--json", "--run-name", "bench"]
    for o in args.overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"the run failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    summary = json.loads(p.stdout)
    uri = summary["mlflow"]["tracking_uri"]

    ray_start = summary.get("ray_connect_s") or 0.0  # inside the first stage that ran
    rows = []
    for s in summary["stages"]:
        if s["status"] != "completed" or not s["mlflow_run_id"]:
            continue
        info = tracking.get_run(uri, s["mlflow_run_id"]).info
        body = (info.end_time - info.start_time) / 1000
        ray = ray_start if not rows else 0.0
        rows.append((s["stage"], s["seconds"], body, ray, s["seconds"] - body - ray))
    flow_s = summary["seconds"]
    stages_s = sum(r[1] for r in rows)
    bodies = sum(r[2] for r in rows)
    prefect = sum(r[4] for r in rows)
    overhead = wall - bodies

    print(f"machine: {machine()}")
    print(f"command: {' '.join(cmd[1:])}")
    print(f"\n{'stage':<10} {'wall s':>8} {'body s':>8} {'Ray start s':>12} {'Prefect s':>10}")
    for stage, seconds, body, ray, pre in rows:
        print(f"{stage:<10} {seconds:8.1f} {body:8.1f} {ray:12.2f} {pre:10.2f}")
    print(f"{'stages':<10} {stages_s:8.1f} {bodies:8.1f} {ray_start:12.2f} {prefect:10.2f}")
    print(f"\nprocess wall time             {wall:8.1f} s")
    print(f"  start-up and exit           {wall - flow_s:8.1f} s  (imports, Prefect engine, exit)")
    print(f"  flow, outside stages        {flow_s - stages_s:8.1f} s  (MLflow parent run, summary)")
    print(f"  Ray start                   {ray_start:8.1f} s")
    print(f"  Prefect around the stages   {prefect:8.1f} s")
    print(f"  stage bodies (baseline)     {bodies:8.1f} s")
    print(f"overhead: {overhead:.1f} s = {overhead / wall:.1%} of the wall time (goal < 15%)")
    print(f"ratio wall / stage bodies: {wall / bodies:.3f}")


if __name__ == "__main__":
    main()
