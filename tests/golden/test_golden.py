"""Every run of the golden matrix gives, bit for bit, what ``golden.json`` recorded: the same
perplexities and measured sparsity, the same masks and weights, the same refusals.

The file was recorded from commit 709b90a with ``tests/golden/record.py`` (see its docstring).
A difference here is a change of behaviour; re-record only when the change is meant.
"""

from __future__ import annotations

import pytest
from record import GOLDEN, Workspace, load_golden, record_run, runs

RECORDED = load_golden()
RUNS = runs()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    """The tiny model folders, text and prompt files, shared by the module's runs."""
    return Workspace(tmp_path_factory.mktemp("golden"))


def test_the_golden_file_records_the_whole_matrix():
    assert sorted(RECORDED) == sorted(r.key for r in RUNS), f"re-record {GOLDEN}"


@pytest.mark.parametrize(
    "run",
    [
        pytest.param(run, id=run.key, marks=[pytest.mark.integration] if run.integration else [])
        for run in RUNS
    ],
)
def test_run_matches_the_golden_file(run, workspace):
    assert run.key in RECORDED, f"{run.key} is not in {GOLDEN}"
    assert record_run(run, workspace) == RECORDED[run.key]
