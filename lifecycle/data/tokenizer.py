"""Byte-level BPE tokenizer training with `tokenizers`, saved as a local HF tokenizer dir.

The special tokens are fixed here for every later stage: `<|bos|>`, `<|eos|>`, `<|pad|>` and the
chat-role markers `<|system|>`, `<|user|>`, `<|assistant|>` that SFT's chat template uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lifecycle.artifacts import sha256_file

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS]

# Each turn is its role marker followed by its content; an assistant turn ends with EOS.
# lifecycle.data.instruct.encode_chat builds the same ids by hand (and the loss mask with them).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|eos|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_bpe(
    texts: Iterable[str], vocab_size: int, min_frequency: int, out_dir: str | Path
) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=1 << 20,
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out_dir)
    return hf


def tokenizer_id(tokenizer_dir: str | Path) -> str:
    """Content id of a tokenizer: sha256 of its tokenizer.json."""
    return sha256_file(Path(tokenizer_dir) / "tokenizer.json")
