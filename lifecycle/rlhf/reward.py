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

from lifecycle.data.instruct import encode_chat, user_text
from lifecycle.eval.lm import padding_mask
from lifecycle.rlhf.losses import bradley_terry_loss


def reward_model_from(base_dir: str | Path) -> PreTrainedModel:
    """A reward model initialised from a causal-LM dir (body copied, new zero-mean head)."""
    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=1, use_safetensors=True, trust_remote_code=False
    )
    if model.config.pad_token_id is None:
        # The score is read at the last non-pad token: pad as the tokenizer does (its EOS
        # when it has no pad token, lifecycle.models.chat_tokenizer).
        from lifecycle.models import chat_tokenizer

        model.config.pad_token_id = chat_tokenizer(base_dir).pad_token_id
    return model


def scores(model: PreTrainedModel, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    ids = ids.to(next(model.parameters()).device)
    return model(input_ids=ids, attention_mask=padding_mask(ids, pad_id)).logits.squeeze(-1)


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


class RewardModelJudge:
    """Scores (chat-rendered prompt, response) with a trained reward model directory."""

    def __init__(self, model_dir: str | Path, batch_size: int = 64) -> None:
        from lifecycle.data.instruct import assistant_suffix
        from lifecycle.models import chat_tokenizer, default_device

        self.id = f"reward_model:{model_dir}"
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(
                model_dir, use_safetensors=True, trust_remote_code=False
            )
            .to(default_device())
            .eval()
        )
        self.tok = chat_tokenizer(model_dir)
        # What the template puts after a reply (EOS, `<|im_end|>\n`, ...): the rows it was
        # trained on end the same way.
        self.suffix = assistant_suffix(self.tok)
        self.batch_size = batch_size

    @torch.no_grad()
    def score_batch(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        texts = [f"{p}{r}{self.suffix}" for p, r in zip(prompts, responses, strict=True)]
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            rows = [
                self.tok(t, add_special_tokens=False)["input_ids"]
                for t in texts[i : i + self.batch_size]
            ]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [self.tok.pad_token_id] * (width - len(r)) for r in rows])
            out += scores(self.model, ids, self.tok.pad_token_id).tolist()
        return out

    def score(self, prompt: str, response: str) -> float:
        return self.score_batch([prompt], [response])[0]


class LLMJudge:
    """A local causal LM as judge: the probability it gives `yes` as the next token after the
    template rendered with the user's request and the response."""

    def __init__(
        self, model_dir: str | Path, template: str, yes: str = "yes", policy_dir: str | None = None
    ) -> None:
        from lifecycle.models import chat_tokenizer, default_device, load_model, load_tokenizer

        self.id = f"llm:{model_dir}"
        self.model = load_model(model_dir, default_device()).eval()
        self.tok = load_tokenizer(model_dir)
        # The prompts arrive rendered in the policy's chat template: the judge reads the
        # user's request back out of them with that template.
        self.policy_tok = chat_tokenizer(policy_dir) if policy_dir else None
        self.template = template
        self.yes_id = self.tok(yes, add_special_tokens=False)["input_ids"][0]

    @torch.no_grad()
    def score_batch(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        from lifecycle.eval.generate import left_pad

        texts = [
            self.template.format(
                prompt=user_text(p, self.policy_tok) if self.policy_tok else p, response=r
            )
            for p, r in zip(prompts, responses, strict=True)
        ]
        ids, mask = left_pad(
            [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts],
            self.tok.pad_token_id,
        )
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, -1]
        return torch.softmax(logits.float(), -1)[:, self.yes_id].tolist()

    def score(self, prompt: str, response: str) -> float:
        return self.score_batch([prompt], [response])[0]


def make_reward_fn(spec: dict[str, Any]) -> Any:
    """(prompts, responses) -> scores, from a judge spec of plain values (so it can be sent to
    Ray workers and built there): {"kind": "program"}, {"kind": "reward_model", "model_dir"},
    or {"kind": "llm", "model_dir", "template", "yes", "policy_dir"}."""
    kind = spec["kind"]
    if kind == "program":
        from lifecycle.data.preference import ProgramJudge

        judge = ProgramJudge()
        return lambda ps, rs: [judge.score(p, r) for p, r in zip(ps, rs, strict=True)]
    if kind == "reward_model":
        return RewardModelJudge(spec["model_dir"]).score_batch
    if kind == "llm":
        return LLMJudge(
            spec["model_dir"], spec["template"], spec.get("yes", "yes"), spec.get("policy_dir")
        ).score_batch
    raise ValueError(f"unknown judge kind {kind!r}")


def pair_rows(
    pairs: Sequence[dict[str, Any]], tokenizer: Any, max_length: int
) -> tuple[list[list[int]], list[list[int]], list[list[int]], list[list[int]], int]:
    """(chosen ids, chosen labels, rejected ids, rejected labels, dropped): padded rows with the
    loss on the response; a pair is dropped whole when either side is longer than max_length."""
    from lifecycle.data.instruct import build_rows

    keep, dropped = [], 0
    for p in pairs:
        sides = [
            [*p["prompt"], {"role": "assistant", "content": p[k]}] for k in ("chosen", "rejected")
        ]
        if max(len(encode_chat(s, tokenizer)[0]) for s in sides) > max_length:
            dropped += 1
            continue
        keep.append(sides)
    cx, cy, _ = build_rows([s[0] for s in keep], tokenizer, max_length, packing=False)
    rx, ry, _ = build_rows([s[1] for s in keep], tokenizer, max_length, packing=False)
    return cx, cy, rx, ry, dropped


def accuracy_of_dir(model_dir: str, pairs: Sequence[dict[str, Any]], max_length: int) -> float:
    """Held-out accuracy of a saved reward model on preference pairs."""
    from lifecycle.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True)
    cx, _, rx, _, _ = pair_rows(pairs, tok, max_length)
    return accuracy(rm, torch.tensor(cx), torch.tensor(rx), tok.pad_token_id)
