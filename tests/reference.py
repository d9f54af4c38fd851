"""Independent float64 reference: full logits from the plain model forward, one sample at a time."""

from __future__ import annotations

import numpy as np
import torch


def reference_scores(model, ids: list[list[int]], masks: list[list[bool]]) -> np.ndarray:
    """[n, 2] array of (mean NLL, mean entropy) over response tokens, computed in float64."""
    model = model.double().eval()
    out = []
    with torch.no_grad():
        for x, m in zip(ids, masks):
            logits = model(torch.tensor([x])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            pos = [j for j, v in enumerate(m) if v]
            nll = -np.mean([logp[j - 1, x[j]].item() for j in pos])
            ent = np.mean([-(logp[j - 1].exp() * logp[j - 1]).sum().item() for j in pos])
            out.append((nll, ent))
    return np.array(out)
