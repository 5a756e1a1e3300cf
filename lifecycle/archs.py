"""What the chain needs to know about a model, read from the model's own `config.json`.

A model is a directory: its shapes (heads, head_dim, key/value heads, layers, vocabulary,
context, experts) come from its config, never from the YAML's `pretrain.model` defaults, which
describe only a model built from scratch. No torch here: the config checks run before anything
is imported or trained.

    from lifecycle.archs import read_facts
    facts = read_facts("/models/Qwen2.5-0.5B-Instruct")
    facts.head_dim, facts.num_kv_heads, facts.model_type     # 64, 2, "qwen2"
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Arch:
    """What the chain supports for one `model_type` (the architectures tests build)."""

    family: str
    quirks: str
    # None: quantized like any dense decoder; else why w8a8/w4a16/awq refuse this model.
    quantize_refusal: str | None = None


ARCHS: dict[str, Arch] = {
    "llama": Arch("Llama 2/3", "grouped-query attention (Llama 3)"),
    "mistral": Arch("Mistral", "grouped-query attention, sliding window"),
    "qwen2": Arch("Qwen2/2.5", "q/k/v biases, grouped-query attention"),
    "qwen3": Arch("Qwen3", "q/k RMS norms, explicit head_dim"),
    "gemma2": Arch("Gemma 2", "explicit head_dim, pre+post norms, logit soft-capping"),
    "gemma3_text": Arch("Gemma 3 (text)", "explicit head_dim, q/k norms, pre+post norms"),
    "phi3": Arch("Phi-3", "fused qkv_proj and gate_up_proj"),
    "mixtral": Arch(
        "Mixtral (MoE)",
        "sparse experts",
        quantize_refusal="the mixture-of-experts layers are not quantized by this project yet "
        "(transformers holds the experts as fused 3-D tensors, not the linear layers the "
        "compressors and compressed-tensors work on); distill into a dense student "
        "(distill.student) or set quantize: null",
    ),
}


@dataclass(frozen=True)
class ModelFacts:
    """The shapes of one causal LM, from its config.json or from `pretrain.model`."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_experts: int = 0
    experts_per_token: int = 0
    source: str = "pretrain.model"

    @property
    def linear_in_features(self) -> dict[str, int]:
        """The input widths of the decoder's linear layers (what int4 group sizes divide)."""
        return {
            "hidden_size": self.hidden_size,
            "num_heads*head_dim": self.num_heads * self.head_dim,
            "intermediate_size": self.intermediate_size,
        }


class ModelDirError(ValueError):
    """A model directory that is missing, incomplete or not a causal LM we can read."""


def read_facts(model_dir: str | Path) -> ModelFacts:
    """The facts of a local HF model directory (its config.json; `text_config` for the text
    part of a multimodal config). Raises ModelDirError naming the problem."""
    path = Path(model_dir)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise ModelDirError(f"{path}: no such model directory")
    if not cfg_file.is_file():
        raise ModelDirError(f"{path}: not a model directory (no config.json)")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{cfg_file}: unreadable ({e})") from None
    return facts_from_dict(raw, str(path))


def facts_from_dict(raw: dict[str, Any], source: str) -> ModelFacts:
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else None
    cfg = {**raw, **text} if text else raw
    model_type = str(cfg.get("model_type") or raw.get("model_type") or "")

    def need(*keys: str) -> int:
        for k in keys:
            if isinstance(cfg.get(k), int):
                return int(cfg[k])
        raise ModelDirError(f"{source}: config.json has no {' / '.join(keys)}")

    hidden = need("hidden_size", "n_embd", "d_model")
    heads = need("num_attention_heads", "n_head")
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    inter_keys = ("moe_intermediate_size", "intermediate_size") if experts else ()
    return ModelFacts(
        model_type=model_type,
        hidden_size=hidden,
        num_layers=need("num_hidden_layers", "n_layer"),
        num_heads=heads,
        num_kv_heads=int(kv),
        head_dim=int(head_dim),
        intermediate_size=need(*inter_keys, "intermediate_size", "n_inner"),
        vocab_size=need("vocab_size"),
        max_position_embeddings=need("max_position_embeddings", "n_positions"),
        # Absent: transformers' base default (True), which save_pretrained leaves out.
        tie_word_embeddings=bool(
            raw.get("tie_word_embeddings", cfg.get("tie_word_embeddings", True))
        ),
        num_experts=experts,
        experts_per_token=int(cfg.get("num_experts_per_tok") or 0),
        source=source,
    )


def check_weights(model_dir: str | Path) -> None:
    """Raises `ModelDirError` unless every `*.safetensors` file in `model_dir` is whole: its
    header parses and the file is exactly as long as the tensors it lists (a truncated copy,
    an interrupted download). Reads only the headers: milliseconds for any model size."""
    import json
    import struct

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ModelDirError(f"{model_dir}: no *.safetensors weights")
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                raise ModelDirError(f"{f}: not a safetensors file (header length {n})")
            try:
                header = json.loads(fh.read(n))
            except ValueError as e:
                raise ModelDirError(f"{f}: unreadable safetensors header ({e})") from None
        end = max(
            (t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0
        )
        if size != 8 + n + end:
            raise ModelDirError(
                f"{f}: {size} bytes, but its header lists {8 + n + end} (truncated or padded)"
            )
