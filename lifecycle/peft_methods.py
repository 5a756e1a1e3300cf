"""The SFT methods: one PEFT config per `sft.method`, applying it, saving and loading results.

full           every weight trains (no adapter)
lora / qlora   low-rank adapters (qlora: on a 4-bit bitsandbytes base, CUDA only)
adalora        LoRA with a rank budget pruned during training
loha           low-rank Hadamard-product adapter layers
ia3            learned rescaling vectors on keys, values and the MLP
prompt_tuning / prefix_tuning / p_tuning   learned virtual tokens
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from transformers import PreTrainedModel

from lifecycle.config import LORA_FAMILY, SFTConfig
from lifecycle.models import load_model, save_model

CAUSAL = TaskType.CAUSAL_LM


def peft_config(cfg: SFTConfig) -> PeftConfig | None:
    m = cfg.method
    if m == "full":
        return None
    if m in ("lora", "qlora"):
        o = cfg.lora
        return LoraConfig(
            task_type=CAUSAL,
            r=o.r,
            lora_alpha=o.alpha,
            lora_dropout=o.dropout,
            target_modules=o.target_modules,
        )
    if m == "adalora":
        o = cfg.adalora
        return AdaLoraConfig(
            task_type=CAUSAL,
            init_r=o.init_r,
            target_r=o.target_r,
            lora_alpha=o.alpha,
            lora_dropout=o.dropout,
            target_modules=o.target_modules,
            total_step=cfg.max_steps,
            tinit=int(o.tinit_fraction * cfg.max_steps),
            tfinal=int(o.tfinal_fraction * cfg.max_steps),
        )
    if m == "loha":
        o = cfg.loha
        return LoHaConfig(
            task_type=CAUSAL,
            r=o.r,
            alpha=o.alpha,
            rank_dropout=o.dropout,
            target_modules=o.target_modules,
        )
    if m == "ia3":
        return IA3Config(
            task_type=CAUSAL,
            target_modules=cfg.ia3.target_modules,
            feedforward_modules=cfg.ia3.feedforward_modules,
        )
    n = cfg.prompt.num_virtual_tokens
    if m == "prompt_tuning":
        return PromptTuningConfig(task_type=CAUSAL, num_virtual_tokens=n)
    if m == "prefix_tuning":
        return PrefixTuningConfig(task_type=CAUSAL, num_virtual_tokens=n)
    if m == "p_tuning":
        return PromptEncoderConfig(
            task_type=CAUSAL,
            num_virtual_tokens=n,
            encoder_hidden_size=cfg.prompt.encoder_hidden_size,
        )
    raise ValueError(f"unknown sft.method {m!r}")


def load_base(path: str | Path, cfg: SFTConfig) -> PreTrainedModel:
    """The model to fine-tune; for qlora, loaded in 4 bits (NF4) through bitsandbytes."""
    if cfg.method != "qlora":
        return load_model(path)
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb, use_safetensors=True, device_map={"": 0}
    )
    return prepare_model_for_kbit_training(model)


def apply_method(model: PreTrainedModel, cfg: SFTConfig) -> torch.nn.Module:
    """Wraps `model` for the configured method; the base weights are frozen unless `full`."""
    pc = peft_config(cfg)
    if pc is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    return get_peft_model(model, pc)


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) as PEFT counts them (get_nb_trainable_parameters when available)."""
    if isinstance(model, PeftModel):
        return model.get_nb_trainable_parameters()
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def save_outputs(
    model: torch.nn.Module, tokenizer: Any, out: Path, cfg: SFTConfig
) -> dict[str, str]:
    """Writes `adapter/` (PEFT methods) and `model/` (full, or LoRA family merged if configured).

    Returns which directories exist: {"adapter": ..., "model": ...}.
    """
    written = {}
    if isinstance(model, PeftModel):
        model.save_pretrained(out / "adapter", safe_serialization=True)
        tokenizer.save_pretrained(out / "adapter")
        written["adapter"] = str(out / "adapter")
        if cfg.merge and cfg.method in LORA_FAMILY and cfg.method != "qlora":
            merged = model.merge_and_unload()
            save_model(merged, tokenizer, out / "model")
            written["model"] = str(out / "model")
    else:
        save_model(model, tokenizer, out / "model")
        written["model"] = str(out / "model")
    return written


def load_finetuned(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """A fine-tuned model dir (full or merged) or a PEFT adapter dir on its base model, on
    `device` in `dtype` (defaults: as saved, on the CPU)."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        cfg = PeftConfig.from_pretrained(path)
        base = load_model(cfg.base_model_name_or_path, device, dtype)
        model = PeftModel.from_pretrained(base, path, is_trainable=False)
        return model.to(device) if device is not None else model
    return load_model(path, device, dtype)
