"""Metrics stage: exact per-token log p(label) and full-vocabulary entropy, reduced per sample.

Only the hidden states at positions that predict response tokens reach the LM head, in chunks,
so memory stays bounded for 150k–262k-token vocabularies and prompt positions cost no head FLOPs.
Logits and exponentials stay fp32 (whatever dtype the model runs in); the sums over the
vocabulary (the log-normaliser and the entropy) accumulate in float64: an fp32 sum over 262k
terms is off by ~1e-4 nats, systematically.
"""

from __future__ import annotations

from typing import Callable

import torch

LOGITS_BUDGET = 2**25  # fp32 logits elements per chunk (128 MiB)


def chunk_positions(vocab_size: int, requested: int | None = None) -> int:
    return requested or max(16, LOGITS_BUDGET // vocab_size)


def logp_entropy_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For logits [N, V] (any float dtype): (log p(label), entropy), float64 [N].

    With z' = z - max z (exact in fp32), S = Σ exp z' and E = Σ exp(z')·z' summed in float64:
    log p(y) = z'_y - log S and H = log S - E / S (no p·log p term underflows to NaN)."""
    z = logits.float()
    top = z.max(dim=-1, keepdim=True).values
    picked = z.gather(-1, labels[:, None]).squeeze(-1).double() - top.squeeze(-1).double()  # exact, unlike z'_y in fp32
    z = z - top
    e = z.exp()
    total = _sum64(e)
    weighted = _sum64(e.mul_(z))
    log_total = total.log()
    return picked - log_total, log_total - weighted / total


SUM_BLOCK = 1024


def _sum64(x: torch.Tensor) -> torch.Tensor:
    """Row sums of a fp32 [N, V] tensor accurate to float64: fp32 sums within blocks of 1024
    (relative error ~1e-7), added in float64 (a float64 sum over all of V is 50x slower on CPU)."""
    v = x.shape[-1] - x.shape[-1] % SUM_BLOCK
    out = x[:, :v].unflatten(-1, (-1, SUM_BLOCK)).sum(-1).double().sum(-1)
    return out + x[:, v:].sum(-1).double() if v < x.shape[-1] else out


def token_logp_entropy(
    hidden: torch.Tensor, labels: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For hidden [N, D] and next-token labels [N]: (log p(label), entropy), both float64 [N]."""
    logp_out = torch.empty(hidden.shape[0], dtype=torch.float64, device=hidden.device)
    ent_out = torch.empty_like(logp_out)
    for start in range(0, hidden.shape[0], chunk):
        stop = start + chunk
        logp_out[start:stop], ent_out[start:stop] = logp_entropy_from_logits(head(hidden[start:stop]), labels[start:stop])
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
