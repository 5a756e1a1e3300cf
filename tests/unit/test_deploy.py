"""Promotion gate, champion alias and rollback (MLflow registry in a temp dir), serve config."""

from __future__ import annotations

import subprocess

import pytest

from lifecycle import tracking
from lifecycle.config import DeployConfig, ServeConfig
from tests.conftest import LIFECYCLE, ROOT


def _evaluation(em: list[float], nll: list[float], reward: list[float]) -> dict:
    """What evaluate_for_promotion returns, from per-prompt figures (4 answer tokens each)."""
    import math

    return {
        "exact_match": sum(em) / len(em),
        "perplexity": math.exp(sum(nll) / len(nll)),
        "reward": sum(reward) / len(reward),
        "items": {
            "exact_match": em,
            "neg_nll_per_token": [-x for x in nll],
            "answer_tokens": [4.0] * len(em),
            "reward": reward,
        },
    }


def test_gate_pairs_each_prompt_with_the_champions_and_names_each_worse_metric():
    import random

    from tasks.deploy import gate

    cfg = DeployConfig()  # the shipped margins: 0.02 EM, perplexity ratio 1.05, 0.02 reward
    rng = random.Random(0)
    em = [float(rng.random() < 0.8) for _ in range(200)]
    nll = [rng.uniform(0.5, 1.0) for _ in range(200)]
    reward = [rng.choice([0.0, 0.5, 1.0]) for _ in range(200)]
    champ = _evaluation(em, nll, reward)
    assert gate(champ, None, cfg) == ([], [])  # no champion yet: promote
    why, comps = gate(_evaluation(em, nll, reward), champ, cfg)  # the same model again
    assert why == [] and [c.metric for c in comps] == [
        "exact_match",
        "answer_log_likelihood",
        "reward",
    ]
    assert all(c.diff == 0 and c.low == c.high == 0 for c in comps)
    # One answer of 200 lost (drop 0.005), within every margin.
    near = em.copy()
    near[em.index(1.0)] = 0.0
    assert gate(_evaluation(near, nll, reward), champ, cfg)[0] == []
    # Clearly worse on each: a fifth of the answers lost, every NLL up by 0.2 (perplexity
    # ratio e^0.2 = 1.22), rewards down by 0.25.
    worse_em = [0.0 if i % 5 == 0 else x for i, x in enumerate(em)]
    worse = _evaluation(worse_em, [x + 0.2 for x in nll], [max(0.0, r - 0.25) for r in reward])
    why, comps = gate(worse, champ, cfg)
    assert len(why) == 3 and not any(c.passed for c in comps), why
    assert why[0].startswith(f"exact match {worse['exact_match']:.3f} vs champion 0.")
    assert "its 95% bound" in why[0] and "below -0.02 (allowed drop)" in why[0]
    assert "limit ratio 1.05" in why[1] and why[2].startswith("mean reward")
    # The absolute floor applies with or without a champion.
    cfg = DeployConfig(gate={"min_exact_match": 0.9})
    assert gate(champ, None, cfg)[0] == [
        f"exact match {champ['exact_match']:.3f} below the floor 0.9"
    ]


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
