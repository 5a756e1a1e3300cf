"""Instruction data for SFT: chat and Alpaca records, validation with reasons, the loss mask,
and the rows an SFT or distillation run trains on (`prepare_instructions`).

Records are normalised to chat form, `{"messages": [{"role", "content"}, ...]}` with roles
system / user / assistant, and tokenized so that the loss covers assistant tokens (and the EOS
that ends each assistant turn) only. The tokenizer's chat template renders the same ids.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lifecycle.config import DistillConfig, InstructInput, SFTConfig

IGNORE = -100
ROLES = ("system", "user", "assistant")


def to_chat(obj: Any, fmt: str) -> tuple[list[dict[str, str]] | None, str | None]:
    """(messages, None) for a valid record, (None, reason) for a malformed one."""
    if not isinstance(obj, dict):
        return None, f"not an object: got {type(obj).__name__}"
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                return None, f"missing or empty string field {key!r}"
        extra = obj.get("input") or ""
        if not isinstance(extra, str):
            return None, "field 'input' is not a string"
        user = obj["instruction"] + (f"\n{extra}" if extra.strip() else "")
        return [
            {"role": "user", "content": user},
            {"role": "assistant", "content": obj["output"]},
        ], None
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return None, "missing or empty list field 'messages'"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return None, f"messages[{i}]: role must be one of {list(ROLES)}"
        if not isinstance(m.get("content"), str):
            return None, f"messages[{i}]: content must be a string"
    if msgs[-1]["role"] != "assistant":
        return None, "the last message must be the assistant's"
    if not any(m["role"] == "user" for m in msgs):
        return None, "no user message"
    return [{"role": m["role"], "content": m["content"]} for m in msgs], None


def iter_objects(
    path: str | Path, storage: str, what: str
) -> Iterator[tuple[Any, str, str | None]]:
    """(object, source, None) for every record of a jsonl file/dir or a `datasets` dir, or
    (None, source, reason) for a line that is not JSON. Raises when the input does not exist."""
    path = Path(path)
    if storage == "hf_disk":
        import datasets

        if not (path / "state.json").is_file():
            raise ValueError(f"{what} input {path}: not a `datasets` save_to_disk directory")
        for i, row in enumerate(datasets.load_from_disk(str(path))):
            yield row, f"{path}:{i}", None
        return
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ValueError(f"{what} input {path}: no such file or no *.jsonl in it")
    for f in files:
        for i, raw in enumerate(f.read_bytes().split(b"\n")):
            if not raw.strip():
                continue
            src = f"{f}:{i + 1}"
            try:
                yield json.loads(raw.decode("utf-8")), src, None
            except UnicodeDecodeError as e:
                yield None, src, f"undecodable bytes: {e.reason}"
            except json.JSONDecodeError as e:
                yield None, src, f"bad JSON: {e.msg}"


def read_records(
    inp: InstructInput,
) -> Iterator[tuple[list[dict[str, str]] | None, str, str | None]]:
    """(messages, source, reject reason) for every record of one input."""
    for obj, src, why in iter_objects(inp.path, inp.storage, "sft"):
        if why is not None:
            yield None, src, why
        else:
            msgs, why = to_chat(obj, inp.format)
            yield msgs, src, why


def is_val(messages: list[dict[str, str]], fraction: float) -> bool:
    h = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).digest()
    return int.from_bytes(h[:4], "big") / 0xFFFFFFFF < fraction


def encode_chat(messages: list[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids and labels of a chat rendered by the tokenizer's own chat template: labels
    are the ids of each assistant turn as the template renders it (its content and whatever
    ends the turn: EOS, `<|im_end|>`, `<|eot_id|>`, ...), IGNORE elsewhere.

    Each assistant turn's span is the text the template adds between the conversation up to
    that turn with the generation prompt and the conversation through that turn; the tokens of
    the whole rendering are labelled by their character offsets, so a merge across a boundary
    cannot shift the mask. A template whose prefix renderings are not prefixes of the whole
    (it rewrites earlier turns) is refused with its name.
    """
    text = render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(start) and text.startswith(through)):
            raise ValueError(
                f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: its chat template renders "
                "an earlier turn differently once later turns follow; the assistant turns "
                "cannot be masked by prefix (give a template without that, e.g. in "
                "tokenizer_config.json)"
            )
        spans.append((len(start), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [
        tok if any(a <= s < b for a, b in spans) else IGNORE
        for tok, (s, _) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return ids, labels


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def prompt_and_answer(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, str]:
    """The generation prompt (every turn but the last, plus the assistant marker) and the
    reference answer: what task exact-match compares."""
    return render(tokenizer, messages[:-1], add_generation_prompt=True), messages[-1]["content"]


def user_text(prompt: str, tokenizer: Any) -> str:
    """The last user turn of a prompt rendered by `tokenizer`'s chat template with the
    generation prompt (the inverse of rendering; a default system prompt the template adds is
    skipped); a prompt that is not such a rendering is returned as it is."""
    after, first, later = _user_turn_markup(tokenizer)
    if not prompt.endswith(after):
        return prompt
    body = prompt[: len(prompt) - len(after)] if after else prompt
    i = body.rfind(later)
    if i >= 0:  # a later turn: after an assistant turn's end and the user turn's opener
        return body[i + len(later) :]
    return body[len(first) :] if body.startswith(first) else prompt


def _user_turn_markup(tokenizer: Any) -> tuple[str, str, str]:
    """(what follows a user turn's content through the generation prompt, what precedes the
    first user turn's content, what precedes a later one's from the end of the assistant
    reply before it)."""
    user = [{"role": "user", "content": _SENTINEL}]
    first, _, after = render(tokenizer, user, add_generation_prompt=True).partition(_SENTINEL)
    turns = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _REPLY}, *user]
    before = render(tokenizer, turns, add_generation_prompt=True).partition(_SENTINEL)[0]
    later = before[before.rindex(_REPLY) + len(_REPLY) :]
    return after, first, later


def assistant_suffix(tokenizer: Any) -> str:
    """What `tokenizer`'s chat template renders after an assistant reply's content (EOS,
    `<|im_end|>\n`, `<|eot_id|>`, ...): a generated reply completed as the template would."""
    turns = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _REPLY}]
    return render(tokenizer, turns, add_generation_prompt=False).rpartition(_REPLY)[2]


_SENTINEL, _REPLY = "\x00USER\x00", "\x00REPLY\x00"


def demo_prompts(
    n: int, seed: int, heldout: bool, tokenizer: Any, tasks: list[str] | None
) -> tuple[list[str], list[str]]:
    """`n` demo-task generation prompts (chat-rendered) and their reference answers;
    `heldout` draws from the (task, word) pairs no training data contains."""
    from lifecycle.data import demo

    pairs = [
        prompt_and_answer(ex["messages"], tokenizer)
        for ex in demo.instruction_examples(n, seed, tasks, heldout)
    ]
    return [p for p, _ in pairs], [a for _, a in pairs]


def build_rows(
    examples: Iterable[list[dict[str, str]]], tokenizer: Any, max_length: int, packing: bool
) -> tuple[list[list[int]], list[list[int]], int]:
    """Fixed-length rows (padded with PAD / IGNORE); returns (ids, labels, too_long_count).

    With packing, consecutive examples share a row while they fit (attention is not masked
    between them, as in most packed SFT recipes).
    """
    pad = tokenizer.pad_token_id
    rows_ids: list[list[int]] = []
    rows_labels: list[list[int]] = []
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    too_long = 0

    def flush() -> None:
        if cur_ids:
            n = max_length - len(cur_ids)
            rows_ids.append(cur_ids + [pad] * n)
            rows_labels.append(cur_labels + [IGNORE] * n)

    for msgs in examples:
        ids, labels = encode_chat(msgs, tokenizer)
        if len(ids) > max_length:
            too_long += 1
            continue
        if not packing or len(cur_ids) + len(ids) > max_length:
            flush()
            cur_ids, cur_labels = [], []
        cur_ids += ids
        cur_labels += labels
    flush()
    return rows_ids, rows_labels, too_long


def write_rows(ids: list[list[int]], labels: list[list[int]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "input_ids": pa.array(ids, type=pa.list_(pa.int32())),
                "labels": pa.array(labels, type=pa.list_(pa.int32())),
            }
        ),
        path,
    )


def load_rows(path: str | Path) -> tuple[Any, Any]:
    """(input_ids, labels) int64 tensors [N, max_length] from `write_rows` output."""
    import numpy as np
    import torch

    t = pq.read_table(path)
    n = t.num_rows
    ids = t.column("input_ids").combine_chunks().flatten().to_numpy().reshape(n, -1)
    lab = t.column("labels").combine_chunks().flatten().to_numpy().reshape(n, -1)
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(lab.astype(np.int64))


Pair = tuple[str, str]
"""(prompt, response) of one extra training example."""


def prepare_instructions(
    cfg: SFTConfig | DistillConfig,
    tokenizer: Any,
    out: Path,
    extra_pairs: Sequence[Pair] = (),
    pretrain_data: str | None = None,
) -> tuple[dict[str, int], list[Pair]]:
    """Writes train/val rows and rejects under `out`; returns (counts, held-out eval pairs).

    With `data.pretrain_mix` > 0, that share of the training rows are windows of the data
    stage's pretraining text (`pretrain_data`, its output dir) with the loss on every token.
    """
    d = cfg.data
    if d.pretrain_mix > 0 and pretrain_data is None:
        raise ValueError(
            f"sft.data.pretrain_mix={d.pretrain_mix} needs the data stage's pretraining blocks: "
            "run the data stage (or pass --from data=DIR), or set pretrain_mix: 0"
        )
    train: list[list[dict[str, str]]] = []
    val: list[list[dict[str, str]]] = []
    rejects = []
    for inp in d.inputs:
        for msgs, src, why in read_records(inp):
            if msgs is None:
                rejects.append({"source": src, "reason": why})
            else:
                (val if is_val(msgs, d.val_fraction) else train).append(msgs)
    if d.demo is not None:
        from lifecycle.data import demo

        train += [
            r["messages"]
            for r in demo.instruction_examples(
                d.demo.num_train, d.demo.seed, d.demo.tasks, heldout=False
            )
        ]
        val += [
            r["messages"]
            for r in demo.instruction_examples(
                d.demo.num_eval, d.demo.seed + 1, d.demo.tasks, heldout=True
            )
        ]
    # The hook for other modules (the watermark stage plants its fingerprint this way).
    train += [
        [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        for p, r in extra_pairs
    ]
    if not train or not val:
        raise ValueError(
            f"sft: {len(train)} training and {len(val)} validation examples after "
            f"{len(rejects)} rejects: both must be non-empty"
        )
    tx, ty, long_train = build_rows(train, tokenizer, d.max_length, d.packing)
    vx, vy, long_val = build_rows(val, tokenizer, d.max_length, packing=False)
    if not tx or not vx:
        raise ValueError(f"sft: every example is longer than sft.data.max_length={d.max_length}")
    mixed = 0
    if d.pretrain_mix > 0:
        from lifecycle.data.pipeline import pretrain_windows

        mixed = round(len(tx) * d.pretrain_mix / (1 - d.pretrain_mix))
        windows = pretrain_windows(pretrain_data, "train", d.max_length, mixed, cfg.seed).tolist()
        tx, ty = tx + windows, ty + windows  # labels = inputs: the loss is on every token
    write_rows(tx, ty, out / "train.parquet")
    write_rows(vx, vy, out / "val.parquet")
    with open(out / "rejects.jsonl", "w") as f:
        for r in rejects:
            f.write(json.dumps(r) + "\n")
    eval_pairs = [prompt_and_answer(m, tokenizer) for m in val]
    counts = {
        "sft_examples_train": len(train),
        "sft_examples_val": len(val),
        "sft_rows_train": len(tx),
        "malformed_rejected": len(rejects),
        "too_long_rejected": long_train + long_val,
        "extra_pairs": len(extra_pairs),
        "pretrain_rows_mixed": mixed,
    }
    return counts, eval_pairs
