"""Pulse test of every SFT method on a tiny model, in one process (the loop pieces, no Ray):
trainable counts match PEFT's, frozen weights stay frozen, adapters reload to the same logits."""

import pytest
import torch

from lifecycle.config import SFT_METHODS, ConfigError, ModelConfig, SFTConfig, validate_config
from lifecycle.data import demo
from lifecycle.data.instruct import build_rows, prompt_and_answer
from lifecycle.data.tokenizer import train_bpe
from lifecycle.eval.generate import generate
from lifecycle.models import build_model, save_model
from lifecycle.peft_methods import apply_method, load_finetuned, save_outputs, trainable_parameters
from lifecycle.training import make_optimizer

CPU_METHODS = [m for m in SFT_METHODS if m != "qlora"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft-base")
    texts = [r["text"] for r in demo.generate(200, seed=2, tasks=["copy", "upper"])]
    tok = train_bpe(texts, 280, 2, root / "tok")
    model = build_model(
        ModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64), tok, seed=0
    )
    save_model(model, tok, root / "base")
    msgs = [r["messages"] for r in demo.instruction_examples(64, 0, ["copy", "upper"])]
    ids, labels, _ = build_rows(msgs, tok, 32, packing=False)
    return root / "base", tok, torch.tensor(ids), torch.tensor(labels), msgs


@pytest.mark.parametrize("method", CPU_METHODS)
def test_method_pulse(base, method, tmp_path):
    from lifecycle.models import load_model

    base_dir, tok, ids, labels, msgs = base
    cfg = SFTConfig(
        method=method,
        max_steps=5,
        warmup_steps=0,
        lr=1e-2,
        adalora={"init_r": 4, "target_r": 2, "tinit_fraction": 0.0, "tfinal_fraction": 0.0},
    )
    model = apply_method(load_model(base_dir), cfg)
    trainable, total = trainable_parameters(model)
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == counted > 0
    if method == "full":
        assert trainable == total
    else:
        assert trainable < total / 2

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, cfg)
    mask = (ids != tok.pad_token_id).long()
    losses = []
    for step in range(cfg.max_steps):
        loss = model(input_ids=ids[:16], attention_mask=mask[:16], labels=labels[:16]).loss
        loss.backward()
        opt.step()
        if method == "adalora":
            model.base_model.update_and_allocate(step)
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert changed and not (changed & frozen)  # frozen (base) weights did not move
    if method == "full":
        assert not frozen

    # Saved outputs reload and give the same logits.
    model.eval()
    x = ids[:4]
    with torch.no_grad():
        ref = model(input_ids=x, attention_mask=mask[:4]).logits
    written = save_outputs(model, tok, tmp_path, cfg)
    expect = {
        "full": {"model"},
        "lora": {"adapter", "model"},
        "adalora": {"adapter", "model"},
        "loha": {"adapter", "model"},
    }.get(method, {"adapter"})
    assert set(written) == expect
    for path in written.values():
        reloaded = load_finetuned(path)
        with torch.no_grad():
            got = reloaded(input_ids=x, attention_mask=mask[:4]).logits
        assert torch.allclose(ref, got, atol=1e-4), path
    # and generate, as the evaluation does (left-padded batches through PEFT)
    prompts = [prompt_and_answer(m, tok)[0] for m in msgs[:3]]
    assert len(generate(load_finetuned(next(iter(written.values()))), tok, prompts, 4)) == 3


def test_qlora_without_gpu_fails_at_config_load():
    with pytest.raises(ConfigError, match=r"qlora.*CUDA GPUs.*use method: lora"):
        validate_config({"sft": {"method": "qlora"}})


def test_method_options_are_validated():
    with pytest.raises(ConfigError, match=r"sft\.lora\.r"):
        validate_config({"sft": {"lora": {"r": 0}}})
    with pytest.raises(ConfigError, match="target_r must not exceed init_r"):
        validate_config({"sft": {"method": "adalora", "adalora": {"init_r": 2, "target_r": 8}}})
    with pytest.raises(ConfigError, match="feedforward_modules"):
        validate_config(
            {
                "sft": {
                    "method": "ia3",
                    "ia3": {"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]},
                }
            }
        )
    with pytest.raises(ConfigError, match=r"sft\.method"):
        validate_config({"sft": {"method": "dora"}})
    with pytest.raises(ConfigError, match="zero_stage 3"):
        validate_config({"sft": {"method": "lora", "deepspeed": {"zero_stage": 3}}})
