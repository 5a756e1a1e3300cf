"""One optimisation step of each RLHF algorithm, in plain torch (the Ray Train loop calls them).

    reward_step   Bradley-Terry on (chosen, rejected) token rows
    dpo_step      DPO against a frozen reference on (chosen, rejected) rows
    grpo_step     sample a group per prompt, group-normalised advantages, KL to the reference
    ppo_step      one rollout per prompt, value head, GAE, clipped policy and value losses

`rollout` samples responses and returns token rows whose labels mark the response tokens.
Inputs may live on the CPU: each step moves them to its model's device, so the same calls run
on CPU or GPU workers, in fp32 or under bf16 autocast (log-probs are taken in fp32).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lifecycle.data.instruct import IGNORE
from lifecycle.eval.generate import left_pad
from lifecycle.eval.lm import padding_mask
from lifecycle.rlhf.losses import dpo_loss, kl_per_token, sequence_logprob, token_logprobs
from lifecycle.rlhf.ppo import ValueHead, gae, per_token_rewards, policy_loss, value_loss, whiten


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


RewardFn = Callable[[Sequence[str], Sequence[str]], list[float]]
"""(prompts, responses) -> scores: a program judge, a reward model, or an LLM judge."""


@dataclass
class Rollout:
    ids: torch.Tensor  # [N, T] prompt (left-padded) + response (+ pad)
    mask: torch.Tensor  # [N, T] attention mask
    labels: torch.Tensor  # [N, T] ids on response tokens (up to and with EOS), IGNORE elsewhere
    prompts: list[str]  # per row
    responses: list[str]  # per row, decoded without special tokens


@torch.no_grad()
def rollout(
    policy: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    k: int,
    max_new_tokens: int,
    temperature: float = 1.0,
) -> Rollout:
    """`k` sampled responses per prompt from `policy` (rows grouped by prompt)."""
    was_training = policy.training
    policy.eval()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids, mask = left_pad(
        [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts], pad
    )
    ids, mask = ids.to(device_of(policy)), mask.to(device_of(policy))
    seqs = policy.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        num_return_sequences=k,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    width = ids.shape[1]
    resp = seqs[:, width:]
    # Response tokens: everything up to and including the first EOS.
    after_eos = (resp == eos).long().cumsum(-1) - (resp == eos).long() > 0
    resp_mask = ~after_eos & ~((resp == pad) & (resp != eos))
    labels = torch.full_like(seqs, IGNORE)
    labels[:, width:] = resp.masked_fill(~resp_mask, IGNORE)
    attn = torch.cat([mask.repeat_interleave(k, 0), resp_mask.long()], dim=1)
    texts = [
        tokenizer.decode(r[m], skip_special_tokens=True).strip()
        for r, m in zip(resp, resp_mask, strict=True)
    ]
    if was_training:
        policy.train()
    return Rollout(seqs, attn, labels, [p for p in prompts for _ in range(k)], texts)


def reward_step(
    rm: torch.nn.Module, chosen: torch.Tensor, rejected: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, dict[str, float]]:
    from lifecycle.rlhf.reward import pair_loss

    device = device_of(rm)
    loss, acc = pair_loss(rm, chosen.to(device), rejected.to(device), pad_id)
    return loss, {"train/accuracy": float(acc)}


def dpo_step(
    policy: torch.nn.Module,
    ref: torch.nn.Module,
    chosen: tuple[torch.Tensor, torch.Tensor],
    rejected: tuple[torch.Tensor, torch.Tensor],
    pad_id: int,
    beta: float,
    nll_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """`chosen`/`rejected` are (ids, labels) rows with labels on the response only.

    `nll_weight` > 0 adds the chosen responses' per-token NLL (RPO, Pang et al. 2024): it
    keeps DPO from lowering the likelihood of both sides, which on small models collapses
    generation.
    """
    device = device_of(policy)
    ids = torch.cat([chosen[0], rejected[0]]).to(device)
    labels = torch.cat([chosen[1], rejected[1]]).to(device)
    mask = padding_mask(ids, pad_id)
    logits = policy(input_ids=ids, attention_mask=mask).logits
    tok_lp, tok_mask = token_logprobs(logits, labels)
    lp = tok_lp.sum(-1)
    with torch.no_grad():
        ref_lp = sequence_logprob(ref, ids, labels, mask)
    n = len(chosen[0])
    loss, stats = dpo_loss(lp[:n], lp[n:], ref_lp[:n], ref_lp[n:], beta)
    nll = -tok_lp[:n].sum() / tok_mask[:n].sum().clamp(min=1)
    stats["nll_chosen"] = nll.detach()
    return loss + nll_weight * nll, {k: float(v) for k, v in stats.items()}


def grpo_step(
    policy: torch.nn.Module,
    ref: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    group_size: int,
    max_new_tokens: int,
    beta: float,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Group Relative Policy Optimization (Shao et al. 2024), one update per rollout (so the
    importance ratio is 1 and the clipped objective reduces to its policy gradient)."""
    ro = rollout(policy, tokenizer, prompts, group_size, max_new_tokens, temperature)
    scores = torch.tensor(
        reward_fn(ro.prompts, ro.responses), dtype=torch.float32, device=ro.ids.device
    )
    grouped = scores.view(-1, group_size)
    adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(
        -1
    )
    logits = policy(input_ids=ro.ids, attention_mask=ro.mask).logits
    lp, tmask = token_logprobs(logits, ro.labels)
    with torch.no_grad():
        ref_lp, _ = token_logprobs(ref(input_ids=ro.ids, attention_mask=ro.mask).logits, ro.labels)
    tmask = tmask.float()
    pg = -(adv[:, None] * lp * tmask).sum() / tmask.sum().clamp(min=1)
    kl = kl_per_token(lp, ref_lp, tmask)
    loss = pg + beta * kl
    return loss, {
        "train/reward": float(scores.mean()),
        "train/kl": float(kl),
        "train/response_len": float(tmask.sum(1).mean()),
    }


def ppo_step(
    policy: torch.nn.Module,
    value_head: ValueHead,
    ref: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    optimizer: torch.optim.Optimizer,
    max_new_tokens: int,
    kl_coef: float,
    epochs: int = 2,
    clip: float = 0.2,
    vf_coef: float = 0.5,
    gamma: float = 1.0,
    lam: float = 0.95,
    temperature: float = 1.0,
    grad_clip: float = 1.0,
) -> dict[str, float]:
    """One PPO iteration: rollout, rewards (score − β·KL), GAE, `epochs` clipped updates.

    Takes the optimizer (of policy and value head) because PPO updates several times per
    rollout. Returns the last epoch's losses and the rollout's reward and KL.
    """
    ro = rollout(policy, tokenizer, prompts, 1, max_new_tokens, temperature)
    score = torch.tensor(
        reward_fn(ro.prompts, ro.responses), dtype=torch.float32, device=ro.ids.device
    )

    def forward() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = policy(input_ids=ro.ids, attention_mask=ro.mask, output_hidden_states=True)
        lp, m = token_logprobs(out.logits, ro.labels)
        values = value_head(out.hidden_states[-1])[:, :-1]  # V(s_t) at the position before token t
        return lp, values, m.float()

    with torch.no_grad():
        old_lp, old_v, m = forward()
        ref_lp, _ = token_logprobs(ref(input_ids=ro.ids, attention_mask=ro.mask).logits, ro.labels)
        rewards = per_token_rewards(score, old_lp, ref_lp, m, kl_coef)
        adv, returns = gae(rewards, old_v, m, gamma, lam)
        adv = whiten(adv, m)
    stats: dict[str, float] = {
        "train/reward": float(score.mean()),
        "train/kl": float(kl_per_token(old_lp, ref_lp, m)),
    }
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for _ in range(epochs):
        lp, v, _ = forward()
        pl = policy_loss(lp, old_lp, adv, m, clip)
        vl = value_loss(v, old_v, returns, m, clip)
        loss = pl + vf_coef * vl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        stats.update({"train/policy_loss": float(pl), "train/value_loss": float(vl)})
    return stats
