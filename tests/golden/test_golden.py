"""Every run of the golden matrix gives, bit for bit, what ``golden.json`` recorded: the same
perplexities and measured sparsity, the same masks and weights, the same refusals; on a
machine of another kind than the recording one (float rounding differs), what its portable
fingerprint allows (see ``record.py``).

The file was recorded from commit 709b90a with ``tests/golden/record.py`` (see its docstring).
A difference here is a change of behaviour; re-record only when the change is meant.
"""

from __future__ import annotations

import pytest
from record import (
    GOLDEN,
    Workspace,
    differences_elsewhere,
    load_golden,
    machine,
    record_run,
    recorded_machine,
    runs,
)

RECORDED = load_golden()
RUNS = runs()
SAME_MACHINE = recorded_machine() == machine()


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
    got = record_run(run, workspace)
    if SAME_MACHINE:
        assert got == RECORDED[run.key]
    else:
        assert differences_elsewhere(got, RECORDED[run.key], run.group) == []


def test_the_portable_fingerprint_passes_a_record_and_tells_methods_apart():
    same = RECORDED["llama/wanda/unstructured"]
    assert differences_elsewhere(same, same, "tiny") == []
    for other in ("llama/magnitude/unstructured", "llama/ria/unstructured"):
        assert differences_elsewhere(RECORDED[other], same, "tiny") != [], other
    assert differences_elsewhere(RECORDED["llama/wanda/2:4"], same, "smollm2") != []
    wanda, select = (RECORDED[f"smollm2-135m/{m}/unstructured"] for m in ("wanda", "wanda_select"))
    assert differences_elsewhere(wanda, select, "smollm2") != []
