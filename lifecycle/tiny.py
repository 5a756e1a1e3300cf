"""Tiny random-weight models of the real architectures, each with a trained tokenizer and its
family's own chat template: what tests, benches and the GPU check use where a user would
bring a hub model (nothing can be downloaded here).

    python -m lifecycle.tiny qwen2 /tmp/tiny-qwen2         # writes an HF model dir

Each model is built from its transformers config class with the quirks of its family kept —
grouped-query attention (Llama 3, Mistral, Qwen), q/k/v biases (Qwen2), q/k norms and an
explicit head_dim (Qwen3, Gemma 3), pre+post norms and soft-capping (Gemma 2), fused qkv and
gate/up projections (Phi-3), untied embeddings (all but Gemma), sparse experts (Mixtral) —
at head_dim 32 (the smallest vLLM's CPU attention supports) and layer widths that are
multiples of 64 (the int4 kernels' groups). The tokenizer is a byte-level BPE trained on the
demo corpus with the family's special tokens; the chat template is the family's own format
(ChatML, Llama 3 headers, Mistral [INST], Gemma turns, Phi-3 tags), so nothing downstream can
lean on the project's own `<|user|>` markers.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
PHI3 = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class Family:
    template: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None  # None: the tokenizer has no pad token (Llama 3, Mistral ship without)


FAMILIES = {
    "chatml": Family(
        CHATML, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>", "<|endoftext|>"
    ),
    "llama3": Family(
        LLAMA3,
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|begin_of_text|>",
        "<|eot_id|>",
        None,
    ),
    "mistral": Family(MISTRAL, ("<s>", "</s>", "[INST]", "[/INST]"), "<s>", "</s>", None),
    "gemma": Family(
        GEMMA,
        ("<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
        "<bos>",
        "<end_of_turn>",
        "<pad>",
    ),
    "phi3": Family(
        PHI3,
        ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        None,
        "<|end|>",
        "<|endoftext|>",
    ),
}

# Gemma 2 and 3: explicit head_dim (4 x 32 != hidden 64), alternating sliding windows, tied.
_GEMMA = {
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "sliding_window": 64,
    "query_pre_attn_scalar": 32,
    "tie_word_embeddings": True,
}

# model_type -> (chat family, config class name, config overrides beyond the common ones)
ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("llama3", "LlamaConfig", {"num_attention_heads": 2, "num_key_value_heads": 1}),
    "mistral": (
        "mistral",
        "MistralConfig",
        {"num_attention_heads": 2, "num_key_value_heads": 1, "sliding_window": None},
    ),
    "qwen2": ("chatml", "Qwen2Config", {"num_attention_heads": 2, "num_key_value_heads": 1}),
    "qwen3": (
        "chatml",
        "Qwen3Config",
        {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32},
    ),
    "gemma2": (
        "gemma",
        "Gemma2Config",
        _GEMMA,
    ),
    "gemma3_text": (
        "gemma",
        "Gemma3TextConfig",
        _GEMMA,
    ),
    "phi3": ("phi3", "Phi3Config", {"num_attention_heads": 2, "num_key_value_heads": 2}),
    "mixtral": (
        "mistral",
        "MixtralConfig",
        {
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": None,
        },
    ),
}


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Demo task lines: what the tokenizer is trained on."""
    from lifecycle.data.demo import sample

    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        task, arg = sample(rng, None, heldout=rng.random() < 0.5)
        lines.append(task.line(arg))
    return lines


def build_tokenizer(family: str, out_dir: str | Path, vocab_size: int = 384) -> Any:
    """A byte-level BPE trained on the demo corpus with `family`'s special tokens and chat
    template, saved to `out_dir` (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fam = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(fam.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=fam.bos,
        eos_token=fam.eos,
        pad_token=fam.pad,
        model_max_length=1 << 20,
    )
    hf.chat_template = fam.template
    hf.save_pretrained(out_dir)
    return hf


def build(model_type: str, out_dir: str | Path, *, num_layers: int = 2, seed: int = 0) -> Path:
    """Writes a tiny random-weight `model_type` model with its tokenizer to `out_dir`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    if model_type not in ARCHITECTURES:
        raise ValueError(f"unknown model_type {model_type!r}; known: {sorted(ARCHITECTURES)}")
    family, cls_name, extra = ARCHITECTURES[model_type]
    out = Path(out_dir)
    tok = build_tokenizer(family, out)
    ids = {
        name: tok.convert_tokens_to_ids(t)
        for name, t in (("bos", tok.bos_token), ("eos", tok.eos_token), ("pad", tok.pad_token))
        if t
    }
    cfg = getattr(transformers, cls_name)(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        max_position_embeddings=512,
        tie_word_embeddings=extra.get("tie_word_embeddings", False),
        bos_token_id=ids.get("bos"),
        eos_token_id=ids["eos"],
        pad_token_id=ids.get("pad"),
        **{k: v for k, v in extra.items() if k != "tie_word_embeddings"},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=ids.get("bos"), eos_token_id=ids["eos"], pad_token_id=ids.get("pad")
    )
    model.save_pretrained(out, safe_serialization=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_type", choices=sorted(ARCHITECTURES))
    p.add_argument("out_dir")
    p.add_argument("--num-layers", type=int, default=2)
    a = p.parse_args()
    print(build(a.model_type, a.out_dir, num_layers=a.num_layers))


if __name__ == "__main__":
    main()
