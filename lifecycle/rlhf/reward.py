"""The reward model: the policy's architecture with a scalar head, trained on preference pairs.

`AutoModelForSequenceClassification` with one label reads the hidden state of each row's last
non-pad token (the model config's pad_token_id), which is the score r(prompt, response). It
saves and loads as an HF safetensors directory like every other model here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from lifecycle.data.instruct import encode_chat
from lifecycle.rlhf.losses import bradley_terry_loss


def reward_model_from(base_dir: str | Path) -> PreTrainedModel:
    """A reward model initialised from a causal-LM dir (body copied, new zero-mean head)."""
    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=1, use_safetensors=True, trust_remote_code=False
    )
    if model.config.pad_token_id is None:
        raise ValueError(f"{base_dir}: the config has no pad_token_id; the reward model needs it")
    return model


def encode_pairs(
    pairs: Sequence[dict[str, Any]], tokenizer: Any, max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen ids, rejected ids) [N, max_length], right-padded; each row is the chat-rendered
    prompt + response + EOS. Pairs longer than `max_length` are truncated from the left."""
    pad = tokenizer.pad_token_id

    def row(prompt: list[dict[str, str]], response: str) -> list[int]:
        ids, _ = encode_chat([*prompt, {"role": "assistant", "content": response}], tokenizer)
        ids = ids[-max_length:]
        return ids + [pad] * (max_length - len(ids))

    chosen = torch.tensor([row(p["prompt"], p["chosen"]) for p in pairs])
    rejected = torch.tensor([row(p["prompt"], p["rejected"]) for p in pairs])
    return chosen, rejected


def scores(model: PreTrainedModel, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=(ids != pad_id).long()).logits.squeeze(-1)


def pair_loss(
    model: PreTrainedModel, chosen: torch.Tensor, rejected: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bradley-Terry loss of a batch and its accuracy (share of pairs ranked right)."""
    both = scores(model, torch.cat([chosen, rejected]), pad_id)
    rc, rr = both[: len(chosen)], both[len(chosen) :]
    return bradley_terry_loss(rc, rr), (rc > rr).float().mean()


@torch.no_grad()
def accuracy(
    model: PreTrainedModel,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    pad_id: int,
    batch_size: int = 64,
) -> float:
    model.eval()
    right = 0
    for i in range(0, len(chosen), batch_size):
        rc = scores(model, chosen[i : i + batch_size], pad_id)
        rr = scores(model, rejected[i : i + batch_size], pad_id)
        right += int((rc > rr).sum())
    return right / max(1, len(chosen))
