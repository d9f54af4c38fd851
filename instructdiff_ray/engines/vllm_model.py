"""vLLM side of the `vllm` engine: causal LMs served as pooling models whose pooler returns exact
per-token (log p(next token), entropy) computed next to the logits.

vLLM has no entropy output, and `prompt_logprobs=-1` (exact) builds Python objects for the whole
vocabulary. Here the LM head runs inside the forward pass, only at the positions that predict the
requested response tokens, in chunks, with the same fp32 log-softmax as the hf engine
(`metrics.token_logp_entropy`); only two floats per response token leave the device.

The classes are registered with vLLM's model registry from the `vllm.general_plugins` entry point
(`engines.register_vllm_models`), because vLLM may build the model in its engine-core/worker
processes, and directly by `engines.vllm.VLLMEngine` in the actor's own process.
Only this module and `engines/vllm.py` import vLLM.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.pooler import Pooler, PoolingParamsUpdate
from vllm.model_executor.models.interfaces_base import VllmModelForPooling

from ..metrics import chunk_positions, token_logp_entropy
from .base import SPANS_KEY, VLLM_PREFIX



class TokenScorePooler(Pooler):
    """Pooler for `token_classify`: returns a float64 [n_targets, 2] tensor per request,
    column 0 = log p(token), column 1 = entropy of the distribution that predicted it.

    Chunked prefill delivers a request's hidden states over several steps; each step scores the
    positions it holds and keeps the small result in the request's pooling state until the
    request finishes. Without spans (vLLM's profiling run) every next-token position is scored,
    the worst case for memory."""

    def __init__(self, model: torch.nn.Module, vocab_size: int):
        super().__init__()
        self._model = [model]  # a list, so the LM head is not registered twice as a submodule
        self.chunk = chunk_positions(vocab_size)

    def get_supported_tasks(self) -> set[str]:
        return {"token_classify"}

    def get_pooling_updates(self, task) -> PoolingParamsUpdate:
        return PoolingParamsUpdate(requires_token_ids=True)

    def forward(self, hidden_states: torch.Tensor, pooling_metadata) -> list[torch.Tensor | None]:
        cursor = pooling_metadata.get_pooling_cursor()
        sizes = cursor.num_scheduled_tokens_cpu.tolist()
        ends = cursor.seq_lens_cpu.tolist()
        finished = cursor.get_finished_mask()
        token_ids = pooling_metadata.get_prompt_token_ids_cpu()

        rows, labels, counts = [], [], []
        offset = 0
        for r, (n, end) in enumerate(zip(sizes, ends)):
            start = end - n  # absolute position of this step's first token
            targets = _targets(pooling_metadata.pooling_params[r], len(token_ids[r]))
            # label position t is predicted by the hidden state at t - 1
            keep = targets[(targets - 1 >= start) & (targets - 1 < end)]
            rows.append(keep - 1 - start + offset)
            labels.append(token_ids[r][keep].long())
            counts.append(len(keep))
            offset += n

        device = hidden_states.device
        rows_t = torch.cat(rows).to(device)
        labels_t = torch.cat(labels).to(device)
        logp, ent = token_logp_entropy(hidden_states[rows_t], labels_t, self._model[0].compute_logits, self.chunk)
        pieces = torch.stack([logp, ent], dim=-1).split(counts)

        out: list[torch.Tensor | None] = []
        for state, piece, done in zip(pooling_metadata.pooling_states, pieces, finished):
            state.hidden_states_cache.append(piece.clone())
            if done:
                out.append(torch.cat(state.hidden_states_cache) if len(state.hidden_states_cache) > 1 else state.hidden_states_cache[0])
                state.clean()
            else:
                out.append(None)
        return out


def _targets(params, n_tokens: int) -> torch.Tensor:
    spans = (params.extra_kwargs or {}).get(SPANS_KEY)
    if spans is None:
        return torch.arange(1, n_tokens)
    return torch.cat([torch.arange(max(a, 1), min(b, n_tokens)) for a, b in spans] or [torch.zeros(0, dtype=torch.long)])


def _scoring_class(name: str, base: type) -> type:
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        self.pooler = TokenScorePooler(self, vllm_config.model_config.hf_config.get_text_config().vocab_size)

    return type(
        name,
        (base, VllmModelForPooling),
        {"__init__": __init__, "is_pooling_model": True, "default_tok_pooling_type": "ALL", "__module__": __name__},
    )


_CLASSES: dict[str, type] = {}


def scoring_class(arch: str) -> type:
    """The scoring class of one of vLLM's text-generation architectures: vLLM's own model class
    (its layers, weight loading and `compute_logits`, soft-capping included) with the token-score
    pooler. Built on first use in each process."""
    from vllm import ModelRegistry

    name = VLLM_PREFIX + arch
    if name not in _CLASSES:
        base = ModelRegistry._try_load_model_cls(arch)  # vLLM 0.32's loader of a registered architecture
        if base is None:
            raise ValueError(f"vLLM has no model class for {arch}")
        _CLASSES[name] = _scoring_class(name, base)
    return _CLASSES[name]


def __getattr__(name: str) -> type:
    """`instructdiff_ray.engines.vllm_model:InstructDiffScore<Arch>`, the lazy names the plugin registers."""
    if name.startswith(VLLM_PREFIX):
        return scoring_class(name[len(VLLM_PREFIX):])
    raise AttributeError(name)
