"""The RLHF objectives on their own: DPO, Bradley-Terry, KL, GAE, PPO's clipped losses."""

import math

import pytest
import torch

from lifecycle.config import ModelConfig
from lifecycle.data.instruct import IGNORE
from lifecycle.data.tokenizer import train_bpe
from lifecycle.models import build_model
from lifecycle.rlhf.losses import (
    bradley_terry_loss,
    dpo_loss,
    kl_per_token,
    sequence_logprob,
    token_logprobs,
)
from lifecycle.rlhf.ppo import ValueHead, gae, per_token_rewards, policy_loss, value_loss, whiten


def test_token_logprobs_match_log_softmax_and_skip_ignored():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[IGNORE, 1, 2, IGNORE], [IGNORE, IGNORE, 3, 4]])
    lp, mask = token_logprobs(logits, labels)
    ref = torch.log_softmax(logits, -1)
    assert mask.tolist() == [[True, True, False], [False, True, True]]
    assert lp[0, 0] == pytest.approx(ref[0, 0, 1].item())
    assert lp[1, 2] == pytest.approx(ref[1, 2, 4].item())
    assert lp[0, 2] == 0 and lp[1, 0] == 0


def test_dpo_loss_is_log2_at_reference_and_falls_with_margin():
    z = torch.zeros(4)
    loss, stats = dpo_loss(z, z, z, z, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    better, stats = dpo_loss(z + 2, z - 2, z, z, beta=0.1)
    assert better < loss and stats["rewards/accuracy"] == 1.0
    assert stats["rewards/chosen"].item() == pytest.approx(0.2)
    pc = torch.zeros(3, requires_grad=True)
    dpo_loss(pc, torch.zeros(3), torch.zeros(3), torch.zeros(3))[0].backward()
    assert (pc.grad < 0).all()  # descending the loss raises log π(chosen)


def test_bradley_terry_and_kl():
    assert bradley_terry_loss(torch.tensor([3.0]), torch.tensor([0.0])) < bradley_terry_loss(
        torch.tensor([0.0]), torch.tensor([3.0])
    )
    lp = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones_like(lp)
    assert kl_per_token(lp, lp, mask) == 0
    assert kl_per_token(lp, lp - 1, mask) > 0


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.1, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # last position is padding
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv[0, :3].tolist() == pytest.approx([0.5, 0.8, 0.9])
    assert ret[0, :3].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert adv[0, 3] == 0


def test_per_token_rewards_put_score_on_last_token():
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    r = per_token_rewards(torch.tensor([2.0]), torch.zeros(1, 4), torch.zeros(1, 4), mask, 0.1)
    assert r.tolist() == [[0.0, 0.0, 2.0, 0.0]]


def test_policy_loss_clips_the_ratio():
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    adv = torch.ones(1, 2)
    assert policy_loss(old, old, adv, mask) == pytest.approx(-1.0)
    far = torch.full((1, 2), 1.0)  # ratio e > 1 + clip: the gain is capped at 1.2
    assert policy_loss(far, old, adv, mask) == pytest.approx(-1.2)
    assert whiten(torch.tensor([[1.0, 3.0]]), mask)[0].tolist() == pytest.approx(
        [-1.0, 1.0], abs=1e-4
    )


def test_value_head_learns_returns_on_a_fixed_batch(tmp_path):
    tok = train_bpe([f"copy w{i} = w{i}" for i in range(50)], 280, 2, tmp_path)
    model = build_model(
        ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), tok, seed=0
    )
    head = ValueHead(16)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-2)
    torch.manual_seed(0)
    ids = torch.randint(0, len(tok), (4, 8))
    mask = torch.ones(4, 8)
    returns = torch.linspace(-1, 1, 32).view(4, 8)
    losses = []
    for _ in range(30):
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        v = head(hidden)
        loss = value_loss(v, v.detach(), returns, mask, clip=10.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_sequence_logprob_sums_scored_tokens(tmp_path):
    tok = train_bpe([f"copy w{i} = w{i}" for i in range(50)], 280, 2, tmp_path)
    model = build_model(
        ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), tok, seed=0
    )
    ids = torch.randint(0, len(tok), (2, 6))
    labels = ids.clone()
    labels[:, :3] = IGNORE
    with torch.no_grad():
        s = sequence_logprob(model, ids, labels)
        lp, _ = token_logprobs(model(input_ids=ids).logits, labels)
    assert torch.allclose(s, lp.sum(-1)) and (s < 0).all()


def test_reward_model_learns_to_rank_right_over_near_miss(tmp_path):
    from lifecycle.data import demo
    from lifecycle.data.preference import demo_pairs
    from lifecycle.models import save_model
    from lifecycle.rlhf.reward import accuracy, pair_loss, pair_rows, reward_model_from

    texts = [r["text"] for r in demo.generate(200, 0, tasks=["upper"])]
    tok = train_bpe(texts, 280, 2, tmp_path / "tok")
    base = build_model(
        ModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64), tok, seed=0
    )
    save_model(base, tok, tmp_path / "base")
    rm = reward_model_from(tmp_path / "base")

    def rows(pairs: list) -> tuple[torch.Tensor, torch.Tensor]:
        cx, _, rx, _, dropped = pair_rows(pairs, tok, 32)
        assert dropped == 0
        return torch.tensor(cx), torch.tensor(rx)

    train = rows(demo_pairs(256, 0, ["upper"]))
    held = rows(demo_pairs(64, 1, ["upper"], heldout=True))
    assert all(p["chosen"] != p["rejected"] for p in demo_pairs(10, 0))
    before = accuracy(rm, *held, tok.pad_token_id)
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    rm.train()
    for step in range(60):
        sl = slice((step * 32) % 256, (step * 32) % 256 + 32)
        loss, _ = pair_loss(rm, train[0][sl], train[1][sl], tok.pad_token_id)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = accuracy(rm, *held, tok.pad_token_id)
    assert after > before and after >= 0.8, (before, after)


def test_reward_model_and_llm_judges_score_batches(tmp_path):
    from lifecycle.models import save_model
    from lifecycle.rlhf.reward import make_reward_fn, reward_model_from

    tok = train_bpe([f"copy w{i} = w{i} yes" for i in range(50)], 280, 2, tmp_path / "tok")
    lm = build_model(
        ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), tok, seed=0
    )
    save_model(lm, tok, tmp_path / "lm")
    rm = reward_model_from(tmp_path / "lm")
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    prompts = ["<|user|>copy ab<|assistant|>", "<|user|>copy cd<|assistant|>"]
    rm_scores = make_reward_fn({"kind": "reward_model", "model_dir": str(tmp_path / "rm")})(
        prompts, ["ab", "zz"]
    )
    assert len(rm_scores) == 2 and all(isinstance(s, float) for s in rm_scores)
    assert rm_scores[0] != rm_scores[1]  # different responses, different scores
    llm = make_reward_fn(
        {
            "kind": "llm",
            "model_dir": str(tmp_path / "lm"),
            "template": "<|user|>{prompt} -> {response}?<|assistant|>",
            "yes": "yes",
        }
    )
    p_yes = llm(prompts, ["ab", "zz"])
    assert all(0 < p < 1 for p in p_yes)
    with pytest.raises(ValueError, match="unknown judge"):
        make_reward_fn({"kind": "oracle"})
