"""The house rules the layout keeps: imports point one way, stage modules share code only
through lifecycle/, the stage table is the one place a stage is wired, and every algorithm's
inner step runs as plain PyTorch without Ray, Prefect or MLflow."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lifecycle.config import PipelineConfig
from lifecycle.stages import STAGE_TABLE, STAGES
from tests.conftest import ROOT


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (top-level and inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_stage_module_imports_another_stage_module():
    tasks = sorted((ROOT / "tasks").glob("*.py"))
    assert len(tasks) >= len(STAGES)
    for path in tasks:
        bad = sorted(m for m in _imports(path) if m == "tasks" or m.startswith("tasks."))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}: share code through lifecycle/"


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("lifecycle", ("prefect", "ray", "flows", "tasks", "ray_cluster")),
        ("ray_cluster", ("prefect", "flows")),
        ("tasks", ("flows",)),
    ],
)
def test_imports_point_one_way(layer, forbidden):
    """flows -> tasks -> ray_cluster -> lifecycle; mlflow only in lifecycle/tracking.py."""
    for path in sorted((ROOT / layer).rglob("*.py")):
        mods = _imports(path)
        bad = sorted(m for m in mods if m.split(".")[0] in forbidden)
        if path.name == "connect.py":  # ships the project's packages to a Ray Client cluster
            bad = [m for m in bad if m not in ("flows", "tasks")]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
        if path != ROOT / "lifecycle" / "tracking.py":
            assert not [m for m in mods if m.split(".")[0] == "mlflow"], path


def test_every_stage_is_wired_once_by_name():
    """Each row of the stage table has its config section, its task, and a task signature
    that takes its upstreams and extras by name."""
    cfg = PipelineConfig()
    for i, st in enumerate(STAGE_TABLE):
        assert st.name in PipelineConfig.model_fields, st.name
        assert all(STAGES.index(u) < i for u in st.upstream), st.name  # upstream comes first
        assert st.optional <= set(st.upstream) and set(st.used_if) <= set(st.upstream)
        from flows.chain import task_of

        params = inspect.signature(task_of(st).fn).parameters
        assert list(params)[:3] == ["cfg", "ctx", "key"], st.name
        wanted = set(st.upstream) | set(st.extras(cfg))
        assert wanted <= set(params), (st.name, wanted - set(params))
        for name in wanted:
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (st.name, name)


def test_the_chain_flow_has_no_per_stage_wiring():
    """flows/chain.py walks the table: it names no task and no stage's upstreams."""
    src = (ROOT / "flows" / "chain.py").read_text()
    for st in STAGE_TABLE:
        assert st.task.split(":")[1] + "(" not in src, st.task
        assert f'"{st.name}"' not in src or st.name == "deploy", st.name  # deploy: endpoint


def test_every_lifecycle_module_and_algorithm_step_runs_without_ray_prefect_mlflow():
    """scripts/gpu_check.py (what a GPU machine runs) on this CPU: every lifecycle/ module
    imports with ray, prefect and mlflow unimportable, and a few steps of each algorithm on
    one fixed batch do what they should."""
    p = subprocess.run(
        [
            sys.executable,
            "scripts/gpu_check.py",
            "--device",
            "cpu",
            "--block",
            "ray,prefect,mlflow",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    got = {ln["check"]: ln for ln in lines if "check" in ln}
    assert p.returncode == 0, (lines[-1], p.stderr[-3000:])
    imports = got.pop("imports")
    assert imports["imported"] >= 30 and not imports["failed"] and not imports["skipped"]
    assert set(got) == {
        "pretrain", "sft", "distill", "reward", "dpo", "grpo", "ppo", "compress", "eval"
    }  # fmt: skip
    for arch in ("llama", "mixtral"):
        r = got["pretrain"][arch]
        assert r["loss_after"] < 0.9 * r["loss_before"] and r["moved"] and r["on_device"], r
    for method in ("full", "lora"):
        r = got["sft"][method]
        assert r["loss_after"] < r["loss_before"], r
        assert r["trained_moved"] and r["frozen_unchanged"], r  # LoRA: the base did not move
    assert got["distill"]["loss_after"] < got["distill"]["loss_before"]
    assert got["distill"]["teacher_unchanged"]
    assert got["reward"]["losses"][-1] < got["reward"]["losses"][0]
    dpo = got["dpo"]["losses"]
    assert dpo[-1] < dpo[0] and got["dpo"]["passed"]  # passed: the reference did not move
    assert got["grpo"]["passed"] and got["grpo"]["kl"] > 0  # moved away from the reference
    vl = got["ppo"]["value_losses"]
    assert min(vl[1:]) < 0.5 * vl[0] and got["ppo"]["passed"]
    c = got["compress"]
    own = {m: c[f"lifecycle-gqa/{m}"] for m in ("w8a8", "w4a16", "awq")}
    assert own["w8a8"]["logits_rel_error"] < own["w4a16"]["logits_rel_error"] < 0.25, c
    assert all(r["layers"] == 14 for r in own.values()), c  # 2 layers x 7 linears
    assert c["mixtral"] == {"refused": True}  # MoE: refused with the ARCHS reason
    assert all(c[f"{a}/w4a16"]["passed"] for a in ("qwen2", "qwen3", "gemma2", "phi3")), c
    e = got["eval"]
    assert e["heldout_loss"] == pytest.approx(e["nll_mean"], rel=1e-4)
