"""PPO for language models, small and readable (TRL ≥ 1.x no longer ships it).

Pieces: a value head on the policy's last hidden states, generalized advantage estimation
(Schulman et al. 2016), the clipped surrogate objective and the clipped value loss (PPO,
Schulman et al. 2017), and per-token rewards = −β·KL to a frozen reference plus the reward
model's score on the last response token (Ziegler et al. 2019).
"""

from __future__ import annotations

import torch
from torch import nn


class ValueHead(nn.Module):
    """Scalar value per position from the policy model's hidden states (the critic)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)


def per_token_rewards(
    score: torch.Tensor,
    policy_lp: torch.Tensor,
    ref_lp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """−kl_coef·(log π − log π_ref) on every response token, plus `score` on the last one."""
    rewards = -kl_coef * (policy_lp - ref_lp) * mask
    last = mask.long().cumsum(-1).argmax(-1)  # index of each row's last response token
    rewards[torch.arange(len(score), device=rewards.device), last] += score.to(rewards.device)
    return rewards


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns [B, T] by generalized advantage estimation over response tokens.

    Positions outside `mask` contribute nothing and bootstrap zero beyond the last token.
    """
    values = values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_v = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    returns = adv + values
    return adv, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def policy_loss(
    new_lp: torch.Tensor,
    old_lp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> torch.Tensor:
    """The clipped surrogate: −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A), averaged over response tokens."""
    ratio = torch.exp(new_lp - old_lp)
    surr = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    return (surr * mask).sum() / mask.sum().clamp(min=1)


def value_loss(
    new_v: torch.Tensor,
    old_v: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> torch.Tensor:
    """Clipped value loss: 0.5·max((V − R)², (clip(V, V_old ± ε) − R)²)."""
    clipped = old_v + (new_v - old_v).clamp(-clip, clip)
    loss = torch.max((new_v - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * (loss * mask).sum() / mask.sum().clamp(min=1)
