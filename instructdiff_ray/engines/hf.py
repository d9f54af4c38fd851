"""The transformers engine: the reference engine and the CPU engine.

With a LoRA warmup one copy of the base weights serves both passes (adapter disabled for the base
pass). Batches are length-sorted and packed under a padded-token budget; position ids are passed
explicitly so results do not depend on the padding side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..faults import engine_faults
from ..metrics import chunk_positions, logit_transform, per_sample_means, token_logp_entropy
from ..models import is_adapter
from .base import DTYPES, EngineSettings, PassResult, invalid_row, run_split

if TYPE_CHECKING:
    from ..config import RunConfig


class HFEngine:
    """Transformers engine holding the base model and (optionally) the warmup model."""

    name = "hf"
    loads_adapters = True  # peft on the base weights

    @classmethod
    def check(cls, cfg: "RunConfig") -> None:
        """Any AutoModelForCausalLM loads; one actor holds both passes (no pools)."""
        from ..config import ConfigError

        if cfg.engine.placement == "pools":
            raise ConfigError("engine.placement: pools is for the vllm engine (one engine per model and GPU); the hf "
                              "engine holds the base once and serves a LoRA warmup from it: use together or auto")

    @classmethod
    def check_model(cls, cfg: "RunConfig", model_config: dict[str, Any]) -> None:
        """Any size loads (memory is the device's concern)."""

    @classmethod
    def gpus(cls, cfg: "RunConfig") -> float:
        return 1.0

    @classmethod
    def settings(cls, cfg: "RunConfig") -> dict[str, Any]:
        return {}

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
