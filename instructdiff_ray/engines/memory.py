"""The vllm engine's GPU memory plan: what each engine may ask for, and whether the weights fit.

A scoring actor holds one vLLM engine per model pass it runs (base and warmup in round 1, the
warmup alone later), each spanning `engine.tensor_parallel_size` GPUs. vLLM's
`gpu_memory_utilization` is a fraction of a whole GPU, so the requests of every engine on a GPU
must add up to at most `engine.gpu_memory_utilization`:

    per engine = gpu_memory_utilization x (share of each GPU this actor holds) / engines per actor

where the share is `ray.gpus_per_actor / tensor_parallel_size` below 1 (two half-GPU actors each
get half) and 1 otherwise. With `engine.gpu_memory_gb` set (the cluster's GPU; the driver is
often a CPU head and cannot see it), a plan whose weights alone cannot fit is refused at config
time: weights per GPU (parameters from config.json x dtype bytes / tensor_parallel_size) plus
`HEADROOM_GB` must not exceed each engine's budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import ConfigError

if TYPE_CHECKING:
    from ..config import RunConfig

log = logging.getLogger(__name__)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEADROOM_GB = 2.0  # activations, the CUDA context and the smallest useful KV cache, per engine per GPU
GIB = 1 << 30


def param_count(config: dict[str, Any]) -> int:
    """Parameters of a decoder-only transformer from its config.json (Llama, Mistral, Qwen2/3,
    Gemma 2/3, Phi-3 shapes: attention with grouped KV heads, a gated MLP, RMS norms)."""
    c = config.get("text_config", config)
    h, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    hd = c.get("head_dim") or h // heads
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    if c.get("attention_bias") or c.get("model_type") == "qwen2":
        attn += heads * hd + 2 * kv * hd
    mlp = 3 * h * c["intermediate_size"]
    norms = 2 * h + (2 * hd if c.get("model_type") == "qwen3" else 0) + (2 * h if "gemma" in str(c.get("model_type")) else 0)
    embeddings = vocab * h * (1 if c.get("tie_word_embeddings", False) else 2)
    return layers * (attn + mlp + norms) + embeddings + h


def gpu_share(gpus_per_actor: float | None, tensor_parallel_size: int) -> float:
    """Fraction of each of its GPUs an actor's engines may use together."""
    if gpus_per_actor is None:
        return 1.0
    return min(1.0, gpus_per_actor / tensor_parallel_size)


@dataclass(frozen=True)
class MemoryPlan:
    engines: int
    utilization_per_engine: float  # what each engine passes to vLLM
    weights_gb_per_gpu: float  # of one engine
    budget_gb_per_engine: float | None  # per GPU; None when the GPU's memory is not known
    fits: bool | None

    def describe(self, gpu_gb: float | None) -> str:
        where = f" of a {gpu_gb:g} GB GPU" if gpu_gb else ""
        budget = f", {self.budget_gb_per_engine:.1f} GB each" if self.budget_gb_per_engine is not None else ""
        return (f"{self.engines} engine(s) per actor, each asking vLLM for {self.utilization_per_engine:.3f}{where}"
                f"{budget}; weights {self.weights_gb_per_gpu:.1f} GB per GPU per engine + {HEADROOM_GB:g} GB headroom")


def plan(params: int, dtype: str, engines: int, utilization: float, gpus_per_actor: float | None,
         tensor_parallel_size: int, gpu_gb: float | None) -> MemoryPlan:
    per_engine = utilization * gpu_share(gpus_per_actor, tensor_parallel_size) / engines
    weights = params * DTYPE_BYTES[dtype] / tensor_parallel_size / GIB
    budget = gpu_gb * per_engine if gpu_gb else None
    return MemoryPlan(engines, per_engine, weights, budget, None if budget is None else weights + HEADROOM_GB <= budget)


def smallest_tensor_parallel(params: int, dtype: str, engines: int, utilization: float, gpu_gb: float) -> int | None:
    """The fewest GPUs per engine (1, 2, 4, 8) on which `engines` engines of this size fit."""
    for tp in (1, 2, 4, 8):
        if plan(params, dtype, engines, utilization, tp, tp, gpu_gb).fits:
            return tp
    return None


def params_of(model_config: dict[str, Any] | None) -> int | None:
    """The base model's parameter count, None when its config.json lacks the decoder fields
    (GPT-2 names them n_embd, ...)."""
    try:
        return param_count(model_config) if model_config else None
    except KeyError:
        return None


def engine_plan(cfg: RunConfig, params: int, engines: int):
    e = cfg.engine
    return plan(params, cfg.model.dtype, engines, e.gpu_memory_utilization, cfg.ray.gpus_per_actor,
                e.tensor_parallel_size, e.gpu_memory_gb)


def base_model_config(cfg: RunConfig) -> dict[str, Any] | None:
    """The base model's config.json (a Hub model brings only its config and tokenizer here)."""
    import json
    from pathlib import Path

    from ..models import kind, resolve_model

    if kind(cfg.model.base) in ("builtin", "gguf"):
        return None
    path = Path(resolve_model(cfg.model.base, tokenizer_only=True)) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def placement(cfg: RunConfig, model_config: dict[str, Any] | None = None) -> str:
    """together or pools (engine.placement; auto: pools when the vllm engine's two models do not
    fit one actor's GPUs but one model does)."""
    if cfg.engine.placement != "auto":
        return cfg.engine.placement
    if cfg.engine.name != "vllm" or not cfg.engine.gpu_memory_gb:
        return "together"
    params = params_of(model_config or base_model_config(cfg))
    if params is None:
        return "together"
    together, alone = engine_plan(cfg, params, 2), engine_plan(cfg, params, 1)
    return "pools" if together.fits is False and alone.fits else "together"


def check_gpu_memory(cfg: RunConfig, model_config: dict[str, Any]) -> None:
    """vllm: refuse a plan whose weights cannot fit the GPUs before anything loads (memory.py)."""
    e = cfg.engine
    if not e.gpu_memory_gb:
        return
    params = params_of(model_config)
    if params is None:
        log.warning("engine.gpu_memory_gb: cannot count the parameters of model.base (its config.json lacks the "
                    "decoder size fields); the memory check is skipped")
        return
    engines = 1 if placement(cfg, model_config) == "pools" else 2
    p = engine_plan(cfg, params, engines)
    if p.fits is False:
        tp = smallest_tensor_parallel(params, cfg.model.dtype, engines, e.gpu_memory_utilization, e.gpu_memory_gb)
        hint = (f"engine.tensor_parallel_size={tp} with ray.gpus_per_actor={tp}" if tp else "a GPU with more memory")
        if engines == 2 and engine_plan(cfg, params, 1).fits:
            hint = "engine.placement: pools (one model per actor)"
        held = "the base and warmup engines together" if engines == 2 else "one engine per actor (placement: pools)"
        raise ConfigError(f"model.base does not fit: {p.describe(e.gpu_memory_gb)}, over budget; round 1 holds "
                          f"{held}. Use {hint}, or a smaller model.dtype")
