"""The CLI's error messages reach a pipe or a log whole: one line each, whatever the path
length and whether or not a terminal (or COLUMNS) is there."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import LIFECYCLE, ROOT


@pytest.fixture
def long_dir(tmp_path):
    d = tmp_path / ("d" * 60) / ("e" * 60) / ("f" * 70)
    d.mkdir(parents=True)
    assert len(str(d)) >= 200
    return d


def _stderr(*args: str) -> tuple[int, list[str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    p = subprocess.run(
        [LIFECYCLE, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120
    )
    return p.returncode, p.stderr.splitlines()


def _one_line(lines: list[str], *parts: str) -> str:
    """The single stderr line that holds every part (the message is not wrapped)."""
    hits = [ln for ln in lines if all(p in ln for p in parts)]
    assert len(hits) == 1, lines
    return hits[0]


def test_error_paths_print_each_message_on_one_line(long_dir):
    (long_dir / "bad.yaml").write_text("name: x\nbogus: 1\n")
    ws = str(long_dir / "ws")
    cases = [
        (("validate", f"{long_dir}/missing.yaml"), 2, ("config file not found:", "missing.yaml")),
        (
            ("validate", f"{long_dir}/bad.yaml"),
            2,
            ("configuration error:", "invalid configuration"),
        ),
        (
            ("run", "configs/tiny_cpu.yaml", "--from", f"pretrain={long_dir}/nope"),
            2,
            ("--from 'pretrain=", "/nope does not exist"),
        ),
        (("serve", "--model", str(long_dir), "--workspace", ws), 2, ("not a model directory",)),
        (("run", "--resume", "gone", "--workspace", ws), 2, ("no run 'gone' in", "config.yaml)")),
        (("run", "--run-name", "../x", "--workspace", ws), 2, ("run name '../x':", "under runs/")),
        (("run", "--resume", "/etc", "--workspace", ws), 2, ("run name '/etc':", "under runs/")),
        (
            ("fingerprint", "verify", "--model", "models:/N@a/../../x", "--workspace", ws),
            2,
            ("models:/N@a/../../x: expected models:/NAME/VERSION",),
        ),
        (
            ("fingerprint", "verify", "--model", f"{long_dir}/nomodel"),
            2,
            ("nomodel is not a model directory",),
        ),
    ]
    for args, code, parts in cases:
        rc, lines = _stderr(*args)
        assert rc == code, (args, rc, lines)
        line = _one_line(lines, *parts)
        assert str(long_dir) in line, (args, line)  # the whole path, unbroken


def test_messages_are_printed_verbatim_not_as_markup(tmp_path):
    """Brackets in a message (lists, paths) are text, not rich markup tags."""
    d = tmp_path / "[bold]odd"
    d.mkdir()
    rc, lines = _stderr("serve", "--model", str(d), "--workspace", str(tmp_path / "ws"))
    assert rc == 2
    _one_line(lines, "[bold]odd: not a model directory")


def test_the_run_table_gives_each_stage_its_deciding_numbers_in_80_columns():
    import io

    from rich.console import Console

    from flows.cli import _table

    def stage(name: str, status: str = "completed", error: str | None = None, **m) -> dict:
        return {
            "stage": name,
            "status": status,
            "metrics": m,
            "error": error,
            "mlflow_run_id": "0123456789abcdef0123456789abcdef",
        }

    summary = {
        "run_name": "first",
        "status": "completed",
        "stages": [
            stage(
                "data",
                docs_out=3840,
                tokens_train=435456,
                exact_dupes_removed=80,
                near_dupes_removed=80,
            ),
            stage("pretrain", **{"eval/loss_before": 5.66, "eval/loss_after": 1.54}),
            stage("distill", "skipped", "disabled in the config"),
            stage(
                "quantize",
                **{
                    "size/ratio_vs_bf16": 0.58,
                    "vllm/exact_match_before": 0.73,
                    "vllm/exact_match_after": 0.72,
                },
            ),
            stage(
                "watermark",
                **{"watermark/detection_rate": 0.98, "watermark/false_positive_rate": 0.0},
            ),
            stage(
                "deploy",
                error="exact match 0.000 vs champion 0.760: difference -0.760, its "
                "95% bound -0.700 is below -0.02 (allowed drop)",
                **{"promotion/promoted": 0.0, "promotion/version": 2},
            ),
        ],
    }
    buf = io.StringIO()
    Console(file=buf, width=80).print(_table(summary))
    lines = buf.getvalue().splitlines()
    assert max(len(ln) for ln in lines) <= 80
    # The result column, its wrapped lines joined: each stage's headline reads whole.
    cells = [ln.split("│") for ln in lines if ln.startswith("│")]
    text = " ".join(" ".join(c[3].split()) for c in cells) + " " + " ".join(c[4] for c in cells)
    for want in (
        "3840 docs, 435k train tokens, 160 dupes out",
        "loss 5.66 -> 1.54",
        "size 0.58x bf16, EM 0.73 -> 0.72 (vllm)",
        "detected 98%, false positives 0%",
        "version 2 NOT promoted",
        "disabled in the config",
        "01234567",
    ):
        assert want in text, (want, text)
