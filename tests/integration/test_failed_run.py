"""A run whose first stage fails: exit code 1, a summary that says so, later stages skipped.
Its own workspace (not the whole chain's), so it runs beside the chain module's tests. It
starts while another process holds the dashboard port it is given (another run's local Ray
on the same machine): its own Ray takes a free port and says which."""

import socket

from tests.conftest import run_cli as _run


def test_failed_stage_exits_nonzero_with_summary(tmp_path):
    bad = tmp_path / "empty.jsonl"
    bad.write_text('{"text": "x"}\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, summary = _run(
            tmp_path / "ws",
            "--set",
            "data.demo=null",
            "--set",
            f"data.inputs=[{{path: {bad}, format: jsonl}}]",
            "--set",
            f"cluster.dashboard_port={port}",  # after run_cli's own: this one wins
        )
    assert rc == 1
    assert summary["status"] == "failed"
    data, *later = summary["stages"]
    assert data["status"] == "failed" and "no usable documents" in data["error"]
    assert [s["status"] for s in later] == ["skipped"] * 7
    log = (tmp_path / "cli.log").read_text()
    assert f"Ray dashboard port {port} is in use" in log
