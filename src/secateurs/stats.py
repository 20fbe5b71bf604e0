"""Activation statistics gathered per input channel while calibration windows pass a layer."""

from __future__ import annotations

import torch


class ActivationStats:
    """Running statistics of one linear layer's input, accumulated in fp32.

    ``sq_norm[j]`` follows the reference Wanda update exactly: for a batch of ``b`` windows,
    ``s <- s * n / (n + b); n <- n + b; s <- s + ||X_j||^2 / n``, so it is the mean over
    windows of each window's sum of ``x_j^2``.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.in_features = in_features
        self.windows = 0
        self.tokens = 0
        self.sq_norm = torch.zeros(in_features, dtype=torch.float32, device=device)

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Fold in a batch of layer inputs shaped (windows, tokens, in_features)."""
        if inputs.dim() == 2:
            inputs = inputs.unsqueeze(0)
        batch = inputs.shape[0]
        flat = inputs.reshape(-1, inputs.shape[-1]).float()
        self.sq_norm.mul_(self.windows / (self.windows + batch))
        self.windows += batch
        self.tokens += flat.shape[0]
        self.sq_norm.add_(flat.square().sum(dim=0) / self.windows)

    @property
    def norm(self) -> torch.Tensor:
        """Per-channel ``sqrt(s_j)``, the activation factor of the Wanda score."""
        return self.sq_norm.sqrt()
