"""Data prep stage on Ray Data: read → clean → dedup → split → tokenizer → pack → Parquet shards.

Run it alone:  lifecycle run configs/tiny_cpu.yaml --stages data

Per-record work (parsing with rejects, normalisation, redaction, length filters, MinHash
signatures, tokenisation and packing) runs as Ray Data operators; the steps that must see every
document (exact and near dedup, first occurrence wins, and the BPE training) run on the driver.
The output directory is written under a temporary name and renamed when complete, so a failed
run never leaves a half-written dataset behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray
from prefect import task
from prefect.cache_policies import NO_CACHE

from lifecycle import tracking
from lifecycle.artifacts import RunContext, StageResult
from lifecycle.config import DataConfig
from lifecycle.data.clean import clean_record
from lifecycle.data.pipeline import (
    chunks,
    dedup_and_split,
    make_tokenizer,
    read_file,
    resolve_inputs,
    tokenize_and_pack,
    write_outputs,
)


def _clean_row(row: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    out = clean_record(row, cfg)
    # Arrow-friendly: a fixed type per column (no None next to arrays).
    mh = out["minhash"]
    out["minhash"] = [] if mh is None else [int(v) for v in mh]
    return out


def _tokenize_chunk(row: dict[str, Any], tok_dir: str, block: int) -> list[dict[str, Any]]:
    from lifecycle.models import load_tokenizer

    blocks = tokenize_and_pack(list(row["texts"]), load_tokenizer(tok_dir), block)
    return [{"input_ids": b} for b in blocks]


def _pack_on_ray(texts: list[str], tok_dir: Path, block: int) -> list[list[int]]:
    parts = [{"texts": c} for c in chunks(texts)]
    ds = ray.data.from_items(parts, override_num_blocks=len(parts)).flat_map(
        _tokenize_chunk, fn_kwargs={"tok_dir": str(tok_dir), "block": block}
    )
    return [list(map(int, r["input_ids"])) for r in ds.iter_rows()]


def run_data_prep(cfg: DataConfig, out_dir: Path, demo_dir: Path) -> dict[str, Any]:
    """The Ray Data pipeline; returns the manifest. `out_dir` must be empty or not exist."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    files = resolve_inputs(cfg, demo_dir)
    plain_cfg = cfg.model_dump()
    cleaned = (
        ray.data.from_items(files, override_num_blocks=len(files))
        .flat_map(read_file)
        .repartition(target_num_rows_per_block=1000)
        .map(_clean_row, fn_kwargs={"cfg": plain_cfg})
    )
    records = sorted(cleaned.iter_rows(), key=lambda r: r["doc_id"])
    for r in records:
        r["minhash"] = r["minhash"] or None
    train, val, counts, rejects = dedup_and_split(records, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = make_tokenizer(cfg, train, out_dir)
    train_blocks = _pack_on_ray(train, tok_dir, cfg.block_size)
    val_blocks = _pack_on_ray(val, tok_dir, cfg.block_size)
    return write_outputs(out_dir, cfg, train_blocks, val_blocks, counts, rejects, tok_dir)


@task(name="data", cache_policy=NO_CACHE)
def prepare_data(cfg: DataConfig, ctx: RunContext, key: str) -> StageResult:
    """The data stage: a tokenized, packed, deduplicated dataset directory, tracked in MLflow."""
    final = ctx.stage_dir("data", key)
    with tracking.stage_run(ctx, "data", params=cfg.model_dump(mode="json")) as run_id:
        with ctx.staging("data", key) as tmp:
            manifest = run_data_prep(cfg, tmp, Path(ctx.workspace) / "demo")
        uri = ctx.tracking_uri
        counts = manifest["counts"]
        tracking.log_metrics(uri, run_id, counts)
        tracking.log_artifact(uri, run_id, final / "manifest.json")
        tracking.log_artifacts(uri, run_id, final / "tokenizer", "tokenizer")
        if (final / "rejects.jsonl").stat().st_size:
            tracking.log_artifact(uri, run_id, final / "rejects.jsonl")
        tracking.log_dataset(
            uri,
            run_id,
            f"{ctx.run_name}-tokens",
            final.as_uri(),
            manifest["sha256"],
            context="train",
        )
        tracking.set_tags(
            uri,
            run_id,
            {
                "lifecycle.data_manifest_sha256": manifest["sha256"],
                "lifecycle.tokenizer_id": manifest["tokenizer_id"],
            },
        )
    return StageResult(
        stage="data",
        status="completed",
        artifact_uri=str(final),
        mlflow_run_id=run_id,
        metrics={k: float(v) for k, v in counts.items()},
        artifact_id=manifest["sha256"],
    )
