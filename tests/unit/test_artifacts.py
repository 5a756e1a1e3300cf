from pathlib import Path

import pytest

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


def test_run_names_and_registry_uris_that_would_leave_the_workspace_are_refused(tmp_path):
    from lifecycle import tracking
    from lifecycle.artifacts import check_run_name

    for ok in ("first", "tiny-20261206-193530", "a.b_c-1"):
        assert check_run_name(ok) == ok
    for bad in ("../x", "/x", "a/b", "..", "a..b", ".hidden", "", "x" * 129, "a b"):
        with pytest.raises(ValueError, match="names a directory under runs/"):
            check_run_name(bad)
    uri = tracking.default_tracking_uri(tmp_path)
    for bad in ("models:/N@a/../../x", "models:/../x/1", "models:/x/1/", "models:/x", "runs:/x"):
        with pytest.raises(ValueError, match="expected models:/NAME/VERSION or models:/NAME@"):
            tracking.model_version_of(uri, bad)
    with pytest.raises(ValueError, match="not in the registry"):
        tracking.model_version_of(uri, "models:/nothing/1")


def test_a_corrupt_cache_entry_is_a_miss_with_a_warning(tmp_path):
    from lifecycle.artifacts import _cache_file

    r = StageResult("data", "completed", artifact_uri=str(tmp_path), artifact_id="x")
    cache_store(tmp_path, "data", "k", r)
    assert cache_lookup(tmp_path, "data", "k") == r.with_status("cached")
    f = _cache_file(tmp_path, "data", "k")
    assert [p.name for p in f.parent.iterdir()] == ["k.json"]  # no temp file left behind
    f.write_text('{"stage": "data", "status": "comp')  # cut short
    with pytest.warns(UserWarning, match="unreadable cache entry, treated as a miss"):
        assert cache_lookup(tmp_path, "data", "k") is None
    cache_store(tmp_path, "data", "k", r)  # the rerun's result replaces it
    assert cache_lookup(tmp_path, "data", "k") == r.with_status("cached")


def test_runs_of_a_dead_lifecycle_process_are_marked_killed(tmp_path):
    import subprocess
    import sys

    from lifecycle import tracking

    uri = tracking.default_tracking_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "t", tmp_path / "art")
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_owner = f"{tracking.owner_tag().split(':')[0]}:{gone.stdout.strip()}:1"
    dead = tracking.start_run(uri, exp, "dead", tags={tracking.OWNER_TAG: dead_owner})
    dead_stage = tracking.start_run(uri, exp, "dead/sft", parent_run_id=dead)
    alive = tracking.start_run(uri, exp, "alive", tags={tracking.OWNER_TAG: tracking.owner_tag()})
    other_host = tracking.start_run(uri, exp, "x", tags={tracking.OWNER_TAG: "elsewhere:1:1"})
    untagged = tracking.start_run(uri, exp, "old")
    assert sorted(tracking.end_orphaned_runs(uri, exp)) == sorted([dead, dead_stage])
    status = {r: tracking.get_run(uri, r).info.status for r in (dead, dead_stage, alive)}
    assert status == {dead: "KILLED", dead_stage: "KILLED", alive: "RUNNING"}
    for r in (other_host, untagged):
        assert tracking.get_run(uri, r).info.status == "RUNNING"
    assert tracking.end_orphaned_runs(uri, exp) == []


def test_one_writer_per_workspace(tmp_path):
    """A second `lifecycle run` on a workspace that another process writes stops at once with
    a message naming the holder; the lock ends with its holder, SIGKILL included."""
    import os
    import signal
    import subprocess
    import sys

    from lifecycle.artifacts import WorkspaceBusy, workspace_lock
    from tests.conftest import LIFECYCLE, ROOT

    ws = tmp_path / "ws"
    hold = (
        "import sys, time\nfrom lifecycle.artifacts import workspace_lock\n"
        "with workspace_lock(sys.argv[1], 'lifecycle run first'):\n"
        "    print('held', flush=True)\n    time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(ws)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(
                WorkspaceBusy, match=rf"in use by lifecycle run first \(pid {holder.pid} "
            ),
            workspace_lock(ws, "second"),
        ):
            pass
        env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
        p = subprocess.run(
            [LIFECYCLE, "run", "configs/tiny_cpu.yaml", "--workspace", str(ws), "--stages", "data"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert p.returncode == 2, p.stderr[-2000:]
        line = [ln for ln in p.stderr.splitlines() if "is in use by" in ln]
        assert len(line) == 1 and f"pid {holder.pid}" in line[0] and "--workspace" in line[0]
        assert not (ws / "runs").exists()  # it wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with workspace_lock(ws, "third"):  # released with its (killed) holder
        assert "third" in (ws / ".lock.json").read_text()


def test_registry_downloads_are_checked_against_the_registered_digest(tmp_path):
    import shutil

    from lifecycle import tracking

    uri = tracking.default_tracking_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "t", tmp_path / "art")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"w" * 4096)
    run = tracking.start_run(uri, exp, "r")
    version = tracking.register_model(uri, run, "m", model, {})
    mv = tracking.model_version(uri, "m", version)
    assert mv.tags[tracking.DIGEST_TAG] == dir_manifest(model)["digest"]

    dest = tmp_path / "ws" / "serving" / "m" / version
    assert tracking.fetch_model(uri, f"models:/m/{version}", dest) == dest
    assert (dest / "model.safetensors").read_bytes() == b"w" * 4096
    # A copy cut short behind our back (and not sealed) is fetched again, with a warning.
    (dest / "model.safetensors").write_bytes(b"w" * 100)
    dest.with_name(f".{dest.name}.digest").unlink()
    with pytest.warns(UserWarning, match="differs from models:/m/1's registered files"):
        tracking.fetch_model(uri, f"models:/m/{version}", dest)
    assert (dest / "model.safetensors").read_bytes() == b"w" * 4096
    # Files changed at the source: the download is refused and nothing is left behind.
    src = Path(mv.source.removeprefix("file://")) / "model.safetensors"
    src.write_bytes(b"x" * 4096)
    other = tmp_path / "ws2" / "m" / version
    with pytest.raises(ValueError, match="do not match the digest registered with the version"):
        tracking.fetch_model(uri, f"models:/m/{version}", other)
    assert not other.exists()
    shutil.rmtree(tmp_path / "ws2")
