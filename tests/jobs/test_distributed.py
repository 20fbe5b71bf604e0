"""Data-parallel calibration over two gloo processes: the masks of one process, bit for bit."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import invoke_prune, make_model, make_windows

from secateurs.api import MethodPruner
from secateurs.core.model import iter_prunable, weight_matrix
from secateurs.core.recovery import BlockReconstruction
from secateurs.errors import SecateursError
from secateurs.jobs import distributed
from secateurs.methods.dsnot import MaskRefiner
from secateurs.methods.recovery import LeastSquaresStrategy, MaskedRefit, WeightRedistributor

# one method per kind of statistic that is reduced: norms, Gram (solver and recovery), classes,
# the block reconstruction's targets (on either stream), the means DSnoT reads:
# (method, recovery, reconstruction, refine)
CASES = {
    "wanda": ("wanda", None, None, False),
    "ria": ("ria", None, None, False),
    "sparsegpt": ("sparsegpt", None, None, False),
    "alps": ("alps", None, None, False),
    "neuronrank_fisher": ("neuronrank_fisher", None, None, False),
    "wanda+least_squares": ("wanda", "least_squares", None, False),
    "wanda+dsnot": ("wanda", None, None, True),
    "wanda+reconstruct pruned": ("wanda", None, "pruned", False),
    "sparsegpt+reconstruct dense": ("sparsegpt", None, "dense", False),
    "gemma3 wanda+reconstruct pruned": ("wanda", None, "pruned", False),
}
# the block aim through Gemma-3's post norms (weighted targets) on the tiny Gemma-3
ARCH = {"gemma3 wanda+reconstruct pruned": "gemma3"}
WINDOWS, BATCH = 10, 2  # 5 batches: shares of 3 and 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _masks(case: str, parallel=None) -> dict[str, torch.Tensor]:
    method, recovery, stream, refine = CASES[case]
    model = make_model(ARCH.get(case, "llama"))
    redistributor = (
        WeightRedistributor(LeastSquaresStrategy(), 1.0) if recovery is not None else None
    )
    reconstruction = BlockReconstruction(MaskedRefit(), stream) if stream is not None else None
    pruner = MethodPruner(
        model,
        method,
        batch_size=BATCH,
        progress=False,
        redistributor=redistributor,
        parallel=parallel,
        reconstruction=reconstruction,
        refiner=MaskRefiner() if refine else None,
        options={"neuronrank_max_classes": 8},
    )
    pruner.prune(make_windows(WINDOWS, 16), 0.5)
    return {name: weight_matrix(layer).clone() for name, layer in iter_prunable(model)}


def _rank(rank: int, port: int, folder: str) -> None:
    """One rank: every case on agreeing windows, then windows that differ by rank."""
    os.environ |= {
        "RANK": str(rank),
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    torch.set_num_threads(1)
    launch = distributed.start(torch.device("cpu"))
    try:
        windows = make_windows(WINDOWS, 16)
        launch.check_agreement("the calibration windows", windows.numpy().tobytes())
        for case in CASES:
            weights = _masks(case, launch.parallel(WINDOWS, BATCH))
            if rank == 0:
                torch.save(weights, os.path.join(folder, f"{case}.pt"))
        own = make_windows(WINDOWS, 16, seed=rank)
        try:
            launch.check_agreement("the calibration windows", own.numpy().tobytes())
        except SecateursError as exc:
            with open(os.path.join(folder, f"error-{rank}.txt"), "w") as file:
                file.write(str(exc))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The outputs of one two-process gloo run (spawned once for the module)."""
    folder = tmp_path_factory.mktemp("ranks")
    mp.start_processes(_rank, args=(_free_port(), str(folder)), nprocs=2, start_method="spawn")
    return folder


def test_two_processes_give_the_masks_and_weights_of_one(two_ranks):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: a block's sums must run in the same order
    try:
        for case in CASES:
            one = _masks(case)
            two = torch.load(two_ranks / f"{case}.pt", weights_only=True)
            for name, weight in one.items():
                assert torch.equal(weight == 0, two[name] == 0), (case, name)
                assert torch.equal(weight, two[name]), (case, name)
    finally:
        torch.set_num_threads(threads)


def test_ranks_with_different_windows_fail_clearly(two_ranks):
    for rank in (0, 1):
        message = (two_ranks / f"error-{rank}.txt").read_text()
        assert "disagree on the calibration windows" in message
        assert "rank(s) 1" in message


def test_batch_shares_are_whole_contiguous_batches():
    assert distributed.batch_shares(10, 2, 2) == [slice(0, 4), slice(4, 10)]
    assert distributed.batch_shares(9, 4, 3) == [slice(0, 4), slice(4, 8), slice(8, 9)]
    with pytest.raises(SecateursError, match="--nsamples"):
        distributed.batch_shares(4, 4, 2)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("--prune_method", "wanda_idf"), "selectivity"),
        (("--prune_method", "magnitude"), "does not calibrate"),
        (("--sparsity_allocation", "owl"), "OWL"),
        (("--use_recovery",), "--recovery_report_fraction 1"),
        (("--reconstruct", "pruned", "--reconstruct_epochs", "1"), "--reconstruct_epochs 0"),
    ],
)
def test_launched_runs_refuse_what_they_cannot_reproduce(
    tiny_model_dir, text_dir, monkeypatch, args, reason
):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = invoke_prune(tiny_model_dir, text_dir, *args)
    assert result.exit_code == 2, result.output
    assert reason in result.output
