"""Per-linear input statistics, accumulated batch by batch. Knows nothing about where inputs come from."""
from __future__ import annotations

import torch


class LinearStats:
    """Accumulates what the pruners and allocators need about one linear's inputs.

    col_norm: Wanda's ‖X_j‖₂ — the L2 norm of input column j over every calibration token.
    hessian:  H = 2/n Σ x xᵀ over the n calibration tokens (SparseGPT / GPTQ).
    """

    def __init__(self, in_features: int, *, hessian: bool = False, device: torch.device | str = "cpu"):
        self.in_features = in_features
        self.ntokens = 0
        self._sq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self._xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.in_features).to(self._sq.device, torch.float32)
        self._sq += (x * x).sum(0, dtype=torch.float64)
        if self._xtx is not None:
            self._xtx.addmm_(x.t(), x)
        self.ntokens += x.shape[0]

    @property
    def col_norm(self) -> torch.Tensor:
        return self._sq.sqrt().to(torch.float32)

    @property
    def hessian(self) -> torch.Tensor:
        if self._xtx is None:
            raise AttributeError("this accumulator was created without a Hessian")
        return self._xtx * (2.0 / max(self.ntokens, 1))

    def take_hessian(self) -> torch.Tensor:
        """The Hessian, freeing the accumulator (one [in, in] matrix less while the method works: 0.5 GB for a 7B
        down_proj); the statistics are then spent."""
        if self._xtx is None:
            raise AttributeError("this accumulator was created without a Hessian (or it was taken)")
        h, self._xtx = self._xtx, None
        return h.mul_(2.0 / max(self.ntokens, 1))   # in place: the same values as `hessian`, no second copy
