"""The guard's quick exit never hides an alarm that the exact check would raise."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secateurs.core.guard import check_channels, surely_alive, written_off


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 24),
    dead=st.integers(0, 24),
    scale=st.floats(1e-6, 1e6),
    negative=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_quick_exit_agrees_with_the_median_rule(rows, cols, dead, scale, negative, seed):
    generator = torch.Generator().manual_seed(seed)
    score = torch.rand(rows, cols, generator=generator) * scale
    score[:, : min(dead, cols)] *= 1e-5  # near-zero columns the exact rule may write off
    if negative:
        score = -score
    if surely_alive(score):
        assert not written_off(score).any()
    energy = torch.rand(cols, generator=generator)
    exact = written_off(score)
    alarm = check_channels(score, energy)
    if alarm is not None:
        assert alarm.count == int(exact.sum())


def test_zero_and_nan_scores_take_the_exact_path():
    assert not surely_alive(torch.zeros(3, 4))
    assert not surely_alive(torch.tensor([[1.0, float("nan")], [1.0, 1.0]]))
    assert check_channels(torch.zeros(3, 4), torch.ones(4)) is not None
