"""Deploy stage (last): gate the shipped model against the current `champion`, promote it,
serve the champion on Ray Serve with vLLM, and check the endpoint.

Run it alone:  lifecycle run configs/tiny_cpu.yaml --stages deploy        (inputs cached)

1. Evaluation, the same for candidate and champion (one Ray task each, PyTorch): task
   exact-match and answer perplexity on held-out demo prompts (lifecycle/eval/heldout.py)
   and the mean judge reward of sampled answers (lifecycle/rlhf/evaluate.py), each also per
   prompt.
2. Promotion gate: the candidate becomes a version of `<tracking.registered_model>` (the
   serving registry; the source is the shipped stage's model version, not a copy), tagged
   `pending` when no metric's drop against the champion, prompt by prompt, is beyond its
   `deploy.gate` margin at the gate's confidence (paired bootstrap, lifecycle/eval/stats.py;
   or there is no champion yet), `rejected` otherwise (the champion stays; `promotion.md`
   says why, with each difference's interval).
3. Staging: the model to serve — the pending candidate, or else the champion — on Ray Serve's
   staging app (ray_cluster/serve.py, route prefix /staging), with the watermark settings the
   watermark stage attached. Endpoint checks through the official `openai` client: exact-match
   of its answers on the held-out prompts (within `max_endpoint_exact_match_gap` of the
   evaluation module's), watermarked long completions that `/v1/watermark/detect` flags, and
   plain demo text that it does not. Only a candidate that started and passed moves the
   `champion` alias (the previous champion is kept in the registered model's
   `lifecycle.champion_history` tag, which `lifecycle rollback` walks back); one that fails
   is tagged `rejected` with the reason and the stage fails. With `keep_serving` the champion
   then serves on the main app (on a persistent cluster: `cluster.address`; a running
   `lifecycle serve` following `@champion` rolls over by itself).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from lifecycle import tracking
from lifecycle.artifacts import RunContext, StageResult
from lifecycle.config import DeployConfig, WatermarkConfig
from lifecycle.data.instruct import demo_prompts, user_text
from lifecycle.eval.stats import Comparison, markdown
from lifecycle.models import chat_tokenizer
from lifecycle.registry import (
    DATA_TAG,
    champion_version,
    data_manifest_sha256,
    fetch_version,
    key_file_for,
    parent_model,
    register_candidate,
    set_champion,
    watermark_settings,
    watermark_tags,
    with_adapters,
)
from lifecycle.stages import shipped_model
from lifecycle.watermark.keys import key_id, load_key
from ray_cluster.compute import run_remote

GATED = ("exact_match", "perplexity", "reward")


class DeployCheckFailed(RuntimeError):
    """The served endpoint did not behave like the model it serves."""


def evaluate_for_promotion(
    model_dir: str, prompts: list[str], answers: list[str], samples: int, max_new_tokens: int
) -> dict[str, Any]:
    """(Ray task) exact-match, answer perplexity and mean judge reward of one model dir, and
    under `items` their per-prompt figures, which the gate pairs with the champion's."""
    from lifecycle.eval.heldout import GATED_SET, evaluate_torch
    from lifecycle.rlhf.evaluate import evaluate_policy

    tok = chat_tokenizer(Path(model_dir))
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    answer_rows = [
        (p + tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], len(p))
        for p, a in zip(prompt_ids, answers, strict=True)
    ]
    ev = evaluate_torch(
        model_dir, prompt_ids, answers, {GATED_SET: answer_rows}, max_new_tokens=max_new_tokens
    )
    pol = evaluate_policy(
        model_dir, model_dir, prompts, answers, {"kind": "program"}, samples, max_new_tokens
    )
    nll = ev["row_nll"][GATED_SET]
    return {
        "exact_match": float(ev["exact_match"]),
        "perplexity": float(ev["perplexity"]),
        "reward": float(pol["mean_reward"]),
        "items": {
            "exact_match": [
                float(o == a.strip()) for o, a in zip(ev["outputs"], answers, strict=True)
            ],
            "neg_nll_per_token": [-s / max(n, 1) for s, n in nll],
            "answer_tokens": [float(max(n, 1)) for _, n in nll],
            "reward": pol["reward_per_prompt"],
        },
    }


def scalars(ev: dict[str, Any]) -> dict[str, float]:
    """An evaluation's headline numbers (without its per-item lists)."""
    return {k: float(v) for k, v in ev.items() if k != "items"}


def gate(
    candidate: dict[str, Any], champion: dict[str, Any] | None, cfg: DeployConfig
) -> tuple[list[str], list[Comparison]]:
    """Whether the candidate may replace the champion: (reasons it may not — empty: promote
    —, the paired comparisons). Each gated metric is compared item by item on the same
    prompts with a paired bootstrap (lifecycle/eval/stats.py): a metric fails only when its
    drop is beyond the margin at `gate.confidence`. The absolute floor needs no champion."""
    from lifecycle.eval.stats import compare, perplexity_ratio_margin

    g, why = cfg.gate, []
    if g.min_exact_match is not None and candidate["exact_match"] < g.min_exact_match:
        why.append(
            f"exact match {candidate['exact_match']:.3f} below the floor {g.min_exact_match:g}"
        )
    if champion is None:
        return why, []
    c, b = candidate["items"], champion["items"]
    kw = {"confidence": g.confidence, "resamples": g.resamples, "seed": g.seed}
    comps = [
        compare("exact_match", c["exact_match"], b["exact_match"], g.max_exact_match_drop, **kw),
        # perplexity = exp(token-weighted mean NLL): its ratio limit is a drop of -NLL
        compare(
            "answer_log_likelihood",
            c["neg_nll_per_token"],
            b["neg_nll_per_token"],
            perplexity_ratio_margin(g.max_perplexity_ratio),
            weights=b["answer_tokens"],
            **kw,
        ),
        compare("reward", c["reward"], b["reward"], g.max_reward_drop, **kw),
    ]
    words = {
        "exact_match": f"exact match {candidate['exact_match']:.3f} vs champion "
        f"{champion['exact_match']:.3f}",
        "answer_log_likelihood": f"answer perplexity {candidate['perplexity']:.3f} vs champion "
        f"{champion['perplexity']:.3f} (limit ratio {g.max_perplexity_ratio:g})",
        "reward": f"mean reward {candidate['reward']:.3f} vs champion {champion['reward']:.3f}",
    }
    for comp in comps:
        if not comp.passed:
            why.append(
                f"{words[comp.metric]}: difference {comp.diff:+.3f}, its {comp.confidence:.0%} "
                f"bound {comp.bound:+.3f} is below -{comp.max_drop:.3g} (allowed drop)"
            )
    return why, comps


def _chat(url: str, prompts: list[str], max_tokens: int, api_key: str) -> list[str]:
    """Greedy answers from the endpoint's chat API (the official client, 8 in flight)."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key or "none", max_retries=5)
    model = client.models.list().data[0].id  # once, not one extra request per prompt

    def one(p: str) -> str:
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": p}],
            max_tokens=max_tokens,
            temperature=0.0,
        )
        return (r.choices[0].message.content or "").strip()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, prompts))


def check_endpoint(
    url: str,
    user_prompts: list[str],
    answers: list[str],
    plain_texts: list[str],
    open_prompts: list[str],
    max_tokens: int,
    watermarked: bool,
) -> dict[str, float]:
    """Exact-match of the endpoint's answers; detection of its watermarked completions and
    of plain text through /v1/watermark/detect."""
    import httpx
    import openai

    key = os.environ.get("LIFECYCLE_API_KEY", "")
    outs = _chat(url, user_prompts, max_tokens, key)
    em = sum(o == a.strip() for o, a in zip(outs, answers, strict=True)) / len(answers)
    metrics = {"endpoint/exact_match": em, "endpoint/requests": float(len(outs))}
    if not watermarked:
        return metrics
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key or "none", max_retries=5)
    model = client.models.list().data[0].id
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    def long_text(p: str) -> str:
        r = client.completions.create(
            model=model,
            prompt=p,
            max_tokens=200,
            temperature=1.0,
            extra_body={"min_tokens": 200},
        )
        return r.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(long_text, open_prompts))

    def flagged(t: str) -> bool:
        r = httpx.post(f"{url}/v1/watermark/detect", json={"text": t}, headers=headers, timeout=60)
        r.raise_for_status()
        return bool(r.json()["watermarked"])

    metrics["endpoint/watermark_detection_rate"] = sum(map(flagged, texts)) / len(texts)
    metrics["endpoint/plain_flagged_rate"] = sum(map(flagged, plain_texts)) / len(plain_texts)
    return metrics


@task(name="deploy", cache_policy=NO_CACHE)
def deploy(
    cfg: DeployConfig,
    ctx: RunContext,
    key: str,
    *,
    rlhf: StageResult,
    data: StageResult,
    distill: StageResult | None = None,
    quantize: StageResult | None = None,
    watermark: StageResult | None = None,
    watermark_cfg: WatermarkConfig | None = None,
) -> StageResult:
    """Gates, promotes and serves the model to ship (the last of quantize, distill, rlhf that
    completed); checks the endpoint. `watermark_cfg` is attached when the watermark stage ran."""
    from ray_cluster.serve import (
        STAGING_APP,
        STAGING_PREFIX,
        RollOverFailed,
        deploy_app,
        make_spec,
        shutdown,
    )

    shipped = shipped_model({"rlhf": rlhf, "distill": distill, "quantize": quantize})
    wm_cfg = watermark_cfg if watermark is not None else None
    uri, name = ctx.tracking_uri, ctx.registered_model
    final = ctx.stage_dir("deploy", key)
    source_ref = parent_model(ctx, shipped)
    serving_root = Path(ctx.workspace) / "serving"
    with tracking.stage_run(ctx, "deploy", params=cfg.model_dump(mode="json")) as run_id:
        with ctx.staging("deploy", key) as tmp:
            tok = chat_tokenizer(Path(shipped.artifact_uri))
            e = cfg.eval
            prompts, answers = demo_prompts(e.prompts, e.seed, True, tok, e.demo_tasks)
            ev_args = (prompts, answers, cfg.reward_samples, e.max_new_tokens)
            cand = run_remote(evaluate_for_promotion, cfg.scaling, shipped.artifact_uri, *ev_args)
            champ_mv = champion_version(uri, name)
            champ = None
            if champ_mv is not None:
                _, champ_dir = fetch_version(
                    uri, f"models:/{name}/{champ_mv.version}", serving_root
                )
                champ = run_remote(evaluate_for_promotion, cfg.scaling, str(champ_dir), *ev_args)
            why, comparisons = gate(cand, champ, cfg)

            # Register the candidate in the serving registry (source: the shipped version).
            wm_tags: dict[str, str] = {}
            if wm_cfg is not None:
                settings = {
                    "gamma": wm_cfg.gamma,
                    "delta": wm_cfg.delta,
                    "z_threshold": wm_cfg.z_threshold,
                }
                kid = key_id(load_key(key_file_for(ctx.workspace, None)))
                wm_tags = watermark_tags(settings, kid)
            tags = {
                "lifecycle.stage": "deploy",
                "lifecycle.parent_model": source_ref,
                "lifecycle.run_name": ctx.run_name,
                "lifecycle.promotion": "pending" if not why else "rejected",
                **{f"lifecycle.eval.{k}": f"{v:.6f}" for k, v in scalars(cand).items()},
                DATA_TAG: data_manifest_sha256(data.artifact_uri),
                **wm_tags,
            }
            version = register_candidate(uri, run_id, name, shipped, source_ref, tags)
            serving_mv = (
                tracking.model_version(uri, name, version)
                if not why
                else champion_version(uri, name)
            )
            if serving_mv is None:
                raise DeployCheckFailed(
                    f"{name} version {version} was not promoted ({'; '.join(why)}) and there "
                    "is no champion to serve"
                )

            # Serve the model that is to be the champion on the staging app and check the
            # endpoint; `@champion` moves only once the candidate has served and passed.
            _, serve_dir = fetch_version(uri, f"models:/{name}/{serving_mv.version}", serving_root)
            wm = watermark_settings(serving_mv.tags) if cfg.serve.watermark else None
            kf = key_file_for(ctx.workspace, serving_mv.tags.get("lifecycle.watermark.key_id"))
            spec = make_spec(
                serve_dir,
                with_adapters(cfg.serve, uri, Path(ctx.workspace)),
                cfg.serve.model_id or name,
                f"{name}/{serving_mv.version}",
                wm,
                kf if wm else None,
            )
            t0 = time.perf_counter()
            try:
                staging = deploy_app(spec, cfg.serve, name=STAGING_APP, route_prefix=STAGING_PREFIX)
            except RollOverFailed as e:
                if not why:
                    _reject(uri, name, version, f"it did not start on the staging app: {e}")
                raise DeployCheckFailed(str(e)) from e
            startup = time.perf_counter() - t0
            try:
                from lifecycle.data.pipeline import load_blocks

                val = load_blocks(data.artifact_uri, "val")
                plain = [tok.decode(row) for row in val[:20].tolist()]
                opens = [tok.decode(row[:16]) for row in val[20:40].tolist()]
                user = [user_text(p, tok) for p in prompts]
                ep = check_endpoint(
                    staging, user, answers, plain, opens, e.max_new_tokens, wm is not None
                )
            finally:
                shutdown(STAGING_APP)
            failures = _endpoint_failures(ep, cand, champ, why, wm is not None, wm_cfg, cfg)
            if failures and not why:
                _reject(uri, name, version, "; ".join(failures))
            if not failures and not why:
                set_champion(uri, name, version)
                tracking.set_model_version_tags(
                    uri, name, version, {"lifecycle.promotion": "promoted"}
                )
            url = staging.removesuffix(STAGING_PREFIX)
            if not failures and cfg.keep_serving:  # the champion on the app clients use
                url = deploy_app(spec, cfg.serve)
            report = _report(name, version, cand, champ, champ_mv, why + failures, cfg, comparisons)
            (tmp / "promotion.md").write_text(report)
            (tmp / "promotion.json").write_text(
                json.dumps(
                    {
                        "candidate": cand,
                        "champion": champ,
                        "reasons": why + failures,
                        "version": version,
                    }
                )
            )
        promoted = not why and not failures
        metrics = {
            **{f"candidate/{k}": v for k, v in scalars(cand).items()},
            **({f"champion/{k}": v for k, v in scalars(champ).items()} if champ else {}),
            **{f"promotion/{c.metric}_bound": c.bound for c in comparisons},
            "promotion/promoted": float(promoted),
            "promotion/version": float(version),
            "serving/version": float(serving_mv.version),
            "serving/startup_s": startup,
            **ep,
        }
        metrics["endpoint/exact_match_gap"] = _gap(ep, cand, champ, why)
        tracking.log_metrics(uri, run_id, metrics, step=0)
        tracking.log_artifact(uri, run_id, final / "promotion.md", "promotion")
        tracking.log_artifact(uri, run_id, final / "promotion.json", "promotion")
        tracking.set_tags(
            uri,
            run_id,
            {
                "lifecycle.stage": "deploy",
                "lifecycle.model": f"{name}/{version}",
                "lifecycle.serving_model": f"{name}/{serving_mv.version}",
                "lifecycle.endpoint": url,
            },
        )
        if failures:
            raise DeployCheckFailed("; ".join(failures))
    return StageResult(
        stage="deploy",
        status="completed",
        artifact_uri=str(serve_dir),
        mlflow_run_id=run_id,
        metrics=metrics,
        artifact_id=f"{name}/{serving_mv.version}:{key[:16]}",
        error="; ".join(why) if why else None,
    )


def _gap(
    ep: dict[str, float],
    cand: dict[str, float],
    champ: dict[str, float] | None,
    why: list[str],
) -> float:
    """How far the endpoint's exact match is from the evaluation module's for the model served."""
    return abs(ep["endpoint/exact_match"] - (champ if why and champ else cand)["exact_match"])


def _endpoint_failures(
    ep: dict[str, float],
    cand: dict[str, float],
    champ: dict[str, float] | None,
    why: list[str],
    watermarked: bool,
    wm_cfg: WatermarkConfig | None,
    cfg: DeployConfig,
) -> list[str]:
    """What the served endpoint did unlike the model it serves (empty: it passed)."""
    failures = []
    gap = _gap(ep, cand, champ, why)
    if gap > cfg.max_endpoint_exact_match_gap:
        failures.append(
            f"the endpoint's exact match {ep['endpoint/exact_match']:.3f} is {gap:.3f} away "
            f"from the evaluation module's (limit {cfg.max_endpoint_exact_match_gap:g})"
        )
    if watermarked and wm_cfg is not None:
        if ep["endpoint/watermark_detection_rate"] < wm_cfg.min_detection_rate:
            failures.append(
                f"the detector flagged {ep['endpoint/watermark_detection_rate']:.2f} of the "
                f"endpoint's watermarked completions (< {wm_cfg.min_detection_rate:g})"
            )
        if ep["endpoint/plain_flagged_rate"] > 0:
            failures.append(
                f"the detector flagged {ep['endpoint/plain_flagged_rate']:.2f} of plain text"
            )
    return failures


def _reject(uri: str, name: str, version: str, reason: str) -> None:
    """A candidate that passed the gate but not its endpoint checks stays registered, tagged
    rejected with the reason; the champion does not move."""
    tracking.set_model_version_tags(
        uri, name, version, {"lifecycle.promotion": "rejected", "lifecycle.rejected_by": reason}
    )


def _report(
    name: str,
    version: str,
    cand: dict[str, Any],
    champ: dict[str, Any] | None,
    champ_mv: Any,
    why: list[str],
    cfg: DeployConfig,
    comparisons: list[Comparison],
) -> str:
    head = (
        f"# {name} version {version}: "
        + (
            "promoted to champion"
            if not why
            else "NOT promoted; "
            + (f"champion stays version {champ_mv.version}" if champ_mv else "no champion yet")
        )
        + "\n\n"
    )
    rows = ["| metric | candidate | champion | allowed |", "|---|---|---|---|"]
    g = cfg.gate
    allowed = {
        "exact_match": f"drop <= {g.max_exact_match_drop:g}"
        + (f", >= {g.min_exact_match:g}" if g.min_exact_match is not None else ""),
        "perplexity": f"ratio <= {g.max_perplexity_ratio:g}",
        "reward": f"drop <= {g.max_reward_drop:g}",
    }
    for k in GATED:
        other = f"{champ[k]:.4f}" if champ else "(none)"
        rows.append(f"| {k} | {cand[k]:.4f} | {other} | {allowed[k]} |")
    out = head + "\n".join(rows) + "\n" + "".join(f"\n- {w}" for w in why) + "\n"
    if comparisons:  # the paired comparisons the decision used, with their intervals
        out += "\n" + markdown("paired comparison with the champion", comparisons).replace(
            "# ", "## ", 1
        )
    return out
