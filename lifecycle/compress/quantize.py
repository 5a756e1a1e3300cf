"""Post-training quantization and pruning of a Llama-family model, written in the
compressed-tensors format that vLLM loads (`int-quantized` for W8A8, `pack-quantized` for W4A16).

Run it alone (the compression stage calls the same function):

    from lifecycle.compress.quantize import compress
    report = compress(model, calib_ids, QuantizeConfig(method="w4a16"), out_dir, tokenizer)

Algorithms, all our own code on plain torch (compressed-tensors only writes the format):

- **RTN**: round to nearest with symmetric per-channel (int8) or per-group (int4) scales.
- **GPTQ** (Frantar et al. 2022): columns quantized in order, each one's rounding error
  spread over the columns not yet quantized through the inverse Hessian of the layer's
  calibration inputs (H = 2 XᵀX), in blocks, with dampening.
- **SmoothQuant** (Xiao et al. 2023), for W8A8: per input channel s = max|X|^α / max|W|^(1-α);
  the preceding RMSNorm is divided by s and the weights multiplied by it, so activation
  outliers move into the weights before int8 rounding of both.
- **AWQ** (Lin et al. 2023), int4: per input channel s = mean|X|^r, r searched on a grid to
  minimise the output error of the quantized layers on calibration inputs; s folded into the
  preceding norm (or linear) exactly as above; then group-wise RTN.
- **Pruning**: magnitude (per row) or SparseGPT (Frantar & Alistarh 2023: the weights whose
  removal costs least by w²/[H⁻¹]²_jj go, the error is compensated like GPTQ), unstructured at
  a target share per row or 2:4 semi-structured; pruned weights stay exactly zero through
  quantization (symmetric scales map 0 to 0).

Layers are processed in forward order, each group of linears that share an input seeing the
already-compressed layers before it (as GPTQ does sequentially).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lifecycle.config import PruneConfig, QuantizeConfig

# (input provider, linears sharing that input) per decoder layer, in forward order. The
# provider is what AWQ/SmoothQuant fold their per-channel scale into: an RMSNorm (its weight)
# or a linear (its output rows) whose output is that input, up to linear operations.
LLAMA_GROUPS: tuple[tuple[str | None, tuple[str, ...]], ...] = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
BITS = {"w8a8": 8, "w4a16": 4, "awq": 4}
AWQ_SAMPLE_ROWS = 4096


def qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def symmetric_scales(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Scale per row (group_size None) or per (row, group): max|w| / ((qmax - qmin) / 2), as
    compressed-tensors computes it, rounded to bf16 so the saved checkpoint holds exactly it."""
    qmin, qmax = qrange(bits)
    rows, cols = w.shape
    g = w.abs() if group_size is None else w.abs().reshape(rows, cols // group_size, group_size)
    amax = g.amax(dim=-1) if group_size is not None else g.amax(dim=1, keepdim=True)
    scale = (amax / ((qmax - qmin) / 2)).clamp(min=1e-8)
    return scale.to(torch.bfloat16).float()


def fake_quant(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """round(w / scale) clamped to the int range, times scale (scale broadcasts over w)."""
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(w / scale), qmin, qmax) * scale


def expand_scale(scale: torch.Tensor, cols: int) -> torch.Tensor:
    """(rows, groups) or (rows, 1) scales → (rows, cols)."""
    return scale.repeat_interleave(cols // scale.shape[1], dim=1)


# --------------------------------------------------------------------------------------------
# Pruning masks and the GPTQ / SparseGPT solver
# --------------------------------------------------------------------------------------------


def prune_mask_from_scores(score: torch.Tensor, spec: PruneConfig) -> torch.Tensor:
    """True where a weight is kept: per row, the lowest-score share goes (unstructured), or
    the two lowest of every four consecutive inputs (2:4)."""
    rows, cols = score.shape
    if spec.pattern == "2:4":
        if cols % 4:
            raise ValueError(f"2:4 sparsity needs input dims divisible by 4, got {cols}")
        g = score.reshape(rows, cols // 4, 4)
        drop = g.topk(2, dim=-1, largest=False).indices
        keep = torch.ones_like(g, dtype=torch.bool).scatter_(-1, drop, False)
        return keep.reshape(rows, cols)
    k = round(cols * spec.sparsity)
    keep = torch.ones_like(score, dtype=torch.bool)
    if k:
        keep.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
    return keep


def obs_compress(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int | None,
    group_size: int | None,
    prune: PruneConfig | None = None,
    keep: torch.Tensor | None = None,
    dampening: float = 0.01,
    blocksize: int = 128,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """GPTQ quantization and/or SparseGPT pruning of one linear weight (out × in).

    `bits` None: no quantization. `prune` set: SparseGPT chooses the mask block by block;
    `keep` set: a fixed mask (e.g. from magnitude pruning) is respected. Returns (the new
    weight, dequantized; its scales or None; the keep mask or None).
    """
    w = weight.detach().float().clone()
    rows, cols = w.shape
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += dampening * torch.mean(torch.diag(h)) * torch.eye(cols)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    if group_size is not None:  # keep every group inside one block
        blocksize = group_size * max(1, blocksize // group_size)
    scales = None
    if bits is not None:
        scales = (
            symmetric_scales(w, bits, None)
            if group_size is None
            else torch.zeros(rows, cols // group_size)
        )
    mask = keep.clone() if keep is not None else None
    if prune is not None:
        mask = torch.ones_like(w, dtype=torch.bool)
    q_all = torch.zeros_like(w)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        if prune is not None and prune.pattern == "unstructured":
            score = w1**2 / torch.diag(hinv1).reshape(1, -1) ** 2
            mask[:, i1:i2] = prune_mask_from_scores(score, prune)
        for i in range(i2 - i1):
            col = i1 + i
            wc, d = w1[:, i], hinv1[i, i]
            if prune is not None and prune.pattern == "2:4" and i % 4 == 0:
                score = w1[:, i : i + 4] ** 2 / torch.diag(hinv1)[i : i + 4].reshape(1, -1) ** 2
                mask[:, col : col + 4] = prune_mask_from_scores(score, prune)
            if bits is not None and group_size is not None and col % group_size == 0:
                sub = w1[:, i : i + group_size]
                if mask is not None:
                    sub = sub * mask[:, col : col + group_size]
                scales[:, col // group_size] = symmetric_scales(sub, bits, None)[:, 0]
            q = wc
            if bits is not None:
                s = scales[:, 0] if group_size is None else scales[:, col // group_size]
                q = fake_quant(wc, s, bits)
            if mask is not None:
                q = q * mask[:, col]
            q1[:, i] = q
            err = (wc - q) / d
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        q_all[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q_all, scales, mask


def rtn(
    weight: torch.Tensor, bits: int, group_size: int | None, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization (masked weights stay zero)."""
    w = weight.detach().float()
    if keep is not None:
        w = w * keep
    scale = symmetric_scales(w, bits, group_size)
    return fake_quant(w, expand_scale(scale, w.shape[1]), bits), scale


# --------------------------------------------------------------------------------------------
# Calibration statistics
# --------------------------------------------------------------------------------------------


@dataclass
class InputStats:
    """What the calibration inputs of one linear (or of a group sharing an input) look like."""

    hessian: torch.Tensor
    absmax: torch.Tensor
    absmean: torch.Tensor
    sample: torch.Tensor
    rows: int = 0
    _chunks: list[torch.Tensor] = field(default_factory=list)


def collect_input_stats(
    model: nn.Module, modules: dict[str, nn.Linear], batches: list[torch.Tensor]
) -> dict[str, InputStats]:
    """Runs the calibration batches and records, per module: H = 2/n Σ xxᵀ, max|x| and
    mean|x| per input channel, and up to AWQ_SAMPLE_ROWS input rows."""
    acc: dict[str, dict[str, Any]] = {}

    def hook(name: str):
        def f(_mod: nn.Module, args: tuple, _out: Any) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            a = acc.setdefault(
                name,
                {
                    "h": torch.zeros(x.shape[1], x.shape[1]),
                    "max": torch.zeros(x.shape[1]),
                    "sum": torch.zeros(x.shape[1]),
                    "n": 0,
                    "rows": [],
                    "kept": 0,
                },
            )
            a["h"] += x.T @ x
            a["max"] = torch.maximum(a["max"], x.abs().amax(dim=0))
            a["sum"] += x.abs().sum(dim=0)
            a["n"] += x.shape[0]
            if a["kept"] < AWQ_SAMPLE_ROWS:
                take = x[: AWQ_SAMPLE_ROWS - a["kept"]]
                a["rows"].append(take)
                a["kept"] += take.shape[0]

        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {
        n: InputStats(
            hessian=2 * a["h"] / a["n"],
            absmax=a["max"],
            absmean=a["sum"] / a["n"],
            sample=torch.cat(a["rows"]),
            rows=a["n"],
        )
        for n, a in acc.items()
    }


# --------------------------------------------------------------------------------------------
# Scale folding: SmoothQuant and AWQ
# --------------------------------------------------------------------------------------------


def fold_scale(provider: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Divides the provider's output channels by `s` and multiplies the linears' input
    columns by it: the function computed is unchanged (up to float rounding)."""
    with torch.no_grad():
        if isinstance(provider, nn.Linear):
            provider.weight.div_(s.reshape(-1, 1).to(provider.weight.dtype))
            if provider.bias is not None:
                provider.bias.div_(s.to(provider.bias.dtype))
        else:  # RMSNorm: y = w ⊙ x / rms(x)
            provider.weight.div_(s.to(provider.weight.dtype))
        for lin in linears:
            lin.weight.mul_(s.reshape(1, -1).to(lin.weight.dtype))


def smoothquant_scales(
    absmax: torch.Tensor, linears: list[nn.Linear], alpha: float
) -> torch.Tensor:
    wmax = torch.stack([lin.weight.detach().abs().amax(dim=0).float() for lin in linears])
    wmax = wmax.amax(dim=0).clamp(min=1e-5)
    return (absmax.clamp(min=1e-5) ** alpha / wmax ** (1 - alpha)).clamp(min=1e-5)


def awq_scales(
    stats: InputStats, linears: list[nn.Linear], bits: int, group_size: int, grid: int
) -> tuple[torch.Tensor, float]:
    """The per-channel scale s = mean|x|^r (r on a grid in [0, 1)) that minimises the output
    error of the group-quantized linears on the sampled inputs; returns (s, best r)."""
    x = stats.sample
    ref = [x @ lin.weight.detach().float().T for lin in linears]
    base = stats.absmean.clamp(min=1e-6)
    best, best_r, best_err = torch.ones_like(base), 0.0, math.inf
    for k in range(grid):
        r = k / grid
        s = base**r
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for lin, y in zip(linears, ref, strict=True):
            w = lin.weight.detach().float() * s.reshape(1, -1)
            wq, _ = rtn(w, bits, group_size)
            err += float(((x @ (wq / s.reshape(1, -1)).T - y) ** 2).mean())
        if err < best_err:
            best, best_r, best_err = s, r, err
    return best, best_r


# --------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    inner = getattr(model, "model", model)
    if not hasattr(inner, "layers") or model.config.model_type != "llama":
        raise ValueError(
            f"quantization supports Llama-family models; got model_type {model.config.model_type!r}"
        )
    for i, layer in enumerate(inner.layers):
        yield f"model.layers.{i}", layer


@torch.no_grad()
def compress_weights(
    model: nn.Module, batches: list[torch.Tensor], cfg: QuantizeConfig
) -> dict[str, Any]:
    """Prunes and/or quantizes every decoder linear of `model` in place (weights become their
    dequantized values); returns {module name: scale tensor} under "scales" and a log."""
    method, bits = cfg.method, BITS.get(cfg.method)
    group = cfg.group_size if method in ("w4a16", "awq") else None
    use_gptq = bits is not None and method != "awq" and cfg.algorithm == "gptq"
    scales: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    log: dict[str, Any] = {"smoothquant_layers": 0, "awq_ratios": {}}
    model.eval()
    for prefix, layer in decoder_layers(model):
        # Phase 1: fold per-channel scales (SmoothQuant / AWQ) into the layer, group by group.
        for provider_name, names in LLAMA_GROUPS:
            if provider_name is None:
                continue
            linears = [layer.get_submodule(n) for n in names]
            provider = layer.get_submodule(provider_name)
            first = f"{prefix}.{names[0]}"
            if method == "w8a8" and cfg.smoothquant_alpha is not None:
                if isinstance(provider, nn.Linear):
                    continue  # SmoothQuant smooths what feeds the int8 activations: the norms
                stats = collect_input_stats(model, {first: linears[0]}, batches)[first]
                fold_scale(
                    provider,
                    linears,
                    smoothquant_scales(stats.absmax, linears, cfg.smoothquant_alpha),
                )
                log["smoothquant_layers"] += 1
            elif method == "awq":
                stats = collect_input_stats(model, {first: linears[0]}, batches)[first]
                s, r = awq_scales(stats, linears, bits, group, cfg.awq_grid)
                fold_scale(provider, linears, s)
                log["awq_ratios"][first] = r
        # Phase 2: prune and quantize, each group seeing the compressed groups before it.
        for _provider, names in LLAMA_GROUPS:
            linears = [layer.get_submodule(n) for n in names]
            full = [f"{prefix}.{n}" for n in names]
            needs_h = use_gptq or (cfg.prune is not None and cfg.prune.method == "sparsegpt")
            hessian = (
                collect_input_stats(model, {full[0]: linears[0]}, batches)[full[0]].hessian
                if needs_h
                else None
            )
            for name, lin in zip(full, linears, strict=True):
                keep = None
                if cfg.prune is not None and cfg.prune.method == "magnitude":
                    keep = prune_mask_from_scores(lin.weight.detach().float().abs(), cfg.prune)
                if needs_h:
                    sparsegpt = cfg.prune if cfg.prune and cfg.prune.method == "sparsegpt" else None
                    w, sc, keep = obs_compress(
                        lin.weight,
                        hessian,
                        bits=bits if use_gptq else None,
                        group_size=group,
                        prune=sparsegpt,
                        keep=keep,
                        dampening=cfg.gptq_dampening,
                    )
                    if bits is not None and not use_gptq:  # SparseGPT, then RTN/AWQ rounding
                        w, sc = rtn(w, bits, group, keep)
                elif bits is not None:
                    w, sc = rtn(lin.weight, bits, group, keep)
                else:
                    w, sc = lin.weight.detach().float() * keep, None
                lin.weight.copy_(w.to(lin.weight.dtype))
                if sc is not None:
                    scales[name] = sc
                if keep is not None:
                    masks[name] = keep
    return {"scales": scales, "masks": masks, "log": log}


def scheme_for(cfg: QuantizeConfig) -> dict[str, Any] | None:
    """The compressed-tensors scheme of a method (None for method none)."""
    from compressed_tensors.quantization import QuantizationArgs

    if cfg.method == "w8a8":
        return {
            "weights": QuantizationArgs(
                num_bits=8, type="int", strategy="channel", symmetric=True, dynamic=False
            ),
            "input_activations": QuantizationArgs(
                num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True
            ),
        }
    if cfg.method in ("w4a16", "awq"):
        return {
            "weights": QuantizationArgs(
                num_bits=4,
                type="int",
                strategy="group",
                group_size=cfg.group_size,
                symmetric=True,
                dynamic=False,
            )
        }
    return None


def save_compressed(
    model: nn.Module,
    tokenizer: Any,
    scales: dict[str, torch.Tensor],
    cfg: QuantizeConfig,
    out_dir: Path,
) -> None:
    """Writes `model` (weights already on the quantization grid) in the compressed-tensors
    format, in bf16 with int8 / packed int4 weights; method none writes plain bf16."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    scheme = scheme_for(cfg)
    if scheme is None:
        model.to(torch.bfloat16).save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        return
    qcfg = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], **scheme)},
        ignore=["lm_head"],
        quantization_status=QuantizationStatus.FROZEN,
    )
    apply_quantization_config(model, qcfg)
    for name, mod in model.named_modules():
        if getattr(mod, "quantization_scheme", None) is None:
            continue
        if name not in scales:
            raise RuntimeError(f"no quantization scale was computed for {name}")
        mod.weight_scale.data.copy_(scales[name].reshape(mod.weight_scale.shape))
    fmt = "int-quantized" if cfg.method == "w8a8" else "pack-quantized"
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    # Everything still floating point (embeddings, norms, scales) is stored in bf16; the
    # scales were rounded to bf16 before quantizing, so this cast is exact for them.
    for p in list(model.parameters()) + list(model.buffers()):
        if p.is_floating_point():
            p.data = p.data.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out_dir)
    compressor.update_config(str(out_dir))
    tokenizer.save_pretrained(out_dir)


def sparsity_of(masks: dict[str, torch.Tensor]) -> float:
    """Share of zeros over all pruned weights."""
    total = sum(m.numel() for m in masks.values())
    return sum(int((~m).sum()) for m in masks.values()) / max(1, total)


def dir_size_bytes(path: str | Path) -> int:
    """Bytes of the weight files (safetensors) in a model directory."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
