"""One validated config object for every stage.

Everything a run needs is here, checked by pydantic before any model loads, so a typo in a
YAML key fails in milliseconds with the key's name instead of an hour into a cluster job.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .engines.registry import check_engine, engine_class
from .strategies import STRATEGIES, check_strategy


class ConfigError(ValueError):
    """A bad key or value in the run configuration (caught before any model loads)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where the corpus is and how its rows map onto prompt/response."""

    paths: list[str] = Field(min_length=1, description="files or directories, local or s3://, gs://")
    format: str = Field("auto", description="auto (by file name) or a reader of readers/: jsonl, json, parquet, csv, "
                                            "arrow")
    split: str | None = Field(None, description="Hub datasets and save_to_disk DatasetDicts: the split to read "
                                               "(default: train, or the only one)")
    preset: Literal["auto", "alpaca", "qa", "prompt_completion", "messages", "sharegpt"] = "auto"
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="explicit mapping canonical->column; canonical names: instruction, input, response, messages",
    )
    id_field: str | None = None
    shard_rows: int = Field(1000, ge=1, description="rows per shard: the unit of work, output and resume")
    limit: int | None = Field(None, ge=1, description="use only the first N rows of the corpus")


class TemplateConfig(_Strict):
    kind: Literal["alpaca", "chat", "raw"] = "alpaca"
    max_length: int = Field(2048, ge=2)
    length_policy: Literal["skip", "truncate"] = "skip"
    raw_separator: str = ""
    ifd: bool = Field(False, description="also score each response alone (without its prompt) under the base model: "
                                         "one extra base pass per row, for the IFD baselines (ifd_loss, ifd_ppl)")


class ModelConfig(_Strict):
    base: str = Field(description="HF model dir, a .gguf file, or the built-in name 'smollm2'")
    warmup: str | None = Field(None, description="peft adapter dir or full model dir (None: trained by `run`)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"


class EngineConfig(_Strict):
    name: str = Field("hf", description="an engine of engines/registry.py: hf (transformers) or vllm")

    @field_validator("name")
    @classmethod
    def _engine(cls, name: str) -> str:
        return check_engine(name)
    max_batch_tokens: int | None = Field(None, ge=16, description="padded tokens per batch; default 2048 cpu, 16384 cuda")
    max_batch_size: int | None = Field(None, ge=1, description="rows per batch; default 8 cpu, 64 cuda")
    padding_side: Literal["right", "left"] = "right"
    logits_chunk: int = Field(1024, ge=1, description="response positions per fp32 log-softmax chunk")
    threads: int | None = Field(None, ge=1, description="torch threads per actor (CPU); default: cores/actors")
    # engine.name = vllm only
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vllm: fraction of each GPU for the actor's engines together (split base/warmup)"
    )
    max_num_batched_tokens: int | None = Field(
        None, ge=16, description="vllm: tokens per scheduler step (chunked prefill); default 16384 cuda, 2048 cpu"
    )
    max_num_seqs: int | None = Field(None, ge=1, description="vllm: sequences per step; default 256 cuda, 64 cpu")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per engine (needs ray.gpus_per_actor >= this)")
    placement: Literal["auto", "together", "pools"] = Field(
        "auto", description="together: base and warmup models in one actor; pools: a base pool and a warmup pool, one "
        "model per actor (a shard flows through both); auto: pools when vllm's two engines do not fit one actor's "
        "GPUs but one does (needs engine.gpu_memory_gb), else together")
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="vllm: memory of one GPU of the cluster (24 for L4/A10G, 80 for H100); enables the "
        "config-time check that the weights fit (memory.py)")
    enforce_eager: bool | None = Field(None, description="vllm: skip torch.compile/CUDA graphs; default true on cpu")
    cpu_kvcache_gb: int = Field(1, ge=1, description="vllm on cpu: KV cache GiB per engine")


class PoolConfig(_Strict):
    """Size and resources of the warmup pool (engine.placement: pools); unset fields follow `ray`."""

    min_actors: int | None = Field(None, ge=1)
    max_actors: int | None = Field(None, ge=1)
    gpus_per_actor: float | None = Field(None, ge=0)


class RayConfig(_Strict):
    address: str | None = Field(None, description="cluster address; default $RAY_ADDRESS, else local")
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1)
    gpus_per_actor: float | None = Field(
        None, ge=0, description="default: 1 when the cluster (or its autoscaler) offers GPUs, else 0")
    shared_filesystem: bool = Field(
        False, description="local paths are visible on every node (NFS, EFS, Lustre); else a multi-node cluster needs s3://, gs:// or Hub ids")
    cpus_per_actor: float = Field(1.0, gt=0)
    tokenize_cpus: float = Field(0.25, gt=0, description="CPUs reserved per tokenize/write task")
    max_restarts: int = Field(3, ge=0, description="times a dead scoring actor is restarted")
    max_task_retries: int = Field(3, ge=0, description="times a shard is retried on a restarted actor")
    select_in_memory_rows: int = Field(
        20_000_000, ge=0, description="selection reads every score row into one task up to this many rows (the fastest); "
                                      "above, it is a distributed search over partitions of the rows: the same pick and "
                                      "stats, bounded memory per task")
    warmup_pool: PoolConfig = Field(default_factory=PoolConfig,
                                    description="engine.placement: pools: the warmup pool (the base pool is min/max_actors)")

    @model_validator(mode="after")
    def _sizes(self) -> "RayConfig":
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) > max_actors ({self.max_actors})")
        return self


# Warmup presets: values a preset sets unless the config gives them explicitly.
WARMUP_PRESETS: dict[str, dict[str, Any]] = {
    "lora": {},  # the defaults below: a LoRA adapter, 1 epoch at lr 2e-4
    "paper": {"method": "full", "epochs": 3.0, "learning_rate": 2e-5},  # full fine-tuning as in the paper
}


class WarmupConfig(_Strict):
    preset: Literal["lora", "paper"] = Field("lora", description="lora (default) or paper: full fine-tuning, 3 epochs, lr 2e-5")
    alpha: float = Field(0.1, gt=0, lt=1, description="fraction of the corpus drawn for warmup")
    count: int | None = Field(None, ge=1, description="absolute number of warmup samples (overrides alpha)")
    max_samples: int | None = Field(None, ge=1, description="at most this many training samples in any round (a seeded "
                                                           "uniform subset): for corpora where alpha x N or a round's "
                                                           "selection is more than a warmup needs; off by default")
    seed: int = 0
    method: Literal["lora", "full"] = "lora"
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    num_workers: int = Field(1, ge=1, description=">1 trains data-parallel with Ray Train")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less memory "
                                                            "for long rows or large batches, about a third more compute")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in WARMUP_PRESETS:
            return {**WARMUP_PRESETS[data["preset"]], **data}
        return data


class SelectionConfig(_Strict):
    budget: float = Field(0.1, gt=0, le=1, description="beta")
    budget_unit: Literal["tokens", "samples"] = "tokens"
    gamma: float = Field(0.1, ge=0, lt=0.5, description="fraction trimmed from each dNLL tail")
    strategy: str = "instructdiff"
    seed: int = 0
    output_format: Literal["auto", "jsonl", "parquet", "json", "csv", "hf"] = Field(
        "auto", description="auto: the corpus' own format; hf: a datasets directory (load_from_disk)")
    export: Literal["auto", "always", "never"] = Field(
        "auto", description="write the selected records: auto when the corpus is reachable (else warn), always, never")

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, name: str) -> str:
        return check_strategy(name)


class RunOptions(_Strict):
    """How the job guards its run directory."""

    max_error_fraction: float = Field(
        0.05, ge=0, le=1,
        description="fail (exit 1, after writing everything) when more of the rows end in error/template_error/nonfinite",
    )
    max_invalid_fraction: float = Field(
        0.05, ge=0, le=1,
        description="fail (exit 1, after writing everything) when more of the rows are input that cannot become a "
                    "sample: malformed JSON, invalid UTF-8, wrong types, missing fields, empty prompt or response")
    lease_ttl_s: float = Field(
        120.0, gt=0, description="a driver's lease on the run directory expires this long after its last heartbeat"
    )
    recompute: list[Literal["warmup", "scores"]] = Field(
        default_factory=list, description="expensive stages an existing run directory may redo when their settings "
        "changed (refused otherwise): warmup (and the scores made with it), scores")


class TrackingConfig(_Strict):
    """Where the finished run is logged (tracking.py)."""

    mlflow: bool = Field(False, description="log config, per-round metrics, selection stats and the report to MLflow")
    mlflow_uri: str | None = Field(None, description="tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's own)")
    experiment: str = "instructdiff"
    run_name: str | None = Field(None, description="default: the run directory's name")


COMPARE_STRATEGIES = ["instructdiff", "random", "highest_dh", "middle_dh", "longest", "full"]


class CompareConfig(_Strict):
    """`instructdiff compare`: fine-tune the base on each strategy's pick at the run's budget and
    measure each model on held-out data (compare.py)."""

    eval: list[str] = Field(min_length=1, description="held-out files or directories (read like data.paths, same "
                                                       "fields); must not share a sample with the pool")
    eval_skip: int = Field(0, ge=0, description="held-out: skip the first N rows of the eval files")
    eval_limit: int | None = Field(None, ge=1, description="held-out: use at most N rows (after eval_skip)")
    strategies: list[str] = Field(default_factory=lambda: list(COMPARE_STRATEGIES), min_length=1,
                                  description="selection strategies at selection.budget, plus 'full' (every scored row)")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1,
                             description="training seeds (and the pick of 'random'); one unit per strategy x seed")
    budget_units: list[Literal["tokens", "samples"]] | None = Field(
        None, description="compare each strategy at β of the tokens and/or β of the rows (default: selection.budget_unit); "
                          "units of the other unit are named STRATEGY@UNIT")
    full_seeds: list[int] | None = Field(None, description="seeds of the 'full' units (default: seeds); full data "
                                                          "costs about 1/budget selection units each")
    train: WarmupConfig | None = Field(None, description="fine-tuning settings, identical for every unit: the run's "
                                                          "warmup settings, with those given here changed (a preset "
                                                          "given here starts from that preset instead)")
    eval_command: str | None = Field(None, description="run per model: {model_dir} and {heldout} are replaced (also "
                                                       "$INSTRUCTDIFF_MODEL_DIR, $INSTRUCTDIFF_HELDOUT); its last stdout "
                                                       "line that is a JSON object holds the metric")
    metric: str | None = Field(None, description="key of eval_command's JSON object shown in the table "
                                                 "(default: its only numeric key)")
    higher_is_better: bool = Field(True, description="of the user metric")
    exact_match: int | None = Field(None, ge=1, description="greedy-decode the first N held-out rows and score exact "
                                                            "match of the final number (GSM8K style: after '####', "
                                                            "else the last number); off by default")
    max_new_tokens: int = Field(256, ge=1, description="exact_match: tokens generated per row at most")

    @model_validator(mode="after")
    def _names(self) -> "CompareConfig":
        for s in self.strategies:
            check_strategy(s, extra=("full",))
        if any(len(set(x)) != len(x) for x in (self.strategies, self.seeds, self.full_seeds or [])):
            raise ValueError("strategies and seeds must not repeat")
        return self


class RunConfig(_Strict):
    out: str = Field(description="run directory (local path or s3://...)")
    data: DataConfig
    model: ModelConfig
    template: TemplateConfig = Field(default_factory=TemplateConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    rounds: int = Field(1, ge=1, le=10)
    run: RunOptions = Field(default_factory=RunOptions)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    compare: CompareConfig | None = Field(None, description="after the rounds, compare strategies by fine-tuning "
                                                            "(compare.py); also `instructdiff compare RUN_DIR`")
    progress: Literal["auto", "on", "off", "ray"] = Field(
        "auto", description="auto: progress lines on a terminal, sparse in logs; on; off; ray: also Ray Data's own "
                            "progress bars and execution logs")

    @model_validator(mode="before")
    @classmethod
    def _train_from_warmup(cls, data: Any) -> Any:
        """compare.train given in part (`--set compare.train.X=...` included) changes those settings of
        the run's warmup and keeps the rest; one that names a preset starts from the preset instead."""
        compare = data.get("compare") if isinstance(data, dict) else None
        train = compare.get("train") if isinstance(compare, dict) else None
        if isinstance(train, dict) and "preset" not in train:
            warm = data.get("warmup")
            warm = warm.model_dump() if isinstance(warm, WarmupConfig) else dict(warm or {})
            warm.pop("num_workers", None)  # a unit trains on one worker (units run in parallel instead)
            data = {**data, "compare": {**compare, "train": {**warm, **train}}}
        return data

    @model_validator(mode="after")
    def _across_sections(self) -> "RunConfig":
        wanted = self.compare.strategies if self.compare else []
        wants_ifd = [s for s in wanted if s in STRATEGIES and STRATEGIES[s].needs_alone]
        if wants_ifd and not self.template.ifd:
            raise ValueError(f"compare.strategies {wants_ifd} need the extra pass: set template.ifd: true")
        return self

    def resolved_device(self) -> str:
        if self.model.device != "auto":
            return self.model.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def batch_limits(self) -> tuple[int, int]:
        """(padded tokens, rows) per forward batch. Small batches stay in cache on CPU (measured:
        2048/8 runs at 0.76 of the fp32 matmul peak on SmolLM2, 4096/32 at 0.62)."""
        cpu = self.resolved_device() == "cpu"
        return (self.engine.max_batch_tokens or (2048 if cpu else 16384), self.engine.max_batch_size or (8 if cpu else 64))

    def torch_threads(self) -> int:
        if self.engine.threads:
            return self.engine.threads
        return max(1, (os.cpu_count() or 1) // self.ray.max_actors)


# What changing a key does when a run directory already holds work made with the old value (README:
# "Rerunning into a run directory"). The most specific entry applies. Kinds:
#   reuse     no persisted stage depends on it: everything finished is reused
#   select    the selection (records, stats, report) is made again, automatically, said in one line
#   warmup    the warmup would change (and the scores made with it): refused, exit 3, unless --recompute warmup
#   scores    the scores would change: refused, exit 3, unless --recompute scores
#   compare   the compare units would not be comparable: refused, exit 3 (remove compare/ to compare afresh)
#   extend    more work is added next to what is reused (more rounds, compare strategies or seeds)
#   new       another run directory
# A key that changes both the warmup and the scores is listed as warmup (its refusal comes first).
RERUN: dict[str, str] = {
    "out": "new",
    "data": "warmup",  # the rows drawn for the warmup, the shard plan and the scores
    "data.shard_rows": "scores",  # the shard plan (the warmup draw is by row, not by shard)
    "data.id_field": "scores",  # sample ids; the warmup trains on contents, not ids
    "data.format": "scores",  # recorded with the scores; the rows read are the same or the plan fails
    "data.split": "scores",
    "template": "warmup",
    "model.base": "warmup",
    "model.warmup": "scores",
    "model.dtype": "warmup",
    "model.device": "reuse",
    "engine": "reuse",  # batch sizes, threads, memory settings: the same numbers
    "engine.name": "scores",
    "ray": "reuse",
    "warmup": "warmup",
    "warmup.gradient_checkpointing": "reuse",  # memory only: the same weights (tested)
    "selection": "select",
    "rounds": "extend",
    "run": "reuse",
    "tracking": "reuse",
    "compare": "compare",
    "compare.strategies": "extend",
    "compare.seeds": "extend",
    "compare.budget_units": "extend",
    "compare.full_seeds": "extend",
    "compare.higher_is_better": "reuse",  # only how the table reads
    "compare.train.seed": "reuse",  # each unit trains with its own seed (compare.seeds)
    "compare.train.gradient_checkpointing": "reuse",  # memory only: the same models (tested)
    "progress": "reuse",
}


def rerun_effect(key: str) -> str:
    """The RERUN kind of a dotted key (its most specific entry)."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in RERUN:
            return RERUN[".".join(parts[:i])]
    raise KeyError(f"{key} is not in config.RERUN")


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        if node.get(part) is None:  # an unset (null) section is an empty one
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """`key.sub=value` strings; values are parsed as YAML so numbers and lists keep their type
    (but `on`, `off`, `yes`, `no` stay words: only `true` and `false` are booleans)."""
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key.strip()}: cannot read {raw!r} as a value ({str(err).splitlines()[0]}); "
                              "quote lists as in --set 'data.paths=[a.jsonl, b.jsonl]'") from None
        if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
            value = raw.strip()
        out.append((key.strip(), value))
    return out


MODEL_FORMS = ("a Hugging Face Hub id (HuggingFaceTB/SmolLM2-135M-Instruct), a local model directory, an s3:// or gs:// "
               "directory, a .gguf file, or the built-in name smollm2")
REQUIRED_HINTS = {  # what to write when a required key is missing
    "out": "the run directory: --out DIR or out: in the YAML (a local path or s3://bucket/prefix)",
    "data": "the corpus: --data FILE_OR_DIR or data.paths in the YAML",
    "data.paths": "the corpus: --data FILE_OR_DIR or data.paths in the YAML",
    "model": f"the base model: --base MODEL or model.base in the YAML; {MODEL_FORMS}",
    "model.base": f"the base model: --base MODEL or model.base in the YAML; {MODEL_FORMS}",
}


def _config_error(err: ValidationError, prefix: str = "") -> ConfigError:
    """One line per problem, each naming its dotted key."""
    lines = []
    for e in err.errors():
        where = ".".join([prefix] * bool(prefix) + [str(p) for p in e["loc"]])
        msg = e["msg"].removeprefix("Value error, ")
        got = f" (got {e['input']!r})" if "input" in e and e["type"] not in ("missing", "value_error") else ""
        if e["type"] == "missing" and where in REQUIRED_HINTS:
            msg = f"missing: {REQUIRED_HINTS[where]}"
        lines.append(f"{where}: {msg}{got}" if where else msg)  # a whole-config check names its keys itself
    return ConfigError(lines[0] if len(lines) == 1 else "invalid configuration:\n" + "\n".join(f"  {x}" for x in lines))


def section(cls: type[_Strict], name: str, **values: Any) -> Any:
    """A config section built on its own (the `select` command, the API's select), validated as in
    a RunConfig: the same messages, the same ConfigError."""
    try:
        return cls(**values)
    except ValidationError as err:
        raise _config_error(err, name) from None


def build_config(tree: dict[str, Any], overrides: list[tuple[str, Any]] = ()) -> RunConfig:
    """Validate a config tree (from YAML and/or flags) into a RunConfig, or raise ConfigError."""
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (tree or {}).items()}
    for key, value in overrides:
        _set_dotted(tree, key, value)
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as err:
        raise _config_error(err) from None
    check_inputs(cfg)
    return cfg


def check_out(out: str, name: str = "out") -> None:
    """An output directory must not be an existing file (checked before anything starts)."""
    if "://" not in out and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"{name}: {out} is a file, not a directory; choose a directory for the output")


def load_config(path: str | None, overrides: list[tuple[str, Any]] = ()) -> RunConfig:
    tree: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {path}")
        tree = yaml.safe_load(p.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    return build_config(tree, overrides)


def check_inputs(cfg: RunConfig) -> None:
    """Cheap existence checks on local inputs so missing files fail before Ray or models start
    (models are checked by preflight.check_config, which knows Hub ids and object stores)."""
    check_out(cfg.out)
    for p in cfg.data.paths:
        if "://" not in p and not Path(p).exists():
            raise ConfigError(f"data.paths: {p} does not exist")
    for p in cfg.compare.eval if cfg.compare else []:
        if "://" not in p and not Path(p).exists():
            raise ConfigError(f"compare.eval: {p} does not exist")
    engine_class(cfg.engine.name).check(cfg)  # each engine's own checks (vllm: installed, architecture, GPUs)


