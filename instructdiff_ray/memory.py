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

from dataclasses import dataclass
from typing import Any

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
