import json
import random

import pytest

from lifecycle.config import DataConfig
from lifecycle.data import demo
from lifecycle.data.clean import (
    Deduplicator,
    clean_record,
    in_val_split,
    normalize,
    pack,
    parse_lines,
    redact,
    text_sha,
)


def test_normalize_unicode_and_whitespace():
    assert normalize("ﬁne\u00a0 text \t here  \r\n\r\n\r\n\nnext ") == "fine text here\n\nnext"


def test_redact_emails_and_phones_but_not_arithmetic():
    text, n = redact(
        "mail bob.smith+x@example.co.uk or call +1 555-123-4567 add 12+7 = 19", True, True
    )
    assert n == 2
    assert "<EMAIL>" in text and "<PHONE>" in text and "add 12+7 = 19" in text
    assert "example" not in text and "4567" not in text


def test_parse_lines_rejects_with_reasons():
    data = b"\n".join(
        [
            json.dumps({"text": "good one"}).encode(),
            b"{not json",
            json.dumps({"body": "no text field"}).encode(),
            json.dumps({"text": 42}).encode(),
            b'{"text": "bad \xff\xfe bytes"}',
            json.dumps(["a list"]).encode(),
        ]
    )
    recs = list(parse_lines(data, "f.jsonl", 0, 0, "jsonl", "text"))
    assert [r["text"] for r in recs] == ["good one", None, None, None, None, None]
    reasons = [r["reason"] for r in recs[1:]]
    assert reasons[0].startswith("bad JSON")
    assert reasons[1] == "missing field 'text'"
    assert "not a string" in reasons[2]
    assert reasons[3].startswith("undecodable bytes")
    assert reasons[4].startswith("not an object")
    assert recs[1]["source"] == "f.jsonl:2"  # 1-based line numbers in rejects


def _clean_all(texts, **kw):
    cfg = DataConfig(demo={"num_docs": 10}, **kw).model_dump()
    return [
        clean_record({"doc_id": f"{i:05d}", "source": "t", "text": t, "reason": None}, cfg)
        for i, t in enumerate(texts)
    ]


def test_dedup_removes_exactly_the_planted_duplicates():
    rng = random.Random(7)
    originals = [demo.make_document(rng) for _ in range(200)]
    exact = [originals[3], originals[10], "  " + originals[20].replace(" ", "  ") + " "]
    near = [demo.near_duplicate(originals[i], rng) for i in (5, 50, 150)]
    corpus = originals + exact + near
    dd = Deduplicator(exact=True, near=True, threshold=0.8, num_perm=128)
    kept = [r["doc_id"] for r in _clean_all(corpus) if dd.keep(r["doc_id"], r["sha"], r["minhash"])]
    assert dd.exact_removed == 3  # the third differs only in whitespace: equal after normalize
    assert dd.near_removed == 3
    assert kept == [f"{i:05d}" for i in range(200)]


def test_near_dedup_off_keeps_near_duplicates():
    rng = random.Random(1)
    a = demo.make_document(rng)
    recs = _clean_all([a, demo.near_duplicate(a, rng)], near_dedup={"enabled": False})
    dd = Deduplicator(exact=True, near=False)
    assert all(dd.keep(r["doc_id"], r["sha"], r["minhash"]) for r in recs)


def test_length_filter_gives_reason():
    (r,) = _clean_all(["short"], min_chars=16)
    assert r["text"] is None and r["reason"].startswith("filtered: length 5")


def test_split_is_deterministic_and_near_fraction():
    shas = [text_sha(f"doc {i}") for i in range(5000)]
    val = [s for s in shas if in_val_split(s, 0.1)]
    assert 400 < len(val) < 600
    assert val == [s for s in shas if in_val_split(s, 0.1)]


def test_pack_puts_eos_between_documents():
    blocks = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], eos_id=0, block_size=4)
    assert blocks == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert pack([[1]], eos_id=0, block_size=4) == []


@pytest.mark.parametrize("name", sorted(demo.TASKS))
def test_demo_task_lines_are_checkable(name):
    task = demo.TASKS[name]
    rng = random.Random(0)
    arg = task.make_arg(rng)
    line = task.line(arg)
    assert line == f"{name} {arg} = {task.answer(arg)}"


def test_demo_generate_plants_duplicates():
    recs = demo.generate(1000, seed=3, exact_dupe_fraction=0.05, near_dupe_fraction=0.0)
    texts = [r["text"] for r in recs]
    assert len(texts) - len(set(texts)) == 50
