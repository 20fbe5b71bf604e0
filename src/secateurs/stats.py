"""Activation statistics gathered per input channel while calibration windows pass a layer."""

from __future__ import annotations

import torch


class ActivationStats:
    """Running statistics of one linear layer's input, accumulated in fp32.

    ``sq_norm[j]`` follows the reference Wanda update exactly: for a batch of ``b`` windows,
    ``s <- s * n / (n + b); n <- n + b; s <- s + ||X_j||^2 / n``, so it is the mean over
    windows of each window's sum of ``x_j^2``.
    """

    def __init__(
        self,
        in_features: int,
        device: torch.device | str = "cpu",
        track_mean: bool = False,
        track_gram: bool = False,
        gram_fraction: float = 1.0,
    ) -> None:
        self.in_features = in_features
        self.windows = 0
        self.tokens = 0
        self.sq_norm = torch.zeros(in_features, dtype=torch.float32, device=device)
        zeros = torch.zeros
        self._sum = zeros(in_features, dtype=torch.float64, device=device) if track_mean else None
        self._gram = (
            zeros(in_features, in_features, dtype=torch.float32, device=device)
            if track_gram
            else None
        )
        self.gram_fraction = gram_fraction
        self.gram_tokens = 0
        # A fixed seed keeps the sampled Gram, and every report built on it, reproducible.
        self._sampler = torch.Generator().manual_seed(0)

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
        if self._sum is not None:
            self._sum.add_(flat.sum(dim=0).double())  # fp32 within a batch, fp64 across
        if self._gram is not None:
            rows = flat if self.gram_fraction >= 1.0 else flat[self._sample(flat.shape[0])]
            self.gram_tokens += rows.shape[0]
            self._gram.addmm_(rows.t(), rows)

    def _sample(self, count: int) -> torch.Tensor:
        """Indices of a seeded random ``gram_fraction`` of ``count`` tokens."""
        keep = torch.rand(count, generator=self._sampler) < self.gram_fraction
        return keep.nonzero().squeeze(1).to(self._gram.device)

    @property
    def norm(self) -> torch.Tensor:
        """Per-channel ``sqrt(s_j)``, the activation factor of the Wanda score."""
        return self.sq_norm.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        """Per-channel mean of the input over every token seen (needs ``track_mean``)."""
        if self._sum is None:
            raise ValueError("this statistic was gathered without track_mean")
        return (self._sum / max(self.tokens, 1)).float()

    @property
    def gram(self) -> torch.Tensor:
        """``X^T X`` summed over the tokens seen, (in, in) (needs ``track_gram``).

        With ``gram_fraction < 1`` the sum runs over a seeded random sample of that fraction
        of the tokens: an estimate, cheap enough for error reports.
        """
        if self._gram is None:
            raise ValueError("this statistic was gathered without track_gram")
        return self._gram
