"""Operations without a Prefect server: the retrain schedule config, prefect.yaml against the
flows it names, `lifecycle schedule` without a server, the retrain's lineage walk and data
check on an MLflow registry in a temp dir, the gate's absolute floor."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from lifecycle import tracking
from lifecycle.config import ConfigError, DeployConfig, load_config
from tests.conftest import LIFECYCLE, ROOT

TINY = ROOT / "configs" / "tiny_cpu.yaml"


def test_retrain_schedule_is_validated():
    assert load_config(TINY, ["operations.retrain.cron=null"]).operations.retrain.cron is None
    with pytest.raises(ConfigError, match="cron '61 \\* \\* \\* \\*'"):
        load_config(TINY, ["operations.retrain.cron=61 * * * *"])
    with pytest.raises(ConfigError, match="unknown timezone 'Mars/Olympus'"):
        load_config(TINY, ["operations.retrain.timezone=Mars/Olympus"])
    with pytest.raises(ConfigError, match="data_format"):
        load_config(TINY, ["operations.retrain.data_format=csv"])


def test_prefect_yaml_names_the_flows_and_the_configs_schedule():
    import inspect

    from flows import deployments

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"full", "retrain", "redeploy"}
    for name, d in deps.items():
        path, func = d["entrypoint"].split(":")
        assert (ROOT / path).is_file()
        fl = getattr(deployments, func)
        assert fl.name == "lifecycle"  # `prefect deployment run lifecycle/<name>`
        accepted = set(inspect.signature(fl.fn).parameters)
        assert set(d["parameters"]) <= accepted, (name, d["parameters"])
        assert d["work_pool"]["name"] == load_config(TINY).operations.work_pool
    cfg = load_config(TINY).operations.retrain
    (sched,) = deps["retrain"]["schedules"]
    assert (sched["cron"], sched["timezone"]) == (cfg.cron, cfg.timezone)


def test_schedule_without_a_prefect_server_says_how_to_start_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "home")  # no profile with an API URL either
    p = subprocess.run(
        [LIFECYCLE, "schedule", "configs/tiny_cpu.yaml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and "PREFECT_API_URL" in p.stderr and not p.stdout, p.stderr
    bad = subprocess.run(
        [LIFECYCLE, "schedule", "configs/tiny_cpu.yaml", "--set", "operations.retrain.cron=x"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "cron 'x'" in bad.stderr, bad.stderr


def _lineage(tmp_path) -> str:
    """rlhf/1 <- quantized/1 <- tiny-llm/1 (champion), tiny-llm/2 from an outside dir."""
    uri = tracking.default_tracking_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "t", tmp_path / "mlartifacts")
    run = tracking.start_run(uri, exp, "r")
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")

    def reg(name: str, stage: str, parent: str, **tags: str) -> None:
        tags = {"lifecycle.stage": stage, "lifecycle.parent_model": parent, **tags}
        tracking.register_model(uri, run, name, model, tags)

    reg("tiny-llm-rlhf", "rlhf", "tiny-llm-sft/1")
    reg("tiny-llm-quantized", "quantize", "tiny-llm-rlhf/1")
    reg("tiny-llm", "deploy", "tiny-llm-quantized/1", **{"lifecycle.data_manifest_sha256": "a"})
    reg("tiny-llm", "deploy", "external:/somewhere", **{"lifecycle.data_manifest_sha256": "b"})
    reg("tiny-llm", "deploy", "tiny-llm-quantized/1")  # registered before data was recorded
    tracking.client(uri).set_registered_model_alias("tiny-llm", "champion", "1")
    return uri


def test_retrain_starts_from_the_champions_trainable_ancestor(tmp_path):
    from lifecycle.registry import trainable_base

    uri = _lineage(tmp_path)
    assert trainable_base(uri, "models:/tiny-llm@champion") == "tiny-llm-rlhf/1"
    assert trainable_base(uri, "models:/tiny-llm-rlhf/1") == "tiny-llm-rlhf/1"
    with pytest.raises(ValueError, match=r"no trainable model in its lineage.*external:"):
        trainable_base(uri, "models:/tiny-llm/2")
    with pytest.raises(ValueError, match="models:/tiny-llm@nope: not in the registry"):
        trainable_base(uri, "models:/tiny-llm@nope")


def test_last_trained_data_is_the_newest_version_that_records_it(tmp_path):
    from lifecycle.registry import last_trained_data

    uri = _lineage(tmp_path)
    assert last_trained_data(uri, "tiny-llm") == ("2", "b")
    assert last_trained_data(uri, "no-such-model") is None


def test_gate_floor_applies_with_and_without_a_champion():
    from tasks.deploy import gate

    def evaluation(em: float) -> dict:  # 10 prompts, each with its own figures
        items = [1.0] * round(em * 10) + [0.0] * (10 - round(em * 10))
        return {
            "exact_match": em,
            "perplexity": 2.0,
            "reward": 0.75,
            "items": {
                "exact_match": items,
                "neg_nll_per_token": [-0.69] * 10,
                "answer_tokens": [3.0] * 10,
                "reward": [0.75] * 10,
            },
        }

    cfg = DeployConfig(gate={"min_exact_match": 0.75})
    good, low = evaluation(0.8), evaluation(0.7)
    assert gate(good, None, cfg) == ([], [])
    assert gate(low, None, cfg)[0] == ["exact match 0.700 below the floor 0.75"]
    why, comps = gate(low, low, cfg)  # as good as the champion, still under the floor
    assert why == ["exact match 0.700 below the floor 0.75"] and all(c.passed for c in comps)


def test_a_registry_source_is_the_parent_in_the_lineage():
    from lifecycle.artifacts import StageResult
    from lifecycle.registry import parent_model

    src = StageResult("pretrain", "cached", artifact_uri="/x", artifact_id="registry:m-rlhf/3")
    assert parent_model(None, src) == "m-rlhf/3"  # type: ignore[arg-type]
