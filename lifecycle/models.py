"""Model and tokenizer builders, and loading/saving as HF safetensors directories.

Models are built from config with random init (no hub downloads) or loaded from a local HF
directory; weights are only ever read from safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from lifecycle.config import ModelConfig


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int) -> PreTrainedModel:
    """A causal LM: random init from `cfg` with a fixed seed, or loaded from `cfg.init_from`."""
    if cfg.init_from:
        model = load_model(cfg.init_from)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            raise ValueError(
                f"pretrain.model.init_from {cfg.init_from}: its vocabulary "
                f"({model.get_input_embeddings().num_embeddings}) is smaller than the data "
                f"tokenizer's ({len(tokenizer)}); prepare the data with its tokenizer "
                "(data.tokenizer.path)"
            )
        return model
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    # The global RNG is the one HF init uses; fork it so a caller's RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.arch == "llama":
            return LlamaForCausalLM(LlamaConfig(**common))
        moe = MixtralConfig(
            **common, num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token
        )
        return MixtralForCausalLM(moe)


def default_device() -> torch.device:
    """The device a model-running task uses when it is not told: its GPU when Ray (or the
    caller) gave it one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """A causal LM from a local HF dir (safetensors only), on `device` (default: the CPU, as
    saved) in `dtype` (default: as saved)."""
    path = Path(path)
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path}: no *.safetensors weights (only safetensors are loaded)")
    model = AutoModelForCausalLM.from_pretrained(
        path, use_safetensors=True, trust_remote_code=False, dtype=dtype
    )
    return model.to(device) if device is not None else model


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    path: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(path)
    return path


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (expected a local HF tokenizer dir)")
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    if tok.pad_token is None and tok.eos_token is not None:
        # Llama 3, Mistral and others ship without one: pad with EOS (masks are built from
        # trailing padding runs, lifecycle.eval.lm.padding_mask, and from lengths).
        tok.pad_token = tok.eos_token
    return tok


def chat_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer of a model dir with its own chat template (ChatML, Llama 3, Mistral,
    Gemma, Phi-3, ...). A tokenizer without one gets the project's template only when it has
    the project's role tokens (the data stage's own tokenizers); otherwise it is refused,
    naming the dir."""
    from lifecycle.data.tokenizer import CHAT_TEMPLATE, ROLE_TOKENS

    tok = load_tokenizer(model_dir)
    if not tok.chat_template:
        missing = [t for t in ROLE_TOKENS if t not in tok.get_vocab()]
        if missing:
            raise ValueError(
                f"{model_dir}: the tokenizer has no chat template (tokenizer_config.json "
                "`chat_template`, or chat_template.jinja) and SFT needs one to render "
                "conversations; add the model's template"
            )
        tok.chat_template = CHAT_TEMPLATE
    if tok.eos_token is None:
        raise ValueError(f"{model_dir}: the tokenizer has no EOS token (eos_token)")
    return tok


def num_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def flops_per_token(model: PreTrainedModel, seq_len: int, trainable: int | None = None) -> float:
    """Training FLOPs per token: 6N for the weights plus attention's 12·L·H·T (PaLM appendix B).

    For a mixture of experts, N counts only the experts a token is routed to. `trainable`:
    how many parameters get weight gradients when not all do (PEFT, frozen layers): every
    weight costs its forward (2) and the backward through its activations (2), only the
    trainable ones their weight gradient (2 more), so 4N + 2·trainable.
    """
    cfg = model.config
    n = num_params(model)
    n_exp = getattr(cfg, "num_local_experts", None)
    if n_exp:
        per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
        n -= cfg.num_hidden_layers * per_expert * (n_exp - cfg.num_experts_per_tok)
    if not getattr(cfg, "tie_word_embeddings", False):
        n -= model.get_input_embeddings().weight.numel()  # lookups are not matmuls
    weights = 6 * n if trainable is None else 4 * n + 2 * min(trainable, n)
    return weights + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
