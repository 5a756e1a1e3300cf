"""The stage graph: one table that says, for every stage, what it is and what it takes.

    from lifecycle.stages import STAGE_TABLE, STAGES, needed_stages

Everything that needs to know the chain reads it from here: the flow (order, upstreams,
which task to call, what to pass), the cache key (which files and whether the watermark key
a stage depends on), the run summary (which artifact is the shipped model), the lineage
(which registered name a stage's model gets) and the retrain (which stages it reruns, which
registry versions it can start from).

A stage's task is called by name: `task(section, ctx, key, **upstreams, **extras)`, where
`upstreams` maps each upstream stage name to its StageResult (None when an optional upstream
is switched off, or a conditional one is not read under this config).

Adding a stage: its `<Stage>Config` and a field on `PipelineConfig` (lifecycle/config.py), a
`Stage(...)` row below, a task module in tasks/, and a pulse test in tests/stages/.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lifecycle.artifacts import StageResult
    from lifecycle.config import PipelineConfig

Predicate = Callable[["PipelineConfig"], bool]


def _never(_: PipelineConfig) -> bool:
    return False


def _no_inputs(_: PipelineConfig) -> list[str]:
    return []


def _no_extras(_: PipelineConfig) -> dict[str, Any]:
    return {}


def _no_stand_in(_: PipelineConfig) -> None:
    return None


@dataclass(frozen=True)
class Stage:
    name: str
    task: str
    """`module:function` of its Prefect task (imported when the stage runs)."""
    upstream: tuple[str, ...] = ()
    """Stages whose results it takes, by parameter name (this order is the cache key's)."""
    optional: frozenset[str] = frozenset()
    """Upstreams it can do without: passed as None when switched off in the config."""
    used_if: Mapping[str, Predicate] = field(default_factory=dict)
    """Upstreams it reads only under some settings: passed as None (and not needed) otherwise."""
    registry_suffix: str | None = None
    """Model stages: their model is registered as `<tracking.registered_model>-<suffix>`."""
    trainable: bool = False
    """Its registered versions are full-precision weights a retrain can start from."""
    inputs: Callable[[PipelineConfig], list[str]] = _no_inputs
    """Files and directories outside the workspace it reads (part of its cache key)."""
    uses_key: Predicate = _never
    """Whether its output depends on the watermark key (its key id joins the cache key)."""
    extras: Callable[[PipelineConfig], dict[str, Any]] = _no_extras
    """Keyword arguments from other sections of the config it needs."""
    stand_in: Callable[[PipelineConfig], StandIn | None] = _no_stand_in
    """When it is needed upstream but not asked for and has no result of its own: another
    config whose cached result serves instead, and the check that result must pass."""

    @property
    def ships_model(self) -> bool:
        """Its artifact is a model that can be shipped (the last completed one wins)."""
        return self.registry_suffix is not None


@dataclass(frozen=True)
class StandIn:
    config: PipelineConfig
    accepts: Callable[[StageResult], bool]


def _data_stand_in(c: PipelineConfig) -> StandIn | None:
    """Data told to tokenize with a given tokenizer (`data.tokenizer.path`, e.g. the model a
    `--from DIR` brought) can use the result of the same config that trained its own, when
    that tokenizer is the given one: a model fine-tuned in this workspace comes back with the
    data stage's own tokenizer."""
    if c.data is None or c.data.tokenizer.path is None:
        return None
    given = c.data.tokenizer.path
    own = c.data.model_copy(
        update={"tokenizer": c.data.tokenizer.model_copy(update={"path": None})}
    )

    def same_tokenizer(res: StageResult) -> bool:
        from lifecycle.data.pipeline import check_same_tokenizer
        from lifecycle.models import load_tokenizer

        try:
            check_same_tokenizer(res.artifact_uri, load_tokenizer(given), "data")
        except ValueError:
            return False
        return True

    return StandIn(c.model_copy(update={"data": own}), same_tokenizer)


def _fingerprint(c: PipelineConfig) -> bool:
    return c.sft is not None and c.sft.fingerprint is not None


def _triggers(c: PipelineConfig) -> dict[str, Any]:
    """The SFT fingerprint's trigger count: RLHF keeps the triggers, watermark checks them."""
    return {"fingerprint_triggers": c.sft.fingerprint.num_triggers if _fingerprint(c) else None}


def _rlhf_inputs(c: PipelineConfig) -> list[str]:
    if c.rlhf is None:
        return []
    judge = c.rlhf.rlaif.llm_judge if c.rlhf.rlaif else None
    return [i.path for i in c.rlhf.inputs] + ([judge.model_dir] if judge else [])


STAGE_TABLE: tuple[Stage, ...] = (
    Stage(
        "data",
        "tasks.data:prepare_data",
        inputs=lambda c: [i.path for i in c.data.inputs] if c.data else [],
        stand_in=_data_stand_in,
    ),
    Stage(
        "pretrain",
        "tasks.pretrain:pretrain",
        upstream=("data",),
        registry_suffix="pretrain",
        trainable=True,
    ),
    Stage(
        "sft",
        "tasks.sft:finetune",
        upstream=("pretrain", "data"),
        # the data stage's pretraining text, for `sft.data.pretrain_mix`
        used_if={"data": lambda c: c.sft is not None and c.sft.data.pretrain_mix > 0},
        registry_suffix="sft",
        trainable=True,
        inputs=lambda c: [i.path for i in c.sft.data.inputs] if c.sft else [],
        uses_key=_fingerprint,
    ),
    Stage(
        "rlhf",
        "tasks.rlhf:align",
        upstream=("sft", "data"),
        # the data stage's pretraining text, for `rlhf.ptx_weight`
        used_if={"data": lambda c: c.rlhf is not None and c.rlhf.ptx_weight > 0},
        registry_suffix="rlhf",
        trainable=True,
        inputs=_rlhf_inputs,
        uses_key=_fingerprint,
        extras=_triggers,
    ),
    Stage(
        "distill",
        "tasks.distill:distill",
        upstream=("rlhf",),
        registry_suffix="distilled",
        trainable=True,
    ),
    Stage(
        "quantize",
        "tasks.quantize:quantize",
        upstream=("rlhf", "distill", "data"),
        optional=frozenset({"distill"}),
        registry_suffix="quantized",
    ),
    Stage(
        "watermark",
        "tasks.watermark:watermark",
        upstream=("rlhf", "distill", "quantize", "data"),
        optional=frozenset({"distill", "quantize"}),
        uses_key=lambda c: True,
        extras=_triggers,
    ),
    Stage(
        "deploy",
        "tasks.deploy:deploy",
        upstream=("rlhf", "distill", "quantize", "watermark", "data"),
        optional=frozenset({"distill", "quantize", "watermark"}),
        # the watermark settings the served model carries (when the watermark stage ran)
        extras=lambda c: {"watermark_cfg": c.watermark},
    ),
)

STAGES: tuple[str, ...] = tuple(s.name for s in STAGE_TABLE)
"""Stage names in chain order."""

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGE_TABLE}


def stage(name: str) -> Stage:
    if name not in BY_NAME:
        raise ValueError(f"unknown stage {name!r}: choose from {list(STAGES)}")
    return BY_NAME[name]


def uses_upstream(name: str, up: str, cfg: PipelineConfig | None) -> bool:
    """Whether `name` reads `up`'s output under `cfg` (None: only the unconditional ones)."""
    when = stage(name).used_if.get(up)
    return when is None or (cfg is not None and when(cfg))


def needed_stages(
    requested: list[str], sources: Mapping[str, str], cfg: PipelineConfig | None = None
) -> set[str]:
    """The requested stages and what they need upstream (under `cfg`, when given), stopping
    at `--from` sources."""
    need: set[str] = set()

    def visit(name: str) -> None:
        if name in need:
            return
        need.add(name)
        if name not in sources:
            for up in stage(name).upstream:
                if uses_upstream(name, up, cfg):
                    visit(up)

    for name in requested:
        visit(name)
    return need


def model_stages() -> tuple[str, ...]:
    """Stages whose artifact is a model to ship, in chain order."""
    return tuple(s.name for s in STAGE_TABLE if s.ships_model)


def shipped_model(results: Mapping[str, StageResult | None]) -> StageResult:
    """The model to ship among `results`: the last model stage (in chain order) that
    completed or came from the cache. A stage whose gate kept its input (`keep_teacher`,
    `keep_uncompressed`) completed with that input as its artifact, so it is followed too."""
    for name in reversed(model_stages()):
        r = results.get(name)
        if r is not None and r.status in ("completed", "cached"):
            return r
    have = [n for n in model_stages() if n in results]
    raise ValueError(
        f"no model to work on among {have}: run one of them, or pass --from {have[0]}=DIR"
        if have
        else "no model stage upstream"
    )


def trainable_stages() -> tuple[str, ...]:
    return tuple(s.name for s in STAGE_TABLE if s.trainable)


def retrain_stages() -> list[str]:
    """What a retrain reruns: the data stage (new data) and everything after pretraining."""
    after = STAGES[STAGES.index("pretrain") + 1 :]
    return ["data", *after]
