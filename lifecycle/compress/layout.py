"""Which linears of a decoder layer share an input, and what produces that input, per
architecture: the table SmoothQuant/AWQ fold their scales through and GPTQ walks in order.

    from lifecycle.compress.layout import layout_for
    layout = layout_for(model.config)        # raises the ARCHS refusal for Mixtral
    for g in layout.groups: g.linears, g.provider.module, g.provider.kind

One small table per architecture (as llm-compressor's smoothquant/AWQ mappings and AutoAWQ's
`get_layers_for_scaling`), checked against the layer it is applied to (`check_layer`): every
nn.Linear of the layer must be in exactly one group, and every provider's channels must match
its consumers' inputs, so a layout that does not fit a model fails before anything is folded.

Provider kinds:
- `rmsnorm`: y = w ⊙ x / rms(x) (Llama, Mistral, Qwen2/3, Phi-3): w / s folds a scale.
- `rmsnorm_plus_one`: y = (1 + w) ⊙ x / rms(x) (Gemma 2/3): the fold is w ← (1 + w) / s − 1.
- `linear`: a linear whose output rows (or a slice of them, for fused projections) are the
  consumers' input channels up to a linear map: v_proj → o_proj through attention (a value
  channel of kv head j feeds the same channel of every query head that shares j, so under
  grouped-query attention one scale per kv-head channel is repeated over those heads), and
  up_proj → down_proj through act(gate) ⊙ up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from lifecycle.archs import ARCHS


@dataclass(frozen=True)
class Provider:
    """What produces a group's input: where a per-channel scale is divided out."""

    module: str
    kind: Literal["rmsnorm", "rmsnorm_plus_one", "linear"]
    # For a fused linear, which of its output blocks feeds the group: "v" of qkv_proj, "up"
    # of gate_up_proj; None: all rows.
    rows: Literal["v", "up"] | None = None
    # True where the provider's channels reach the consumers through attention heads
    # (v → o): each kv-head channel feeds num_heads / num_kv_heads query-head channels.
    through_heads: bool = False


@dataclass(frozen=True)
class Group:
    """Linears of one decoder layer that read the same input, in forward order."""

    linears: tuple[str, ...]
    provider: Provider


@dataclass(frozen=True)
class Layout:
    groups: tuple[Group, ...]


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def _dense(mlp_norm: str, norm_kind: Literal["rmsnorm", "rmsnorm_plus_one"]) -> Layout:
    return Layout(
        (
            Group(_QKV, Provider("input_layernorm", norm_kind)),
            Group(
                ("self_attn.o_proj",),
                Provider("self_attn.v_proj", "linear", through_heads=True),
            ),
            Group(("mlp.gate_proj", "mlp.up_proj"), Provider(mlp_norm, norm_kind)),
            Group(("mlp.down_proj",), Provider("mlp.up_proj", "linear")),
        )
    )


LLAMA = _dense("post_attention_layernorm", "rmsnorm")
# Gemma 2/3: post_attention_layernorm normalises the attention output before the residual
# add; the MLP reads pre_feedforward_layernorm. Both norms scale by (1 + weight).
GEMMA = _dense("pre_feedforward_layernorm", "rmsnorm_plus_one")
PHI3 = Layout(
    (
        Group(("self_attn.qkv_proj",), Provider("input_layernorm", "rmsnorm")),
        Group(
            ("self_attn.o_proj",),
            Provider("self_attn.qkv_proj", "linear", rows="v", through_heads=True),
        ),
        Group(("mlp.gate_up_proj",), Provider("post_attention_layernorm", "rmsnorm")),
        Group(("mlp.down_proj",), Provider("mlp.gate_up_proj", "linear", rows="up")),
    )
)

LAYOUTS: dict[str, Layout] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,  # q/k/v biases: divided with their rows
    "qwen3": LLAMA,  # q/k norms act per head after q/k_proj: outside every fold
    "gemma2": GEMMA,
    "gemma3_text": GEMMA,
    "phi3": PHI3,
}


class NotQuantizable(ValueError):
    """A model_type the compressors refuse; the message is the config check's."""


def layout_for(config: Any) -> Layout:
    """The layout of `config.model_type`; raises NotQuantizable with the reason ARCHS gives
    (the same words the config check prints before anything trains)."""
    mt = config.model_type
    arch = ARCHS.get(mt)
    if arch is not None and arch.quantize_refusal:
        raise NotQuantizable(f"{arch.family}: {arch.quantize_refusal}")
    if mt not in LAYOUTS:
        raise NotQuantizable(
            f"model_type {mt!r} is not one the compressors know ({', '.join(sorted(LAYOUTS))})"
        )
    return LAYOUTS[mt]


@dataclass(frozen=True)
class Heads:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def repeat(self) -> int:
        return self.num_heads // self.num_kv_heads


def heads_of(config: Any) -> Heads:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Heads(heads, kv, head_dim)


def provider_rows(p: Provider, config: Any) -> slice | None:
    """The provider's output rows that feed the group (None: a norm, or all rows)."""
    if p.rows == "v":
        h = heads_of(config)
        q, kv = h.num_heads * h.head_dim, h.num_kv_heads * h.head_dim
        return slice(q + kv, q + 2 * kv)
    if p.rows == "up":
        i = config.intermediate_size
        return slice(i, 2 * i)
    return None


def check_layer(layout: Layout, layer: nn.Module, config: Any) -> None:
    """Raises ValueError unless `layout` covers every linear of `layer` once and each
    provider's channels (expanded over heads where it feeds attention) match its consumers."""
    linears = {n for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    listed = [n for g in layout.groups for n in g.linears]
    missing, extra = linears - set(listed), set(listed) - linears
    if missing or extra or len(listed) != len(set(listed)):
        raise ValueError(
            f"{config.model_type}: the compression layout does not fit this model's decoder "
            f"layer (linears not covered: {sorted(missing)}; named but absent: {sorted(extra)})"
        )
    h = heads_of(config)
    for g in layout.groups:
        p = layer.get_submodule(g.provider.module)
        rows = provider_rows(g.provider, config)
        if g.provider.kind == "linear":
            n = p.out_features if rows is None else rows.stop - rows.start
        else:
            n = p.weight.shape[0]
        if g.provider.through_heads:
            n = n * h.repeat
        ins = {layer.get_submodule(name).in_features for name in g.linears}
        if ins != {n}:
            raise ValueError(
                f"{config.model_type}: {g.provider.module} provides {n} channels but "
                f"{', '.join(g.linears)} read {sorted(ins)}"
            )
