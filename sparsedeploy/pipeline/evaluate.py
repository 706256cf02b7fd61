"""Perplexity with the papers' protocol: non-overlapping windows, exp(mean token NLL over all windows)."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, *, batch: int = 1, device="cpu",
               progress: Callable[[int, int], None] | None = None) -> float:
    model.to(device)
    total, count = 0.0, 0
    n = windows.shape[0]
    for start in range(0, n, batch):
        ids = windows[start:start + batch].to(device)
        logits = model(ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
        if progress:
            progress(min(start + batch, n), n)
    return math.exp(total / count)
