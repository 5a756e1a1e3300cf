"""Instruction data: record validation, the assistant-only loss mask, packing, eval loss."""

import json
import math

import pytest
import torch

from lifecycle.config import InstructInput, ModelConfig
from lifecycle.data.instruct import (
    IGNORE,
    build_rows,
    encode_chat,
    prompt_and_answer,
    read_records,
    to_chat,
)
from lifecycle.data.tokenizer import CHAT_TEMPLATE, train_bpe
from lifecycle.eval.lm import nll_sum
from lifecycle.models import build_model


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_bpe(
        [f"copy word{i} = word{i}" for i in range(100)], 280, 2, tmp_path_factory.mktemp("tok")
    )


MSGS = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "copy abc"},
    {"role": "assistant", "content": "abc"},
]


def test_loss_mask_covers_assistant_content_and_eos_only(tok):
    ids, labels = encode_chat(MSGS, tok)
    assert len(ids) == len(labels)
    scored = [i for i, y in zip(ids, labels, strict=True) if y != IGNORE]
    assert tok.decode(scored) == "abc<|eos|>"
    # The same ids as the stored chat template renders.
    assert tok.chat_template == CHAT_TEMPLATE
    rendered = tok.apply_chat_template(MSGS, tokenize=False)
    assert tok(rendered, add_special_tokens=False)["input_ids"] == ids
    prompt, answer = prompt_and_answer(MSGS, tok)
    assert prompt == "<|system|>be brief<|user|>copy abc<|assistant|>" and answer == "abc"


def test_alpaca_and_chat_validation():
    msgs, why = to_chat({"instruction": "upper", "input": "abc", "output": "ABC"}, "alpaca")
    assert why is None and msgs[0]["content"] == "upper\nabc" and msgs[1]["content"] == "ABC"
    assert to_chat({"instruction": "x"}, "alpaca")[1] == "missing or empty string field 'output'"
    assert to_chat({"messages": []}, "chat")[1] == "missing or empty list field 'messages'"
    assert (
        "role must be one of" in to_chat({"messages": [{"role": "bot", "content": "x"}]}, "chat")[1]
    )
    assert to_chat({"messages": [{"role": "user", "content": "x"}]}, "chat")[1] == (
        "the last message must be the assistant's"
    )
    assert to_chat([1, 2], "chat")[1] == "not an object: got list"


def test_rows_padding_packing_and_too_long(tok):
    short = [MSGS] * 3
    long = [[{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "y"}]]
    ids, labels, too_long = build_rows(short + long, tok, 32, packing=False)
    assert len(ids) == 3 and too_long == 1 and all(len(r) == 32 for r in ids)
    assert ids[0][-1] == tok.pad_token_id and labels[0][-1] == IGNORE
    packed, plabels, _ = build_rows(short, tok, 32, packing=True)
    n = len(encode_chat(MSGS, tok)[0])
    assert len(packed) == math.ceil(3 / (32 // n))
    assert sum(y != IGNORE for r in plabels for y in r) == sum(
        y != IGNORE for r in labels for y in r
    )


def test_read_records_from_jsonl_and_hf_disk(tmp_path):
    import datasets

    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"messages": MSGS}) + "\n{bad\n")
    got = list(read_records(InstructInput(path=str(f), format="chat")))
    assert got[0][0] == MSGS and got[1][0] is None and got[1][2].startswith("bad JSON")
    datasets.Dataset.from_list(
        [{"instruction": "copy a", "input": "", "output": "a"}]
    ).save_to_disk(str(tmp_path / "hf"))
    ((msgs, _, why),) = read_records(
        InstructInput(path=str(tmp_path / "hf"), format="alpaca", storage="hf_disk")
    )
    assert why is None and msgs[-1]["content"] == "a"
    with pytest.raises(ValueError, match="no such file"):
        list(read_records(InstructInput(path=str(tmp_path / "nope.jsonl"), format="chat")))


def test_heldout_loss_counts_only_scored_tokens(tok):
    model = build_model(
        ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), tok, seed=0
    )
    ids, labels, _ = build_rows([MSGS] * 4, tok, 32, packing=False)
    ids, labels = torch.tensor(ids), torch.tensor(labels)
    total, count = nll_sum(model, ids, labels, (ids != tok.pad_token_id).long())
    assert count == int((labels[:, 1:] != IGNORE).sum()) < ids[:, 1:].numel()
    with torch.no_grad():  # transformers' own mean over the same scored tokens
        hf = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels)
    assert total / count == pytest.approx(float(hf.loss), rel=1e-5)
    assert total / count == pytest.approx(math.log(len(tok)), rel=0.2)  # untrained: ~uniform
