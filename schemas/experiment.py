"""ExperimentConfig: the variants of an experiment, their weights and engines, and the topic naming rule."""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from abqueue.errors import AbqError
from schemas.codec import describe
from schemas.request import PRIORITIES

# Names become parts of Kafka topic and group names ("abq.<experiment>.<variant>.requests"), so they
# keep to characters Kafka accepts and never contain the "." that separates the parts.
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
TOPIC_PREFIX = "abq"


class ConfigError(AbqError, ValueError):
    """An experiment config that cannot be used; the message is one line naming the problem."""


class VllmSettings(BaseModel):
    """The vLLM engine settings operators tune most, typed; anything else goes in engine_args."""

    model_config = ConfigDict(extra="forbid")

    dtype: str | None = Field(default=None, description="auto, float16, bfloat16, float32")
    max_model_len: int | None = Field(
        default=None, ge=16, description="context length in tokens (prompt + output); unset: the model's"
    )
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="share of the GPU's memory vLLM may take for weights and KV cache"
    )
    max_num_seqs: int | None = Field(default=None, ge=1, description="most requests the engine runs at once")
    max_num_batched_tokens: int | None = Field(default=None, ge=1, description="most tokens in one engine step")
    enable_prefix_caching: bool | None = Field(default=None, description="reuse the KV cache of shared prompt prefixes")
    quantization: str | None = Field(default=None, description="e.g. awq, gptq, fp8")
    tensor_parallel_size: int | None = Field(default=None, ge=1, description="GPUs per worker")
    runner: Literal["auto", "generate", "pooling"] | None = Field(
        default=None,
        description="pooling: an embedding (or scoring) variant that serves /v1/embeddings; unset: vLLM's guess",
    )
    convert: str | None = Field(
        default=None,
        description="with runner pooling: adapt a generative model to embed, classify, ... (vLLM's convert)",
    )
    tool_call_parser: str | None = Field(
        default=None, description="the parser that turns the model's output into tool_calls (hermes, llama3_json, ...)"
    )
    enable_auto_tool_choice: bool | None = Field(
        default=None, description='tool_choice "auto": the model decides when to call a tool (needs tool_call_parser)'
    )
    tool_strict_level: Literal["auto", "function", "parameter"] | None = Field(
        default=None,
        description="parameter: every tool call's arguments follow its schema, as if each tool were strict: true "
        "(auto, vLLM's default: only tools marked strict)",
    )
    reasoning_parser: str | None = Field(
        default=None, description="the parser that splits a reasoning model's thinking into message.reasoning"
    )
    structured_outputs_backend: str | None = Field(
        default=None,
        description="response_format and tool schemas: auto, xgrammar, guidance, outlines, lm-format-enforcer",
    )
    disable_any_whitespace: bool | None = Field(
        default=None, description="structured outputs without free whitespace: shorter JSON, and no run of blanks"
    )

    # Settings of vLLM's OpenAI serving layer rather than of its engine.
    FRONTEND: ClassVar[tuple[str, ...]] = ("tool_call_parser", "enable_auto_tool_choice", "tool_strict_level")
    STRUCTURED: ClassVar[dict[str, str]] = {"structured_outputs_backend": "backend", "disable_any_whitespace": "disable_any_whitespace"}  # fmt: skip

    @model_validator(mode="after")
    def _settings_that_need_another(self) -> VllmSettings:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("enable_auto_tool_choice needs tool_call_parser (e.g. hermes); set both")
        if self.disable_any_whitespace and self.structured_outputs_backend not in ("xgrammar", "guidance"):
            raise ValueError("disable_any_whitespace needs structured_outputs_backend xgrammar or guidance; set it")
        return self

    def args(self) -> dict[str, Any]:
        """vLLM engine arguments (structured outputs as vLLM's structured_outputs_config)."""
        values = self.model_dump(exclude_none=True, exclude={*self.FRONTEND, *self.STRUCTURED})
        structured = {
            self.STRUCTURED[k]: v for k, v in self.model_dump(include=set(self.STRUCTURED), exclude_none=True).items()
        }
        return {**values, **({"structured_outputs_config": structured} if structured else {})}

    def frontend(self) -> dict[str, Any]:
        """Arguments of vLLM's OpenAI serving layer (`vllm serve`'s frontend arguments)."""
        return self.model_dump(include=set(self.FRONTEND), exclude_none=True)


ENGINES = ("echo", "vllm", "vllm-batch", "sim")


class ScalingConfig(BaseModel):
    """How KEDA scales a variant's workers on its consumer group's lag (KEDA's Kafka trigger)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=0, ge=0, description="0 lets the variant scale to zero")
    max_replicas: int = Field(default=4, ge=1, description="at most this many workers; above the partitions they idle")
    lag_threshold: int = Field(default=32, ge=1, description="target lag per replica (KEDA lagThreshold)")
    activation_lag_threshold: int = Field(default=0, ge=0, description="lag above which a variant at zero wakes")
    polling_interval: int = Field(default=15, ge=1, description="seconds between KEDA's lag checks")
    cooldown_period: int = Field(default=300, ge=0, description="seconds without lag before scaling to zero")
    offset_reset_policy: Literal["earliest", "latest"] = Field(
        default="earliest", description="must match the workers (earliest)"
    )
    allow_idle_consumers: bool = Field(
        default=False, description="KEDA allowIdleConsumers: replicas beyond the partitions"
    )
    limit_to_partitions_with_lag: bool = Field(
        default=False, description="KEDA limitToPartitionsWithLag: cap replicas at the partitions with lag"
    )
    exclude_persistent_lag: bool = Field(
        default=False,
        description="KEDA excludePersistentLag: leave out partitions whose committed offset does not move",
    )
    scale_to_zero_on_invalid_offset: bool = Field(
        default=False, description="KEDA scaleToZeroOnInvalidOffset: no committed offset counts as no lag"
    )
    ensure_even_distribution_of_partitions: bool = Field(
        default=False,
        description="KEDA ensureEvenDistributionOfPartitions: replicas a divisor of the partitions",
    )
    scale_down_stabilization_seconds: int = Field(default=300, ge=0, description="HPA scale-down window")
    drain_seconds: int = Field(default=120, ge=1, description="longest a worker needs to finish its in-flight work")

    @model_validator(mode="after")
    def _keda_rules(self) -> ScalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}")
        if self.limit_to_partitions_with_lag and (
            self.allow_idle_consumers or self.ensure_even_distribution_of_partitions
        ):
            raise ValueError(
                "KEDA refuses limit_to_partitions_with_lag with allow_idle_consumers or "
                "ensure_even_distribution_of_partitions; pick one"
            )
        return self


class DeployConfig(BaseModel):
    """What a variant's worker pods ask of the cluster."""

    model_config = ConfigDict(extra="forbid")

    gpus: int = Field(default=1, ge=0, description="nvidia.com/gpu per worker")
    cpu: str = Field(default="4", description="CPU request and limit per worker (Kubernetes quantity)")
    memory: str = Field(default="32Gi", description="memory request and limit per worker (Kubernetes quantity)")
    node_selector: dict[str, str] = Field(default_factory=dict, description="labels a worker's node must have")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Kubernetes tolerations of a worker pod"
    )
    max_inflight: int | None = Field(default=None, ge=1, description="the worker's --max-inflight")
    delivery: Literal["at-least-once", "exactly-once"] = Field(
        default="at-least-once",
        description="the worker's --delivery; exactly-once runs as a StatefulSet, so that each replica slot keeps "
        "its transactional id and a replacement fences its predecessor's open transaction",
    )


class PriceConfig(BaseModel):
    """What a variant costs, for the cost per 1,000 requests in `abq evaluate`."""

    model_config = ConfigDict(extra="forbid")

    per_gpu_hour: float | None = Field(default=None, ge=0, description="price of one GPU for an hour")
    per_million_tokens: float | None = Field(
        default=None, ge=0, description="price per million prompt + completion tokens"
    )


HOOK_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


class HookConfig(BaseModel):
    """Python callables the worker runs in process around the engine (KServe's transformers,
    without a network hop), each under a time limit; a hook that raises or overruns gives its
    request an error answer and a dead letter (reason hook_failed), and the worker serves on."""

    model_config = ConfigDict(extra="forbid")

    request: str | None = Field(
        default=None, pattern=HOOK_PATTERN,
        description="module:function taking the InferenceRequest and returning it changed (e.g. abqueue.hooks:redact_pii)",
    )  # fmt: skip
    response: str | None = Field(
        default=None, pattern=HOOK_PATTERN,
        description="module:function taking the request and the outputs (list of str) and returning the outputs "
        "(e.g. abqueue.hooks:extract_json)",
    )  # fmt: skip
    timeout_s: float = Field(default=2.0, gt=0, le=60, description="each call's time limit")


class LoraConfig(BaseModel):
    """A LoRA adapter the variant runs on its pool's base model (vLLM's LoRARequest)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="local directory with adapter_config.json and the adapter's weights")
    name: str | None = Field(
        default=None, description="the adapter's name in vLLM's logs and metrics; default the variant's"
    )


class SamplingConfig(BaseModel):
    """Sampling settings that are the variant's treatment: they replace the request's own."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="in place of the request's")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="in place of the request's")
    max_tokens: int | None = Field(default=None, ge=1, description="a ceiling: requests asking for more get this many")


# What the variants of one pool share: they run on one engine, one Deployment, one ScaledObject.
POOL_FIELDS = ("engine", "model", "vllm", "engine_args", "scaling", "deploy")


class VariantConfig(BaseModel):
    """One arm of the experiment: a model, an adapter or settings, and its share of the traffic."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="[a-z0-9_-], part of topic and group names")
    weight: float = Field(ge=0, le=100, description="percent of routing keys; two decimals at most")
    engine: Literal["echo", "vllm", "vllm-batch", "sim"] = Field(
        default="echo",
        description="vllm: continuous batching (AsyncLLM); vllm-batch: static batches (LLM.generate); "
        "sim: a GPU-shaped simulation for benchmarks (workers/engines/sim.py)",
    )
    model: str = Field(default="echo", description="model name or local path the engine loads")
    vllm: VllmSettings = Field(default_factory=VllmSettings, description="typed vLLM settings")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="further engine arguments, passed as is")
    max_prompt_chars: int = Field(default=100_000, ge=1, description="longer prompts are dead-lettered")
    max_tokens_limit: int = Field(default=4096, ge=1, description="larger max_tokens are dead-lettered")
    shadow_of: str | None = Field(default=None, description="a shadow variant gets copies of this variant's requests")
    shadow_percent: float = Field(default=100, gt=0, le=100, description="share of shadow_of's requests copied")
    price: PriceConfig = Field(
        default_factory=PriceConfig, description="for the cost per 1,000 requests in abq evaluate"
    )
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="how KEDA scales the workers on lag")
    deploy: DeployConfig = Field(default_factory=DeployConfig, description="the worker pods abq deploy render writes")
    hooks: HookConfig | None = Field(default=None, description="request and response hooks the worker runs")
    pool: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        description="variants naming one pool share its workers and engine (one base model); the pool's first variant "
        "gives engine, model, vllm, engine_args, scaling and deploy to the others",
    )
    lora: LoraConfig | None = Field(default=None, description="a LoRA adapter on the base model (vllm engines)")
    system_prompt: str | None = Field(
        default=None,
        max_length=100_000,
        description="put first in every chat request (in place of the caller's system message) and before every prompt",
    )
    chat_template: str | None = Field(
        default=None, max_length=100_000, description="a Jinja chat template in place of the model's own (vllm engines)"
    )
    sampling: SamplingConfig | None = Field(default=None, description="sampling settings in place of the request's")
    max_top_logprobs: int = Field(
        default=5,
        ge=0,
        le=20,
        description="the most top_logprobs a request may ask for (0: logprobs of the chosen token only)",
    )

    @field_validator("weight")
    @classmethod
    def _two_decimals(cls, w: float) -> float:
        # The assignment has 10,000 buckets: a weight is a whole number of hundredths of a percent.
        if not math.isclose(w * 100, round(w * 100), abs_tol=1e-6):
            raise ValueError("weight has more than two decimals")
        return w


class SegmentOverride(BaseModel):
    """Requests whose metadata match go to `variant` whatever the weights (like a header-match route
    in a service mesh). Every key in `match` must equal the metadata value (or be one of a list)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="reported as assigned_by override:<name>")
    match: dict[str, str | int | bool | list[str | int | bool]] = Field(
        min_length=1, description="metadata key: value (or a list of values) a request must have; every key must match"
    )
    variant: str = Field(description="where matching requests go")

    def matches(self, metadata: dict[str, Any]) -> bool:
        for key, want in self.match.items():
            have = metadata.get(key)
            if have is None or (have not in want if isinstance(want, list) else have != want):
                return False
        return True


class ExperimentConfig(BaseModel):
    """An experiment: its variants with their weights, and how requests reach them."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="[a-z0-9_-], part of every topic and group name")
    variants: list[VariantConfig] = Field(min_length=1, description="the models, adapters or settings compared")
    control: str | None = Field(default=None, description="the baseline variant; the first one if unset")
    partitions: int = Field(default=6, ge=1, le=1000, description="partitions of each variant's topic")
    replication_factor: int | None = Field(
        default=None,
        ge=1,
        le=10,
        description="copies of each topic abqueue creates; unset: 3 on a cluster of three or more brokers, else 1",
    )
    min_insync_replicas: int | None = Field(
        default=None,
        ge=1,
        le=10,
        description="copies a write must reach before it counts (with acks=all); unset: 2 with 3+ replicas, else 1",
    )
    overrides: list[SegmentOverride] = Field(default_factory=list, description="checked in order, before the weights")
    reply_topics: list[str] = Field(
        default_factory=list,
        description="topics a request may name as reply_to (fnmatch patterns); empty: abq.<name>.replies.*",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate variant names: {', '.join(dupes)}")
        total = sum(v.weight for v in self.variants)
        if not math.isclose(total, 100.0, abs_tol=1e-6):
            raise ValueError(f"variant weights sum to {total:g}, they must sum to 100")
        if self.control is not None and self.control not in names:
            raise ValueError(f"control variant {self.control!r} is not one of the variants {names}")
        for v in self.variants:
            if v.shadow_of is None:
                continue
            if v.shadow_of not in names or v.shadow_of == v.name:
                raise ValueError(
                    f"shadow variant {v.name!r} copies {v.shadow_of!r}, which is not another of the variants {names}"
                )
            if v.weight != 0:
                raise ValueError(
                    f"shadow variant {v.name!r} must have weight 0: it gets copies, never callers' requests"
                )
            if self.variant(v.shadow_of).shadow_of is not None:
                raise ValueError(
                    f"shadow variant {v.name!r} copies {v.shadow_of!r}, itself a shadow; copy a serving variant"
                )
        self._pools_consistent(names)
        if self.min_insync_replicas and self.min_insync_replicas > (self.replication_factor or 3):
            raise ValueError(
                f"min_insync_replicas {self.min_insync_replicas} is more than replication_factor "
                f"{self.replication_factor or 3}: no write could ever succeed; lower it"
            )
        for o in self.overrides:
            if o.variant not in names:
                raise ValueError(f"override {o.name!r} sends to variant {o.variant!r}, which is not one of {names}")
            if self.variant(o.variant).shadow_of is not None:
                raise ValueError(
                    f"override {o.name!r} sends to shadow variant {o.variant!r}; shadows never answer callers"
                )
        onames = [o.name for o in self.overrides]
        if len(set(onames)) != len(onames):
            raise ValueError(
                f"duplicate override names: {', '.join(sorted({n for n in onames if onames.count(n) > 1}))}"
            )
        return self

    def _pools_consistent(self, names: list[str]) -> None:
        """Each pool's later variants take its first variant's engine settings unless they set their
        own, which must then be the same: one engine serves them all."""
        for pool, members in self.pools().items():
            if pool in names:
                raise ValueError(f"pool {pool!r} has the name of a variant; pools and variants need distinct names")
            lead = members[0]
            for v in members:
                if v.shadow_of is not None:
                    raise ValueError(f"shadow variant {v.name!r} cannot share pool {pool!r}; give it its own workers")
                if v.lora is not None and not lead.engine.startswith("vllm"):
                    raise ValueError(f"variant {v.name!r} has a LoRA adapter but pool {pool!r} runs engine "
                                     f"{lead.engine!r}; adapters need engine vllm or vllm-batch")  # fmt: skip
                for field in POOL_FIELDS if v is not lead else ():
                    if field in v.model_fields_set and getattr(v, field) != getattr(lead, field):
                        what = "base model" if field == "model" else field
                        raise ValueError(
                            f"variant {v.name!r} shares pool {pool!r} but names another {what} than {lead.name!r} "
                            f"({getattr(v, field)!r}, not {getattr(lead, field)!r}); one engine serves a pool: give "
                            f"{v.name!r} the same {field} or a pool of its own"
                        )
                    setattr(v, field, getattr(lead, field))
        for v in self.variants:
            if v.pool is None and v.lora is not None and not v.engine.startswith("vllm"):
                raise ValueError(
                    f"variant {v.name!r} has a LoRA adapter but engine {v.engine!r}; use vllm or vllm-batch"
                )

    def pools(self) -> dict[str, list[VariantConfig]]:
        """Pool name -> its variants, in config order (variants without a pool are not listed)."""
        out: dict[str, list[VariantConfig]] = {}
        for v in self.variants:
            if v.pool is not None:
                out.setdefault(v.pool, []).append(v)
        return out

    def serving(self, name: str) -> list[VariantConfig]:
        """The variants one worker serves: a pool's, or one variant on its own (which may name a pooled variant:
        its pool is served)."""
        pools = self.pools()
        if name in pools:
            return pools[name]
        v = self.variant(name)
        return pools[v.pool] if v.pool is not None else [v]

    def serving_units(self) -> list[str]:
        """What needs its own workers: each pool, and each variant in none; config order."""
        out: list[str] = []
        for v in self.variants:
            unit = v.pool or v.name
            if unit not in out:
                out.append(unit)
        return out

    @property
    def control_variant(self) -> str:
        return self.control or self.variants[0].name

    def variant(self, name: str) -> VariantConfig:
        for v in self.variants:
            if v.name == name:
                return v
        known = ", ".join(v.name for v in self.variants)
        raise ConfigError(f"experiment {self.name!r} has no variant {name!r} (variants: {known})")

    # The one naming rule for topics and groups; producers, workers and manifests all go through it.
    def request_topic(self, variant: str, priority: str = "normal") -> str:
        # "normal" keeps the plain name, so a deployment that never uses priorities sees one topic.
        suffix = "" if priority == "normal" else f".{priority}"
        return f"{TOPIC_PREFIX}.{self.name}.{variant}.requests{suffix}"

    def request_topics(self, variant: str) -> dict[str, str]:
        """Priority level -> topic, highest level first."""
        return {p: self.request_topic(variant, p) for p in PRIORITIES}

    @property
    def response_topic(self) -> str:
        return f"{TOPIC_PREFIX}.{self.name}.responses"

    @property
    def shadow_response_topic(self) -> str:
        """Where shadow variants answer: recorded for comparison, never read by callers."""
        return f"{TOPIC_PREFIX}.{self.name}.shadow-responses"

    @property
    def feedback_topic(self) -> str:
        return f"{TOPIC_PREFIX}.{self.name}.feedback"

    @property
    def deadletter_topic(self) -> str:
        return f"{TOPIC_PREFIX}.{self.name}.deadletter"

    @property
    def cancel_topic(self) -> str:
        """Where callers cancel their requests; every worker of the experiment reads all of it."""
        return f"{TOPIC_PREFIX}.{self.name}.cancels"

    @property
    def reply_topic_patterns(self) -> list[str]:
        return self.reply_topics or [f"{TOPIC_PREFIX}.{self.name}.replies.*"]

    def reply_to_refusal(self, topic: str) -> str | None:
        """Why a request may not name `topic` as its reply_to, or None if it may. A reply topic is
        written by workers on a caller's say-so, so only the experiment's own reply topics qualify:
        never Kafka's internal topics nor abqueue's request, config, rollout or dead-letter topics,
        whatever the patterns say."""
        if topic == self.response_topic:
            return None
        patterns = ", ".join(self.reply_topic_patterns)
        rule = f"experiment {self.name} allows reply topics matching {patterns} (reply_topics in its config)"
        internal = topic.startswith("__") or (
            topic.startswith(f"{TOPIC_PREFIX}.")
            and not topic.endswith(".responses")
            and not fnmatch.fnmatchcase(topic, f"{TOPIC_PREFIX}.*.replies.*")
        )
        if internal:
            return f"reply_to {topic} is an internal topic, never a reply topic; {rule}"
        if not any(fnmatch.fnmatchcase(topic, p) for p in self.reply_topic_patterns):
            return f"reply_to {topic} is not allowed: {rule}"
        return None

    def partitions_for(self, variant: str) -> int:
        """A variant's request topics have at least as many partitions as it may have workers:
        a worker beyond the partition count would get nothing to do."""
        return max(self.partitions, self.serving(variant)[0].scaling.max_replicas)

    def consumer_group(self, variant: str) -> str:
        """The group whose workers serve `variant` (a variant or pool name). A pool's group name has a
        part no variant's can have, so the two never meet."""
        pool = variant if variant in self.pools() else next((v.pool for v in self.variants if v.name == variant), None)
        if pool is not None:
            return f"{TOPIC_PREFIX}.{self.name}.{pool}.pool.workers"
        return f"{TOPIC_PREFIX}.{self.name}.{variant}.workers"


def demo_experiment() -> ExperimentConfig:
    """The built-in `demo` experiment, so the quickstart needs no file."""
    return ExperimentConfig(
        name="demo",
        variants=[
            VariantConfig(name="a", weight=90, engine="echo", model="echo"),
            VariantConfig(name="b", weight=10, engine="echo", model="echo"),
        ],
        partitions=4,
    )


def load_experiment(path: str | Path | None, given_as: str = "with --config") -> ExperimentConfig:
    """Read an experiment from YAML; None gives the built-in demo. Errors are one-line ConfigErrors;
    `given_as` says how the command takes the file, for the fix they name."""
    if path is None:
        return demo_experiment()
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"experiment config {p} is a directory; pass the YAML file in it {given_as}")
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"experiment config {p} does not exist; pass an existing YAML file {given_as}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"experiment config {p} is not valid YAML{where}: {problem}") from None
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"experiment config {p}: {describe(e, whole='(top level)', known=config_keys())}") from None


def config_keys() -> set[str]:
    """Every key an experiment config may have, at any depth: for 'did you mean' on a misspelt one."""
    models: list[type[BaseModel]] = [
        ExperimentConfig, VariantConfig, VllmSettings, ScalingConfig, DeployConfig, PriceConfig, SegmentOverride,
        HookConfig, LoraConfig, SamplingConfig,
    ]  # fmt: skip
    return {name for m in models for name in m.model_fields}
