"""The data-prep steps around the per-record functions: inputs, dedup and split, shards, manifest.

The data stage (tasks/data.py) runs `read_file`, `clean_record` and `tokenize_and_pack` on Ray
Data and the global steps here on the driver; `prepare_plain` runs every step in one process
(the baseline of bench/data_prep.py). Both write the same outputs:

    <out>/train/shard-00000.parquet ...   column input_ids: list<int32>, block_size each
    <out>/val/shard-00000.parquet ...
    <out>/tokenizer/                      HF tokenizer dir
    <out>/rejects.jsonl                   one line per rejected record, with its reason
    <out>/manifest.json                   counts, token totals, sha256 of every shard
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lifecycle.artifacts import sha256_file
from lifecycle.config import DataConfig, DataInput, config_hash
from lifecycle.data import demo
from lifecycle.data.clean import (
    Deduplicator,
    clean_record,
    doc_id,
    in_val_split,
    pack,
    parse_lines,
    record_from_value,
    reject,
)
from lifecycle.data.tokenizer import tokenizer_id, train_bpe

COUNT_KEYS = (
    "docs_in",
    "docs_out",
    "exact_dupes_removed",
    "near_dupes_removed",
    "malformed_rejected",
    "filtered_out",
    "redactions",
    "docs_train",
    "docs_val",
    "tokens_train",
    "tokens_val",
    "blocks_train",
    "blocks_val",
)


class DataError(ValueError):
    """Input that cannot produce a dataset (nothing matched, nothing usable)."""


def resolve_inputs(cfg: DataConfig, demo_dir: str | Path) -> list[dict[str, Any]]:
    """One descriptor per input file: {input_idx, file_idx, path, format, text_field}.

    The demo corpus (if configured) is generated into `demo_dir` and comes first.
    """
    inputs = list(cfg.inputs)
    if cfg.demo is not None:
        d = cfg.demo
        path = Path(demo_dir) / f"demo-{config_hash(d)[:16]}.jsonl"
        if not path.exists():
            recs = demo.generate(
                d.num_docs, d.seed, d.exact_dupe_fraction, d.near_dupe_fraction, d.tasks
            )
            demo.write_jsonl(recs, path)
        inputs.insert(0, DataInput(path=str(path), format="jsonl", text_field="text"))
    files = []
    for i, inp in enumerate(inputs):
        for j, path in enumerate(_expand(inp)):
            files.append(
                {
                    "input_idx": i,
                    "file_idx": j,
                    "path": path,
                    "format": inp.format,
                    "text_field": inp.text_field,
                }
            )
    return files


def _expand(inp: DataInput) -> list[str]:
    p = Path(inp.path)
    if inp.format == "hf_disk":
        if not (p / "state.json").is_file():
            raise DataError(f"data input {inp.path}: not a `datasets` save_to_disk directory")
        state = json.loads((p / "state.json").read_text())
        return [str(p / f["filename"]) for f in state["_data_files"]]
    if p.is_dir():
        ext = {"jsonl": "*.jsonl", "parquet": "*.parquet", "text": "*.txt"}[inp.format]
        paths = sorted(str(f) for f in p.rglob(ext))
    elif p.is_file():
        paths = [str(p)]
    else:
        paths = sorted(f for f in glob.glob(inp.path, recursive=True) if os.path.isfile(f))
    if not paths:
        raise DataError(f"data input {inp.path} ({inp.format}): no files match")
    return paths


def read_file(desc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every record of one input file; a malformed record is yielded as a reject."""
    path, fmt, field = desc["path"], desc["format"], desc["text_field"]
    i, j = desc["input_idx"], desc["file_idx"]
    if fmt in ("jsonl", "text"):
        with open(path, "rb") as f:
            yield from parse_lines(f.read(), path, i, j, fmt, field)
        return
    try:
        if fmt == "parquet":
            table = pq.read_table(path)
        else:  # hf_disk: Arrow IPC stream files written by datasets.save_to_disk
            with pa.memory_map(path) as src:
                table = pa.ipc.open_stream(src).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        yield reject(doc_id(i, j, 0), path, f"unreadable {fmt} file: {e}")
        return
    for k, row in enumerate(table.to_pylist()):
        yield record_from_value(row, doc_id(i, j, k), f"{path}:{k}", field)


def dedup_and_split(
    records: Iterable[dict[str, Any]], cfg: DataConfig
) -> tuple[list[str], list[str], dict[str, int], list[dict[str, Any]]]:
    """Global steps over cleaned records sorted by doc_id: dedup, then the train/val split."""
    dd = Deduplicator(
        exact=cfg.exact_dedup,
        near=cfg.near_dedup.enabled,
        threshold=cfg.near_dedup.threshold,
        num_perm=cfg.near_dedup.num_perm,
    )
    counts = dict.fromkeys(COUNT_KEYS, 0)
    train: list[str] = []
    val: list[str] = []
    rejects: list[dict[str, Any]] = []
    for r in records:
        counts["docs_in"] += 1
        counts["redactions"] += int(r["redactions"])
        if r["text"] is None:
            if str(r["reason"]).startswith("filtered"):
                counts["filtered_out"] += 1
            else:
                counts["malformed_rejected"] += 1
            rejects.append({"source": r["source"], "reason": r["reason"]})
            continue
        if not dd.keep(r["doc_id"], r["sha"], r["minhash"]):
            continue
        (val if in_val_split(r["sha"], cfg.val_fraction) else train).append(r["text"])
    counts["exact_dupes_removed"] = dd.exact_removed
    counts["near_dupes_removed"] = dd.near_removed
    counts["docs_out"] = len(train) + len(val)
    counts["docs_train"], counts["docs_val"] = len(train), len(val)
    if counts["docs_out"] == 0:
        raise DataError(
            f"no usable documents: {counts['docs_in']} records read, "
            f"{counts['malformed_rejected']} malformed, {counts['filtered_out']} filtered out, "
            f"{dd.exact_removed + dd.near_removed} duplicates"
        )
    if not train or not val:
        side = "train" if not train else "val"
        raise DataError(
            f"the {side} split is empty ({counts['docs_out']} usable documents, val_fraction "
            f"{cfg.val_fraction}): add data or change data.val_fraction"
        )
    return train, val, counts, rejects


def make_tokenizer(cfg: DataConfig, train_texts: list[str], out_dir: Path) -> Path:
    tok_dir = out_dir / "tokenizer"
    if cfg.tokenizer.path:
        from lifecycle.models import load_tokenizer

        tok = load_tokenizer(cfg.tokenizer.path)
        if tok.eos_token_id is None:
            raise DataError(f"tokenizer {cfg.tokenizer.path} has no EOS token")
        tok.save_pretrained(tok_dir)
    else:
        train_bpe(train_texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, tok_dir)
    return tok_dir


TOKENIZE_CHUNK = 1024


def chunks(texts: list[str], size: int = TOKENIZE_CHUNK) -> list[list[str]]:
    """Consecutive chunks of at most `size` texts: the unit of tokenize-and-pack work.

    Packing drops each chunk's tail, so both pipelines must chunk identically.
    """
    return [texts[i : i + size] for i in range(0, len(texts), size)]


def tokenize_and_pack(texts: list[str], tokenizer: Any, block_size: int) -> list[list[int]]:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return pack(ids, tokenizer.eos_token_id, block_size)


def write_shards(blocks: list[list[int]], out: Path, rows_per_shard: int) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for n, start in enumerate(range(0, len(blocks), rows_per_shard)):
        chunk = blocks[start : start + rows_per_shard]
        path = out / f"shard-{n:05d}.parquet"
        table = pa.table({"input_ids": pa.array(chunk, type=pa.list_(pa.int32()))})
        pq.write_table(table, path)
        shards.append(
            {
                "path": str(path.relative_to(out.parent)),
                "rows": len(chunk),
                "sha256": sha256_file(path),
            }
        )
    return shards


def write_outputs(
    out_dir: Path,
    cfg: DataConfig,
    train_blocks: list[list[int]],
    val_blocks: list[list[int]],
    counts: dict[str, int],
    rejects: list[dict[str, Any]],
    tok_dir: Path,
) -> dict[str, Any]:
    if not train_blocks or not val_blocks:
        side = "train" if not train_blocks else "val"
        raise DataError(
            f"the {side} split has fewer tokens than one block of {cfg.block_size}: "
            "add data or lower data.block_size"
        )
    counts = {
        **counts,
        "blocks_train": len(train_blocks),
        "blocks_val": len(val_blocks),
        "tokens_train": len(train_blocks) * cfg.block_size,
        "tokens_val": len(val_blocks) * cfg.block_size,
    }
    with open(out_dir / "rejects.jsonl", "w") as f:
        for r in rejects:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    manifest = {
        "format": "llm-lifecycle/tokens-v1",
        "block_size": cfg.block_size,
        "counts": counts,
        "tokenizer_id": tokenizer_id(tok_dir),
        "tokenizer_dir": "tokenizer",
        "train": write_shards(train_blocks, out_dir / "train", cfg.rows_per_shard),
        "val": write_shards(val_blocks, out_dir / "val", cfg.rows_per_shard),
    }
    manifest["sha256"] = manifest_digest(manifest)
    tmp = out_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out_dir / "manifest.json")  # written last: its presence means "complete"
    return manifest


def manifest_digest(manifest: dict[str, Any]) -> str:
    """Content id of a dataset: hash over shard hashes, tokenizer id and block size."""
    import hashlib

    body = {k: manifest[k] for k in ("block_size", "tokenizer_id", "train", "val")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def prepare_plain(cfg: DataConfig, out_dir: str | Path) -> dict[str, Any]:
    """Every data-prep step in one process, no Ray: the baseline for bench/data_prep.py."""
    from lifecycle.models import load_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = resolve_inputs(cfg, out_dir / "demo")
    plain_cfg = cfg.model_dump()
    cleaned = [clean_record(r, plain_cfg) for f in files for r in read_file(f)]
    cleaned.sort(key=lambda r: r["doc_id"])
    train, val, counts, rejects = dedup_and_split(cleaned, cfg)
    tok_dir = make_tokenizer(cfg, train, out_dir)
    tok = load_tokenizer(tok_dir)
    train_blocks = [b for c in chunks(train) for b in tokenize_and_pack(c, tok, cfg.block_size)]
    val_blocks = [b for c in chunks(val) for b in tokenize_and_pack(c, tok, cfg.block_size)]
    return write_outputs(out_dir, cfg, train_blocks, val_blocks, counts, rejects, tok_dir)


def load_blocks(data_dir: str | Path, split: str) -> Any:
    """All blocks of one split as an int64 tensor [N, block_size] (reads the manifest)."""
    import numpy as np
    import torch

    data_dir = Path(data_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    arrays = []
    for shard in manifest[split]:
        col = pq.read_table(data_dir / shard["path"], columns=["input_ids"]).column(0)
        flat = col.combine_chunks().flatten().to_numpy()
        arrays.append(flat.reshape(-1, manifest["block_size"]))
    return torch.from_numpy(np.concatenate(arrays).astype(np.int64))


def check_same_tokenizer(data_dir: str | Path, model_tokenizer: Any, what: str) -> None:
    """Raises when the data stage's token ids are not the model's: its blocks were made with
    another tokenizer (e.g. the data stage trained its own while the model came with `--from`),
    and mixing them in would train on garbage."""
    from lifecycle.models import load_tokenizer

    theirs = load_tokenizer(Path(data_dir) / "tokenizer").get_vocab()
    if theirs != model_tokenizer.get_vocab():
        raise ValueError(
            f"{what}: the data stage's blocks ({data_dir}) were tokenized with another "
            f"tokenizer than the model's ({len(theirs)} vs {len(model_tokenizer)} tokens); "
            "prepare the data with the model's tokenizer (data.tokenizer.path: the model dir)"
        )


def pretrain_windows(data_dir: str | Path, split: str, length: int, count: int, seed: int) -> Any:
    """`count` windows of `length` tokens at seeded random offsets of one split's blocks, as
    an int64 tensor [count, length]: pretraining text that a fine-tuning stage mixes in so the
    model keeps its language modelling (SFT's `pretrain_mix`, RLHF's `ptx_weight`)."""
    import torch

    blocks = load_blocks(data_dir, split)
    if blocks.shape[1] < length:
        raise ValueError(
            f"{data_dir}: blocks of {blocks.shape[1]} tokens are shorter than the {length}-token "
            "windows asked for"
        )
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, blocks.shape[0], (count,), generator=g)
    starts = torch.randint(0, blocks.shape[1] - length + 1, (count,), generator=g)
    return torch.stack([blocks[r, s : s + length] for r, s in zip(rows, starts, strict=True)])
