"""Running a plain function as a Ray task with a stage's resources (evaluation, generation)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import ray

from lifecycle.config import ScalingConfig

T = TypeVar("T")


def as_task(fn: Callable[..., T], scaling: ScalingConfig, **options: Any) -> Any:
    """`fn` as a Ray remote function asking for the resources of one training worker
    (`options`: more `ray.remote` options, e.g. max_calls=1 for a fresh process per call)."""
    res = dict(scaling.resources_per_worker or {})
    num_cpus = res.pop("CPU", 1)
    num_gpus = res.pop("GPU", 1 if scaling.use_gpu else 0)
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, resources=res or None, **options)(fn)


def run_remote(fn: Callable[..., T], scaling: ScalingConfig, *args: Any, **kwargs: Any) -> T:
    """Runs `fn(*args, **kwargs)` on one worker with the resources of one training worker."""
    return ray.get(as_task(fn, scaling).remote(*args, **kwargs))
