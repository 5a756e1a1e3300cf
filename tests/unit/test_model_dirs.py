"""Bring your own model: every architecture `lifecycle/tiny.py` builds (the real config classes
with their quirks, each tokenizer with its family's own chat template) is read from its
directory — facts, chat template, loss mask, prompt parsing — without the project's own
`<|user|>` markers."""

import pytest
import torch

from lifecycle.archs import read_facts
from lifecycle.data.demo import parse_prompt
from lifecycle.data.instruct import (
    IGNORE,
    assistant_suffix,
    encode_chat,
    prompt_and_answer,
    user_text,
)
from lifecycle.data.preference import ProgramJudge
from lifecycle.eval.lm import padding_mask
from lifecycle.models import chat_tokenizer, load_model
from lifecycle.tiny import ARCHITECTURES, FAMILIES, build

CHAT = [
    {"role": "user", "content": "copy lamp"},
    {"role": "assistant", "content": "lamp"},
    {"role": "user", "content": "upper abc"},
    {"role": "assistant", "content": "ABC"},
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    return {mt: build(mt, root / mt) for mt in ARCHITECTURES}


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_each_architecture_reads_its_own_template(dirs, model_type):
    d = dirs[model_type]
    tok = chat_tokenizer(d)
    family = FAMILIES[ARCHITECTURES[model_type][0]]
    assert tok.chat_template == family.template and tok.eos_token == family.eos
    assert tok.pad_token is not None  # its own, or its EOS when it ships without one
    # The loss covers exactly the assistant turns as the template renders them.
    ids, labels = encode_chat(CHAT, tok)
    assert tok.decode(ids) == tok.apply_chat_template(CHAT, tokenize=False)
    scored = tok.decode([i for i, y in zip(ids, labels, strict=True) if y != IGNORE])
    assert "lamp" in scored and "ABC" in scored and "copy" not in scored and "upper" not in scored
    assert scored.count(family.eos) == 2  # each assistant turn learns to end itself
    assert assistant_suffix(tok).startswith(family.eos)  # how a judged reply is completed
    # The prompt ends with the family's generation prompt; the user text comes back out.
    prompt, answer = prompt_and_answer(CHAT, tok)
    assert answer == "ABC" and tok.apply_chat_template(CHAT, tokenize=False).startswith(prompt)
    assert user_text(prompt, tok) == "upper abc"
    single, _ = prompt_and_answer(CHAT[:2], tok)
    assert user_text(single, tok) == "copy lamp" and parse_prompt(single) == ("copy", "lamp")
    assert ProgramJudge().score(single, "lamp") == 1.0
    # The model: a forward pass on the rendered chat, shapes as its config.json says.
    facts = read_facts(d)
    model = load_model(d)
    assert facts.model_type == model.config.model_type == model_type
    assert facts.vocab_size == len(tok) and facts.head_dim == 32
    x = torch.tensor([ids])
    assert model(input_ids=x).logits.shape == (1, len(ids), facts.vocab_size)


def test_padding_with_eos_keeps_a_real_eos_inside_the_row(dirs):
    tok = chat_tokenizer(dirs["mistral"])  # no pad token: pads with its EOS `</s>`
    assert tok.pad_token_id == tok.eos_token_id
    ids, _ = encode_chat(CHAT, tok)  # "...lamp</s>[INST] upper abc [/INST]ABC</s>"
    row = torch.tensor([ids + [tok.pad_token_id] * 5])
    mask = padding_mask(row, tok.pad_token_id)[0].tolist()
    first_eos = ids.index(tok.eos_token_id)
    assert first_eos < len(ids) - 1 and mask[first_eos] == 1  # mid-row EOS stays visible
    assert mask[len(ids) :] == [0] * 5 and sum(mask) == len(ids) - 1


def test_a_tokenizer_without_a_template_or_role_tokens_is_refused(dirs, tmp_path):
    import json
    import shutil

    d = tmp_path / "plain"
    shutil.copytree(dirs["qwen2"], d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in d.glob("chat_template.*"):
        f.unlink()
    with pytest.raises(ValueError, match="has no chat template"):
        chat_tokenizer(d)


def test_data_tokenized_for_another_model_is_refused(dirs, tiny_data):
    """The data stage trained its own tokenizer; the model came with its own: mixing those
    blocks into SFT/RLHF (pretrain_mix, ptx) would train on another vocabulary's ids."""
    from lifecycle.data.pipeline import check_same_tokenizer
    from lifecycle.models import load_tokenizer

    own = load_tokenizer(f"{tiny_data.artifact_uri}/tokenizer")
    check_same_tokenizer(tiny_data.artifact_uri, own, "sft.data.pretrain_mix")  # same: fine
    with pytest.raises(ValueError, match=r"sft\.data\.pretrain_mix: the data stage's blocks"):
        check_same_tokenizer(
            tiny_data.artifact_uri, chat_tokenizer(dirs["qwen2"]), "sft.data.pretrain_mix"
        )


def test_a_model_dir_lends_its_tokenizer_to_the_data_stage(dirs):
    """`--from sft=DIR`: the data stage tokenizes with DIR's tokenizer, unless the config names
    one or the data comes with `--from data=PATH` (the chain reuses a data result cached with
    its own trained tokenizer when that is DIR's: test_cli_chain's `--stages rlhf`)."""
    from flows.cli import _adopt_model_source
    from lifecycle.config import load_config

    cfg = load_config("configs/finetune_cpu.yaml")
    d = str(dirs["qwen2"])
    assert cfg.data.tokenizer.path is None
    assert _adopt_model_source(cfg, {"sft": d}).data.tokenizer.path == d
    assert _adopt_model_source(cfg, {"sft": d, "data": "/x"}).data == cfg.data
    named = load_config("configs/finetune_cpu.yaml", ["data.tokenizer.path=/y"])
    assert _adopt_model_source(named, {"sft": d}).data.tokenizer.path == "/y"


def test_weights_that_are_not_whole_are_found_from_the_headers(dirs, tmp_path):
    """What the server checks before it starts a replica for a new version."""
    import shutil

    from lifecycle.archs import ModelDirError, check_weights

    check_weights(dirs["llama"])
    cut = tmp_path / "cut"
    shutil.copytree(dirs["llama"], cut)
    w = cut / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelDirError, match="truncated"):
        check_weights(cut)
    w.write_bytes(b"\xff" * 16)
    with pytest.raises(ModelDirError, match="not a safetensors file"):
        check_weights(cut)
    w.unlink()
    with pytest.raises(ModelDirError, match=r"no \*\.safetensors"):
        check_weights(cut)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_lora_sft_on_each_architecture(dirs, model_type, tmp_path):
    """The SFT stage's default method on each architecture's own layout (fused qkv and
    gate/up in Phi-3, q/k norms, biases, MoE experts): LoRA on all linear layers learns its
    chat-rendered rows while every base weight stays put, and the merged model it writes
    answers like the adapter on its base."""
    from lifecycle.config import SFTConfig
    from lifecycle.data.demo import instruction_examples
    from lifecycle.data.instruct import build_rows
    from lifecycle.peft_methods import apply_method, load_finetuned, save_outputs
    from lifecycle.training import make_optimizer

    d = dirs[model_type]
    tok = chat_tokenizer(d)
    msgs = [ex["messages"] for ex in instruction_examples(16, 0, ["copy", "upper"])]
    ids, labels, _ = build_rows(msgs, tok, 48, packing=False)
    ids, labels = torch.tensor(ids), torch.tensor(labels)
    mask = padding_mask(ids, tok.pad_token_id)
    cfg = SFTConfig(method="lora", max_steps=4, warmup_steps=0, lr=1e-2)
    model = apply_method(load_model(d), cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, cfg)
    losses = []
    for _ in range(cfg.max_steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]
    # every linear layer of every block is adapted (fused qkv / gate_up too, and the MoE
    # router); PEFT adapts a MoE's expert tensors as well (mixtral: `mlp.experts`)
    linear = {
        n
        for n, m in load_model(d).named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in n
    }
    adapted = {
        n.split(".lora_")[0].removeprefix("base_model.model.").replace(".base_layer", "")
        for n in changed
    }
    assert linear and linear <= adapted, sorted(linear - adapted)
    if model_type == "mixtral":
        assert any(n.endswith("mlp.experts") for n in adapted)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids[:4], attention_mask=mask[:4]).logits
    written = save_outputs(model, tok, tmp_path, cfg)
    with torch.no_grad():
        got = load_finetuned(written["model"])(input_ids=ids[:4], attention_mask=mask[:4]).logits
    assert torch.allclose(want, got, atol=1e-4)
