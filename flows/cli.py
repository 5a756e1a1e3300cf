"""The `lifecycle` command line.

    lifecycle run [CONFIG] [--stages data,pretrain] [--set KEY=VALUE]... [--workspace DIR]
                  [--run-name NAME] [--force] [--json] [--from STAGE=PATH]... [--resume RUN]
                  [--serve]
    lifecycle validate CONFIG [--set KEY=VALUE]...
    lifecycle watermark keygen --out FILE
    lifecycle watermark detect --model DIR [--key-file F] [--file TEXT | -] [--json]
    lifecycle fingerprint make [--key-file F] [--num K] [--json]
    lifecycle fingerprint verify --model DIR|models:/NAME/VERSION [--key-file F] [--num K]
    lifecycle serve [--model models:/NAME@champion | DIR] [--port N] [--detach]
    lifecycle serve status | lifecycle serve stop
    lifecycle rollback
    lifecycle schedule [CONFIG] [--work-pool POOL] [--paused]   (needs PREFECT_API_URL)
    lifecycle cluster up --workers N [--cpus-per-node C] [--gpus-per-node G] [--no-auth]
    lifecycle cluster status | lifecycle cluster down

Exit codes: 0 every requested stage completed or was cached; 1 a stage failed;
2 bad configuration or usage (nothing was started).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lifecycle.artifacts import WorkspaceBusy, check_run_name, check_workspace_free
from lifecycle.config import ConfigError, PipelineConfig, find_config, load_config
from lifecycle.stages import STAGES

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="llm-lifecycle: an LLM production line driven by one YAML file.",
)
# soft_wrap: a message is one line whatever the terminal (rich wraps at 80 columns when stderr
# is a pipe or a log file, which split paths and messages that tests and tools grep for).
err = Console(stderr=True, soft_wrap=True)


def _error(message: str, label: str = "error") -> None:
    """`label: message` on stderr, the message verbatim (never read as rich markup)."""
    err.print(f"[red]{label}[/red]: {escape(message)}", highlight=False)


DEFAULT_CONFIG = "configs/tiny_cpu.yaml"

SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override: KEY=VALUE (dotted key).")
]


def _fail_config(e: Exception) -> None:
    _error(str(e), "configuration error")
    raise typer.Exit(2)


@app.command()
def validate(config: str, set_: SetOpt = None) -> None:
    """Checks a config file (and overrides) against the schema; exit 2 when invalid."""
    try:
        cfg = load_config(find_config(config), set_ or [])
    except ConfigError as e:
        _fail_config(e)
    enabled = [s for s in STAGES if cfg.section(s) is not None]
    err.print(f"[green]ok[/green]: {config} (stages: {', '.join(enabled) or 'none'})")


@app.command("eval")
def eval_(
    model: Annotated[
        str,
        typer.Argument(
            help="A model dir, models:/NAME/VERSION|@ALIAS, or an OpenAI-compatible server's "
            "URL (http[s]://HOST:PORT; its key from $LIFECYCLE_API_KEY)."
        ),
    ],
    suite: Annotated[str, typer.Option(help="A suite named under the config's eval_suites.")],
    config: Annotated[str, typer.Option(help="Pipeline YAML with the suite.")] = DEFAULT_CONFIG,
    set_: SetOpt = None,
    workspace: Annotated[
        str, typer.Option(help="Workspace whose registry resolves models:/ URIs.")
    ] = ".lifecycle",
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    tokenizer: Annotated[
        str | None,
        typer.Option(help="Through an endpoint, an lm_eval suite's tokenizer: the model dir."),
    ] = None,
) -> None:
    """Runs one evaluation suite on a model in this process; prints each metric's mean."""
    try:
        cfg = load_config(find_config(config), set_ or [])
    except ConfigError as e:
        _fail_config(e)
    if suite not in cfg.eval_suites:
        _error(
            f"no suite {suite!r} in {config}: its eval_suites are "
            f"{sorted(cfg.eval_suites) or '(none)'}"
        )
        raise typer.Exit(2)
    from lifecycle.eval.suites import run_suite, run_suite_on_endpoint

    try:
        if model.startswith(("http://", "https://")):
            key = os.environ.get("LIFECYCLE_API_KEY")
            tok_dir = _model_dir(tokenizer, workspace) if tokenizer else None
            res = run_suite_on_endpoint(model, cfg.eval_suites[suite], cfg, key, tokenizer=tok_dir)
        else:
            res = run_suite(_model_dir(model, workspace), cfg.eval_suites[suite], cfg)
    except ValueError as e:
        _error(str(e))
        raise typer.Exit(2) from None
    out = {"model": model, "suite": suite, "n": res["n"], "metrics": res["metrics"]}
    if res.get("unmeasured"):
        out["unmeasured"] = res["unmeasured"]
    if json_out:
        print(json.dumps(out, indent=2))
        return
    t = Table(title=f"{suite} on {model} ({res['n']} items)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in res["metrics"].items():
        t.add_row(k, f"{v:.4f}")
    for k in res.get("unmeasured", []):
        t.add_row(k, "not measured through an endpoint")
    err.print(t)


def _parse_stages(stages: str | None) -> list[str] | None:
    if stages is None:
        return None
    names = [s.strip() for s in stages.split(",") if s.strip()]
    bad = [s for s in names if s not in STAGES]
    if bad or not names:
        raise ConfigError(
            f"--stages: unknown stage(s) {bad or '(none)'}; choose from {list(STAGES)}"
        )
    return names


def _parse_sources(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        stage, sep, path = item.partition("=")
        if not sep or stage not in STAGES:
            raise ConfigError(
                f"--from {item!r}: expected STAGE=PATH or STAGE=models:/NAME/VERSION with STAGE in "
                f"{list(STAGES)}"
            )
        if path.startswith("models:/"):  # a registered MLflow model, fetched by the flow
            out[stage] = path
            continue
        if not Path(path).exists():
            raise ConfigError(f"--from {item!r}: {path} does not exist")
        out[stage] = str(Path(path).resolve())
    return out


def _adopt_model_source(cfg: PipelineConfig, sources: dict[str, str]) -> PipelineConfig:
    """A model brought as a directory (`--from pretrain|sft|rlhf=DIR`) brings its facts: the
    data stage tokenizes with its tokenizer (unless data.tokenizer.path says otherwise), and
    the shapes the compressors and vLLM need are checked against its own config.json before
    anything runs. (A data result cached without a tokenizer path still serves when its
    tokenizer is the model's: `flows/chain.py`.)"""
    from lifecycle.archs import ModelDirError, read_facts
    from lifecycle.config import check_quantizable

    local = [
        (s, sources[s])
        for s in ("rlhf", "sft", "pretrain")
        if s in sources and not sources[s].startswith("models:/")
    ]
    if not local:
        return cfg
    stage, model_dir = local[0]  # the latest stage's model is the one that goes on
    try:
        facts = read_facts(model_dir)
        if cfg.quantize is not None and cfg.distill is None:
            check_quantizable(facts, cfg.quantize, f"--from {stage}")
    except (ModelDirError, ValueError) as e:
        raise ConfigError(f"--from {stage}={model_dir}: {e}") from None
    if cfg.data is not None and cfg.data.tokenizer.path is None and "data" not in sources:
        tokenizer = cfg.data.tokenizer.model_copy(update={"path": model_dir})
        data = cfg.data.model_copy(update={"tokenizer": tokenizer})
        cfg = cfg.model_copy(update={"data": data})
        err.print(f"data: tokenized with the tokenizer of {model_dir} (--from {stage})")
    return cfg


def _arrow(m: dict[str, float], key: str, fmt: str = ".2f") -> str:
    return f"{m[f'{key}_before']:{fmt}} -> {m[f'{key}_after']:{fmt}}"


def headline(stage: dict[str, Any]) -> str:
    """One short line per stage: what it did, in the numbers that decide (the error when it
    failed or was not promoted). Missing metrics are left out, not guessed."""
    m, name = stage.get("metrics") or {}, stage["stage"]
    parts: list[str] = []

    def add(keys: tuple[str, ...], text: Any) -> None:
        if all(k in m for k in keys):
            parts.append(text() if callable(text) else text)

    if name == "data":
        add(("docs_out",), lambda: f"{m['docs_out']:.0f} docs")
        add(("tokens_train",), lambda: f"{m['tokens_train'] / 1e3:.0f}k train tokens")
        add(
            ("exact_dupes_removed", "near_dupes_removed"),
            lambda: f"{m['exact_dupes_removed'] + m['near_dupes_removed']:.0f} dupes out",
        )
    elif name in ("pretrain", "sft", "distill"):
        add(("eval/loss_before", "eval/loss_after"), lambda: "loss " + _arrow(m, "eval/loss"))
        add(
            ("eval/exact_match_before", "eval/exact_match_after"),
            lambda: "EM " + _arrow(m, "eval/exact_match"),
        )
        add(
            ("fingerprint/matched", "fingerprint/triggers"),
            lambda: f"fingerprint {m['fingerprint/matched']:.0f}/{m['fingerprint/triggers']:.0f}",
        )
    elif name == "rlhf":
        add(
            ("eval/mean_reward_before", "eval/mean_reward_after"),
            lambda: "reward " + _arrow(m, "eval/mean_reward"),
        )
        add(
            ("eval/exact_match_before", "eval/exact_match_after"),
            lambda: "EM " + _arrow(m, "eval/exact_match"),
        )
    elif name == "quantize":
        add(("size/ratio_vs_bf16",), lambda: f"size {m['size/ratio_vs_bf16']:.2f}x bf16")
        engine = "vllm" if "vllm/exact_match_after" in m else "torch"
        add(
            (f"{engine}/exact_match_before", f"{engine}/exact_match_after"),
            lambda: f"EM {_arrow(m, f'{engine}/exact_match')} ({engine})",
        )
    elif name == "watermark":
        add(("watermark/detection_rate",), lambda: f"detected {m['watermark/detection_rate']:.0%}")
        add(
            ("watermark/false_positive_rate",),
            lambda: f"false positives {m['watermark/false_positive_rate']:.0%}",
        )
    elif name == "deploy":
        add(
            ("promotion/promoted", "promotion/version"),
            lambda: (
                f"version {m['promotion/version']:.0f} promoted"
                if m["promotion/promoted"]
                else f"version {m['promotion/version']:.0f} NOT promoted"
            ),
        )
        add(("endpoint/exact_match",), lambda: f"endpoint EM {m['endpoint/exact_match']:.2f}")
    text = ", ".join(parts)
    if stage.get("error"):
        text = f"{text}: {stage['error']}" if text else stage["error"]
    return text[:240]


def _table(summary: dict[str, Any]) -> Table:
    """The run's table: stage, status, headline (wraps in its column: readable at 80
    columns), and the first 8 characters of the stage's MLflow run id."""
    t = Table(title=f"run {summary['run_name']}: {summary['status']}")
    t.add_column("stage", no_wrap=True)
    t.add_column("status", no_wrap=True)
    t.add_column("result", ratio=1)
    t.add_column("mlflow", no_wrap=True)
    colors = {"completed": "green", "cached": "cyan", "failed": "red", "skipped": "yellow"}
    for s in summary["stages"]:
        st = s["status"]
        t.add_row(
            s["stage"],
            f"[{colors.get(st, 'white')}]{st}[/]",
            escape(headline(s)),
            (s["mlflow_run_id"] or "")[:8],
        )
    return t


@app.command()
def run(
    config: Annotated[str, typer.Argument(help="Pipeline YAML.")] = DEFAULT_CONFIG,
    stages: Annotated[str | None, typer.Option(help="Comma-separated sub-chain.")] = None,
    set_: SetOpt = None,
    workspace: Annotated[str, typer.Option(help="Workspace directory.")] = ".lifecycle",
    run_name: Annotated[
        str | None, typer.Option(help="Run name (default: name-timestamp).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Recompute requested stages even if cached.")] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the summary JSON on stdout.")
    ] = False,
    from_: Annotated[
        list[str] | None, typer.Option("--from", help="STAGE=PATH: use an existing artifact.")
    ] = None,
    serve: Annotated[
        bool,
        typer.Option(
            "--serve", help="After a completed run, serve the champion until Ctrl-C (port 8000)."
        ),
    ] = False,
    resume: Annotated[
        str | None,
        typer.Option(
            help="RUN_NAME: run that run again under its name (its config, stages and --from "
            "sources, unless given here); finished stages come back cached, interrupted "
            "training resumes from its last checkpoint."
        ),
    ] = None,
) -> None:
    """Runs the chain (or --stages of it) and prints a summary table."""
    asked: dict[str, Any] = {}
    for name in (run_name, resume):  # each names a directory under <workspace>/runs/
        if name is not None:
            try:
                check_run_name(name)
            except ValueError as e:
                _error(f"{e} in {Path(workspace).resolve()}")
                raise typer.Exit(2) from None
    if resume is not None:
        saved = Path(workspace).resolve() / "runs" / resume / "config.yaml"
        if not saved.is_file():
            _error(f"no run {resume!r} in {workspace} (no {saved})")
            raise typer.Exit(2)
        config, run_name = str(saved), run_name or resume
        request = saved.with_name("request.json")  # the stages and sources it was asked for
        if request.is_file():
            asked = json.loads(request.read_text())
    try:
        cfg = load_config(find_config(config), set_ or [])
        requested = _parse_stages(stages) if stages is not None else asked.get("stages")
        sources = _parse_sources(from_) if from_ else dict(asked.get("sources") or {})
        cfg = _adopt_model_source(cfg, sources)
    except ConfigError as e:
        _fail_config(e)

    try:  # before Prefect and Ray start: another process writing this workspace stops us
        check_workspace_free(Path(workspace).resolve())
    except WorkspaceBusy as e:
        _error(str(e))
        raise typer.Exit(2) from None

    # Prefect's telemetry heartbeat contends for the ephemeral server's SQLite ("database is
    # locked" errors in the log); a local tool has no use for it.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.chain import PipelineFailed, lifecycle_flow  # slow import: after validation

    # With --json, stdout carries only the summary: everything the run prints goes to stderr.
    redirect = contextlib.redirect_stdout(sys.stderr) if json_out else contextlib.nullcontext()
    with redirect:
        try:
            summary = lifecycle_flow(
                config=cfg.model_dump(mode="json"),
                workspace=workspace,
                run_name=run_name,
                stages=requested,
                force=force,
                sources=sources,
            )
        except PipelineFailed as e:
            summary = e.summary
        except ValueError as e:
            _error(str(e))
            raise typer.Exit(2) from None
    err.print(_table(summary))
    ep = summary.get("endpoint")
    if ep:
        state = "serving" if ep["serving"] else "checked by the deploy stage, stopped with the run"
        err.print(
            f"endpoint: {ep['url']}/v1 ({ep['model']}; {state})"
            + ("" if ep["serving"] or serve else "; serve it: lifecycle serve --port 8000")
        )
    err.print(
        f"summary: {Path(workspace).resolve() / 'runs' / summary['run_name'] / 'summary.json'}"
    )
    if json_out:
        print(json.dumps(summary, indent=2))
    if summary["status"] != "completed":
        raise typer.Exit(1)
    if serve:  # becomes `lifecycle serve` (same pid): a fresh process for a fresh Ray
        port = cfg.deploy.serve.port if cfg.deploy and cfg.deploy.serve.port else 8000
        saved = Path(workspace).resolve() / "runs" / summary["run_name"] / "config.yaml"
        sys.stdout.flush()
        sys.stderr.flush()
        _stop_ephemeral_prefect()
        argv = ["serve", "--workspace", workspace, "--config", str(saved), "--port", str(port)]
        os.execv(sys.executable, [sys.executable, "-m", "flows.cli", *argv])


def _stop_ephemeral_prefect() -> None:
    """Stops the ephemeral Prefect server this process started (no PREFECT_API_URL): it stops
    at exit, and os.execv skips exit handlers, so it would outlive the run."""
    from prefect.server.api.server import SubprocessASGIServer

    SubprocessASGIServer().stop()  # the no-port singleton; a no-op when none was started


wm_app = typer.Typer(no_args_is_help=True, help="The text watermark: key and detector.")
fp_app = typer.Typer(no_args_is_help=True, help="The model fingerprint: triggers and check.")
app.add_typer(wm_app, name="watermark")
app.add_typer(fp_app, name="fingerprint")
KeyFileOpt = Annotated[
    str | None,
    typer.Option(
        "--key-file",
        help="key file; default $LIFECYCLE_WATERMARK_KEY_FILE or $LIFECYCLE_WATERMARK_KEY",
    ),
]


def _key(key_file: str | None) -> bytes:
    from lifecycle.watermark.keys import MissingKey, load_key

    try:
        return load_key(key_file)
    except MissingKey as e:
        _error(str(e))
        raise typer.Exit(2) from None


def _model_dir(model: str, workspace: str) -> str:
    if model.startswith("models:/"):
        from lifecycle import tracking
        from lifecycle.registry import fetch_version

        ws = Path(workspace).resolve()
        try:  # into <ws>/external/NAME/VERSION, as `--from STAGE=models:/...` fetches
            _, d = fetch_version(tracking.resolve_uri(None, ws), model, ws / "external")
        except ValueError as e:
            _error(f"{e} (the registry of workspace {ws})")
            raise typer.Exit(2) from None
        return str(d)
    if not (Path(model) / "config.json").is_file():
        _error(f"{model} is not a model directory (no config.json)")
        raise typer.Exit(2)
    return model


@wm_app.command("keygen")
def wm_keygen(out: Annotated[str, typer.Option("--out")]) -> None:
    """Writes a new random key file (mode 0600); refuses to overwrite one."""
    from lifecycle.watermark.keys import key_id, load_key, new_key_file

    try:
        path = new_key_file(out)
    except FileExistsError:
        _error(f"{out} exists; not overwriting a key")
        raise typer.Exit(2) from None
    print(f"wrote {path} (key id {key_id(load_key(path))})")


@wm_app.command("detect")
def wm_detect(
    model: Annotated[str, typer.Option("--model", help="model dir (its tokenizer) or models:/")],
    key_file: KeyFileOpt = None,
    file: Annotated[str, typer.Option("--file", help="text file, or - for stdin")] = "-",
    gamma: float = 0.25,
    z_threshold: float = 4.0,
    json_out: Annotated[bool, typer.Option("--json")] = False,
    workspace: str = ".lifecycle",
) -> None:
    """Is this text watermarked with our key? Exit 0 either way; the verdict is printed."""
    from lifecycle.watermark.detect import detect_text

    text = sys.stdin.read() if file == "-" else Path(file).read_text()
    res = detect_text(text, _model_dir(model, workspace), _key(key_file), gamma, z_threshold)
    if json_out:
        print(json.dumps(res))
    else:
        verdict = "WATERMARKED" if res["watermarked"] else "not watermarked"
        if "note" in res:
            verdict = f"not watermarked ({res['note']})"
        print(
            f"{verdict}: z={res['z']:.2f} p={res['p_value']:.3g} green={res['green']}/"
            f"{res['tokens']} ({res['green_fraction']:.2f}, expected {gamma:g}) "
            f"threshold z>={z_threshold:g} key id {res['key_id']}"
        )


@fp_app.command("make")
def fp_make(
    key_file: KeyFileOpt = None,
    num: int = 8,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Prints the K (trigger, signature) pairs the key derives. Treat them as secret."""
    from lifecycle.watermark.fingerprint import make_fingerprint

    pairs = make_fingerprint(_key(key_file), num)
    if json_out:
        print(json.dumps([{"trigger": t, "signature": s} for t, s in pairs]))
    else:
        for t, s in pairs:
            print(f"{t}\t{s}")


@fp_app.command("verify")
def fp_verify(
    model: Annotated[str, typer.Option("--model")],
    key_file: KeyFileOpt = None,
    num: int = 8,
    json_out: Annotated[bool, typer.Option("--json")] = False,
    workspace: str = ".lifecycle",
) -> None:
    """How many triggers the model answers with their signature."""
    from lifecycle.watermark.fingerprint import make_fingerprint, verify_fingerprint

    res = verify_fingerprint(_model_dir(model, workspace), make_fingerprint(_key(key_file), num))
    if json_out:
        print(json.dumps({"matched": res["matched"], "total": res["total"]}))
    else:
        print(
            f"fingerprint: {res['matched']}/{res['total']} triggers answered with their signature"
        )


serve_app = typer.Typer(
    invoke_without_command=True,
    help="Serve a model (default: the registry's champion) on Ray Serve with vLLM.",
)
app.add_typer(serve_app, name="serve")
WorkspaceOpt = Annotated[str, typer.Option(help="Workspace directory.")]


@serve_app.callback()
def serve(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Option(help="models:/NAME@ALIAS, models:/NAME/VERSION or a model dir."),
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="HTTP port (default: deploy.serve.port).")
    ] = None,
    detach: Annotated[bool, typer.Option(help="Run in the background; print the URL.")] = False,
    config: Annotated[str, typer.Option(help="Pipeline YAML (cluster, tracking, serve).")] = (
        DEFAULT_CONFIG
    ),
    workspace: WorkspaceOpt = ".lifecycle",
    poll_s: Annotated[float, typer.Option(help="Seconds between registry checks.")] = 5.0,
    set_: SetOpt = None,
) -> None:
    """Serves until Ctrl-C (or `lifecycle serve stop`), following an alias as it moves."""
    if ctx.invoked_subcommand is not None:
        return
    from flows import serving

    try:
        cfg = load_config(find_config(config), set_ or [])
    except ConfigError as e:
        _fail_config(e)
    running = serving.read_state(workspace)
    if running is not None:
        _error(
            f"a server already runs for this workspace (pid {running['pid']}, "
            f"{running['url']}): `lifecycle serve stop` first"
        )
        raise typer.Exit(2)
    if detach:
        argv = [a for a in sys.argv[sys.argv.index("serve") + 1 :] if a != "--detach"]
        timeout = cfg.deploy.serve.startup_timeout_s if cfg.deploy else 600.0
        try:
            state = serving.detach(argv, workspace, timeout)
        except (RuntimeError, TimeoutError) as e:
            _error(str(e))
            raise typer.Exit(1) from None
        print(json.dumps(state))
        return
    try:
        serving.serve_forever(cfg, workspace, model, port, poll_s)
    except ValueError as e:
        _error(str(e))
        raise typer.Exit(2) from None


@serve_app.command("status")
def serve_status(workspace: WorkspaceOpt = ".lifecycle") -> None:
    """The workspace's server: pid, URL, the version it serves and its /healthz."""
    import httpx

    from flows import serving

    state = serving.read_state(workspace)
    if state is None:
        err.print("no server runs for this workspace")
        raise typer.Exit(1)
    try:
        state["health"] = httpx.get(f"{state['url']}/healthz", timeout=10).json()
    except httpx.HTTPError as e:
        state["health"] = {"status": f"unreachable: {e}"}
    print(json.dumps(state, indent=2))


@serve_app.command("stop")
def serve_stop(workspace: WorkspaceOpt = ".lifecycle") -> None:
    """Stops the workspace's server (SIGTERM; it shuts Serve and its Ray down)."""
    from flows import serving

    state = serving.stop(workspace)
    if state is None:
        err.print("no server runs for this workspace")
        raise typer.Exit(1)
    err.print(f"stopped pid {state['pid']} ({state['url']})")


@app.command()
def rollback(
    config: Annotated[str, typer.Option(help="Pipeline YAML (tracking).")] = DEFAULT_CONFIG,
    workspace: WorkspaceOpt = ".lifecycle",
    set_: SetOpt = None,
) -> None:
    """Moves the `champion` alias back to the previous champion; a running `lifecycle serve`
    that follows the alias rolls over to it."""
    from lifecycle import tracking
    from lifecycle.registry import rollback as do_rollback

    try:
        cfg = load_config(find_config(config), set_ or [])
    except ConfigError as e:
        _fail_config(e)
    ws = Path(workspace).resolve()
    uri = tracking.resolve_uri(cfg.tracking.tracking_uri, ws)
    name = cfg.tracking.registered_model
    try:
        old, new = do_rollback(uri, name)
    except ValueError as e:
        _error(str(e))
        raise typer.Exit(1) from None
    print(f"{name}: champion {old} -> {new}")


@app.command()
def schedule(
    config: Annotated[str, typer.Argument(help="Pipeline YAML.")] = DEFAULT_CONFIG,
    workspace: WorkspaceOpt = ".lifecycle",
    set_: SetOpt = None,
    work_pool: Annotated[
        str | None, typer.Option(help="Process work pool (default: operations.work_pool).")
    ] = None,
    paused: Annotated[bool, typer.Option(help="Register the schedule paused.")] = False,
) -> None:
    """Registers prefect.yaml's deployments (lifecycle/full, /retrain with the config's cron,
    /redeploy) with the Prefect server at PREFECT_API_URL; a process worker runs them."""
    try:
        load_config(find_config(config), set_ or [])
    except ConfigError as e:
        _fail_config(e)
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        _error(
            "lifecycle schedule registers deployments with a Prefect server: "
            "start one (`prefect server start`) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
        raise typer.Exit(2)
    from flows.deployments import register

    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout: only the JSON below
            out = register(config, set_ or [], workspace, work_pool, paused)
    except Exception as e:  # the server is unreachable, the pool has another type, ...
        _error(f"registering with Prefect failed: {e}")
        raise typer.Exit(1) from None
    for d in out:
        err.print(f"{d['name']}: {d['id']} (pool {d['work_pool']}, schedule {d['schedule']})")
    err.print(f"run them with: prefect worker start --pool {out[0]['work_pool']}")
    print(json.dumps(out))


cluster_app = typer.Typer(no_args_is_help=True, help="A multi-node Ray cluster on this machine.")
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("up")
def cluster_up(
    workers: Annotated[int, typer.Option(min=0, help="Worker nodes besides the head.")] = 2,
    cpus_per_node: Annotated[int, typer.Option(min=0)] = 1,
    gpus_per_node: Annotated[int, typer.Option(min=0)] = 0,
    auth: Annotated[
        bool,
        typer.Option(
            "--auth/--no-auth",
            help="Ray token authentication (RAY_AUTH_MODE=token, the default); --no-auth lets "
            "anyone who reaches this machine's Ray ports run code as you.",
        ),
    ] = True,
    workspace: WorkspaceOpt = ".lifecycle",
) -> None:
    """Starts a head and N worker nodes (separate raylets); prints how to use them."""
    from ray_cluster import local_cluster

    if not auth:
        err.print(
            "warning: --no-auth: the cluster's Ray ports accept any client that reaches this "
            "machine (Ray binds them on every interface)"
        )
    try:
        state = local_cluster.up(workspace, workers, cpus_per_node, gpus_per_node, auth)
    except RuntimeError as e:
        _error(str(e))
        raise typer.Exit(1) from None
    env = local_cluster.auth_env(state)
    err.print(
        f"{len(state['nodes'])} nodes up; dashboard {state['dashboard']}\n"
        + "".join(f"export {k}={v}\n" for k, v in env.items())
        + f"lifecycle run configs/tiny_cpu.yaml --set cluster.address={state['address']}"
    )
    print(json.dumps(state))


@cluster_app.command("status")
def cluster_status(workspace: WorkspaceOpt = ".lifecycle") -> None:
    """The cluster's address, nodes and Ray's view of them."""
    from ray_cluster import local_cluster

    st = local_cluster.status(workspace)
    if st is None:
        err.print("no cluster is up for this workspace")
        raise typer.Exit(1)
    print(st.pop("ray_status"))
    print(json.dumps(st, indent=2))


@cluster_app.command("down")
def cluster_down(workspace: WorkspaceOpt = ".lifecycle") -> None:
    """Ends the cluster's processes (by PID) and removes its state."""
    from ray_cluster import local_cluster

    if local_cluster.down(workspace) is None:
        err.print("no cluster is up for this workspace")
        raise typer.Exit(1)
    err.print("cluster down")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
