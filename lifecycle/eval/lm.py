"""Held-out loss and perplexity of a causal LM on token rows (labels IGNORE where not scored).

The training loop computes the same quantity distributed across ranks; this is the
single-process form later stages use to compare models (e.g. before/after compression).
"""

from __future__ import annotations

import math

import torch

from lifecycle.data.instruct import IGNORE


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module,
    ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    pad_id: int | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """Mean loss per scored token and its perplexity. `labels=None` scores every token."""
    model.eval()
    labels = ids if labels is None else labels
    total, count = 0.0, 0
    for i in range(0, len(ids), batch_size):
        x, y = ids[i : i + batch_size], labels[i : i + batch_size]
        mask = None if pad_id is None else (x != pad_id).long()
        loss = model(input_ids=x, attention_mask=mask, labels=y).loss
        n = int((y[:, 1:] != IGNORE).sum())
        total, count = total + loss.item() * n, count + n
    mean = total / max(1, count)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50))}
