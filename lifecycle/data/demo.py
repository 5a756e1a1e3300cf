"""The demo corpus: documents of short task lines whose answers a program can check.

Write one alone:  python -m lifecycle.data.demo OUT.jsonl --num-docs 3000 --seed 0

Each line is `<task> <argument> = <answer>`, e.g. `reverse lamp = pmal`, `add 17+25 = 42`.
A tiny model learns copy-like tasks in minutes on 2 CPU cores (see shared CALIBRATION.md),
and the same task families give later stages instruction data with checkable answers
(`TASKS[name].answer(arg)`), so SFT and RLHF can score exact matches without a judge model.
The generator also plants a controlled number of exact and near duplicates and a few
contact lines (fake e-mail addresses and phone numbers) so data prep has something to do.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Task:
    name: str
    make_arg: Callable[[random.Random], str]
    answer: Callable[[str], str]

    def line(self, arg: str) -> str:
        """The pretraining form: `reverse lamp = pmal`."""
        return f"{self.name} {arg} = {self.answer(arg)}"

    def prompt(self, arg: str) -> str:
        """The instruction form (the user turn of a chat): `reverse lamp`.

        Terse on purpose: a 160k-parameter model learns to follow it in seconds; English
        instructions would need a model that can read English.
        """
        return f"{self.name} {arg}"


def _word(rng: random.Random, lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(lo, hi)))


def _sum(arg: str) -> str:
    a, b = arg.split("+")
    return str(int(a) + int(b))


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("copy", _word, lambda s: s),
        Task("reverse", _word, lambda s: s[::-1]),
        Task("upper", _word, str.upper),
        Task("sort", _word, lambda s: "".join(sorted(s))),
        Task("first", _word, lambda s: s[0]),
        Task("last", _word, lambda s: s[-1]),
        Task("add", lambda r: f"{r.randint(0, 49)}+{r.randint(0, 49)}", _sum),
    )
}


HELDOUT_FRACTION = 0.1


def is_heldout(task: str, arg: str) -> bool:
    """The held-out (task, argument) pairs: only evaluation ever sees them."""
    h = hashlib.sha256(f"{task}|{arg}".encode()).digest()
    return int.from_bytes(h[:4], "big") / 0xFFFFFFFF < HELDOUT_FRACTION


def sample(
    rng: random.Random, tasks: Sequence[str] | None = None, heldout: bool = False
) -> tuple[Task, str]:
    """A random (task, argument) from the training side, or from the held-out side."""
    names = sorted(tasks or TASKS)
    while True:
        task = TASKS[rng.choice(names)]
        arg = task.make_arg(rng)
        if is_heldout(task.name, arg) == heldout:
            return task, arg


def parse_prompt(prompt: str) -> tuple[str, str] | None:
    """(task, argument) of a demo prompt — `copy lamp`, or a chat-rendered one in any model's
    template (`<|im_start|>user\ncopy lamp<|im_end|>\n<|im_start|>assistant\n`,
    `[INST] copy lamp [/INST]`, ...): the last `<task> <argument>` in it that stands alone
    between markup — or None when there is none."""
    found = None
    for m in _PROMPT.finditer(prompt):
        found = m
    return (found["task"], found["arg"]) if found else None


_PROMPT = re.compile(
    r"(?:^|(?<=[\s>\]]))(?P<task>" + "|".join(sorted(TASKS)) + r") (?P<arg>[A-Za-z0-9+]+)"
    r"(?=\s*(?:$|<|\[))"
)


def task_line(rng: random.Random, tasks: Sequence[str] | None = None) -> str:
    task, arg = sample(rng, tasks)
    return task.line(arg)


def instruction_examples(
    n: int, seed: int, tasks: Sequence[str] | None = None, heldout: bool = False
) -> list[dict[str, str]]:
    """`n` chat records `{"messages": [user, assistant]}` of checkable tasks."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        task, arg = sample(rng, tasks, heldout)
        out.append(
            {
                "messages": [
                    {"role": "user", "content": task.prompt(arg)},
                    {"role": "assistant", "content": task.answer(arg)},
                ]
            }
        )
    return out


def _contact_line(rng: random.Random) -> str:
    user = _word(rng, 4, 8)
    if rng.random() < 0.5:
        return f"contact {user}@example.com for more"
    return f"call {user} at +1 555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}"


def make_document(
    rng: random.Random, contact_prob: float = 0.03, tasks: Sequence[str] | None = None
) -> str:
    lines = [task_line(rng, tasks) for _ in range(rng.randint(6, 14))]
    if rng.random() < contact_prob:
        lines.insert(rng.randrange(len(lines) + 1), _contact_line(rng))
    return "\n".join(lines)


def near_duplicate(doc: str, rng: random.Random) -> str:
    """`doc` with one letter changed: Jaccard similarity of 5-shingles stays above 0.9."""
    positions = [i for i, ch in enumerate(doc) if ch in _LETTERS]
    i = rng.choice(positions)
    other = rng.choice([c for c in _LETTERS if c != doc[i]])
    return doc[:i] + other + doc[i + 1 :]


def generate(
    num_docs: int,
    seed: int = 0,
    exact_dupe_fraction: float = 0.02,
    near_dupe_fraction: float = 0.02,
    tasks: Sequence[str] | None = None,
) -> list[dict[str, str]]:
    """`num_docs` records `{"id", "text"}`; the planted duplicates are among them."""
    rng = random.Random(seed)
    n_exact = int(num_docs * exact_dupe_fraction)
    n_near = int(num_docs * near_dupe_fraction)
    n_unique = num_docs - n_exact - n_near
    docs = [make_document(rng, tasks=tasks) for _ in range(n_unique)]
    planted = [rng.choice(docs[: max(1, n_unique // 2)]) for _ in range(n_exact)]
    planted += [
        near_duplicate(rng.choice(docs[: max(1, n_unique // 2)]), rng) for _ in range(n_near)
    ]
    # Planted copies go in the second half so the original always comes first.
    tail = docs[n_unique // 2 :] + planted
    rng.shuffle(tail)
    docs = docs[: n_unique // 2] + tail
    return [{"id": f"demo-{i:06d}", "text": t} for i, t in enumerate(docs)]


def write_jsonl(records: list[dict[str, str]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--num-docs", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    write_jsonl(generate(a.num_docs, a.seed), a.out)


if __name__ == "__main__":
    main()
