"""Statistics of a linear layer's input, gathered by the layer engine and shared by the methods."""
from __future__ import annotations

import torch


class InputStats:
    """Running sums over calibration tokens x (rows of the layer input):

    sum[j]    = sum_t x_tj     (the mean input, for FLAP's fluctuation and bias compensation)
    sq_sum[j] = sum_t x_tj^2   (Wanda's ||X_j||^2)
    xtx       = sum_t x_t x_t^T (the layer Hessian up to scale; only when `hessian=True`; scaled into H, in
                place, when `hessian` is first read)
    """

    def __init__(self, cols: int, hessian: bool, device: torch.device | str = "cpu"):
        self.cols = cols
        self.tokens = 0
        self.sum = torch.zeros(cols, dtype=torch.float32, device=device)
        self.sq_sum = torch.zeros(cols, dtype=torch.float32, device=device)
        self.xtx = torch.zeros(cols, cols, dtype=torch.float32, device=device) if hessian else None
        self._is_hessian = False    # xtx has been scaled, in place, into H

    def add_batch(self, x: torch.Tensor) -> None:
        if self._is_hessian:
            raise RuntimeError("these statistics were already read as a Hessian; they take no more batches")
        x = x.detach().reshape(-1, self.cols).float()
        self.tokens += x.shape[0]
        self.sum += x.sum(dim=0)
        self.sq_sum += x.square().sum(dim=0)
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)

    @property
    def col_norms(self) -> torch.Tensor:
        """||X_j||_2 over all calibration tokens."""
        return self.sq_sum.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        """Mean of each input over the calibration tokens."""
        return self.sum / max(self.tokens, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Variance of each input over the calibration tokens (FLAP's fluctuation)."""
        return (self.sq_sum / max(self.tokens, 1) - self.mean.square()).clamp_min(0)

    @property
    def hessian_mean_diagonal(self) -> float:
        """tr(H) / cols for H = 2XX^T/n, from the column sums of squares alone (no XX^T needed)."""
        return float(self.sq_sum.sum()) * 2.0 / max(self.tokens, 1) / self.cols

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2 X X^T / tokens, the Hessian of the layer-wise squared error ||W X - W' X||^2 / tokens.

        The first read scales the running sum into H in place (the same product, bit for bit, as a scaled copy),
        so a layer holds one [in, in] matrix per input group, not two: on an 8B model's MLP input each is 0.8 GB.
        The tensor is shared with every reader: copy it before modifying it."""
        if self.xtx is None:
            raise RuntimeError("these statistics were gathered without the Hessian")
        if not self._is_hessian:
            self.xtx.mul_(2.0 / max(self.tokens, 1))
            self._is_hessian = True
        return self.xtx
