"""Random pruning: uniform random scores, the baseline every table of Wei et al. (ICML 2024,
"Assessing the Brittleness of Safety Alignment via Pruning and Low-Rank Modifications") carries.

Each layer draws from its own generator, seeded by ``--random_seed`` and the layer's name, so a
layer's scores do not depend on which layers come before it: the same seed gives the same masks
in memory, streamed from disk, or from a dumped score file.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from secateurs.core.spec import setting
from secateurs.core.stats import ActivationStats
from secateurs.errors import SecateursError
from secateurs.methods.registry import Method, register


@dataclass(frozen=True)
class RandomOptions:
    """The seed of the random scores."""

    seed: int = setting(0, "random: seed of the uniform random scores.", flag="random_seed")

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**32:
            raise SecateursError(f"--random_seed must be in [0, 2**32), got {self.seed}")


def random_score(
    weight: torch.Tensor, stats: ActivationStats | None, options: RandomOptions, name: str
) -> torch.Tensor:
    """Uniform scores in [0, 1) from a generator seeded by the seed and the layer's name."""
    # torch's CPU generator keeps 32 bits of a seed: fold the name into those (CRC-32 started
    # at the seed differs for every seed)
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode(), options.seed))
    return torch.rand(weight.shape, generator=generator).to(weight.device)


register(
    Method(
        "random",
        "uniform random scores (seeded by --random_seed): the baseline",
        random_score,
        options=RandomOptions,
        calibrated=False,
    )
)
