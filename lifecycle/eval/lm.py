"""Held-out loss of a causal LM: the one definition every stage uses.

    from lifecycle.eval.lm import nll_sum, mean_nll_rows, nll_rows
    total, tokens = nll_sum(model, ids, labels, mask)       # one batch, labels IGNORE-masked
    loss = mean_nll_rows(model, [(ids, start), ...], pad)   # ragged rows scored from `start`
    per_row = nll_rows(model, [(ids, start), ...], pad)     # [(nll sum, tokens)] per row

The training loop sums `nll_sum` over ranks (lifecycle/training.py `evaluate`); the held-out
evaluation of finished models (lifecycle/eval/heldout.py) scores ragged rows with
`mean_nll_rows`. Perplexity is exp of the mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lifecycle.data.instruct import IGNORE

ScoreRows = Sequence[tuple[Sequence[int], int]]
"""(token ids, first scored position ≥ 1): each row's tokens from `start` on are scored."""


@torch.no_grad()
def nll_sum(
    model: Any, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[float, int]:
    """(sum of −log p over the scored next tokens, their count) of one batch. `labels` are
    aligned with `ids` (IGNORE where not scored) and shifted here, as transformers does."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        target.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return float(nll), int((target != IGNORE).sum())


def padding_mask(ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """Attention mask (long, 1 = attend) of right-padded rows: 0 on each row's trailing run of
    `pad_id` only. A pad id that is also a real token (many tokenizers pad with their EOS)
    stays visible inside a row; a real EOS at a row's end is masked with the padding after it,
    which only the padding positions after it would see."""
    if pad_id is None:
        return torch.ones_like(ids)
    trailing = (ids == pad_id).long().flip(-1).cumprod(-1).flip(-1)
    return 1 - trailing


@torch.no_grad()
def nll_rows(model: Any, rows: ScoreRows, pad: int, batch: int = 32) -> list[tuple[float, int]]:
    """(sum of −log p over its scored tokens, their count) of each ragged row (right-padded
    per batch): per-item figures for paired comparisons."""
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        width = max(len(ids) for ids, _ in chunk)
        x = torch.full((len(chunk), width), pad, dtype=torch.long)
        y = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (ids, start) in enumerate(chunk):
            x[r, : len(ids)] = torch.tensor(ids)
            y[r, start : len(ids)] = torch.tensor(ids[start:])
            mask[r, : len(ids)] = 1
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits
        target = y[:, 1:].to(device)
        nll = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE, reduction="none"
        )
        sums, counts = nll.sum(1).tolist(), (target != IGNORE).sum(1).tolist()
        out += list(zip(sums, counts, strict=True))
    return out


def mean_nll_rows(model: Any, rows: ScoreRows, pad: int, batch: int = 32) -> float:
    """Mean −log p per scored token over ragged rows."""
    per_row = nll_rows(model, rows, pad, batch)
    return sum(s for s, _ in per_row) / max(1, sum(n for _, n in per_row))
