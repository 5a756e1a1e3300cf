"""Watermark stage (after compression): attaches the text-watermark settings to the shipped
model version, and verifies on that model that the watermark is detected, costs little, and
that the fingerprint planted during SFT answers.

Run it alone:  lifecycle run configs/tiny_cpu.yaml --stages watermark        (inputs cached)

The key: $LIFECYCLE_WATERMARK_KEY or $LIFECYCLE_WATERMARK_KEY_FILE, else the workspace's own
`watermark.key` (made on first use). MLflow gets its key id only.

In one fresh Ray worker, vLLM serves the shipped model with the project's watermark logits
processor: `generations` sampled continuations of open prompts (windows of the data stage's
val split) with the watermark and as many without, each `max_tokens` long, scored by the
detector (detection rate and false-positive rate at `z_threshold`), and their perplexity under
the plain model (the quality cost); greedy task exact-match on held-out demo prompts with the
watermark on and off. The fingerprint is checked on the RLHF model and on the shipped model.
The stage fails when a rate misses its limit; otherwise the settings (not the key) become tags
of the shipped model version: `lifecycle.watermark.*`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import ray
from prefect import task
from prefect.cache_policies import NO_CACHE

from lifecycle import tracking
from lifecycle.artifacts import RunContext, StageResult
from lifecycle.config import WatermarkConfig
from lifecycle.data.instruct import demo_prompts
from lifecycle.eval.stats import compare
from lifecycle.models import chat_tokenizer
from lifecycle.registry import parent_model, watermark_tags
from lifecycle.stages import shipped_model
from lifecycle.watermark.fingerprint import make_fingerprint, verify_fingerprint
from lifecycle.watermark.keys import KEY_FILE_ENV, key_id, resolve_key
from ray_cluster.compute import as_task, run_remote


class WatermarkCheckFailed(RuntimeError):
    """The watermark or the fingerprint missed a configured limit."""


def _vllm_watermark_job(
    model_dir: str,
    key_file: str | None,
    open_prompts: list[list[int]],
    eval_prompts: list[list[int]],
    answers: list[str],
    cfg_dict: dict[str, Any],
) -> dict[str, Any]:
    """(Ray task, fresh worker) Generations with and without the watermark, detection,
    perplexity under the plain model, and exact-match with and without."""
    cfg = WatermarkConfig.model_validate(cfg_dict)
    if key_file:
        os.environ[KEY_FILE_ENV] = key_file
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from lifecycle.vllm_engine import offline_llm
    from lifecycle.watermark.keys import load_key, watermark_hashing_key
    from lifecycle.watermark.scheme import WatermarkScheme
    from lifecycle.watermark.vllm_processor import WatermarkLogitsProcessor

    longest = max(len(p) for p in [*open_prompts, *eval_prompts]) + cfg.max_tokens
    llm = offline_llm(
        model_dir,
        kv_cache_gb=cfg.vllm.kv_cache_gb,
        dtype=cfg.vllm.dtype,
        max_model_len=longest + 1,
        seed=0,
        logits_processors=[WatermarkLogitsProcessor],
    )
    wm = {"watermark": {"gamma": cfg.gamma, "delta": cfg.delta}}
    prompts = [TokensPrompt(prompt_token_ids=p) for p in open_prompts]

    def sample(extra: dict | None) -> list[list[int]]:
        params = [
            SamplingParams(
                temperature=cfg.temperature,
                max_tokens=cfg.max_tokens,
                min_tokens=cfg.max_tokens,
                seed=i,
                extra_args=extra,
            )
            for i in range(len(prompts))
        ]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    on, off = sample(wm), sample(None)
    vocab = llm.llm_engine.model_config.hf_config.vocab_size
    scheme = WatermarkScheme(watermark_hashing_key(load_key()), vocab, cfg.gamma, cfg.delta)
    z_on = [scheme.detect(t, cfg.z_threshold, cfg.ignore_repeated)["z"] for t in on]
    z_off = [scheme.detect(t, cfg.z_threshold, cfg.ignore_repeated)["z"] for t in off]

    def nll(gens: list[list[int]]) -> float:  # under the plain model: no extra_args
        rows = [p + g for p, g in zip(open_prompts, gens, strict=True)]
        score = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows], score, use_tqdm=False)
        total, n = 0.0, 0
        for o, r, p in zip(outs, rows, open_prompts, strict=True):
            for pos in range(len(p), len(r)):
                total -= o.prompt_logprobs[pos][r[pos]].logprob
                n += 1
        return total / max(1, n)

    def exact_match(extra: dict | None) -> tuple[float, list[str]]:
        params = SamplingParams(
            max_tokens=cfg.eval.max_new_tokens,
            temperature=0.0,
            skip_special_tokens=True,
            extra_args=extra,
        )
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in eval_prompts], params, use_tqdm=False
        )
        texts = [o.outputs[0].text.strip() for o in outs]
        return sum(t == a.strip() for t, a in zip(texts, answers, strict=True)) / len(
            answers
        ), texts

    em_on, texts_on = exact_match(wm)
    em_off, texts_off = exact_match(None)
    return {
        "z_on": z_on,
        "z_off": z_off,
        "nll_on": nll(on),
        "nll_off": nll(off),
        "em_on": em_on,
        "em_off": em_off,
        "tokens_on": on,
        "tokens_off": off,
        "texts_on": texts_on,
        "texts_off": texts_off,
    }


@task(name="watermark", cache_policy=NO_CACHE)
def watermark(
    cfg: WatermarkConfig,
    ctx: RunContext,
    key: str,
    *,
    rlhf: StageResult,
    data: StageResult,
    distill: StageResult | None = None,
    quantize: StageResult | None = None,
    fingerprint_triggers: int | None = None,
) -> StageResult:
    """Checks the watermark and the fingerprint on the model to ship (the last of quantize,
    distill, rlhf that completed); records the settings on its registered version."""
    shipped = shipped_model({"rlhf": rlhf, "distill": distill, "quantize": quantize})
    model_dir = Path(shipped.artifact_uri)
    final = ctx.stage_dir("watermark", key)
    uri = ctx.tracking_uri
    secret = resolve_key(ctx.workspace)
    kid = key_id(secret)
    key_file = os.environ.get(KEY_FILE_ENV) or (
        str(Path(ctx.workspace) / "watermark.key")
        if (Path(ctx.workspace) / "watermark.key").is_file()
        and not os.environ.get("LIFECYCLE_WATERMARK_KEY")
        else None
    )
    params = {**cfg.model_dump(mode="json"), "key_id": kid}
    with tracking.stage_run(ctx, "watermark", params=params) as run_id:
        with ctx.staging("watermark", key) as tmp:
            tok = chat_tokenizer(model_dir)
            from lifecycle.data.pipeline import load_blocks

            val = load_blocks(data.artifact_uri, "val")
            windows = [row[i : i + 16] for row in val.tolist() for i in range(0, len(row) - 16, 32)]
            if len(windows) < cfg.generations:
                raise ValueError(
                    f"watermark: {cfg.generations} generations need as many open prompts; the "
                    f"data stage's val split gives {len(windows)}"
                )
            open_prompts = windows[: cfg.generations]
            e = cfg.eval
            prompts, answers = demo_prompts(e.prompts, e.seed, True, tok, e.demo_tasks)
            eval_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
            job = as_task(_vllm_watermark_job, cfg.scaling, max_calls=1)
            out = ray.get(
                job.remote(
                    str(model_dir),
                    key_file,
                    open_prompts,
                    eval_ids,
                    answers,
                    cfg.model_dump(mode="json"),
                )
            )
            fp: dict[str, Any] = {}
            if cfg.fingerprint and fingerprint_triggers:
                pairs = make_fingerprint(secret, fingerprint_triggers)
                fp["rlhf"] = run_remote(verify_fingerprint, cfg.scaling, rlhf.artifact_uri, pairs)
                fp["shipped"] = run_remote(verify_fingerprint, cfg.scaling, str(model_dir), pairs)
            n = len(out["z_on"])
            metrics = {
                "watermark/generations": float(n),
                "watermark/tokens_per_generation": float(cfg.max_tokens),
                "watermark/detection_rate": sum(z >= cfg.z_threshold for z in out["z_on"]) / n,
                "watermark/false_positive_rate": sum(z >= cfg.z_threshold for z in out["z_off"])
                / n,
                "watermark/z_mean_on": sum(out["z_on"]) / n,
                "watermark/z_mean_off": sum(out["z_off"]) / n,
                "watermark/perplexity_on": math.exp(min(out["nll_on"], 50)),
                "watermark/perplexity_off": math.exp(min(out["nll_off"], 50)),
                "watermark/exact_match_on": out["em_on"],
                "watermark/exact_match_off": out["em_off"],
            }
            for where, r in fp.items():
                metrics[f"fingerprint/{where}_matched"] = float(r["matched"])
                metrics[f"fingerprint/{where}_triggers"] = float(r["total"])
            failures = []
            if metrics["watermark/detection_rate"] < cfg.min_detection_rate:
                failures.append(
                    f"detection rate {metrics['watermark/detection_rate']:.3f} < "
                    f"{cfg.min_detection_rate:g} at z >= {cfg.z_threshold:g}"
                )
            if metrics["watermark/false_positive_rate"] > cfg.max_false_positive_rate:
                failures.append(
                    f"false-positive rate {metrics['watermark/false_positive_rate']:.3f} > "
                    f"{cfg.max_false_positive_rate:g}"
                )
            # The same prompts with and without the watermark: judged per prompt, the drop
            # fails only when beyond the limit at cfg.confidence (lifecycle/eval/stats.py).
            em = compare(
                "exact_match",
                [float(t == a.strip()) for t, a in zip(out["texts_on"], answers, strict=True)],
                [float(t == a.strip()) for t, a in zip(out["texts_off"], answers, strict=True)],
                cfg.max_exact_match_drop,
                confidence=cfg.confidence,
                resamples=cfg.resamples,
                seed=cfg.seed,
            )
            metrics["watermark/exact_match_drop_bound"] = -em.bound
            if not em.passed:
                failures.append(
                    f"exact-match with the watermark {out['em_on']:.3f} vs {out['em_off']:.3f} "
                    f"without: difference {em.diff:+.3f} [{em.low:+.3f}, {em.high:+.3f}], its "
                    f"{em.confidence:.0%} bound {em.bound:+.3f} is below "
                    f"-{cfg.max_exact_match_drop:g}"
                )
            if "shipped" in fp and fp["shipped"]["matched"] < fp["shipped"]["total"]:
                failures.append(
                    f"fingerprint: {fp['shipped']['matched']}/{fp['shipped']['total']} triggers "
                    "answered by the shipped model"
                )
            metrics["watermark/passed"] = float(not failures)
            table = [
                "| check | value | limit |",
                "|---|---|---|",
                f"| detection rate (z >= {cfg.z_threshold:g}) | {metrics['watermark/detection_rate']:.3f} | >= {cfg.min_detection_rate:g} |",
                f"| false-positive rate | {metrics['watermark/false_positive_rate']:.3f} | <= {cfg.max_false_positive_rate:g} |",
                f"| mean z on / off | {metrics['watermark/z_mean_on']:.2f} / {metrics['watermark/z_mean_off']:.2f} | |",
                f"| perplexity on / off (plain model) | {metrics['watermark/perplexity_on']:.3f} / {metrics['watermark/perplexity_off']:.3f} | |",
                f"| exact match on / off | {out['em_on']:.3f} / {out['em_off']:.3f} (on - off {em.diff:+.3f}, [{em.low:+.3f}, {em.high:+.3f}] {em.confidence:.0%}) | drop <= {cfg.max_exact_match_drop:g} |",
                *(
                    f"| fingerprint on {w} model | {r['matched']}/{r['total']} | all on shipped |"
                    for w, r in fp.items()
                ),
            ]
            (tmp / "watermark.md").write_text(
                f"# watermark {'PASSED' if not failures else 'FAILED'} (key id {kid})\n\n"
                + "\n".join(table)
                + "\n"
                + "".join(f"\n- {f}" for f in failures)
                + "\n"
            )
            (tmp / "watermark.json").write_text(
                json.dumps(
                    {
                        "metrics": metrics,
                        "failures": failures,
                        "z_on": out["z_on"],
                        "z_off": out["z_off"],
                        # what was generated, so any detector can be run on it again
                        "tokens_on": out["tokens_on"],
                        "tokens_off": out["tokens_off"],
                        "fingerprint": fp,
                    },
                )
            )
        tracking.log_metrics(uri, run_id, metrics, step=0)
        tracking.log_artifact(uri, run_id, final / "watermark.md", "watermark")
        tracking.log_artifact(uri, run_id, final / "watermark.json", "watermark")
        settings = {
            "lifecycle.watermark.scheme": "kgw-lefthash-cw1",
            **watermark_tags(
                {"gamma": cfg.gamma, "delta": cfg.delta, "z_threshold": cfg.z_threshold}, kid
            ),
        }
        tracking.set_tags(
            uri,
            run_id,
            {
                **settings,
                "lifecycle.stage": "watermark",
                "lifecycle.model": parent_model(ctx, shipped),
            },
        )
        if failures:
            raise WatermarkCheckFailed("; ".join(failures) + f" (report: {final / 'watermark.md'})")
        ref = parent_model(ctx, shipped)
        if not ref.startswith("external:"):
            name, version = ref.rsplit("/", 1)
            tracking.set_model_version_tags(uri, name, version, settings)
    return StageResult(
        stage="watermark",
        status="completed",
        artifact_uri=str(model_dir),
        mlflow_run_id=run_id,
        metrics=metrics,
        artifact_id=f"{shipped.artifact_id}+wm:{kid}:{key[:16]}",
    )
