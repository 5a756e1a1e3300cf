"""Pulse tests of each RLHF algorithm's step on a tiny model (no Ray): the policy moves, the
reference stays frozen, losses are finite; PPO's value loss goes down on a fixed batch."""

import copy

import pytest
import torch

from lifecycle.config import ModelConfig
from lifecycle.data import demo
from lifecycle.data.instruct import build_rows, prompt_and_answer
from lifecycle.data.preference import ProgramJudge, demo_pairs
from lifecycle.data.tokenizer import train_bpe
from lifecycle.models import build_model
from lifecycle.rlhf.algorithms import dpo_step, grpo_step, ppo_step, rollout
from lifecycle.rlhf.ppo import ValueHead


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    texts = [r["text"] for r in demo.generate(200, 0, tasks=["copy", "upper"])]
    tok = train_bpe(texts, 280, 2, tmp_path_factory.mktemp("tok"))
    policy = build_model(
        ModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64), tok, seed=0
    )
    prompts = [
        prompt_and_answer(ex["messages"], tok)[0]
        for ex in demo.instruction_examples(8, 0, ["copy", "upper"])
    ]
    return tok, policy, prompts


def _pair_rows(pairs, tok, max_length):
    """(ids, labels) of the chosen and of the rejected sides of preference pairs."""

    def rows(key):
        msgs = [[*p["prompt"], {"role": "assistant", "content": p[key]}] for p in pairs]
        ids, labels, _ = build_rows(msgs, tok, max_length, packing=False)
        return torch.tensor(ids), torch.tensor(labels)

    return rows("chosen"), rows("rejected")


def _judge(prompts, responses):
    j = ProgramJudge()
    return [j.score(p, r) for p, r in zip(prompts, responses, strict=True)]


def _snapshot(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def _moved(m, before):
    return any(not torch.equal(p, before[n]) for n, p in m.named_parameters())


def test_rollout_marks_response_tokens(setup):
    tok, policy, prompts = setup
    ro = rollout(policy, tok, prompts[:3], 2, max_new_tokens=6)
    assert ro.ids.shape[0] == 6 and len(ro.responses) == 6 and ro.prompts[0] == ro.prompts[1]
    width = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts[:3])
    assert (ro.labels[:, :width] == -100).all()  # no prompt token is scored
    assert ((ro.labels[:, width:] != -100).sum(1) >= 1).all()


def test_dpo_step(setup):
    tok, base, _ = setup
    policy, ref = copy.deepcopy(base), copy.deepcopy(base)
    ref.requires_grad_(False)
    pairs = demo_pairs(16, 0, ["copy", "upper"])

    ch, rj = _pair_rows(pairs, tok, 32)
    p0, r0 = _snapshot(policy), _snapshot(ref)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss, stats = dpo_step(policy, ref, ch, rj, tok.pad_token_id, beta=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start
    assert losses[-1] < losses[0] and stats["rewards/accuracy"] > 0.5
    assert _moved(policy, p0) and not _moved(ref, r0)


def test_grpo_step(setup):
    tok, base, prompts = setup
    policy, ref = copy.deepcopy(base), copy.deepcopy(base)
    ref.requires_grad_(False)
    p0, r0 = _snapshot(policy), _snapshot(ref)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    torch.manual_seed(0)
    kls = []
    for _ in range(3):
        loss, stats = grpo_step(
            policy, ref, tok, prompts[:4], _judge, group_size=4, max_new_tokens=6, beta=0.05
        )
        assert torch.isfinite(loss)
        kls.append(stats["train/kl"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert _moved(policy, p0) and not _moved(ref, r0)
    # KL to the reference: 0 while the policy is the reference, positive once it has moved.
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[-1] > 1e-6, kls


def test_ppo_step_value_head_learns(setup):
    tok, base, prompts = setup
    policy, ref = copy.deepcopy(base), copy.deepcopy(base)
    ref.requires_grad_(False)
    head = ValueHead(32)
    p0, r0 = _snapshot(policy), _snapshot(ref)
    opt = torch.optim.AdamW([*policy.parameters(), *head.parameters()], lr=5e-3)
    torch.manual_seed(0)
    # A constant reward: the returns are fixed, so the value loss must fall as the head fits.
    stats = [
        ppo_step(
            policy,
            head,
            ref,
            tok,
            prompts[:4],
            lambda p, r: [1.0] * len(r),
            opt,
            max_new_tokens=6,
            kl_coef=0.0,
            epochs=4,
        )
        for _ in range(4)
    ]
    vl = [s["train/value_loss"] for s in stats]
    assert all(torch.isfinite(torch.tensor([s["train/policy_loss"] for s in stats])))
    assert vl[-1] < vl[0]
    assert _moved(policy, p0) and not _moved(ref, r0)


@pytest.mark.parametrize("model_type", ["qwen2", "gemma2"])
def test_dpo_and_grpo_in_bf16_on_a_model_dir(tmp_path, model_type):
    """bf16 as the RLHF loop runs it (ray_cluster/rlhf.py): forwards and rollouts under
    autocast, fp32 master weights; on a model dir with its own chat template (ChatML / Gemma
    turns), a tokenizer padding as it does."""
    from lifecycle.models import chat_tokenizer, load_model
    from lifecycle.tiny import build
    from lifecycle.training import autocast_for

    d = build(model_type, tmp_path / model_type)
    tok, base = chat_tokenizer(d), load_model(d)
    amp = autocast_for(torch.device("cpu"), torch.bfloat16)
    policy, ref = copy.deepcopy(base), copy.deepcopy(base).requires_grad_(False)
    pairs = demo_pairs(16, 0, ["copy", "upper"])

    ch, rj = _pair_rows(pairs, tok, 48)
    p0, r0 = _snapshot(policy), _snapshot(ref)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        with amp():
            loss, stats = dpo_step(policy, ref, ch, rj, tok.pad_token_id, beta=0.5)
        assert loss.dtype == torch.float32  # log-probs and the loss in fp32
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] == pytest.approx(0.6931, abs=2e-2)  # policy == reference (bf16 rounding)
    assert losses[-1] < losses[0] and _moved(policy, p0) and not _moved(ref, r0)
    assert all(p.dtype == torch.float32 for p in policy.parameters())

    prompts = [prompt_and_answer(ex["messages"], tok)[0] for ex in demo.instruction_examples(4, 0)]
    torch.manual_seed(0)
    p1 = _snapshot(policy)
    with amp():
        loss, stats = grpo_step(
            policy, ref, tok, prompts, _judge, group_size=4, max_new_tokens=6, beta=0.05
        )
    assert torch.isfinite(loss) and stats["train/kl"] > 0  # the DPO steps above moved it
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert _moved(policy, p1) and not _moved(ref, r0)
