from lifecycle.artifacts import (
    StageResult,
    cache_key,
    cache_lookup,
    cache_store,
    code_version,
    dir_manifest,
)


def test_stage_result_round_trips_through_json():
    r = StageResult("pretrain", "completed", "/x/model", "abc", {"eval/loss_after": 1.5}, "id1")
    assert StageResult.from_json(r.to_json()) == r


def test_cache_store_and_lookup(tmp_path):
    art = tmp_path / "artifact"
    art.mkdir()
    r = StageResult("data", "completed", str(art), "run1", {"docs_out": 3.0}, "sha")
    key = cache_key("data", "cfghash", [], "code1")
    assert cache_lookup(tmp_path, "data", key) is None
    cache_store(tmp_path, "data", key, r)
    hit = cache_lookup(tmp_path, "data", key)
    assert hit.status == "cached" and hit.artifact_uri == str(art) and hit.metrics == r.metrics
    art.rmdir()  # an artifact that has gone is not a cache hit
    assert cache_lookup(tmp_path, "data", key) is None


def test_cache_key_depends_on_config_upstream_and_code():
    up = StageResult("data", "completed", "/d", artifact_id="m1")
    base = cache_key("pretrain", "c", [up], "v1")
    assert base == cache_key("pretrain", "c", [up], "v1")
    assert base != cache_key("pretrain", "c2", [up], "v1")
    assert base != cache_key(
        "pretrain", "c", [StageResult("data", "completed", "/d", artifact_id="m2")], "v1"
    )
    assert base != cache_key("pretrain", "c", [up], "v2")


def test_code_version_has_source_hash():
    assert "+src." in code_version()


def test_dir_manifest(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("x")
    m = dir_manifest(tmp_path)
    assert set(m["files"]) == {"a.txt", "sub/b.txt"}
    assert m["bytes"] == 6
    assert m["files"]["a.txt"]["sha256"].startswith("2cf24dba")


def test_needed_stages_stop_at_sources():
    from lifecycle.stages import needed_stages

    assert needed_stages(["sft"], {}) == {"data", "pretrain", "sft"}
    assert needed_stages(["sft"], {"pretrain": "/m"}) == {"pretrain", "sft"}
    assert needed_stages(["data"], {}) == {"data"}


def test_sft_and_rlhf_need_the_data_stage_only_for_their_pretraining_mix():
    from lifecycle.config import load_config
    from lifecycle.stages import needed_stages

    def cfg(*overrides: str):
        return load_config("configs/tiny_cpu.yaml", list(overrides))

    mixed = cfg("sft.data.pretrain_mix=0.2")
    plain = cfg("sft.data.pretrain_mix=0", "rlhf.ptx_weight=0")
    assert needed_stages(["sft"], {"pretrain": "/m"}, mixed) == {"data", "pretrain", "sft"}
    assert needed_stages(["sft"], {"pretrain": "/m"}, plain) == {"pretrain", "sft"}
    ptx = cfg("sft.data.pretrain_mix=0", "rlhf.ptx_weight=0.5")
    assert needed_stages(["rlhf"], {"sft": "/m"}, ptx) == {"data", "rlhf", "sft"}


def test_external_inputs_of_every_file_reading_stage_reach_the_fingerprint(tmp_path):
    import os

    from lifecycle.artifacts import paths_fingerprint
    from lifecycle.config import validate_config
    from lifecycle.stages import stage

    corpus, chat, prefs = tmp_path / "c.jsonl", tmp_path / "sft", tmp_path / "p.jsonl"
    corpus.write_text('{"text": "a"}\n')
    chat.mkdir()
    (chat / "a.jsonl").write_text("{}\n")
    prefs.write_text("{}\n")
    cfg = validate_config(
        {
            "data": {"inputs": [{"path": str(corpus), "format": "jsonl"}]},
            "sft": {"data": {"inputs": [{"path": str(chat), "format": "chat"}]}},
            "rlhf": {"inputs": [{"path": str(prefs)}]},
        }
    )
    for name, edited in (("data", corpus), ("sft", chat / "a.jsonl"), ("rlhf", prefs)):
        paths = stage(name).inputs(cfg)
        before = paths_fingerprint(paths)
        assert paths_fingerprint(paths) == before
        edited.write_text('{"changed": true}\n')
        os.utime(edited, ns=(1, 1))
        assert paths_fingerprint(paths) != before, name
    assert stage("pretrain").inputs(cfg) == []
    assert paths_fingerprint([str(tmp_path / "missing/*.jsonl")]) != paths_fingerprint([])


def test_run_trainer_returns_a_committed_final_without_training(tmp_path):
    import json

    from lifecycle.config import PretrainConfig
    from ray_cluster.train import COMMIT_FILE, FINAL_DIR, STATE_FILE, latest_checkpoint, run_trainer

    final = tmp_path / "run" / FINAL_DIR
    (final / "model").mkdir(parents=True)
    (final / STATE_FILE).write_text(json.dumps({"step": 5, "final": True, "metrics": {"m": 1.0}}))
    (final / COMMIT_FILE).write_text("ok\n")

    def loop(_):  # must not run: no Ray is started in this test
        raise AssertionError("trained again")

    metrics, path = run_trainer(loop, {}, PretrainConfig(), name="run", storage_path=str(tmp_path))
    assert metrics == {"m": 1.0} and path == final
    assert latest_checkpoint(tmp_path / "run") is None  # final is not a resume point
