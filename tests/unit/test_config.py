from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from lifecycle.config import ConfigError, apply_overrides, config_hash, load_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"tiny_cpu.yaml", "gpu_single_node.yaml", "gpu_multi_node.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path):
    cfg = load_config(path)
    # Every config prepares data and trains something: from scratch, or (finetune_cpu.yaml)
    # a model brought with `--from pretrain=DIR`.
    assert cfg.data is not None and (cfg.pretrain is not None or cfg.sft is not None)


def test_gpu_configs_describe_distributed_training():
    single = load_config(ROOT / "configs/gpu_single_node.yaml")
    multi = load_config(ROOT / "configs/gpu_multi_node.yaml")
    assert single.pretrain.scaling.use_gpu and multi.pretrain.scaling.use_gpu
    assert single.pretrain.deepspeed.zero_stage > 0 and multi.pretrain.deepspeed.zero_stage > 0
    assert multi.pretrain.scaling.placement_strategy in ("SPREAD", "STRICT_SPREAD")
    assert multi.pretrain.scaling.num_workers > single.pretrain.scaling.num_workers
    assert multi.cluster.address is not None


def test_override_sets_nested_value_and_parses_types():
    cfg = load_config(
        ROOT / "configs/tiny_cpu.yaml",
        ["pretrain.max_steps=50", "pretrain.lr=1e-3", "data.near_dedup.enabled=false"],
    )
    assert cfg.pretrain.max_steps == 50
    assert cfg.pretrain.lr == pytest.approx(1e-3)
    assert cfg.data.near_dedup.enabled is False


def test_null_disables_a_stage():
    cfg = load_config(ROOT / "configs/tiny_cpu.yaml", ["pretrain=null"])
    assert cfg.pretrain is None


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        ("pretrain.max_stpes=3", "pretrain.max_stpes", "unknown key"),
        ("pretrain.max_steps=abc", "pretrain.max_steps", "integer"),
        ("data.near_dedup.threshold=1.5", "data.near_dedup.threshold", "less than or equal"),
        (
            "pretrain.scaling.placement_strategy=EVERYWHERE",
            "pretrain.scaling.placement_strategy",
            "PACK",
        ),
        ("pretrain.deepspeed.zero_stage=4", "pretrain.deepspeed.zero_stage", "3"),
    ],
)
def test_bad_values_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/tiny_cpu.yaml", [override])
    assert key in str(e.value) and words in str(e.value)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("pretrain.model.num_heads=3", "divisible by num_heads"),
        ("data.block_size=1024", "exceeds pretrain.model.max_position_embeddings"),
        ("pretrain.warmup_steps=5000", "warmup_steps"),
        ("pretrain.deepspeed.offload_params=true", "zero_stage: 3"),
    ],
)
def test_impossible_combinations_fail_at_load(override, words):
    with pytest.raises(ConfigError, match=words):
        load_config(ROOT / "configs/tiny_cpu.yaml", [override])


def test_no_data_input_is_an_error():
    with pytest.raises(ConfigError, match="no input"):
        validate_config({"data": {"demo": None, "inputs": []}})


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["pretrain.max_steps"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_config_hash_ignores_key_order():
    assert config_hash({"a": 1, "b": {"c": 2}}) == config_hash({"b": {"c": 2}, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_cli_validate_exit_codes(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(ROOT / "configs/tiny_cpu.yaml")])
    assert ok.exit_code == 0
    typo = runner.invoke(
        app, ["validate", str(ROOT / "configs/tiny_cpu.yaml"), "--set", "pretrain.max_stpes=3"]
    )
    assert typo.exit_code == 2 and "pretrain.max_stpes" in typo.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain:\n  max_steps: lots\n")
    wrong_type = runner.invoke(app, ["validate", str(bad)])
    assert wrong_type.exit_code == 2 and "pretrain.max_steps" in wrong_type.output


def test_cli_run_rejects_bad_config_before_starting(tmp_path):
    res = CliRunner().invoke(
        app,
        [
            "run",
            str(ROOT / "configs/tiny_cpu.yaml"),
            "--workspace",
            str(tmp_path / "ws"),
            "--set",
            "data.blok_size=64",
        ],
    )
    assert res.exit_code == 2 and "data.blok_size" in res.output
    assert not (tmp_path / "ws").exists()  # nothing started, nothing written
    res = CliRunner().invoke(app, ["run", "--stages", "data,sfft", "--workspace", str(tmp_path)])
    assert res.exit_code == 2 and "sfft" in res.output


# A model is a directory: with `init_from` the checks read the model's own config.json.
def _model_dir(tmp_path, model_type, **over):
    import json

    from lifecycle.tiny import build

    d = build(model_type, tmp_path / model_type)
    if over:
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **over}))
    return d


@pytest.mark.parametrize("model_type", ["qwen3", "gemma2", "phi3", "llama"])
def test_checks_read_the_model_dir_not_the_yaml_defaults(tmp_path, model_type):
    """The YAML's shape keys say hidden 64 / 4 heads (head_dim 16, which vLLM's CPU attention
    cannot serve); the model dir says head_dim 32: it validates, facts from the dir."""
    d = _model_dir(tmp_path, model_type)
    raw = {
        "pretrain": {"model": {"init_from": str(d), "hidden_size": 64, "num_heads": 4}},
        "quantize": {"method": "w4a16"},
    }
    cfg = validate_config(raw)
    facts = cfg.pretrain.model.facts()
    assert facts.model_type == model_type and facts.head_dim == 32
    assert facts.source == str(d)
    with pytest.raises(ConfigError, match="head_dim 16"):  # the same YAML, no model dir
        validate_config({**raw, "pretrain": {"model": {"hidden_size": 64, "num_heads": 4}}})


def test_a_model_dir_vllm_cannot_serve_is_refused_naming_its_head_dim(tmp_path):
    d = _model_dir(tmp_path, "qwen3", head_dim=48)
    raw = {"pretrain": {"model": {"init_from": str(d)}}, "quantize": {"method": "w8a8"}}
    with pytest.raises(ConfigError, match=rf"{d}: head_dim 48 is not one vLLM"):
        validate_config(raw)
    raw["quantize"]["vllm"] = {"enabled": False}  # not served by vLLM here: nothing to refuse
    assert validate_config(raw).pretrain.model.facts().head_dim == 48
    d40 = _model_dir(tmp_path / "40", "qwen3", head_dim=40)
    raw["pretrain"]["model"]["init_from"] = str(d40)
    raw["quantize"] = {"method": "w4a16", "group_size": 64, "vllm": {"enabled": False}}
    with pytest.raises(ConfigError, match="'num_heads\\*head_dim': 160"):  # 4 x 40: not /64
        validate_config(raw)


def test_model_dir_problems_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no such model directory"):
        validate_config({"pretrain": {"model": {"init_from": str(tmp_path / "nope")}}})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"not a model directory \(no config.json\)"):
        validate_config({"pretrain": {"model": {"init_from": str(tmp_path / "empty")}}})
    moe = _model_dir(tmp_path, "mixtral")
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        validate_config(
            {"pretrain": {"model": {"init_from": str(moe)}}, "quantize": {"method": "w8a8"}}
        )
    d = _model_dir(tmp_path, "llama", max_position_embeddings=128)
    with pytest.raises(ConfigError, match=rf"exceeds max_position_embeddings of {d} \(128\)"):
        validate_config(
            {
                "pretrain": {"model": {"init_from": str(d)}},
                "data": {"demo": {}, "block_size": 256},
            }
        )
