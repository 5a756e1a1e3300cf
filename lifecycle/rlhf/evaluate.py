"""Policy evaluation for RLHF: mean judge reward of sampled responses, KL to the reference,
mean response length, and greedy task exact-match (lifecycle.eval.generate)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lifecycle.eval.generate import exact_match
from lifecycle.models import default_device, load_model, load_tokenizer
from lifecycle.rlhf.algorithms import rollout
from lifecycle.rlhf.losses import kl_per_token, token_logprobs
from lifecycle.rlhf.reward import make_reward_fn


@torch.no_grad()
def evaluate_policy(
    model_dir: str,
    ref_dir: str,
    prompts: Sequence[str],
    answers: Sequence[str],
    judge: dict[str, Any],
    samples: int,
    max_new_tokens: int,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean judge reward of sampled responses (and per prompt), KL to the reference on them,
    response length and greedy exact-match of a policy dir, on `device` (default: this task's GPU if it has
    one) in `dtype` (default: as saved)."""
    torch.manual_seed(seed)
    device = device or default_device()
    policy, tok = load_model(model_dir, device, dtype).eval(), load_tokenizer(model_dir)
    ref = policy if ref_dir == model_dir else load_model(ref_dir, device, dtype).eval()
    reward_fn = make_reward_fn(judge)
    rewards, kls, lengths, n_tok = [], [], 0.0, 0
    for i in range(0, len(prompts), batch_size):
        ro = rollout(policy, tok, prompts[i : i + batch_size], samples, max_new_tokens)
        rewards += reward_fn(ro.prompts, ro.responses)
        lp, m = token_logprobs(policy(input_ids=ro.ids, attention_mask=ro.mask).logits, ro.labels)
        rlp, _ = token_logprobs(ref(input_ids=ro.ids, attention_mask=ro.mask).logits, ro.labels)
        m = m.float()
        kls.append(float(kl_per_token(lp, rlp, m)) * float(m.sum()))
        lengths += float(m.sum())
        n_tok += len(ro.responses)
    em = exact_match(
        policy, tok, prompts, answers, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return {
        "mean_reward": sum(rewards) / len(rewards),
        "kl": sum(kls) / max(lengths, 1.0),
        "response_len": lengths / max(n_tok, 1),
        "exact_match": em,
        # rollouts are grouped by prompt: each prompt's mean over its samples (paired gates)
        "reward_per_prompt": [
            sum(rewards[j * samples : (j + 1) * samples]) / samples for j in range(len(prompts))
        ],
    }
