"""A run whose first stage fails: exit code 1, a summary that says so, later stages skipped.
Its own workspace (not the whole chain's), so it runs beside the chain module's tests."""

from tests.conftest import run_cli as _run


def test_failed_stage_exits_nonzero_with_summary(tmp_path):
    bad = tmp_path / "empty.jsonl"
    bad.write_text('{"text": "x"}\n')
    rc, summary = _run(
        tmp_path / "ws",
        "--set",
        "data.demo=null",
        "--set",
        f"data.inputs=[{{path: {bad}, format: jsonl}}]",
    )
    assert rc == 1
    assert summary["status"] == "failed"
    data, *later = summary["stages"]
    assert data["status"] == "failed" and "no usable documents" in data["error"]
    assert [s["status"] for s in later] == ["skipped"] * 7
