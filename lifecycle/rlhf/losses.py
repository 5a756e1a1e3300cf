"""RLHF objectives as plain torch functions: sequence log-probs, DPO, Bradley-Terry, KL.

Groundwork of the RLHF stage (issue 4): the stage's Ray Train loops call these; they are tested
on their own in tests/unit/test_rlhf_losses.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lifecycle.data.instruct import IGNORE


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) for causal-LM `logits` [B, T, V] and `labels` [B, T]
    (IGNORE where not scored). Returns (logprobs [B, T-1], mask [B, T-1]), shifted by one."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    safe = labels.masked_fill(~mask, 0)
    lp = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, safe.unsqueeze(-1)).squeeze(-1)
    return lp * mask, mask


def sequence_logprob(
    model: torch.nn.Module,
    ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of log-probs of the scored tokens of each row: log π(response | prompt)."""
    logits = model(input_ids=ids, attention_mask=attention_mask).logits
    lp, _ = token_logprobs(logits, labels)
    return lp.sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct Preference Optimization (Rafailov et al. 2023), sigmoid form.

    Inputs are sequence log-probs [B]. Returns the mean loss and per-batch diagnostics:
    implicit rewards β·(log π − log π_ref) of chosen and rejected, and their accuracy.
    """
    chosen_r = beta * (policy_chosen - ref_chosen)
    rejected_r = beta * (policy_rejected - ref_rejected)
    margin = chosen_r - rejected_r
    loss = -F.logsigmoid(margin).mean()
    stats = {
        "rewards/chosen": chosen_r.detach().mean(),
        "rewards/rejected": rejected_r.detach().mean(),
        "rewards/accuracy": (margin > 0).float().mean().detach(),
    }
    return loss, stats


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Reward-model loss: −log σ(r_chosen − r_rejected)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def kl_per_token(policy_lp: torch.Tensor, ref_lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over scored tokens of the k3 estimator of KL(π‖π_ref) from sampled tokens
    (Schulman's unbiased, always non-negative estimate: exp(r) − 1 − r, r = log π_ref − log π)."""
    r = (ref_lp - policy_lp) * mask
    k3 = (torch.exp(r) - 1 - r) * mask
    return k3.sum() / mask.sum().clamp(min=1)
