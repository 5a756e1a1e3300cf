"""AI feedback: preference records, the program judge, and K samples per prompt over Ray."""

import json

import pytest

from lifecycle.config import ScalingConfig
from lifecycle.data import demo
from lifecycle.data.preference import ProgramJudge, read_pairs, rlaif_records, to_pair
from ray_cluster.generate import sample_responses


def test_pairs_plain_and_chat_with_rejects(tmp_path):
    f = tmp_path / "prefs.jsonl"
    rows = [
        {"prompt": "copy abc", "chosen": "abc", "rejected": "abd"},
        {
            "prompt": [
                {"role": "system", "content": "terse"},
                {"role": "user", "content": "upper ab"},
            ],
            "chosen": [{"role": "assistant", "content": "AB"}],
            "rejected": "ab",
        },
        {"prompt": "copy x", "chosen": "x"},
        {"prompt": "copy x", "chosen": "x", "rejected": "x"},
        {"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n{oops\n")
    got = list(read_pairs(f))
    ok = [p for p, _, _ in got if p is not None]
    reasons = [why for p, _, why in got if p is None]
    assert [p["chosen"] for p in ok] == ["abc", "AB"]
    assert ok[1]["prompt"][0] == {"role": "system", "content": "terse"}
    assert reasons[0] == "missing or empty 'rejected' (a string or one assistant message)"
    assert reasons[1] == "chosen and rejected are identical"
    assert reasons[2] == "the prompt's last message must be the user's"
    assert reasons[3].startswith("bad JSON")
    assert to_pair("text")[1] == "not an object: got str"


def test_program_judge_ranks_exact_over_near_over_wrong():
    j = ProgramJudge()
    assert j.score("<|user|>upper lamp<|assistant|>", "LAMP") == 1.0
    near, wrong = j.score("upper lamp", "LAMB"), j.score("upper lamp", "zzzz")
    assert 0 <= wrong < near < 1
    with pytest.raises(ValueError, match="only knows demo tasks"):
        j.score("write a poem", "roses")


def test_rlaif_records_are_auditable_and_pairs_are_ordered():
    prompts = ["copy abc", "first xyz", "upper ab"]
    responses = [["abc", "abd", "q"], ["x", "x", "x"], ["AB", "ab", "A"]]
    j = ProgramJudge()
    scores = [j.score(p, r) for p, rs in zip(prompts, responses, strict=True) for r in rs]
    recs = rlaif_records(prompts, responses, scores, j.id)
    assert [r["responses"] for r in recs] == responses
    assert all(len(r["scores"]) == 3 and r["judge"] == "program:demo-tasks-v1" for r in recs)
    pairs = [r for r in recs if r["chosen"] is not None]
    assert [r["prompt"] for r in pairs] == ["copy abc", "upper ab"]  # all-equal: no pair
    assert all(r["chosen_score"] > r["rejected_score"] for r in pairs)
    assert pairs[0]["chosen"] == "abc" and pairs[0]["rejected"] == "q"


def test_sampling_spreads_over_ray_workers_in_prompt_order(ray_session, tmp_path):
    from lifecycle.config import ModelConfig
    from lifecycle.data.tokenizer import train_bpe
    from lifecycle.models import build_model, save_model

    texts = [r["text"] for r in demo.generate(100, 0, tasks=["copy"])]
    tok = train_bpe(texts, 280, 2, tmp_path / "tok")
    model = build_model(
        ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), tok, 0
    )
    save_model(model, tok, tmp_path / "m")
    prompts = [f"<|user|>copy w{i}<|assistant|>" for i in range(7)]
    scaling = ScalingConfig(resources_per_worker={"CPU": 1})
    out = sample_responses(
        str(tmp_path / "m"),
        prompts,
        3,
        num_workers=2,
        scaling=scaling,
        max_new_tokens=5,
        batch_size=4,
        seed=1,
        engine="transformers",
    )
    assert len(out) == 7 and all(len(r) == 3 for r in out)
    again = sample_responses(
        str(tmp_path / "m"),
        prompts,
        3,
        num_workers=2,
        scaling=scaling,
        max_new_tokens=5,
        batch_size=4,
        seed=1,
        engine="transformers",
    )
    assert again == out  # seeded per shard
    # an untrained model samples varied text: K samples of one prompt are not all equal
    assert any(len(set(r)) > 1 for r in out)
