"""Metrics stage: exact per-token log p(label) and full-vocabulary entropy, reduced per sample.

Only the hidden states at positions that predict response tokens reach the LM head, in chunks,
so memory stays bounded for 150k-token vocabularies and prompt positions cost no head FLOPs.
log-softmax always runs in fp32, whatever dtype the model runs in.
"""

from __future__ import annotations

from typing import Callable

import torch

LOGITS_BUDGET = 2**25  # fp32 logits elements per chunk (128 MiB)


def chunk_positions(vocab_size: int, requested: int | None = None) -> int:
    return requested or max(16, LOGITS_BUDGET // vocab_size)


def token_logp_entropy(
    hidden: torch.Tensor, labels: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For hidden [N, D] and next-token labels [N]: (log p(label), entropy), both fp32 [N]."""
    logp_out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    ent_out = torch.empty_like(logp_out)
    for start in range(0, hidden.shape[0], chunk):
        stop = start + chunk
        logits = head(hidden[start:stop]).float()
        logp = torch.log_softmax(logits, dim=-1)
        p = logp.exp()
        logp_out[start:stop] = logp.gather(-1, labels[start:stop, None]).squeeze(-1)
        # p * logp is 0 where p underflows to 0 (and logp may be -inf for masked vocab entries)
        ent_out[start:stop] = -torch.where(p > 0, p * logp, 0.0).sum(-1)
    return logp_out, ent_out


def per_sample_means(
    values: torch.Tensor, sample_index: torch.Tensor, n_samples: int, counts: torch.Tensor
) -> torch.Tensor:
    """Mean of per-token values for each sample, accumulated in float64."""
    sums = torch.zeros(n_samples, dtype=torch.float64, device=values.device)
    sums.index_add_(0, sample_index, values.double())
    return sums / counts.double()


def logit_transform(config) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Architectures that post-process logits (Gemma soft-capping, Cohere/Granite scaling)."""
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    div = getattr(config, "logits_scaling", None)
    if not (cap or scale or div):
        return None

    def apply(z: torch.Tensor) -> torch.Tensor:
        if scale:
            z = z * scale
        if div:
            z = z / div
        if cap:
            z = torch.tanh(z / cap) * cap
        return z

    return apply
