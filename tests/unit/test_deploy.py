"""Promotion gate, champion alias and rollback (MLflow registry in a temp dir), serve config."""

from __future__ import annotations

import subprocess

import pytest

from lifecycle import tracking
from lifecycle.config import DeployConfig, ServeConfig
from tests.conftest import LIFECYCLE, ROOT

CHAMP = {"exact_match": 0.80, "perplexity": 2.0, "reward": 0.75}


def test_gate_passes_within_margins_and_names_each_worse_metric():
    from tasks.deploy import gate

    cfg = DeployConfig()
    assert gate(CHAMP, None, cfg) == []  # no champion yet: promote
    assert gate({"exact_match": 0.79, "perplexity": 2.05, "reward": 0.74}, CHAMP, cfg) == []
    worse = gate({"exact_match": 0.70, "perplexity": 2.5, "reward": 0.60}, CHAMP, cfg)
    assert len(worse) == 3
    assert "exact match 0.700 vs champion 0.800" in worse[0]
    assert "ratio 1.250 > 1.05" in worse[1]
    assert "mean reward 0.600" in worse[2]


def _registry(tmp_path, versions: int) -> tuple[str, str]:
    uri = tracking.default_tracking_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "t", tmp_path / "mlartifacts")
    run = tracking.start_run(uri, exp, "r")
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for _ in range(versions):
        tracking.register_model(uri, run, "svc", model, {})
    return uri, "svc"


def test_champion_alias_moves_and_rollback_walks_back(tmp_path):
    from lifecycle.registry import champion_history, champion_version, rollback, set_champion

    uri, name = _registry(tmp_path, 3)
    assert champion_version(uri, name) is None
    with pytest.raises(ValueError, match="no earlier champion"):
        rollback(uri, name)
    for v in ("1", "2", "3"):
        set_champion(uri, name, v)
    assert str(champion_version(uri, name).version) == "3"
    assert rollback(uri, name) == ("3", "2")
    assert str(champion_version(uri, name).version) == "2"
    assert tracking.model_version(uri, name, "3").tags["lifecycle.promotion"] == "rolled_back"
    assert rollback(uri, name) == ("2", "1")
    assert champion_history(uri, name) == ["1"]
    with pytest.raises(ValueError, match="no earlier champion"):
        rollback(uri, name)
    with pytest.raises(ValueError, match="no registered model 'nope'"):
        rollback(uri, "nope")


def test_rollback_cli_without_a_registry_says_so(tmp_path):
    p = subprocess.run(
        [LIFECYCLE, "rollback", "--workspace", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1 and "no registered model 'tiny-llm'" in p.stderr, p.stderr


def test_serve_config_defaults_are_local_and_bounded():
    s = ServeConfig()
    assert s.host == "127.0.0.1" and s.max_queued_requests > 0 and s.watermark
    with pytest.raises(ValueError, match="min_replicas"):
        ServeConfig(autoscaling={"min_replicas": 3, "max_replicas": 2})


def test_serve_cli_rejects_a_missing_model_dir_before_starting_anything(tmp_path):
    p = subprocess.run(
        [LIFECYCLE, "serve", "--model", str(tmp_path / "nothing"), "--workspace", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and "not a model directory" in p.stderr, p.stderr
    assert not (tmp_path / "serve" / "state.json").exists()


def test_build_app_maps_replicas_resources_and_limits():
    from ray_cluster.serve import ServeSpec, build_app

    cfg = ServeConfig(
        autoscaling={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2},
        resources_per_replica={"CPU": 2, "GPU": 1, "a100": 1},
        max_queued_requests=7,
        max_replicas_per_node=1,
    )
    app = build_app(ServeSpec(model_dir="/m", model_id="m"), cfg)
    d = app._bound_deployment
    assert d._deployment_config.max_queued_requests == 7
    assert d._replica_config.max_replicas_per_node == 1
    auto = d._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 4, 2)
    opts = d.ray_actor_options
    assert opts["num_cpus"] == 2 and opts["num_gpus"] == 1 and opts["resources"] == {"a100": 1}


def test_grafana_dashboard_is_valid_and_shows_every_project_metric():
    import json

    from ray_cluster.metrics import NAMES

    dash = json.loads((ROOT / "ray_cluster" / "monitoring" / "grafana_dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    assert dash["uid"] and len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    missing = [n for n in NAMES if f"ray_{n}" not in exprs]
    assert not missing, missing


def test_engine_env_sizes_the_kv_cache_and_binds_no_threads_unless_told(monkeypatch):
    from lifecycle.vllm_engine import engine_env
    from ray_cluster.serve import ServeSpec, vllm_env

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "9")  # the config's size wins
    assert engine_env(1.5) == {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-3")  # a user's own binding is kept
    spec = ServeSpec(
        model_dir="/m", model_id="m", kv_cache_gb=0.5, lora={"allow_runtime_updates": 1}
    )
    assert vllm_env(spec) == {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0-3",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    }
