"""Engines stage: load the models and run teacher-forced forward passes.

`HFEngine` (transformers) is the reference engine and the CPU engine. With a LoRA warmup one
copy of the base weights serves both passes (adapter disabled for the base pass). Batches are
length-sorted and packed under a padded-token budget; position ids are passed explicitly so
results do not depend on the padding side.

`VLLMEngine` is the production GPU engine: the same contract (`score` -> per-sample means and
per-row errors), computed by the pooling model in vllm_model.py. vLLM is imported lazily, so
the project works without it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .corpus import INVALID_ROW
from .faults import encode_progress, engine_faults
from .models import is_adapter, merged_warmup
from .metrics import chunk_positions, logit_transform, per_sample_means, token_logp_entropy

log = logging.getLogger(__name__)

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


class HFEngine:
    """Transformers engine holding the base model and (optionally) the warmup model."""

    def _load(self, model_dir: str, kw: dict[str, Any]):
        from transformers import AutoConfig, AutoModelForCausalLM

        if self.s.load_format == "dummy":  # shapes only: random weights made on the device
            with torch.device(self.device):
                return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), **kw).eval()
        return AutoModelForCausalLM.from_pretrained(model_dir, **kw).to(self.device).eval()

    def __init__(self, base_dir: str, warmup: str | None, settings: EngineSettings):
        self.s = settings
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.device = torch.device(settings.device)
        kw = dict(dtype=DTYPES[settings.dtype], attn_implementation="sdpa")
        self.base = self._load(base_dir, kw)
        self.warm = None
        self.shared = False
        if warmup and is_adapter(warmup):
            from peft import PeftModel

            self.base = PeftModel.from_pretrained(self.base, warmup).to(self.device).eval()
            self.shared = True
        elif warmup:
            self.warm = self._load(warmup, kw)
        self.has_warmup = bool(warmup)
        vocab = self.base.get_output_embeddings().weight.shape[0]
        self.vocab = self.base.get_input_embeddings().weight.shape[0]
        self.chunk = chunk_positions(vocab, settings.logits_chunk)

    def _model(self, which: str):
        if which == "warmup":
            if not self.has_warmup:
                raise ValueError("no warmup model loaded")
            return self.warm if self.warm is not None else self.base
        return self.base

    def score(self, ids: list[list[int]], masks: list[list[bool]], which: str) -> PassResult:
        """Mean NLL and mean entropy over each sample's response tokens under one model."""
        import contextlib
        import time

        n = len(ids)
        nll = np.full(n, np.nan)
        ent = np.full(n, np.nan)
        errors: dict[int, str] = {}
        model = self._model(which)
        ctx = model.disable_adapter() if (self.shared and which == "base") else contextlib.nullcontext()
        start = time.perf_counter()
        tokens = 0
        runnable = []
        for i, x in enumerate(ids):
            bad = invalid_row(x, self.vocab)
            if bad:
                errors[i] = bad
            else:
                runnable.append(i)

        def attempt(rows: list[int]) -> int:
            engine_faults([ids[i] for i in rows])
            nll[rows], ent[rows] = self._forward(model, [ids[i] for i in rows], [masks[i] for i in rows])
            return sum(len(ids[i]) for i in rows)

        with ctx, torch.inference_mode():
            for batch in self._batches(ids, runnable):
                tokens += run_split(batch, attempt, errors, self._release)
        return PassResult(nll, ent, errors, tokens, time.perf_counter() - start)

    def _release(self) -> None:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _batches(self, ids: list[list[int]], rows: list[int]) -> list[list[int]]:
        order = sorted(rows, key=lambda i: (-len(ids[i]), i))
        batches, cur = [], []
        for i in order:
            width = len(ids[cur[0]]) if cur else len(ids[i])
            if cur and ((len(cur) + 1) * width > self.s.max_batch_tokens or len(cur) >= self.s.max_batch_size):
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        return batches

    def _forward(self, model, ids: list[list[int]], masks: list[list[bool]]) -> tuple[np.ndarray, np.ndarray]:
        width = max(len(x) for x in ids)
        b = len(ids)
        input_ids = torch.zeros((b, width), dtype=torch.long)
        attn = torch.zeros((b, width), dtype=torch.long)
        target = torch.zeros((b, width), dtype=torch.bool)
        for r, (x, m) in enumerate(zip(ids, masks)):
            off = width - len(x) if self.s.padding_side == "left" else 0
            input_ids[r, off : off + len(x)] = torch.tensor(x)
            attn[r, off : off + len(x)] = 1
            target[r, off : off + len(x)] = torch.tensor(m)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        input_ids, attn, positions, target = (t.to(self.device) for t in (input_ids, attn, positions, target))
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attn, position_ids=positions).last_hidden_state
        rows, cols = target.nonzero(as_tuple=True)  # token (row, col) is predicted from (row, col - 1)
        labels = input_ids[rows, cols]
        h = hidden[rows, cols - 1]
        head = model.get_output_embeddings()
        post = logit_transform(model.config)
        fn = (lambda x: post(head(x))) if post else head
        logp, entropy = token_logp_entropy(h, labels, fn, self.chunk)
        counts = target.sum(-1)
        mean_nll = per_sample_means(-logp, rows, b, counts)
        mean_ent = per_sample_means(entropy, rows, b, counts)
        return mean_nll.cpu().numpy(), mean_ent.cpu().numpy()


# Every text-generation architecture vLLM serves is scored as `VLLM_PREFIX + arch` (vllm_model.py).
VLLM_PREFIX = "InstructDiffScore"


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
            ModelRegistry.register_model(VLLM_PREFIX + arch, f"instructdiff_ray.vllm_model:{VLLM_PREFIX}{arch}")


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


class VLLMEngine:
    """vLLM engine: each model is a pooling engine whose pooler returns exact per-token
    (log p, entropy) (vllm_model.py); only those two floats per response token leave the device.

    The warmup is served as a second engine on merged weights: vLLM's LoRA path is not trusted
    with prompt-level outputs (an upstream bug breaks LoRA + prompt logprobs at >= 3 prompts per
    batch). The engine core runs in this process (in a Ray actor), so nothing outlives the actor.
    """

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

        from .vllm_model import SPANS_KEY

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


def make_engine(name: str, base_dir: str, warmup: str | None, settings: EngineSettings) -> HFEngine | VLLMEngine:
    if name == "hf":
        return HFEngine(base_dir, warmup, settings)
    if name == "vllm":
        return VLLMEngine(base_dir, warmup, settings)
    raise ValueError(f"unknown engine {name!r} (use 'hf' or 'vllm')")

