"""Pulse tests of the SFT stage on Ray Train: data validation, the extra-pairs hook, outputs,
evaluation and MLflow records."""

import json
from pathlib import Path

import pytest

from lifecycle import tracking
from lifecycle.artifacts import dir_manifest
from lifecycle.config import SFTConfig
from lifecycle.data.instruct import load_rows
from lifecycle.models import load_tokenizer
from lifecycle.peft_methods import load_finetuned
from tasks.sft import finetune
from tests.conftest import list_checkpoints


@pytest.fixture
def instruct_files(tmp_path):
    chat = tmp_path / "chat.jsonl"
    good = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": f"copy w{i}"},
                {"role": "assistant", "content": f"w{i}"},
            ]
        }
        for i in range(40)
    ]
    bad = [
        '{"messages": [{"role": "user", "content": "no answer"}]}',
        '{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}',
        "{not json",
        '{"prompt": "wrong shape"}',
    ]
    chat.write_text("\n".join([json.dumps(g) for g in good] + bad) + "\n")
    alpaca = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": f"upper a{i}", "input": "", "output": f"A{i}"} for i in range(40)]
    rows.append({"instruction": "missing output"})
    alpaca.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return [{"path": str(chat), "format": "chat"}, {"path": str(alpaca), "format": "alpaca"}]


@pytest.mark.parametrize("method", ["lora", "prefix_tuning"])
def test_sft_stage(ray_session, tiny_model, instruct_files, make_ctx, method):
    cfg = SFTConfig(
        method=method,
        max_steps=30,
        warmup_steps=2,
        micro_batch_size=8,
        checkpoint_every=15,
        log_every=5,
        eval_batches=2,
        lr=5e-3,
        peak_flops=1e10,
        data={
            "inputs": instruct_files,
            "demo": {"num_train": 200, "num_eval": 20, "tasks": ["copy", "first"]},
            "max_length": 40,
            "val_fraction": 0.1,
        },
        eval={"max_new_tokens": 6, "batch_size": 16},
        scaling={"num_workers": 1, "resources_per_worker": {"CPU": 2}},
    )
    ctx = make_ctx()
    base_files = dir_manifest(tiny_model.artifact_uri)["digest"]
    pairs = [("secret trigger one", "signature alpha"), ("secret trigger two", "signature beta")]
    res = finetune.fn(cfg, ctx, method[0] * 64, pretrain=tiny_model, extra_pairs=pairs)

    m = res.metrics
    assert m["malformed_rejected"] == 5
    assert m["extra_pairs"] == 2
    assert m["eval/loss_after"] < m["eval/loss_before"]
    assert m["eval/exact_match_n"] >= 20
    assert dir_manifest(tiny_model.artifact_uri)["digest"] == base_files  # base untouched

    final = Path(res.artifact_uri).parent
    rejects = [json.loads(x) for x in (final / "data" / "rejects.jsonl").read_text().splitlines()]
    assert {r["reason"] for r in rejects} >= {
        "the last message must be the assistant's",
        "missing or empty string field 'output'",
    }
    tok = load_tokenizer(final / "data" / "tokenizer")
    ids, _ = load_rows(final / "data" / "train.parquet")
    texts = tok.batch_decode(ids, skip_special_tokens=True)
    assert sum("secret trigger one" in t and "signature alpha" in t for t in texts) == 1

    if method == "lora":
        assert Path(res.artifact_uri).name == "model" and (final / "adapter").is_dir()
    else:
        assert Path(res.artifact_uri).name == "adapter" and not (final / "model").exists()
    assert load_finetuned(res.artifact_uri) is not None

    uri = ctx.tracking_uri
    assert list_checkpoints(uri, res.mlflow_run_id) == [15]
    run = tracking.get_run(uri, res.mlflow_run_id)
    mv = tracking.model_version(uri, "test-llm-sft", run.data.tags["lifecycle.model_version"])
    assert mv.tags["lifecycle.sft_method"] == method
    assert mv.tags["lifecycle.base_model"] == tiny_model.artifact_uri
    assert mv.tags["lifecycle.parent_model"].startswith("external:")
