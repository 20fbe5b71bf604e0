"""Depth methods: which whole decoder blocks to drop, from how much each changes its input.

- ``shortgpt``: Men et al., "ShortGPT: Layers in Large Language Models are More Redundant Than
  You Expect", 2024. Block influence ``BI_i = 1 - cos(h_i, h_{i+1})`` (mean over tokens); the
  blocks of lowest influence go, wherever they are.
- ``angular``: Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers", 2024.
  To drop ``n`` blocks, the run of ``n`` consecutive blocks whose input and output are closest
  in angle, ``arccos(cos(h_i, h_{i+n})) / pi``, goes.
"""

from __future__ import annotations

import math

import torch

from secateurs.methods.units import UnitMethod, register_unit


def shortgpt_blocks(
    similarity: dict[tuple[int, int], float], blocks: int, remove: int
) -> list[int]:
    """The ``remove`` blocks of lowest influence ``1 - cos(h_i, h_{i+1})``."""
    influence = torch.tensor([1.0 - similarity[(i, i + 1)] for i in range(blocks)])
    order = torch.sort(influence.double(), stable=True).indices
    return sorted(int(i) for i in order[:remove])


def angular_blocks(similarity: dict[tuple[int, int], float], blocks: int, remove: int) -> list[int]:
    """The ``remove`` consecutive blocks with the least angle between their input and output."""

    def angle(start: int) -> float:
        cosine = max(-1.0, min(1.0, similarity[(start, start + remove)]))
        return math.acos(cosine) / math.pi

    start = min(range(blocks - remove + 1), key=angle)
    return list(range(start, start + remove))


register_unit(
    UnitMethod(
        "shortgpt",
        "depth",
        "blocks of lowest influence 1 - cos(in, out) (ShortGPT)",
        shortgpt_blocks,
        "Men et al., 2024",
    )
)
register_unit(
    UnitMethod(
        "angular",
        "depth",
        "the consecutive blocks of least angular distance (Gromov et al.)",
        angular_blocks,
        "Gromov et al., 2024",
    )
)
