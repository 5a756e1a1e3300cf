"""Quantization, pruning, distillation pieces and the ONNX export, on tiny random models."""

import json

import pytest
import torch

from lifecycle.compress.distill import distill_loss, student_from_teacher
from lifecycle.compress.quantize import (
    compress_weights,
    fold_scale,
    obs_compress,
    prune_mask_from_scores,
    qrange,
    rtn,
    save_compressed,
    symmetric_scales,
)
from lifecycle.config import (
    ConfigError,
    DistillConfig,
    ModelConfig,
    PruneConfig,
    QuantizeConfig,
    validate_config,
)
from lifecycle.models import build_model, load_model


class _Tok:
    """Just what build_model reads of a tokenizer."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self) -> int:
        return 96


def _model(seed: int = 0, **kw):
    cfg = dict(
        hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_position_embeddings=64
    )
    return build_model(ModelConfig(**{**cfg, **kw}), _Tok(), seed).eval()


def _layer_problem(seed: int = 0, rows: int = 48, cols: int = 64, n: int = 512):
    """A weight and correlated inputs with a few outlier channels, like real activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(n, cols, generator=g) @ (torch.eye(cols) + 2 * mix)
    x[:, :3] *= 8
    w = torch.randn(rows, cols, generator=g) * 0.1
    return w, x, 2 * x.T @ x / n


def _batches(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (4, 32), generator=g) for _ in range(n)]


def test_gptq_beats_round_to_nearest_on_layer_output():
    w, x, h = _layer_problem()
    for bits, group in ((4, 32), (8, None)):
        q_gptq, scales, _ = obs_compress(w, h, bits=bits, group_size=group)
        q_rtn, _ = rtn(w, bits, group)
        err_gptq = ((x @ (q_gptq - w).T) ** 2).mean()
        err_rtn = ((x @ (q_rtn - w).T) ** 2).mean()
        assert err_gptq < 0.8 * err_rtn, (bits, err_gptq, err_rtn)
        # Every weight lies on its scale's integer grid, inside the int range.
        full = scales.repeat_interleave(w.shape[1] // scales.shape[1], dim=1)
        ints = q_gptq / full
        qmin, qmax = qrange(bits)
        assert torch.allclose(ints, ints.round(), atol=1e-3)
        assert ints.round().min() >= qmin and ints.round().max() <= qmax


def test_pruning_masks_have_the_exact_pattern():
    w, _, h = _layer_problem(rows=32, cols=64)
    half = PruneConfig(method="magnitude", sparsity=0.5)
    keep = prune_mask_from_scores(w.abs(), half)
    assert (keep.sum(dim=1) == 32).all()  # exactly half of every row
    for r in range(32):  # magnitude: within a row, every kept weight outweighs every pruned one
        assert w[r].abs()[keep[r]].min() >= w[r].abs()[~keep[r]].max()
    two_four = prune_mask_from_scores(w.abs(), PruneConfig(pattern="2:4"))
    assert (two_four.reshape(32, 16, 4).sum(dim=-1) == 2).all()
    # SparseGPT + int4 GPTQ: pruned weights stay exactly zero, kept ones are quantized.
    for spec in (PruneConfig(method="sparsegpt", sparsity=0.5), PruneConfig(pattern="2:4")):
        q, _, mask = obs_compress(w, h, bits=4, group_size=32, prune=spec)
        assert (q[~mask] == 0).all()
        assert int((~mask).sum()) == w.numel() // 2
    # SparseGPT loses less of the layer's output than magnitude pruning at the same sparsity.
    _, x, _ = _layer_problem(rows=32, cols=64)
    q_sg, _, _ = obs_compress(w, h, bits=None, group_size=None, prune=half)
    err_sg = ((x @ (q_sg - w).T) ** 2).mean()
    err_mag = ((x @ (w * keep - w).T) ** 2).mean()
    assert err_sg < err_mag


def test_fold_scale_keeps_the_function():
    model = _model()
    ids = _batches(1)[0]
    before = model(input_ids=ids).logits
    layer = model.model.layers[0]
    s = torch.rand(64) * 3 + 0.2
    fold_scale(
        layer.input_layernorm,
        [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
        s,
    )
    fold_scale(layer.mlp.up_proj, [layer.mlp.down_proj], torch.rand(128) + 0.5)
    after = model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize("method", ["w8a8", "w4a16", "awq"])
def test_compressed_checkpoint_round_trips(tmp_path, method):
    from lifecycle.models import load_tokenizer  # noqa: F401  (the real loader path below)

    model = _model()
    ids = _batches(1, seed=5)[0]
    ref = model(input_ids=ids).logits
    cfg = QuantizeConfig(method=method, group_size=32)
    result = compress_weights(model, _batches(), cfg)
    fake = model(input_ids=ids).logits
    # The model still computes nearly the same function after quantization.
    assert torch.nn.functional.cosine_similarity(fake.flatten(), ref.flatten(), dim=0) > 0.98

    class Tok:
        def save_pretrained(self, d):
            (d / "tokenizer_config.json").write_text("{}")

    save_compressed(model, Tok(), result["scales"], cfg, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == ("int-quantized" if method == "w8a8" else "pack-quantized")
    weights = qc["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == (8 if method == "w8a8" else 4)
    assert qc["ignore"] == ["lm_head"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        name = "model.layers.0.self_attn.q_proj"
        if method == "w8a8":
            assert f.get_tensor(f"{name}.weight").dtype == torch.int8
        else:
            assert f.get_tensor(f"{name}.weight_packed").dtype == torch.int32
    assert f"{name}.weight_scale" in keys
    # transformers reads the checkpoint back (compressed-tensors) to the same function.
    loaded = load_model(tmp_path)
    got = loaded(input_ids=ids).logits.float()
    assert torch.nn.functional.cosine_similarity(got.flatten(), fake.flatten(), dim=0) > 0.99


def test_compress_prunes_every_linear_to_the_target():
    model = _model()
    cfg = QuantizeConfig(method="none", prune={"method": "sparsegpt", "sparsity": 0.5})
    result = compress_weights(model, _batches(), cfg)
    assert len(result["masks"]) == 14  # 7 linears x 2 layers
    for layer in model.model.layers:
        for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
            assert (lin.weight == 0).float().mean().item() == 0.5


def test_symmetric_scales_are_bf16_exact():
    w = torch.randn(8, 64)
    s = symmetric_scales(w, 4, 32)
    assert torch.equal(s, s.to(torch.bfloat16).float())


def test_distill_loss_and_student_init():
    teacher = _model(seed=1, intermediate_size=128)
    cfg = DistillConfig(
        student=ModelConfig(
            hidden_size=64,
            num_layers=1,
            num_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    )
    student = student_from_teacher(teacher, cfg, _Tok())
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(
        student.model.layers[0].self_attn.q_proj.weight,
        teacher.model.layers[0].self_attn.q_proj.weight,
    )
    up_rows = student.model.layers[0].mlp.up_proj.weight
    teacher_rows = teacher.model.layers[0].mlp.up_proj.weight
    assert all(any(torch.equal(r, t) for t in teacher_rows) for r in up_rows)
    ids = _batches(1)[0]
    labels = ids.clone()
    t_logits = teacher(input_ids=ids).logits
    same = distill_loss(t_logits, t_logits, labels, None, 2.0, 1.0)
    assert same.item() == pytest.approx(0.0, abs=1e-5)
    other = distill_loss(student(input_ids=ids).logits, t_logits, labels, None, 2.0, 0.5)
    assert other.item() > 0.01


def test_config_refuses_shapes_vllm_cannot_serve():
    base = {
        "pretrain": {"model": {"hidden_size": 64, "num_heads": 4, "intermediate_size": 256}},
        "quantize": {"method": "w4a16"},
    }
    with pytest.raises(ConfigError, match="head_dim 16"):
        validate_config(base)
    base["pretrain"]["model"] = {"hidden_size": 64, "num_heads": 2, "intermediate_size": 48}
    with pytest.raises(ConfigError, match="multiples of 32"):
        validate_config(base)
    with pytest.raises(ConfigError, match="2:4"):
        validate_config({"quantize": {"prune": {"pattern": "2:4", "sparsity": 0.3}}})
    with pytest.raises(ConfigError, match="does nothing"):
        validate_config({"quantize": {"method": "none"}})


def test_onnx_export_matches_pytorch(tmp_path):
    from lifecycle.compress.onnx_export import export_onnx

    model = _model()
    model.save_pretrained(tmp_path / "m")
    report = export_onnx(tmp_path / "m", tmp_path / "onnx" / "model.onnx")
    assert report["max_rel_diff"] < 1e-4
    assert (tmp_path / "onnx" / "model.onnx").stat().st_size > 0
