"""Batched greedy generation and task exact-match: the evaluation every stage reuses.

from lifecycle.eval.generate import exact_match
score = exact_match(model, tokenizer, prompts, answers, batch_size=64)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) with every row right-aligned: generation continues all rows at
    the same position."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions of `prompts` (already formatted), decoded without special tokens.

    Prompts are left-padded so that every row's last position is its last prompt token.
    """
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    pad = tokenizer.pad_token_id
    for i in range(0, len(prompts), batch_size):
        enc = [
            tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[i : i + batch_size]
        ]
        ids, mask = left_pad(enc, pad)
        width = ids.shape[1]
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in gen[:, width:]:
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


def exact_match(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], **kw) -> float:
    """Fraction of prompts whose greedy completion equals the answer (whitespace-stripped)."""
    got = generate(model, tokenizer, prompts, **kw)
    return sum(g == a.strip() for g, a in zip(got, answers, strict=True)) / max(1, len(answers))


def evaluate_model(
    model_path: str,
    prompts: Sequence[str],
    answers: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Task exact-match of a model dir or PEFT adapter dir on (prompt, answer) pairs, on
    `device` (default: this task's GPU if it has one) in `dtype` (default: as saved)."""
    from lifecycle.models import default_device, load_tokenizer
    from lifecycle.peft_methods import load_finetuned

    model = load_finetuned(model_path, device or default_device(), dtype)
    tok = load_tokenizer(model_path)
    em = exact_match(
        model, tok, prompts, answers, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return {"exact_match": em, "n": float(len(prompts))}


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    k: int,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
) -> list[list[str]]:
    """`k` sampled completions per prompt (temperature sampling), seeded."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    gen = torch.Generator().manual_seed(seed)
    out: list[list[str]] = []
    for i in range(0, len(prompts), batch_size):
        enc = [
            tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[i : i + batch_size]
        ]
        ids, mask = left_pad(enc, pad)
        width = ids.shape[1]
        # generate() draws from the global RNG: seed it from our generator, per batch.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            seqs = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                num_return_sequences=k,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
        texts = [tokenizer.decode(s, skip_special_tokens=True).strip() for s in seqs[:, width:]]
        out += [texts[j * k : (j + 1) * k] for j in range(len(enc))]
    return out
