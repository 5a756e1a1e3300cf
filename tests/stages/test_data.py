"""Pulse tests of the data stage on Ray Data: formats, dedup, rejects, MLflow records."""

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lifecycle import tracking
from lifecycle.config import DataConfig
from lifecycle.data import demo
from lifecycle.data.pipeline import DataError, load_blocks
from tasks.data import prepare_data
from tests.conftest import child_runs


@pytest.fixture
def corpus(tmp_path):
    """Unique demo docs in three formats, plus 3 exact and 3 near duplicates and 4 bad lines."""
    rng = random.Random(11)
    docs = [demo.make_document(rng) for _ in range(150)]
    root = tmp_path / "corpus"
    (root / "jsonl").mkdir(parents=True)
    lines = [json.dumps({"text": d}) for d in docs[:100]]
    lines += [
        json.dumps({"text": docs[1]}),
        json.dumps({"text": docs[2]}),
        json.dumps({"text": docs[120]}),
    ]  # exact duplicates (one across formats)
    lines += [json.dumps({"text": demo.near_duplicate(docs[i], rng)}) for i in (4, 40, 140)]
    lines += ["{broken json", json.dumps({"content": "no text"}), json.dumps({"text": None})]
    data = ("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff bytes here and there"}\n'
    (root / "jsonl" / "part-0.jsonl").write_bytes(data)
    pq.write_table(pa.table({"body": docs[100:130]}), root / "docs.parquet")
    (root / "txt").mkdir()
    for i, d in enumerate(docs[130:150]):
        (root / "txt" / f"{i:03d}.txt").write_text(d)
    return root


def _cfg(root, **kw):
    return DataConfig(
        inputs=[
            {"path": str(root / "jsonl"), "format": "jsonl"},
            {"path": str(root / "*.parquet"), "format": "parquet", "text_field": "body"},
            {"path": str(root / "txt"), "format": "text"},
        ],
        block_size=32,
        val_fraction=0.1,
        tokenizer={"vocab_size": 300},
        **kw,
    )


def test_data_stage_dedups_rejects_and_records(ray_session, corpus, make_ctx):
    ctx = make_ctx()
    res = prepare_data.fn(_cfg(corpus), ctx, key="a" * 64)
    m = res.metrics
    assert m["docs_in"] == 150 + 3 + 3 + 4
    assert m["exact_dupes_removed"] == 3
    assert m["near_dupes_removed"] == 3
    assert m["malformed_rejected"] == 4
    assert m["docs_out"] == 150
    assert m["docs_train"] + m["docs_val"] == 150 and m["docs_val"] > 0

    out = Path(res.artifact_uri)
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    reasons = sorted(r["reason"].split(":")[0] for r in rejects)
    assert reasons == [
        "bad JSON",
        "field 'text' is NoneType, not a string",
        "missing field 'text'",
        "undecodable bytes",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["tokens_train"] == manifest["counts"]["blocks_train"] * 32
    train = load_blocks(out, "train")
    assert train.shape == (manifest["counts"]["blocks_train"], 32)
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert not list(out.parent.glob("*.partial"))

    run = tracking.get_run(ctx.tracking_uri, res.mlflow_run_id)
    assert run.data.tags[tracking.PARENT_TAG] == ctx.parent_run_id
    assert run.data.metrics["near_dupes_removed"] == 3
    assert run.data.tags["lifecycle.data_manifest_sha256"] == manifest["sha256"] == res.artifact_id
    assert run.inputs.dataset_inputs[0].dataset.digest == manifest["sha256"][:36]
    arts = {a.path for a in tracking.client(ctx.tracking_uri).list_artifacts(res.mlflow_run_id)}
    assert {"manifest.json", "rejects.jsonl", "tokenizer"} <= arts


def test_data_stage_reads_hf_disk_and_redacts(ray_session, tmp_path, make_ctx):
    import datasets

    rng = random.Random(5)
    rows = [demo.make_document(rng) for _ in range(60)]
    rows[0] += "\nwrite to jane.doe@example.org today"
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "hf"))
    cfg = DataConfig(
        inputs=[{"path": str(tmp_path / "hf"), "format": "hf_disk"}],
        block_size=32,
        val_fraction=0.2,
        tokenizer={"vocab_size": 300},
    )
    res = prepare_data.fn(cfg, make_ctx(), key="b" * 64)
    assert res.metrics["docs_out"] == 60 and res.metrics["redactions"] >= 1


def test_input_with_nothing_usable_fails_clearly(ray_session, tmp_path, make_ctx):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "tiny"}\n{oops\n{"other": 1}\n')
    cfg = DataConfig(inputs=[{"path": str(bad), "format": "jsonl"}], min_chars=16)
    ctx = make_ctx()
    with pytest.raises(
        DataError, match="no usable documents: 3 records read, 2 malformed, 1 filtered"
    ):
        prepare_data.fn(cfg, ctx, key="c" * 64)
    assert not list((Path(ctx.workspace) / "artifacts").rglob("manifest.json"))
    runs = child_runs(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id)
    assert [r.info.status for r in runs] == ["FAILED"]


def test_missing_input_path_fails_clearly(ray_session, tmp_path, make_ctx):
    cfg = DataConfig(inputs=[{"path": str(tmp_path / "nope/*.jsonl"), "format": "jsonl"}])
    with pytest.raises(DataError, match="no files match"):
        prepare_data.fn(cfg, make_ctx(), key="d" * 64)
