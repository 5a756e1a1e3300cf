"""The project's Ray metrics (`ray.util.metrics`), exported on each node's Prometheus endpoint
(`cluster.metrics_export_port`, or Ray's choice) next to Ray's own, and shown by the Grafana
dashboard in ray_cluster/monitoring/.

    lifecycle_train_loss{stage}                   gauge, every log_every steps (rank 0)
    lifecycle_train_tokens_per_second{stage}      gauge
    lifecycle_train_step{stage}                   gauge
    lifecycle_serve_requests_total{route,code}    counter, every API request of a replica
    lifecycle_serve_generated_tokens_total        counter
    lifecycle_serve_errors_total{route,code}      counter, 4xx/5xx answers
    lifecycle_serve_ongoing_requests              gauge, requests inside the replica now
    lifecycle_serve_request_seconds{route}        histogram
    lifecycle_stage_status{stage,status}          gauge, 1 for the stage's latest status
    lifecycle_stage_duration_seconds{stage}       gauge

Only processes connected to Ray record (a metric made elsewhere is a no-op here).
"""

from __future__ import annotations

from functools import cache
from typing import Any

NAMES = (
    "lifecycle_train_loss",
    "lifecycle_train_tokens_per_second",
    "lifecycle_train_step",
    "lifecycle_serve_requests_total",
    "lifecycle_serve_generated_tokens_total",
    "lifecycle_serve_errors_total",
    "lifecycle_serve_ongoing_requests",
    "lifecycle_serve_request_seconds",
    "lifecycle_stage_status",
    "lifecycle_stage_duration_seconds",
)
"""Every metric the project exports (the Grafana dashboard and its test use this list)."""

STATUSES = ("completed", "cached", "skipped", "failed")


def _ray_ready() -> bool:
    import ray

    return ray.is_initialized()


@cache
def _metrics() -> dict[str, Any]:
    from ray.util.metrics import Counter, Gauge, Histogram

    return {
        "train_loss": Gauge("lifecycle_train_loss", "training loss", tag_keys=("stage",)),
        "train_tps": Gauge(
            "lifecycle_train_tokens_per_second", "training tokens/s", tag_keys=("stage",)
        ),
        "train_step": Gauge("lifecycle_train_step", "optimizer step", tag_keys=("stage",)),
        "requests": Counter(
            "lifecycle_serve_requests_total", "API requests", tag_keys=("route", "code")
        ),
        "tokens": Counter("lifecycle_serve_generated_tokens_total", "generated tokens"),
        "errors": Counter(
            "lifecycle_serve_errors_total", "API errors (4xx/5xx)", tag_keys=("route", "code")
        ),
        "ongoing": Gauge("lifecycle_serve_ongoing_requests", "requests inside the replica"),
        "latency": Histogram(
            "lifecycle_serve_request_seconds",
            "API request latency",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30],
            tag_keys=("route",),
        ),
        "stage_status": Gauge(
            "lifecycle_stage_status", "1 for the stage's status", tag_keys=("stage", "status")
        ),
        "stage_seconds": Gauge(
            "lifecycle_stage_duration_seconds", "stage wall time", tag_keys=("stage",)
        ),
    }


def training_step(stage: str, step: int, loss: float, tokens_per_s: float) -> None:
    if not _ray_ready():
        return
    m, tags = _metrics(), {"stage": stage}
    m["train_loss"].set(loss, tags)
    m["train_tps"].set(tokens_per_s, tags)
    m["train_step"].set(step, tags)


def request_done(route: str, code: int, seconds: float) -> None:
    if not _ray_ready():
        return
    m = _metrics()
    tags = {"route": route, "code": str(code)}
    m["requests"].inc(1, tags)
    if code >= 400:
        m["errors"].inc(1, tags)
    m["latency"].observe(seconds, {"route": route})


def generated_tokens(n: int) -> None:
    if n and _ray_ready():
        _metrics()["tokens"].inc(n)


def ongoing(n: int) -> None:
    if _ray_ready():
        _metrics()["ongoing"].set(n)


def stage_finished(stage: str, status: str, seconds: float | None) -> None:
    if not _ray_ready():
        return
    m = _metrics()
    for s in STATUSES:
        m["stage_status"].set(1.0 if s == status else 0.0, {"stage": stage, "status": s})
    if seconds is not None:
        m["stage_seconds"].set(seconds, {"stage": stage})
