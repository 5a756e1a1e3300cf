"""The only module that imports mlflow: parent and stage runs, metrics, checkpoints, registry.

Every call takes an explicit tracking URI and run id (no reliance on "the active run"), so the
driver, Prefect tasks and Ray Train workers (rank 0) can all log to the same runs. mlflow is
imported by the calls that use it, not at import time: a training loop with a disabled
`RankZeroTracker` (other ranks, or a GPU check without MLflow) runs where mlflow is absent.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lifecycle.artifacts import RunContext, dir_manifest

if TYPE_CHECKING:
    from mlflow import MlflowClient

PARENT_TAG = "mlflow.parentRunId"
DIGEST_TAG = "lifecycle.files_digest"  # a registered version's dir_manifest digest
STAGE_TAG = "lifecycle.stage"


def default_tracking_uri(workspace: str | Path) -> str:
    return f"sqlite:///{Path(workspace).resolve() / 'mlflow.db'}"


def resolve_uri(configured: str | None, workspace: str | Path) -> str:
    """The tracking URI a run uses: the config's `tracking.tracking_uri`, else
    $MLFLOW_TRACKING_URI (where a URI with credentials belongs: the config refuses them),
    else SQLite in the workspace."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workspace)


def redact(uri: str) -> str:
    """`uri` with any password replaced by `***` (`postgresql://u:***@host/db`): what is
    recorded (summaries, logs) instead of the URI itself."""
    return re.sub(r"^([A-Za-z][\w+.-]*://[^:/@]*):[^@/]*@", r"\1:***@", uri)


def client(tracking_uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    if redact(tracking_uri) != tracking_uri:
        # MLflow prints "View run <name> at: <tracking URI>/#/..." when a run ends, the
        # password included: not with this URI (this process's runs, its workers included).
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def ensure_experiment(tracking_uri: str, name: str, artifact_root: str | Path) -> str:
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=Path(artifact_root).resolve().as_uri())
    except MlflowException:  # created concurrently
        return c.get_experiment_by_name(name).experiment_id


def start_run(
    tracking_uri: str,
    experiment_id: str,
    name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> str:
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = client(tracking_uri).create_run(experiment_id, run_name=name, tags=all_tags)
    return run.info.run_id


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(tracking_uri).set_terminated(run_id, status=status)


OWNER_TAG = "lifecycle.owner"  # host:pid:start-ticks of the `lifecycle run` process


def owner_tag() -> str:
    """This process as `host:pid:start` (its start time in clock ticks since boot, so that a
    reused pid does not pass for the process that started a run)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def _start_ticks(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rfind(")") + 2 :].split()[19]


def _owner_gone(owner: str) -> bool:
    host, _, rest = owner.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's run: not ours to judge
    return _start_ticks(int(pid)) != start  # gone, or the pid now belongs to another process


def end_orphaned_runs(tracking_uri: str, experiment_id: str) -> list[str]:
    """Marks KILLED the RUNNING runs whose `lifecycle run` process on this host has died (a
    SIGKILL, a lost machine's reboot) and their RUNNING stage runs; returns their run ids.
    Runs of live processes, and of other hosts, are left alone."""
    c = client(tracking_uri)
    running = c.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'")
    dead = {
        r.info.run_id
        for r in running
        if OWNER_TAG in r.data.tags and _owner_gone(r.data.tags[OWNER_TAG])
    }
    ended = [r.info.run_id for r in running if r.info.run_id in dead]
    ended += [r.info.run_id for r in running if r.data.tags.get(PARENT_TAG) in dead]
    for run_id in ended:
        c.set_terminated(run_id, status="KILLED")
    return ended


def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    now = [RunTag(k, str(v)) for k, v in tags.items()]
    client(tracking_uri).log_batch(run_id, tags=now)


def log_params(tracking_uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
    for i in range(0, len(items), 100):
        client(tracking_uri).log_batch(run_id, params=items[i : i + 100])


def log_metrics(
    tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int = 0
) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
    if items:
        client(tracking_uri).log_batch(run_id, metrics=items)


def log_dict(tracking_uri: str, run_id: str, data: Any, artifact_file: str) -> None:
    client(tracking_uri).log_dict(run_id, data, artifact_file)


def log_artifacts(
    tracking_uri: str, run_id: str, local_dir: str | Path, artifact_path: str | None = None
) -> None:
    client(tracking_uri).log_artifacts(run_id, str(local_dir), artifact_path)


def log_artifact(
    tracking_uri: str, run_id: str, local_file: str | Path, artifact_path: str | None = None
) -> None:
    client(tracking_uri).log_artifact(run_id, str(local_file), artifact_path)


def log_dataset(
    tracking_uri: str, run_id: str, name: str, source_uri: str, digest: str, context: str
) -> None:
    """Records a dataset (by URI and content digest) as an input of the run."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    ds = MetaDataset(resolve_dataset_source(source_uri), name=name, digest=digest[:36])
    inp = DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
    client(tracking_uri).log_inputs(run_id, datasets=[inp])


def log_checkpoint(
    tracking_uri: str,
    run_id: str,
    step: int,
    local_dir: str | Path,
    storage_uri: str,
    copy_max_mb: float,
    root: str = "checkpoints",
) -> dict[str, Any]:
    """Records one checkpoint against its step (under `root/step_<N>/`).

    Small checkpoints are copied under `checkpoints/step_<N>/`; above `copy_max_mb` only a
    manifest (sha256 of every file, and where the checkpoint lives) is logged, so MLflow never
    holds a second copy of a large model.
    """
    manifest = dir_manifest(local_dir)
    manifest.update({"step": step, "uri": storage_uri})
    art = f"{root}/step_{step:06d}"
    if manifest["bytes"] <= copy_max_mb * 1e6:
        log_artifacts(tracking_uri, run_id, local_dir, art)
        manifest["copied"] = True
    else:
        manifest["copied"] = False
    log_dict(tracking_uri, run_id, manifest, f"{art}/manifest.json")
    log_metrics(tracking_uri, run_id, {"checkpoint/bytes": manifest["bytes"]}, step=step)
    return manifest


def register_model(
    tracking_uri: str,
    run_id: str,
    name: str,
    model_dir: str | Path,
    tags: Mapping[str, Any],
    description: str = "",
    artifact_path: str = "model",
) -> str:
    """Logs an HF model directory under `model/` of the run and registers it; returns the version."""
    from mlflow.exceptions import MlflowException

    log_artifacts(tracking_uri, run_id, model_dir, artifact_path)
    c = client(tracking_uri)
    with contextlib.suppress(MlflowException):  # already exists
        c.create_registered_model(name)
    source = f"{c.get_run(run_id).info.artifact_uri}/{artifact_path}"
    tags = {**tags, DIGEST_TAG: dir_manifest(model_dir)["digest"]}
    mv = c.create_model_version(
        name,
        source,
        run_id=run_id,
        tags={k: str(v) for k, v in tags.items()},
        description=description,
    )
    return str(mv.version)


def set_model_version_tags(
    tracking_uri: str, name: str, version: str, tags: Mapping[str, Any]
) -> None:
    c = client(tracking_uri)
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, str(v))


def create_version(
    tracking_uri: str, name: str, source: str, run_id: str, tags: Mapping[str, Any]
) -> str:
    """A new version of `name` (created when missing) whose weights are at `source` (no copy)."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    with contextlib.suppress(MlflowException):  # already exists
        c.create_registered_model(name)
    if Path(source).is_dir():
        tags = {**tags, DIGEST_TAG: dir_manifest(source)["digest"]}
    mv = c.create_model_version(
        name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()}
    )
    return str(mv.version)


def version_by_alias(tracking_uri: str, name: str, alias: str) -> Any | None:
    """The model version `name@alias`, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_alias(tracking_uri: str, name: str, alias: str, version: str) -> None:
    client(tracking_uri).set_registered_model_alias(name, alias, str(version))


def registered_model_tags(tracking_uri: str, name: str) -> dict[str, str] | None:
    """The tags of registered model `name`, or None when there is no such model."""
    from mlflow.exceptions import MlflowException

    try:
        return dict(client(tracking_uri).get_registered_model(name).tags)
    except MlflowException:
        return None


def set_registered_model_tag(tracking_uri: str, name: str, key: str, value: str) -> None:
    client(tracking_uri).set_registered_model_tag(name, key, value)


def search_versions(tracking_uri: str, name: str) -> list[Any]:
    """Every version of registered model `name` (empty when there is none)."""
    from mlflow.exceptions import MlflowException

    try:
        return list(client(tracking_uri).search_model_versions(f"name='{name}'"))
    except MlflowException:
        return []


def model_version(tracking_uri: str, name: str, version: str) -> Any:
    return client(tracking_uri).get_model_version(name, version)


def get_run(tracking_uri: str, run_id: str) -> Any:
    return client(tracking_uri).get_run(run_id)


def log_text_file(tracking_uri: str, run_id: str, text: str, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / Path(artifact_file).name
        p.write_text(text)
        parent = str(Path(artifact_file).parent)
        log_artifact(tracking_uri, run_id, p, None if parent == "." else parent)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        elif isinstance(v, list | tuple):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


@contextmanager
def stage_run(
    ctx: RunContext, stage: str, params: Mapping[str, Any] | None = None
) -> Iterator[str]:
    """A child run of the pipeline's parent run for one stage; ends FAILED if the body raises."""
    run_id = start_run(
        ctx.tracking_uri,
        ctx.experiment_id,
        f"{ctx.run_name}/{stage}",
        tags={
            STAGE_TAG: stage,
            "lifecycle.run_name": ctx.run_name,
            "lifecycle.code_version": ctx.code_version,
        },
        parent_run_id=ctx.parent_run_id,
    )
    if params:
        log_params(ctx.tracking_uri, run_id, params)
    try:
        yield run_id
    except BaseException:
        end_run(ctx.tracking_uri, run_id, "FAILED")
        raise
    end_run(ctx.tracking_uri, run_id, "FINISHED")


class RankZeroTracker:
    """Logs to one MLflow run from rank 0; on every other rank each call is a no-op.

    Training loops call it unconditionally instead of scattering `if rank == 0`.
    """

    def __init__(self, tracking_uri: str, run_id: str, enabled: bool) -> None:
        self.tracking_uri, self.run_id, self.enabled = tracking_uri, run_id, enabled

    def metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.enabled:
            log_metrics(self.tracking_uri, self.run_id, metrics, step)

    def checkpoint(
        self,
        step: int,
        local_dir: str | Path,
        storage_uri: str,
        copy_max_mb: float,
        root: str = "checkpoints",
    ) -> None:
        if self.enabled:
            log_checkpoint(
                self.tracking_uri, self.run_id, step, local_dir, storage_uri, copy_max_mb, root
            )


def model_version_of(tracking_uri: str, model_uri: str) -> Any:
    """The ModelVersion that `models:/NAME/VERSION` or `models:/NAME@ALIAS` names."""
    from mlflow.exceptions import MlflowException

    m = _MODEL_URI.fullmatch(model_uri)
    if m is None:
        raise ValueError(f"{model_uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    name, version, alias = m.groups()
    c = client(tracking_uri)
    try:
        if alias is not None:
            return c.get_model_version_by_alias(name, alias)
        return c.get_model_version(name, version)
    except MlflowException as e:
        raise ValueError(f"{model_uri}: not in the registry at {tracking_uri} ({e})") from None


# A registered name (it becomes a directory name: no '/', no '..'), then a version number or
# an alias; nothing after it.
_MODEL_URI = re.compile(r"models:/((?!\.\.?(?:[/@]|$))[^/@\s]+)(?:/(\d+)|@([A-Za-z0-9_-]+))")


def _download(tracking_uri: str, artifact_uri: str, dest: Path) -> Path:
    """Downloads an artifact directory into `dest` through `<dest>.partial` and one rename: a
    download cut short never leaves a `dest` that looks complete."""
    import mlflow.artifacts

    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    mlflow.artifacts.download_artifacts(
        artifact_uri=artifact_uri, dst_path=str(tmp), tracking_uri=tracking_uri
    )
    inner = next(tmp.iterdir()) if len(list(tmp.iterdir())) == 1 else tmp
    dest.parent.mkdir(parents=True, exist_ok=True)
    inner.rename(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetch_model(tracking_uri: str, model_uri: str, dest: str | Path) -> Path:
    """Downloads `models:/NAME/VERSION` or `models:/NAME@ALIAS` into `dest` (once; one
    process at a time per `dest`). A version registered with a files digest is checked
    against it: a copy already there that differs (cut short, edited) is fetched again, a
    download that differs is an error."""
    from filelock import FileLock

    mv = model_version_of(tracking_uri, model_uri)
    dest = Path(dest)
    want = mv.tags.get(DIGEST_TAG)
    seal = dest.with_name(f".{dest.name}.digest")  # beside the dir: not one of its files
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest.with_name(f".{dest.name}.lock"))):
        present = (dest / "config.json").is_file() or (dest / "adapter_config.json").is_file()
        sealed = seal.is_file() and seal.read_text() == want
        if present and want and not sealed and dir_manifest(dest)["digest"] != want:
            warnings.warn(
                f"{dest} differs from {model_uri}'s registered files; fetching it again",
                stacklevel=2,
            )
            shutil.rmtree(dest)
            present = False
        if not present:
            _download(tracking_uri, mv.source, dest)
            if want and dir_manifest(dest)["digest"] != want:
                shutil.rmtree(dest)
                raise ValueError(
                    f"{model_uri}: the files fetched from {mv.source} do not match the digest "
                    "registered with the version (changed or damaged at the source)"
                )
        if want:
            seal.write_text(want)
    return dest


def fetch_run_artifacts(tracking_uri: str, artifact_uri: str, dest: str | Path) -> Path:
    """Downloads `runs:/RUN_ID/PATH` (a run's artifact directory) into `dest` (once; one
    process at a time per `dest`)."""
    from filelock import FileLock

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest.with_name(f".{dest.name}.lock"))):
        return dest if dest.is_dir() else _download(tracking_uri, artifact_uri, dest)
