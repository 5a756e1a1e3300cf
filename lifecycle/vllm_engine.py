"""How the project starts vLLM engines: the environment an engine gets, and the offline engine
the compression gate, the watermark check and RLAIF sampling use.

    from lifecycle.vllm_engine import engine_env, offline_llm
    llm = offline_llm("path/to/model", kv_cache_gb=1, dtype="bfloat16", max_model_len=512)

vLLM-CPU's defaults suit a machine given over to one engine, not a Ray node that runs several
tasks at once:

- `VLLM_CPU_OMP_THREADS_BIND=auto` pins every engine's OpenMP threads to the same fixed cores
  (on a 2-core node: core 0 for each of them) whatever Ray scheduled beside it. Here engines
  default to `nobind` (the OS places the threads); a user's own setting wins.
- An offline engine on CPU runs in its own process (engine core in-process, uni-process
  executor) instead of spawning an engine-core and a worker process that each import torch and
  vLLM again: bench/engine_start.py, 2 cores, 31.0 s -> 13.0 s per engine from process start
  to exit, identical greedy outputs (docs/benchmarks.md). On GPU vLLM's defaults stay: the
  separate engine core overlaps scheduling with the GPU's work. Serving keeps vLLM's
  multiprocess engine everywhere (its async client needs it).

Import-light: vLLM is imported only inside `offline_llm`.
"""

from __future__ import annotations

import math
import os
from typing import Any

THREADS_BIND = "VLLM_CPU_OMP_THREADS_BIND"
KV_CACHE = "VLLM_CPU_KVCACHE_SPACE"


def engine_env(kv_cache_gb: float) -> dict[str, str]:
    """The environment variables an engine needs on CPU machines (vLLM ignores them on GPU):
    the config's KV cache in GiB (whole GiB, rounded up) and no fixed thread binding unless
    this process's environment names one (`VLLM_CPU_OMP_THREADS_BIND=0-15|16-31`, say)."""
    return {
        KV_CACHE: str(max(1, math.ceil(kv_cache_gb))),
        THREADS_BIND: os.environ.get(THREADS_BIND) or "nobind",
    }


def offline_llm(model_dir: str, *, kv_cache_gb: float = 1.0, **kwargs: Any) -> Any:
    """`vllm.LLM` for `model_dir` (eager mode), with `engine_env` applied to this process;
    on CPU the engine runs in this process. Call it in a process of its own (a Ray task with
    `max_calls=1`): vLLM's process-wide state goes with the process."""
    os.environ.update(engine_env(kv_cache_gb))
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0":
            kwargs.setdefault("distributed_executor_backend", "uni")
    from vllm import LLM

    return LLM(model=model_dir, enforce_eager=True, **kwargs)
