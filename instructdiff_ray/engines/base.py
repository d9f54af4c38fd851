"""What every engine shares: the `Engine` protocol, its settings and results, row checks, and the
split-and-retry that tells a row's fault from a process's fault."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from ..config import RunConfig

log = logging.getLogger(__name__)

# The reason prefix of an `error` row no engine can run (token ids outside the vocabulary, more tokens
# than the engine takes): a rerun does not retry it.
INVALID_ROW = "invalid row: "
# vLLM serves every text-generation architecture for scoring as `VLLM_PREFIX + arch` (vllm_model.py)
VLLM_PREFIX = "InstructDiffScore"
# spans = [[first, stop), ...] label positions (token indices whose log-prob is wanted), per vLLM request
SPANS_KEY = "instructdiff_spans"

# Messages of faults that poison the process or the device, not one row (CUDA, NCCL, vLLM's engine).
SYSTEMIC_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "NCCL", "device-side assert",
                    "illegal memory access", "ECC error", "CUDA driver", "EngineDeadError", "EngineCore")


class EngineFault(RuntimeError):
    """A fault of the process or device, not of a row: the actor must end and be restarted."""


def is_systemic(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}"
    return any(marker in text for marker in SYSTEMIC_MARKERS)


def invalid_row(ids: list[int], vocab: int, max_len: int | None = None) -> str | None:
    """Why a row cannot be run at all (checked before any forward), or None."""
    if max_len is not None and len(ids) > max_len:
        return f"{INVALID_ROW}{len(ids)} tokens > max_model_len {max_len}"
    if ids and (max(ids) >= vocab or min(ids) < 0):
        return f"{INVALID_ROW}token id {max(ids) if max(ids) >= vocab else min(ids)} outside the vocabulary (size {vocab})"
    return None


def run_split(rows: list[int], attempt, errors: dict[int, str], release=lambda: None) -> int:
    """`attempt(rows)` (returns tokens run); when it fails for a row-level reason, free the failed
    batch's memory and split it in halves until the failing rows stand alone as `errors`.

    Raises EngineFault for a systemic error, or when every row of a batch fails alone with the
    same error (a poisoned process, not poisoned rows; out-of-memory excepted: a row too long
    for the device is that row's fault)."""
    try:
        return attempt(rows)
    except EngineFault:
        raise
    except Exception as err:  # noqa: BLE001 - engines raise many types; each is classified here
        if is_systemic(err):
            raise EngineFault(f"{type(err).__name__}: {str(err)[:300]}") from err
        failed = f"{type(err).__name__}: {str(err)[:300]}"
        oom = isinstance(err, torch.OutOfMemoryError)
    release()  # outside the except block: the failed batch's tensors are no longer referenced
    if len(rows) == 1:
        errors[rows[0]] = failed
        return 0
    log.warning("batch of %d failed (%s); retrying as two halves", len(rows), failed[:120])
    before = set(errors)
    half = len(rows) // 2
    tokens = run_split(rows[:half], attempt, errors, release) + run_split(rows[half:], attempt, errors, release)
    new = {errors[i] for i in rows if i in errors and i not in before}
    if not oom and len(new) == 1 and all(i in errors for i in rows):
        raise EngineFault(f"the same error on every row of a batch of {len(rows)}: {failed}")
    return tokens

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineSettings:
    dtype: str = "float32"
    device: str = "cpu"
    max_batch_tokens: int = 2048
    max_batch_size: int = 8
    padding_side: str = "right"
    logits_chunk: int | None = None
    threads: int | None = None
    # vllm engine only (see EngineConfig for what each means and its default)
    max_model_len: int = 2048
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    cpu_kvcache_gb: int = 1
    passes: tuple[str, ...] = ("base", "warmup")
    load_format: str = "auto"  # "dummy": random weights of the config's shape (benchmarks/bench_gpu.py)


@dataclass
class PassResult:
    """Per-sample means over response tokens; NaN where the row failed (see `errors`)."""

    nll: np.ndarray
    entropy: np.ndarray
    errors: dict[int, str]
    tokens: int
    seconds: float



class Engine(Protocol):
    """A scoring engine: loads the base and (optionally) the warmup model once, then scores
    batches of tokenized rows under one of them. Registered by name in `registry.ENGINES`."""

    name: ClassVar[str]
    loads_adapters: ClassVar[bool]  # False: a LoRA warmup is served as merged weights (models.merged_warmup)
    has_warmup: bool

    def __init__(self, base_dir: str, warmup: str | None, settings: EngineSettings) -> None: ...

    def score(self, ids: list[list[int]], masks: list[list[bool]], which: str) -> PassResult:
        """Mean NLL and mean entropy over each row's response tokens under `which` (base|warmup)."""

    @classmethod
    def check(cls, cfg: "RunConfig") -> None:
        """Config-time checks (no weights loaded); raise ConfigError."""

    @classmethod
    def check_model(cls, cfg: "RunConfig", model_config: dict[str, Any]) -> None:
        """Preflight checks against the base model's config.json (no weights loaded)."""

    @classmethod
    def gpus(cls, cfg: "RunConfig") -> float:
        """GPUs one scoring actor asks for on a cluster that offers GPUs."""

    @classmethod
    def settings(cls, cfg: "RunConfig") -> dict[str, Any]:
        """Engine-specific EngineSettings fields, defaults resolved for the device."""


def engine_settings(cfg: "RunConfig", passes: tuple[str, ...] = ("base", "warmup")) -> EngineSettings:
    """The engine's settings from the run config: those every engine takes and the configured
    engine's own (`Engine.settings`), defaults resolved for the device."""
    from .registry import engine_class

    limit_tokens, limit_rows = cfg.batch_limits()
    return EngineSettings(dtype=cfg.model.dtype, device=cfg.resolved_device(), max_batch_tokens=limit_tokens,
                          max_batch_size=limit_rows, padding_side=cfg.engine.padding_side,
                          logits_chunk=cfg.engine.logits_chunk, threads=cfg.torch_threads(), passes=passes,
                          **engine_class(cfg.engine.name).settings(cfg))


def mask_spans(mask: list[bool]) -> list[list[int]]:
    """[[start, stop), ...] runs of True in a per-token response mask."""
    spans, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append([start, i])
            start = None
    return spans
