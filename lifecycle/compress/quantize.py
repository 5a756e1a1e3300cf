"""Post-training quantization and pruning of a dense decoder LM (Llama 3, Mistral, Qwen2/3,
Gemma 2/3, Phi-3: lifecycle/compress/layout.py has each one's table), written in the
compressed-tensors format that vLLM loads (`int-quantized` for W8A8, `pack-quantized` for
W4A16). Mixture-of-experts models are refused with the reason lifecycle/archs.py gives (the
config check prints the same words before anything trains).

Run it alone (the compression stage calls the same functions):

    from lifecycle.compress.quantize import compress_weights, save_compressed
    result = compress_weights(model, calib_batches, QuantizeConfig(method="w4a16"),
                              device="cuda", dtype=torch.bfloat16)
    save_compressed(model, tokenizer, result["scales"], cfg, out_dir)

Algorithms, all our own code on plain torch (compressed-tensors only writes the format):

- **RTN**: round to nearest with symmetric per-channel (int8) or per-group (int4) scales.
- **GPTQ** (Frantar et al. 2022): columns quantized in order, each one's rounding error
  spread over the columns not yet quantized through the inverse Hessian of the layer's
  calibration inputs (H = 2 XᵀX), in blocks, with dampening.
- **SmoothQuant** (Xiao et al. 2023), for W8A8: per input channel s = max|X|^α / max|W|^(1-α);
  the preceding RMSNorm is divided by s (Gemma's (1 + w) norms: w ← (1 + w)/s − 1) and the
  weights multiplied by it, so activation outliers move into the weights before int8 rounding.
- **AWQ** (Lin et al. 2023), int4: per input channel s = mean|X|^r, r searched on a grid to
  minimise the output error of the quantized layers on calibration inputs; s folded into the
  preceding norm or linear exactly as above (into v_proj's rows under grouped-query attention
  as one scale per kv-head channel, repeated over the query heads that share it; biases and
  the v / up blocks of fused qkv / gate_up projections scaled with their rows); then
  group-wise RTN.
- **Pruning**: magnitude (per row) or SparseGPT (Frantar & Alistarh 2023: the weights whose
  removal costs least by w²/[H⁻¹]²_jj go, the error is compensated like GPTQ), unstructured at
  a target share per row or 2:4 semi-structured; pruned weights stay exactly zero through
  quantization (symmetric scales map 0 to 0).

Layer by layer, as the reference GPTQ: the calibration set goes through the embeddings once
and the inputs of the decoder layers (with each layer's attention mask and position
embeddings) are cached; each layer is moved to the compute device, its scales folded from one
pass's statistics, its groups of linears compressed in forward order (each group's Hessian
from a pass that sees the groups before it already compressed, stopped at that group's
input), and the compressed layer run once more to give the next layer its inputs. Forward
work is O(layers) (`log["layer_forwards"]` counts decoder-layer calls). Forward passes run in
the given compute dtype (autocast), Hessians and weight math in fp32; the weights stay in the
model's dtype (fp32 in the stage) so they stay exactly on their int grid. Embeddings and
`lm_head` (tied or not) are never changed or quantized.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lifecycle.compress.layout import (
    Heads,
    NotQuantizable,
    check_layer,
    heads_of,
    layout_for,
    provider_rows,
)
from lifecycle.config import PruneConfig, QuantizeConfig

__all__ = ["NotQuantizable", "compress_weights", "save_compressed"]

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
    h += dampening * torch.mean(torch.diag(h)) * torch.eye(cols, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    if group_size is not None:  # keep every group inside one block
        blocksize = group_size * max(1, blocksize // group_size)
    scales = None
    if bits is not None:
        scales = (
            symmetric_scales(w, bits, None)
            if group_size is None
            else torch.zeros(rows, cols // group_size, device=w.device)
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
# Calibration: the inputs of each decoder layer, captured once and carried layer to layer
# --------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what it needed has been seen."""


@dataclass
class InputStats:
    """What the calibration inputs of one linear (or of a group sharing an input) look like."""

    hessian: torch.Tensor | None
    absmax: torch.Tensor
    absmean: torch.Tensor
    sample: torch.Tensor
    rows: int = 0


class _Accumulator:
    """Running input statistics of one linear: H = 2/n Σ xxᵀ (fp32, only when asked), max|x|
    and mean|x| per input channel, and the first AWQ_SAMPLE_ROWS input rows."""

    def __init__(self, hessian: bool) -> None:
        self.want_h = hessian
        self.h: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.n = 0
        self.rows: list[torch.Tensor] = []
        self.kept = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.max is None:
            self.max = torch.zeros(x.shape[1], device=x.device)
            self.sum = torch.zeros(x.shape[1], device=x.device)
            if self.want_h:
                self.h = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        if self.h is not None:
            # Called from inside the layer's forward: leave its autocast, or XᵀX is summed in
            # bf16 and comes out indefinite.
            with torch.autocast(x.device.type, enabled=False):
                self.h += x.T @ x
        self.max = torch.maximum(self.max, x.abs().amax(dim=0))
        self.sum += x.abs().sum(dim=0)
        self.n += x.shape[0]
        if self.kept < AWQ_SAMPLE_ROWS:
            take = x[: AWQ_SAMPLE_ROWS - self.kept]
            self.rows.append(take)
            self.kept += take.shape[0]

    def stats(self) -> InputStats:
        return InputStats(
            hessian=None if self.h is None else 2 * self.h / self.n,
            absmax=self.max,
            absmean=self.sum / self.n,
            sample=torch.cat(self.rows),
            rows=self.n,
        )


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack (`model.model` of a *ForCausalLM) holding `.layers`."""
    inner = getattr(model, "model", model)
    if not isinstance(getattr(inner, "layers", None), nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layers at .model.layers")
    return inner


def capture_layer_inputs(
    model: nn.Module, batches: list[torch.Tensor], device: torch.device, dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict[str, Any]]]]]:
    """Runs the calibration batches through the embeddings once and returns what decoder
    layer 0 receives (hidden states, in `dtype`, on `device`) and what every layer is called
    with besides them ([layer][batch] → (args, kwargs): attention mask, position embeddings
    — per layer, since Gemma's sliding and global layers get different ones).

    Every layer's forward is swapped for a recorder that hands its input straight on, and the
    last one ends the pass, so no layer computes anything (the "Catcher" of GPTQ/AutoGPTQ,
    extended to all layers). Only the modules outside the layers visit `device`."""
    inner = base_model(model)
    layers = list(inner.layers)
    home = next(model.parameters()).device
    outside = [m for n, m in inner.named_children() if n != "layers"]
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict[str, Any]]]] = [[] for _ in layers]

    def recorder(i: int):
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if i == 0:
                hidden.append(hidden_states.detach().to(dtype))
            calls[i].append((args, kwargs))
            if i == len(layers) - 1:
                raise _Stop
            return hidden_states

        return forward

    # A forward already set on the instance (accelerate's offload hooks wrap it so) is put back.
    own = [layer.__dict__.get("forward") for layer in layers]
    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        for m in outside:
            m.to(device)
        with _autocast(device, dtype):
            for ids in batches:
                with contextlib.suppress(_Stop):
                    model(input_ids=ids.to(device), use_cache=False)
    finally:
        for layer, forward in zip(layers, own, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
        for m in outside:
            m.to(home)
    return hidden, calls


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class LayerRunner:
    """Forward passes of one decoder layer over the cached calibration inputs, counted."""

    def __init__(
        self,
        layer: nn.Module,
        hidden: list[torch.Tensor],
        calls: list[tuple[tuple, dict[str, Any]]],
        device: torch.device,
        dtype: torch.dtype,
        log: dict[str, Any],
    ) -> None:
        self.layer, self.hidden, self.calls = layer, hidden, calls
        self.device, self.dtype, self.log = device, dtype, log

    def _forward(self, b: int) -> torch.Tensor:
        self.log["layer_forwards"] += 1
        args, kwargs = self.calls[b]
        with _autocast(self.device, self.dtype):
            return self.layer(self.hidden[b], *args, **kwargs)

    def stats(self, modules: dict[str, nn.Module], *, hessian: bool) -> dict[str, InputStats]:
        """Input statistics of `modules` (in forward order); each pass stops at the input of
        the last one."""
        acc = {n: _Accumulator(hessian) for n in modules}
        last = list(modules)[-1]

        def hook(name: str):
            def f(_mod: nn.Module, args: tuple) -> None:
                acc[name].add(args[0])
                if name == last:
                    raise _Stop

            return f

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
        try:
            for b in range(len(self.hidden)):
                with contextlib.suppress(_Stop):
                    self._forward(b)
        finally:
            for h in handles:
                h.remove()
        return {n: a.stats() for n, a in acc.items()}

    def outputs(self) -> list[torch.Tensor]:
        """The (compressed) layer's outputs: the next layer's inputs."""
        return [self._forward(b).detach().to(self.dtype) for b in range(len(self.hidden))]


# --------------------------------------------------------------------------------------------
# Scale folding: SmoothQuant and AWQ
# --------------------------------------------------------------------------------------------


def expand_heads(s: torch.Tensor, heads: Heads) -> torch.Tensor:
    """Per kv-head channel (kv·head_dim) → per query-head channel (heads·head_dim): query head
    h reads kv head h // repeat (transformers' repeat_kv and SDPA's enable_gqa)."""
    return s.reshape(heads.num_kv_heads, 1, heads.head_dim).expand(-1, heads.repeat, -1).reshape(-1)


def reduce_heads(v: torch.Tensor, heads: Heads, how: str = "mean") -> torch.Tensor:
    """Per query-head channel → per kv-head channel, over the query heads that share it."""
    g = v.reshape(heads.num_kv_heads, heads.repeat, heads.head_dim)
    return (g.mean(dim=1) if how == "mean" else g.amax(dim=1)).reshape(-1)


def fold_scale(
    provider: nn.Module,
    linears: list[nn.Linear],
    s: torch.Tensor,
    *,
    kind: str | None = None,
    rows: slice | None = None,
    heads: Heads | None = None,
) -> None:
    """Divides the provider's output channels by `s` and multiplies the linears' input
    columns by it (repeated over the query heads sharing a kv head when `heads` is given):
    the function computed is unchanged (up to float rounding).

    `kind` (default: "linear" for an nn.Linear, else "rmsnorm"): "rmsnorm" divides the
    norm's weight; "rmsnorm_plus_one" (Gemma's (1 + w)) sets w ← (1 + w) / s − 1; "linear"
    divides the output rows `rows` (all by default) and their bias entries."""
    kind = kind or ("linear" if isinstance(provider, nn.Linear) else "rmsnorm")
    s = s.detach().float()
    with torch.no_grad():
        w = provider.weight
        if kind == "linear":
            sl = rows if rows is not None else slice(None)
            w[sl] = (w[sl].float() / s.to(w.device).reshape(-1, 1)).to(w.dtype)
            if provider.bias is not None:
                b = provider.bias
                b[sl] = (b[sl].float() / s.to(b.device)).to(b.dtype)
        elif kind == "rmsnorm":
            w.copy_((w.float() / s.to(w.device)).to(w.dtype))
        elif kind == "rmsnorm_plus_one":
            w.copy_(((1 + w.float()) / s.to(w.device) - 1).to(w.dtype))
        else:
            raise ValueError(f"unknown provider kind {kind!r}")
        s_in = expand_heads(s, heads) if heads is not None else s
        for lin in linears:
            lw = lin.weight
            lw.copy_((lw.float() * s_in.to(lw.device).reshape(1, -1)).to(lw.dtype))


def smoothquant_scales(
    absmax: torch.Tensor, linears: list[nn.Linear], alpha: float
) -> torch.Tensor:
    wmax = torch.stack([lin.weight.detach().abs().amax(dim=0).float() for lin in linears])
    wmax = wmax.amax(dim=0).clamp(min=1e-5)
    return (absmax.clamp(min=1e-5) ** alpha / wmax ** (1 - alpha)).clamp(min=1e-5)


def awq_scales(
    stats: InputStats,
    linears: list[nn.Linear],
    bits: int,
    group_size: int,
    grid: int,
    heads: Heads | None = None,
) -> tuple[torch.Tensor, float]:
    """The per-channel scale s = mean|x|^r (r on a grid in [0, 1)) that minimises the output
    error of the group-quantized linears on the sampled inputs; returns (s, best r).

    With `heads` (v → o under grouped-query attention) s has one entry per kv-head channel,
    from mean|x| averaged over the query heads that read it, and is searched as repeated over
    them: the only scales a fold into v_proj can carry exactly."""
    x = stats.sample
    ref = [x @ lin.weight.detach().float().T for lin in linears]
    base = stats.absmean.clamp(min=1e-6)
    if heads is not None:
        base = reduce_heads(base, heads)
    best, best_r, best_err = torch.ones_like(base), 0.0, math.inf
    for k in range(grid):
        r = k / grid
        s = base**r
        s = s / (s.max() * s.min()).sqrt()
        s_in = (expand_heads(s, heads) if heads is not None else s).reshape(1, -1)
        err = 0.0
        for lin, y in zip(linears, ref, strict=True):
            wq, _ = rtn(lin.weight.detach().float() * s_in, bits, group_size)
            err += float(((x @ (wq / s_in).T - y) ** 2).mean())
        if err < best_err:
            best, best_r, best_err = s, r, err
    return best, best_r


# --------------------------------------------------------------------------------------------
# The whole model, layer by layer
# --------------------------------------------------------------------------------------------


def _compress_linear(
    lin: nn.Linear,
    hessian: torch.Tensor | None,
    cfg: QuantizeConfig,
    bits: int | None,
    group: int | None,
    use_gptq: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    keep = None
    if cfg.prune is not None and cfg.prune.method == "magnitude":
        keep = prune_mask_from_scores(lin.weight.detach().float().abs(), cfg.prune)
    if hessian is not None:
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
        return w, sc, keep
    if bits is not None:
        w, sc = rtn(lin.weight, bits, group, keep)
        return w, sc, keep
    return lin.weight.detach().float() * keep, None, keep


@torch.no_grad()
def compress_weights(
    model: nn.Module,
    batches: list[torch.Tensor],
    cfg: QuantizeConfig,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Prunes and/or quantizes every decoder linear of `model` in place (weights become their
    dequantized values, in the model's own dtype: keep it fp32 so they stay on the grid).

    Layer by layer on `device` (default: where the model is): the calibration `batches` go
    through the embeddings once; each layer is moved to `device`, compressed from the cached
    inputs and run once more to produce the next layer's inputs, then moved back. Forward
    passes run in `dtype` (autocast when not fp32); Hessians and weight math in fp32.

    Returns {"scales": {module name: scale tensor}, "masks": {module name: keep mask},
    "log": {"smoothquant_layers", "awq_ratios", "calibration_passes" (model forwards, one
    per batch; 0 for RTN / magnitude pruning, which read only the weights), "layer_forwards"
    (decoder-layer calls, one per batch each)}}; raises NotQuantizable for an architecture
    the compressors refuse (MoE)."""
    method, bits = cfg.method, BITS.get(cfg.method)
    group = cfg.group_size if method in ("w4a16", "awq") else None
    use_gptq = bits is not None and method != "awq" and cfg.algorithm == "gptq"
    needs_h = use_gptq or (cfg.prune is not None and cfg.prune.method == "sparsegpt")
    smooth = method == "w8a8" and cfg.smoothquant_alpha is not None
    scales: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    log: dict[str, Any] = {
        "smoothquant_layers": 0,
        "awq_ratios": {},
        "calibration_passes": 0,
        "layer_forwards": 0,
    }
    if bits is None and cfg.prune is None:
        return {"scales": scales, "masks": masks, "log": log}
    layout = layout_for(model.config)
    heads = heads_of(model.config)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    model.eval()
    folds = [
        g for g in layout.groups if method == "awq" or (smooth and g.provider.kind != "linear")
    ]
    # Round-to-nearest and magnitude pruning read only the weights: no calibration at all.
    calibrate = needs_h or bool(folds)
    if calibrate:
        hidden, calls = capture_layer_inputs(model, batches, device, dtype)
        log["calibration_passes"] = len(batches)
    for i, layer in enumerate(base_model(model).layers):
        prefix = f"model.layers.{i}"
        check_layer(layout, layer, model.config)
        layer.to(device)
        run = LayerRunner(layer, hidden, calls[i], device, dtype, log) if calibrate else None
        # Phase 1: fold per-channel scales (SmoothQuant / AWQ), statistics from one pass
        # (folds keep the layer's function, so one pass serves every group).
        if folds:
            stats = run.stats(
                {g.linears[0]: layer.get_submodule(g.linears[0]) for g in folds}, hessian=False
            )
            for g in folds:
                st, p = stats[g.linears[0]], g.provider
                linears = [layer.get_submodule(n) for n in g.linears]
                fold_heads = heads if p.through_heads else None
                if method == "awq":
                    s, r = awq_scales(st, linears, bits, group, cfg.awq_grid, fold_heads)
                    log["awq_ratios"][f"{prefix}.{g.linears[0]}"] = r
                else:
                    s = smoothquant_scales(st.absmax, linears, cfg.smoothquant_alpha)
                    log["smoothquant_layers"] += 1
                fold_scale(
                    layer.get_submodule(p.module),
                    linears,
                    s,
                    kind=p.kind,
                    rows=provider_rows(p, model.config),
                    heads=fold_heads,
                )
        # Phase 2: prune and quantize, each group seeing the compressed groups before it.
        for g in layout.groups:
            linears = [layer.get_submodule(n) for n in g.linears]
            hessian = (
                run.stats({g.linears[0]: linears[0]}, hessian=True)[g.linears[0]].hessian
                if needs_h
                else None
            )
            for name, lin in zip(g.linears, linears, strict=True):
                w, sc, keep = _compress_linear(lin, hessian, cfg, bits, group, use_gptq)
                lin.weight.copy_(w.to(lin.weight.dtype))
                if sc is not None:
                    scales[f"{prefix}.{name}"] = sc.to(home)
                if keep is not None:
                    masks[f"{prefix}.{name}"] = keep.to(home)
        if run is not None:
            hidden = run.outputs()
        layer.to(home)
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
