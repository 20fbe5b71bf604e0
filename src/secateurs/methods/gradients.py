"""``wandg`` (Wei et al., ICML 2024, "Assessing the Brittleness of Safety Alignment via Pruning
and Low-Rank Modifications"): ``|W| * sum over samples of |dL/dW|``, and its set difference.

The gradient pass itself is :func:`secateurs.core.passes.gradient_magnitudes`.
"""

from __future__ import annotations

import torch

from secateurs.core.passes import gradient_magnitudes
from secateurs.methods.registry import Method, register


def wandg_score(weight: torch.Tensor, gradient: torch.Tensor | None) -> torch.Tensor:
    """``|W_ij| * sum_s |dL_s/dW_ij|``, the SNIP-style score of Wei et al. (ICML 2024).

    ``gradient`` is the per-sample-absolute gradient sum of :func:`gradient_magnitudes`.
    """
    if gradient is None:
        raise ValueError("the wandg score needs the summed gradient magnitudes")
    return weight.abs().float() * gradient.to(weight.device)


register(
    Method(
        "wandg",
        "|W| * sum of |dL/dW| over samples (needs the LM loss; use --prune_data)",
        wandg_score,
        calibrated=False,
        whole_model=gradient_magnitudes,
        streamable=False,
    )
)
register(
    Method(
        "wandg_set_difference",
        "prune top-q wandg on --prune_data (safety) minus top-p on --utility_data, per matrix",
        wandg_score,
        scope="layer",
        calibrated=False,
        whole_model=gradient_magnitudes,
        set_difference=True,
        streamable=False,
    )
)
