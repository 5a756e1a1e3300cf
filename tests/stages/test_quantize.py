"""The compression stages on the whole chain's aligned model: int4 through vLLM, pruning,
a failing gate, and distillation into a student half the size; and vLLM serving other
architectures' compressed checkpoints (tiny random Qwen2 and Gemma 2)."""

import json
from pathlib import Path

import pytest
import ray
import torch
from safetensors import safe_open

from lifecycle import tracking
from lifecycle.artifacts import StageResult
from lifecycle.config import DistillConfig, QuantizeConfig
from lifecycle.models import load_model
from tasks.distill import distill
from tasks.quantize import GateFailed, quantize

pytestmark = pytest.mark.slow


def _upstreams(whole_chain) -> tuple[StageResult, StageResult]:
    _, summary = whole_chain
    stages = {s["stage"]: s for s in summary["stages"]}
    rl, data = stages["rlhf"], stages["data"]
    return (
        StageResult("rlhf", "completed", artifact_uri=rl["artifact_uri"], artifact_id="rlhf"),
        StageResult("data", "completed", artifact_uri=data["artifact_uri"], artifact_id="data"),
    )


def _cfg(**kw) -> QuantizeConfig:
    base = {
        "eval": {
            "demo_tasks": ["copy", "upper", "first", "last"],
            "prompts": 200,
            "max_new_tokens": 12,
            "perplexity_blocks": 32,
        },
        "scaling": {"resources_per_worker": {"CPU": 2}},
        "gate": {"max_exact_match_drop": 0.08, "max_perplexity_ratio": 1.5},
    }
    return QuantizeConfig.model_validate({**base, **kw})


@pytest.mark.timeout(2400)  # may wait for the session's whole chain
def test_w4a16_gptq_served_by_vllm(ray_session, whole_chain, make_ctx):
    rlhf, data = _upstreams(whole_chain)
    ctx = make_ctx()
    res = quantize.fn(_cfg(method="w4a16"), ctx, "4" * 64, rlhf=rlhf, data=data)
    m = res.metrics
    assert res.status == "completed" and res.error is None
    out = Path(res.artifact_uri)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized"
    assert 0.25 <= m["size/ratio_vs_bf16"] <= 0.45, m
    for engine in ("torch", "vllm"):
        drop = m[f"{engine}/exact_match_before"] - m[f"{engine}/exact_match_after"]
        assert drop <= 0.08, (engine, m)
        assert m[f"{engine}/exact_match_before"] >= 0.4, m  # a model that can do the tasks
    # vLLM and PyTorch agree on what the unquantized model scores (same inputs, same greedy).
    assert abs(m["vllm/exact_match_before"] - m["torch/exact_match_before"]) <= 0.05, m
    gate = (out.parent / "gate.md").read_text()
    assert "PASSED" in gate and "| vllm | exact_match |" in gate
    run = tracking.get_run(ctx.tracking_uri, res.mlflow_run_id)
    assert run.data.metrics["vllm/exact_match_after"] == m["vllm/exact_match_after"]
    mv = tracking.model_version(ctx.tracking_uri, "test-llm-quantized", "1")
    assert mv.tags["lifecycle.quantize_method"] == "w4a16"
    assert mv.tags["lifecycle.gate_passed"] == "true"
    arts = {
        a.path for a in tracking.client(ctx.tracking_uri).list_artifacts(res.mlflow_run_id, "gate")
    }
    assert {"gate/gate.md", "gate/gate.json", "gate/outputs.jsonl"} <= arts


@pytest.mark.timeout(2400)  # may wait for the session's whole chain
def test_pruning_to_half_and_a_gate_that_cannot_pass(ray_session, whole_chain, make_ctx):
    rlhf, data = _upstreams(whole_chain)
    ctx = make_ctx()
    impossible = {"max_exact_match_drop": 0.0, "max_perplexity_ratio": 1.0, "min_agreement": 1.0}
    cfg = _cfg(
        method="none",
        prune={"method": "sparsegpt", "sparsity": 0.5},
        gate={**impossible, "on_fail": "keep_uncompressed"},
        vllm={"enabled": False},
    )
    res = quantize.fn(cfg, ctx, "p" * 64, rlhf=rlhf, data=data)
    # The gate failed: the stage says what it lost and hands the uncompressed model on.
    assert res.status == "completed" and res.artifact_uri == rlhf.artifact_uri
    assert "quality gate failed" in res.error and "torch perplexity" in res.error
    assert res.metrics["gate/passed"] == 0.0
    assert res.metrics["prune/sparsity"] == 0.5
    assert res.metrics["torch/perplexity_after"] > res.metrics["torch/perplexity_before"]
    # Exactly half of every pruned linear is zero in the written checkpoint.
    pruned = ctx.stage_dir("quantize", "p" * 64) / "model"
    with safe_open(str(pruned / "model.safetensors"), "pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            if name.endswith(("proj.weight",)):
                w = f.get_tensor(name)
                assert (w == 0).float().mean().item() == 0.5, name
    assert not tracking.client(ctx.tracking_uri).search_model_versions("name='test-llm-quantized'")
    # With on_fail: fail the stage fails, and the report names what was lost.
    cfg = cfg.model_copy(update={"gate": cfg.gate.model_copy(update={"on_fail": "fail"})})
    with pytest.raises(GateFailed, match=r"exact_match|perplexity"):
        quantize.fn(cfg, make_ctx("again"), "f" * 64, rlhf=rlhf, data=data)


@pytest.mark.timeout(2400)  # may wait for the session's whole chain
def test_distilled_student_keeps_the_teachers_skill(ray_session, whole_chain, make_ctx):
    rlhf, _ = _upstreams(whole_chain)
    ctx = make_ctx()
    cfg = DistillConfig(
        student={
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 256,
        },
        data={
            "demo": {
                "num_train": 4000,
                "num_eval": 100,
                "tasks": ["copy", "upper", "first", "last"],
            },
            "max_length": 32,
        },
        eval={"demo_tasks": ["copy", "upper", "first", "last"], "prompts": 200},
        max_steps=300,
        micro_batch_size=32,
        checkpoint_every=150,
        log_every=50,
        scaling={"num_workers": 1, "resources_per_worker": {"CPU": 2}},
    )
    res = distill.fn(cfg, ctx, "d" * 64, rlhf=rlhf)
    m = res.metrics
    assert m["model/params_ratio"] <= 0.5, m
    assert m["eval/exact_match_ratio"] >= 0.8, m
    assert m["gate/passed"] == 1.0 and res.artifact_uri != rlhf.artifact_uri
    student = load_model(res.artifact_uri)
    assert sum(p.numel() for p in student.parameters()) == m["model/student_params"]
    assert student.config.intermediate_size == 32
    teacher = load_model(rlhf.artifact_uri)
    assert not torch.equal(
        student.model.layers[0].self_attn.q_proj.weight,
        teacher.model.layers[0].self_attn.q_proj.weight,
    )  # trained past its initialisation
    mv = tracking.model_version(ctx.tracking_uri, "test-llm-distilled", "1")
    assert mv.tags["lifecycle.teacher_model"].startswith("external:")
    # A student that cannot keep up (random init, a few steps) fails the gate; told to, the
    # stage keeps the teacher and says why.
    weak = cfg.model_copy(
        update={
            "init_from_teacher": False,
            "max_steps": 20,
            "warmup_steps": 5,
            "on_fail": "keep_teacher",
        }
    )
    kept = distill.fn(weak, make_ctx("weak"), "w" * 64, rlhf=rlhf)
    assert kept.artifact_uri == rlhf.artifact_uri and kept.metrics["gate/passed"] == 0.0
    assert "distillation gate failed" in kept.error and "keeping the teacher" in kept.error


@pytest.mark.timeout(1200)
def test_vllm_serves_other_architectures_compressed(ray_session, tmp_path):
    """Beyond the chain's own Llama: a grouped-query Qwen2 with q/k/v biases in W4A16 (GPTQ)
    and a Gemma 2 (tied embeddings, (1 + w) pre/post norms, GQA) in W8A8 (SmoothQuant folded
    into its norms + GPTQ), both compressed from tiny random models, and a Mixtral MoE as it
    is (its experts are not quantized: lifecycle/archs.py), loaded and run by vLLM in one
    worker: it generates, and its perplexity of held-out continuations matches transformers'
    reading of the same checkpoint (W8A8's activations are quantized per token by vLLM and
    simulated by transformers)."""
    from transformers import AutoTokenizer

    from lifecycle import tiny
    from lifecycle.compress.quantize import compress_weights, save_compressed
    from lifecycle.config import ScalingConfig
    from lifecycle.eval.heldout import evaluate_torch
    from ray_cluster.compute import as_task

    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(3, 380, (4, 32), generator=g) for _ in range(4)]
    prompt_ids = [torch.randint(3, 380, (24,), generator=g).tolist() for _ in range(8)]
    sets = {
        "answers": [(p + torch.randint(3, 380, (8,), generator=g).tolist(), 24) for p in prompt_ids]
    }
    dirs = []
    for model_type, method in (("qwen2", "w4a16"), ("gemma2", "w8a8")):
        src = tiny.build(model_type, tmp_path / model_type)
        model = load_model(src).float().eval()
        cfg = QuantizeConfig(method=method, group_size=32)
        res = compress_weights(model, calib, cfg)
        out = tmp_path / f"{model_type}-{method}"
        save_compressed(model, AutoTokenizer.from_pretrained(src), res["scales"], cfg, out)
        dirs.append(str(out))
    dirs.append(str(tiny.build("mixtral", tmp_path / "mixtral")))

    def vllm_on_each(dirs: list[str], prompt_ids: list, sets: dict) -> list[dict]:
        # A local function: Ray ships it by value (test modules do not import on workers).
        from lifecycle.eval.heldout import evaluate_vllm

        answers = ["-"] * len(prompt_ids)
        return [evaluate_vllm(d, prompt_ids, answers, sets, max_new_tokens=8) for d in dirs]

    # One fresh worker for the engines, one after the other.
    task = as_task(vllm_on_each, ScalingConfig(resources_per_worker={"CPU": 2}), max_calls=1)
    served = ray.get(task.remote(dirs, prompt_ids, sets))
    for d, v in zip(dirs, served, strict=True):
        t = evaluate_torch(d, prompt_ids, ["-"] * len(prompt_ids), sets, max_new_tokens=8)
        # vLLM generated for every prompt (greedy text is not compared: on a random byte-level
        # model a near-tie flips a token and vLLM's incremental detokenizer renders partial
        # UTF-8 sequences differently)...
        assert len(v["outputs"]) == len(prompt_ids) and sum(map(bool, v["outputs"])) >= 4, v
        # ...and scores the answers as transformers does on the same checkpoint.
        assert v["perplexity"] == pytest.approx(t["perplexity"], rel=0.02), (d, v, t)
