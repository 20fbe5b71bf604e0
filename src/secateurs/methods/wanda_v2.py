"""``wanda_v2``: Wanda's score with activation norms from whole-model forward passes.

Wei, Huang, Huang, Xie, Qi, Xia, Mittal, Wang and Henderson, "Assessing the Brittleness of
Safety Alignment via Pruning and Low-Rank Modifications" (ICML 2024). Their code's
``wanda_v2`` records every linear layer's input while the whole unpruned model runs over the
prompt/response samples (response tokens only unless ``--entangle_prompt_feat``), and scores
``|W_ij| * sqrt(mean of x_j^2)``; unlike ``wanda`` no block sees inputs changed by pruning
the blocks before it. The pass is :func:`secateurs.core.passes.activation_means`.
"""

from __future__ import annotations

import torch

from secateurs.core.passes import activation_means
from secateurs.methods.registry import Method, register
from secateurs.methods.wanda import weighted


def wanda_v2_score(weight: torch.Tensor, mean_square: torch.Tensor | None) -> torch.Tensor:
    """``|W_ij| * sqrt(mean_t x_tj^2)`` from the whole-model pass's mean squared inputs."""
    if mean_square is None:
        raise ValueError("the wanda_v2 score needs the mean squared inputs of the layer")
    return weighted(weight, mean_square.sqrt())


register(
    Method(
        "wanda_v2",
        "|W| * ||X|| with norms from whole-model passes over --prune_data (not block by block)",
        wanda_v2_score,
        calibrated=False,
        whole_model=activation_means,
        streamable=False,
    )
)
