"""What stages hand each other: small, frozen, JSON-serialisable records, and the stage cache.

A StageResult carries URIs and numbers only, never tensors or models. The cache maps a stage's
key (hash of its config section, its upstream artifact ids and the code version) to the
StageResult it produced, as one JSON file per key under `<workspace>/cache/<stage>/`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Status = Literal["completed", "cached", "failed", "skipped"]

_PACKAGES = ("lifecycle", "tasks", "ray_cluster", "flows")
_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class StageResult:
    stage: str
    status: Status
    artifact_uri: str | None = None
    mlflow_run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    artifact_id: str | None = None
    """Content id of the artifact (a manifest sha256); what downstream cache keys hash."""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageResult:
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> StageResult:
        return cls.from_dict(json.loads(s))

    def with_status(self, status: Status) -> StageResult:
        return dataclasses.replace(self, status=status)


@dataclass(frozen=True)
class RunContext:
    """Everything a stage needs to know about the pipeline run it belongs to."""

    run_name: str
    workspace: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    registered_model: str
    code_version: str
    checkpoint_copy_max_mb: float = 64.0

    @property
    def ray_storage(self) -> str:
        return str(Path(self.workspace) / "ray_storage")

    def stage_dir(self, stage: str, key: str) -> Path:
        """Where a stage writes its artifacts: keyed, so a re-run never overwrites another."""
        return Path(self.workspace) / "artifacts" / stage / key[:16]

    @contextmanager
    def staging(self, stage: str, key: str) -> Iterator[Path]:
        """A fresh `<stage_dir>.partial` to write the stage's artifacts into; renamed to
        `stage_dir(stage, key)` when the block ends normally, deleted when it raises. Nothing
        half-written is ever at the final path (a re-run replaces the previous output)."""
        final = self.stage_dir(stage, key)
        tmp = final.with_name(final.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)

    def train_name(self, stage: str, key: str) -> str:
        """The Ray Train run name of a training stage: checkpoints live under ray_storage/NAME."""
        return f"{stage}-{key[:16]}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_run_name(name: str) -> str:
    """`name` if it can name `<workspace>/runs/<name>/` and nothing outside it: letters,
    digits, `.`, `_`, `-` (first a letter or digit, at most 128, no `..`); else ValueError."""
    if not _RUN_NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"run name {name!r}: use letters, digits, '.', '_' and '-' (starting with a letter "
            "or digit, at most 128 characters, no '..'): it names a directory under runs/"
        )
    return name


class WorkspaceBusy(ValueError):
    """Another process writes this workspace now."""


@contextmanager
def workspace_lock(workspace: str | Path, what: str) -> Iterator[None]:
    """Holds `<workspace>/.lock` (an OS file lock: it ends with its process, SIGKILL included)
    while `what` writes the workspace; raises WorkspaceBusy naming the holder when another
    process holds it. The holder's description is in `.lock.json`."""
    ws = Path(workspace)
    ws.mkdir(parents=True, exist_ok=True)
    lock = _take_lock(ws)
    try:
        info = {
            "what": what,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        write_atomic(ws / ".lock.json", json.dumps(info))
        yield
    finally:
        lock.release()


def check_workspace_free(workspace: str | Path) -> None:
    """WorkspaceBusy (naming the holder) if another process writes `workspace` now: what the
    CLI checks before it starts anything."""
    ws = Path(workspace)
    if (ws / ".lock").is_file():
        _take_lock(ws).release()


def _take_lock(ws: Path) -> Any:
    from filelock import FileLock, Timeout

    lock = FileLock(str(ws / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise WorkspaceBusy(_busy_message(ws)) from None
    return lock


def _busy_message(ws: Path) -> str:
    try:
        holder = json.loads((ws / ".lock.json").read_text())
        who = f"{holder['what']} (pid {holder['pid']} on {holder['host']}, since {holder['since']})"
    except (OSError, ValueError, KeyError):
        who = "another process"
    return (
        f"workspace {ws} is in use by {who}: one run writes a workspace at a time; wait for "
        "it, or give this run its own --workspace"
    )


def code_version() -> str:
    """Git sha (with `-dirty`) when available, plus a hash of the project's Python sources.

    The source hash is what makes cache keys change when code changes, with or without git.
    """
    h = hashlib.sha256()
    for pkg in _PACKAGES:
        for f in sorted((_ROOT / pkg).rglob("*.py")):
            h.update(str(f.relative_to(_ROOT)).encode())
            h.update(f.read_bytes())
    src = h.hexdigest()[:12]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = "nogit"
    return f"{sha}+src.{src}"


def git_sha() -> str:
    return code_version().split("+", 1)[0]


def cache_key(stage: str, config_hash: str, upstream: list[StageResult], code: str) -> str:
    parts = {
        "stage": stage,
        "config": config_hash,
        "upstream": [(u.stage, u.artifact_id or u.artifact_uri) for u in upstream],
        "code": code,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _cache_file(workspace: str | Path, stage: str, key: str) -> Path:
    return Path(workspace) / "cache" / stage / f"{key}.json"


def cache_lookup(workspace: str | Path, stage: str, key: str) -> StageResult | None:
    """The cached result for `key`, or None when absent, unreadable (a warning names the
    file; the stage then runs again and rewrites it) or when its artifact has gone."""
    f = _cache_file(workspace, stage, key)
    if not f.is_file():
        return None
    try:
        result = StageResult.from_json(f.read_text())
    except (OSError, ValueError, TypeError, KeyError) as e:
        warnings.warn(f"{f}: unreadable cache entry, treated as a miss ({e!r})", stacklevel=2)
        return None
    if result.artifact_uri and not Path(result.artifact_uri).exists():
        return None
    return result.with_status("cached")


def cache_store(workspace: str | Path, stage: str, key: str, result: StageResult) -> None:
    """Atomically records a completed result (write to a temp file, then rename)."""
    write_atomic(_cache_file(workspace, stage, key), result.to_json())


def write_atomic(path: str | Path, text: str) -> Path:
    """Writes `text` to `path` through a temp file beside it, flushed to disk, and one
    rename: a reader (or a run killed mid-write) sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def paths_fingerprint(paths: list[str]) -> str:
    """Path, size and mtime of every file a stage reads from outside the workspace (files,
    directories, globs): part of its cache key, so an edited input is never a cache hit.
    A missing path counts as such; the stage itself reports it."""
    import glob

    h = hashlib.sha256()
    for i, raw in enumerate(paths):
        p = Path(raw)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            files = [p]
        else:
            files = sorted(Path(f) for f in glob.glob(raw, recursive=True) if os.path.isfile(f))
        h.update(f"{i}|{raw}|{len(files)}\n".encode())
        for f in files:
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def dir_manifest(root: str | Path) -> dict[str, Any]:
    """sha256 and size of every file below `root`, plus a digest over all of them."""
    root = Path(root)
    files = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        files[str(f.relative_to(root))] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"files": files, "digest": digest, "bytes": sum(v["bytes"] for v in files.values())}
