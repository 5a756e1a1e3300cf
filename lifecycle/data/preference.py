"""Preference data for RLHF: prompt/chosen/rejected records, and AI feedback (RLAIF).

Records are normalised to `{"prompt": messages, "chosen": str, "rejected": str}` where
`prompt` is a chat message list ending with a user turn. RLAIF: K responses sampled per
prompt are scored by a judge; the best and worst of a prompt become a pair when their scores
differ. The audit record of every prompt keeps all responses, scores and the judge id.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lifecycle.data import demo
from lifecycle.data.instruct import ROLES, iter_objects


def to_pair(obj: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(pair, None) for a valid record (plain strings or chat form), (None, reason) otherwise."""
    if not isinstance(obj, dict):
        return None, f"not an object: got {type(obj).__name__}"
    prompt = obj.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        for i, m in enumerate(prompt):
            if (
                not isinstance(m, dict)
                or m.get("role") not in ROLES
                or not isinstance(m.get("content"), str)
            ):
                return None, f"prompt[{i}]: needs a role in {list(ROLES)} and string content"
        if prompt[-1]["role"] != "user":
            return None, "the prompt's last message must be the user's"
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        return None, "missing prompt (a non-empty string or message list)"
    out: dict[str, Any] = {"prompt": messages}
    for key in ("chosen", "rejected"):
        v = obj.get(key)
        if (
            isinstance(v, list)
            and len(v) == 1
            and isinstance(v[0], dict)
            and v[0].get("role") == "assistant"
        ):
            v = v[0].get("content")  # conversational form: [{"role": "assistant", ...}]
        if not isinstance(v, str) or not v.strip():
            return None, f"missing or empty {key!r} (a string or one assistant message)"
        out[key] = v
    if out["chosen"] == out["rejected"]:
        return None, "chosen and rejected are identical"
    return out, None


def read_pairs(
    path: str | Path, storage: str = "jsonl"
) -> Iterator[tuple[dict | None, str, str | None]]:
    """(pair, source, reject reason) for every record of a jsonl file/dir or `datasets` dir."""
    for obj, src, why in iter_objects(path, storage, "preference"):
        if why is not None:
            yield None, src, why
        else:
            pair, why = to_pair(obj)
            yield pair, src, why


@dataclass(frozen=True)
class ProgramJudge:
    """Scores demo-task responses with a program: 1.0 for the exact answer, otherwise the
    character-level similarity to it (0..1), so that near misses rank above garbage."""

    id: str = "program:demo-tasks-v1"

    def score(self, prompt: str, response: str) -> float:
        task = demo.parse_prompt(prompt)
        if task is None:
            raise ValueError(f"the program judge only knows demo tasks, got prompt {prompt!r}")
        name, arg = task
        answer = demo.TASKS[name].answer(arg)
        if response.strip() == answer:
            return 1.0
        return 0.9 * difflib.SequenceMatcher(None, response.strip(), answer).ratio()


def demo_pairs(
    n: int, seed: int, tasks: Sequence[str] | None = None, heldout: bool = False
) -> list[dict[str, Any]]:
    """Preference pairs from the demo tasks: the right answer over a near miss (one letter
    changed), for reward-model training and its held-out accuracy."""
    import random

    rng = random.Random(seed)
    out = []
    for ex in demo.instruction_examples(n, seed, tasks, heldout):
        prompt, answer = ex["messages"][:-1], ex["messages"][-1]["content"]
        i = rng.randrange(len(answer))
        wrong = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != answer[i].lower()])
        out.append(
            {"prompt": prompt, "chosen": answer, "rejected": answer[:i] + wrong + answer[i + 1 :]}
        )
    return out


def rlaif_records(
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    scores: Sequence[float],
    judge_id: str,
) -> list[dict[str, Any]]:
    """The audit record of every prompt: all responses with their scores, and the pair if any.

    `scores` is flat, in the order of `responses` flattened. chosen = the highest-scored
    response, rejected = the lowest; a prompt whose responses all score the same gives no pair
    (`chosen`/`rejected` are None).
    """
    out = []
    it = iter(scores)
    for prompt, resps in zip(prompts, responses, strict=True):
        sc = [float(next(it)) for _ in resps]
        best = max(range(len(resps)), key=sc.__getitem__)
        worst = min(range(len(resps)), key=sc.__getitem__)
        pair = sc[best] > sc[worst]
        out.append(
            {
                "prompt": prompt,
                "responses": list(resps),
                "scores": sc,
                "judge": judge_id,
                "chosen": resps[best] if pair else None,
                "rejected": resps[worst] if pair else None,
                "chosen_score": sc[best] if pair else None,
                "rejected_score": sc[worst] if pair else None,
            }
        )
    return out
