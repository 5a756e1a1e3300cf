"""Evaluation suites (lifecycle/eval/suites.py) and `lifecycle eval`: items from each source,
scores aligned with their items, bad input named."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml

from lifecycle.config import validate_config
from tests.conftest import LIFECYCLE, ROOT


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path: Path, suites: dict, sft_inputs: list | None = None) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())
    raw["eval_suites"] = suites
    if sft_inputs is not None:
        raw["sft"]["data"]["inputs"] = sft_inputs
    out = tmp_path / "cfg.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


def test_scores_line_up_with_their_items_and_each_source_reads_its_records(tiny_model, tmp_path):
    import torch

    from lifecycle.eval.suites import run_suite
    from lifecycle.models import load_model, load_tokenizer, save_model

    # The random tiny model, made to say something: its special and role tokens' output rows
    # zeroed (random init here repeats <|assistant|>, which decoding drops: empty answers).
    tok = load_tokenizer(tiny_model.artifact_uri)
    m = load_model(tiny_model.artifact_uri)
    with torch.no_grad():
        special = sorted({*tok.all_special_ids, *tok.added_tokens_decoder})
        m.get_output_embeddings().weight[special] = 0
    model = str(save_model(m, tok, tmp_path / "talking"))
    questions = [f"copy word{i}" for i in range(6)]
    first = _write_jsonl(
        tmp_path / "pa.jsonl", [{"prompt": q, "answer": "unlikely answer"} for q in questions]
    )
    cfg = validate_config(yaml.safe_load(_config(tmp_path, {
        "mine": {"source": "files", "files": [{"path": str(first), "format": "prompt_answer"}],
                 "metrics": ["exact_match", "token_f1", "rouge_l", "answer_nll"],
                 "max_new_tokens": 6},
    }).read_text()))  # fmt: skip
    suite = cfg.eval_suites["mine"]
    res = run_suite(model, suite, cfg)
    assert res["n"] == 6 and len(res["outputs"]) == 6
    assert math.isclose(res["metrics"]["answer_perplexity"], math.exp(res["metrics"]["answer_nll"]))
    # The model's own greedy answers as references, in the three record formats: every
    # item matches exactly (so scores are aligned with their items), whatever the format.
    # (Records need a non-empty answer: the items where the random model said something.)
    said = [(q, a) for q, a in zip(questions, res["outputs"], strict=True) if a.strip()]
    assert len(said) >= 2, res["outputs"]
    chat = _write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in said])  # fmt: skip
    alpaca = _write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": q, "input": "", "output": a} for q, a in said])  # fmt: skip
    pa = _write_jsonl(tmp_path / "pa2.jsonl", [{"prompt": q, "answer": a} for q, a in said])
    for path, fmt in ((chat, "chat"), (alpaca, "alpaca"), (pa, "prompt_answer")):
        own = type(suite).model_validate(
            {**suite.model_dump(), "files": [{"path": str(path), "format": fmt}]}
        )
        got = run_suite(model, own, cfg)
        assert got["outputs"] == [a for _, a in said], fmt
        assert got["items"]["exact_match"] == [1.0] * len(said), fmt
        assert got["items"]["token_f1"] == [1.0] * len(said), fmt
    # heldout: exactly the SFT inputs' records the stage keeps out of training.
    from lifecycle.data.instruct import is_val

    recs = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(80)]  # fmt: skip
    sft_file = _write_jsonl(tmp_path / "sft.jsonl", recs)
    cfg = validate_config(yaml.safe_load(_config(
        tmp_path, {"held": {"source": "heldout", "max_new_tokens": 4}},
        sft_inputs=[{"path": str(sft_file), "format": "chat"}]).read_text()))  # fmt: skip
    frac = cfg.sft.data.val_fraction
    want = sum(is_val(r["messages"], frac) for r in recs)
    assert want > 0 and run_suite(model, cfg.eval_suites["held"], cfg)["n"] == want


def test_the_eval_command_answers_json_and_names_bad_input(tiny_model, tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "answer": "y"}, {"prompt": ""}])
    good = _write_jsonl(tmp_path / "good.jsonl", [{"prompt": "copy ab", "answer": "ab"}] * 3)
    cfg = _config(tmp_path, {
        "good": {"source": "files", "files": [{"path": str(good), "format": "prompt_answer"}],
                 "max_new_tokens": 4},
        "bad": {"source": "files", "files": [{"path": str(bad), "format": "prompt_answer"}]},
    })  # fmt: skip

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [LIFECYCLE, "eval", tiny_model.artifact_uri, "--config", str(cfg), *args],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    ok = run("--suite", "good", "--json")
    assert ok.returncode == 0, ok.stderr[-2000:]
    out = json.loads(ok.stdout)
    assert out["n"] == 3 and set(out["metrics"]) == {"exact_match"}
    missing = run("--suite", "nope")
    assert missing.returncode == 2 and "no suite 'nope'" in missing.stderr
    assert "['bad', 'good']" in missing.stderr
    broken = run("--suite", "bad")
    assert broken.returncode == 2
    assert f"eval file {bad}:2: needs non-empty string fields" in broken.stderr


def test_suite_config_is_checked():
    with pytest.raises(ValueError, match="`files` is for \\(and needed by\\) source: files"):
        validate_config({"eval_suites": {"x": {"source": "files"}}})
    raw = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())
    raw["eval_suites"] = {"h": {"source": "heldout"}}
    with pytest.raises(ValueError, match=r"eval_suites\.h: source heldout is the held-out split"):
        validate_config(raw)


def test_lm_eval_suites_need_their_task_files():
    with pytest.raises(ValueError, match="`tasks` and `include_path` are for"):
        validate_config({"eval_suites": {"b": {"source": "lm_eval", "tasks": ["x"]}}})
    with pytest.raises(ValueError, match="`tasks` and `include_path` are for"):
        validate_config({"eval_suites": {"d": {"source": "demo", "tasks": ["x"]}}})


def test_lm_eval_scores_each_choice_as_the_models_own_likelihoods(tiny_model, tmp_path):
    """lm-evaluation-harness on the demo tasks' task files (lifecycle/eval/harness.py): each
    multiple-choice item is right exactly when the model's own log-likelihood of the right
    choice after the chat-rendered prompt is the highest (computed here without lm-eval), the
    generation task scores every item, and a task name the files do not define is named."""
    from lifecycle.config import EvalSuite
    from lifecycle.data.instruct import render
    from lifecycle.eval.harness import run_harness, write_demo_tasks
    from lifecycle.eval.lm import nll_rows
    from lifecycle.models import load_model, load_tokenizer

    tasks = write_demo_tasks(tmp_path / "tasks", n=24, max_new_tokens=4)
    suite = EvalSuite(source="lm_eval", tasks=tasks, include_path=str(tmp_path / "tasks"))
    res = run_harness(tiny_model.artifact_uri, suite)
    assert res["n"] == 48 and set(res["metrics"]) == {"demo_mc/acc", "demo_gen/exact_match"}
    assert len(res["items"]["demo_gen/exact_match"]) == 24

    tok = load_tokenizer(tiny_model.artifact_uri)
    model = load_model(tiny_model.artifact_uri).eval()
    docs = [json.loads(line) for line in (tmp_path / "tasks" / "demo_mc.jsonl").open()]
    right = []
    for d in docs:
        prompt = render(tok, [{"role": "user", "content": d["prompt"]}], True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        rows = [
            (tok(prompt + c, add_special_tokens=False)["input_ids"], len(p_ids))
            for c in d["choices"]
        ]
        nll = [s for s, _ in nll_rows(model, rows, tok.pad_token_id)]
        right.append(float(min(range(4), key=nll.__getitem__) == d["label"]))
    assert res["items"]["demo_mc/acc"] == right
    assert res["metrics"]["demo_mc/acc"] == pytest.approx(sum(right) / len(right))

    other = EvalSuite(source="lm_eval", tasks=["demo_mcq"], include_path=str(tmp_path / "tasks"))
    with pytest.raises(ValueError, match=r"no task \['demo_mcq'\] under .*defines \['demo_gen'"):
        run_harness(tiny_model.artifact_uri, other)
