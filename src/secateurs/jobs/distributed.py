"""Data-parallel calibration with ``torch.distributed`` (``torchrun --nproc_per_node N``).

Each process (rank) calibrates on a fixed share of whole batches of the calibration windows,
contiguous and in rank order, and propagates its own windows through every pruned block.
After a block's calibration pass every rank gathers every batch's statistic terms
(:class:`secateurs.core.stats.BatchTerms`) and folds them in batch order, exactly as one process
folds them, so every rank holds the same bits and computes the same masks itself: no mask
is sent, and the pruned block every rank needs for propagation is already in place. A mask
broadcast from rank 0 would cost as much traffic as the terms and still need the weights
updated alike on every rank (SparseGPT, recovery). Rank 0 alone evaluates and writes.

Gloo on the CPU, NCCL on GPUs (one per rank, ``LOCAL_RANK``). The statistics that are
combined: Wanda's norms, means, the Gram (SparseGPT's Hessian, least-squares recovery), the
class statistics and block reconstruction's target moments (its training, epochs > 0, is not
combined). The streamed selectivity statistics (wanda_idf, wanda_select, wanda_spiky) fix
their thresholds on the first batch, which only rank 0 sees, so those
methods run in one process.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch import nn

from secateurs.core.engine import DataParallel
from secateurs.core.model import iter_prunable, weight_matrix
from secateurs.core.stats import ActivationStats, BatchTerms
from secateurs.core.targets import BatchTarget
from secateurs.errors import SecateursError


def world_size() -> int:
    """How many processes ``torchrun`` started (1 when launched plainly)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise SecateursError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun"
        ) from exc


@dataclass
class Launch:
    """This process's place in a data-parallel run."""

    rank: int
    size: int
    device: torch.device

    @property
    def leader(self) -> bool:
        """Rank 0: the process that evaluates and writes the outputs."""
        return self.rank == 0

    def describe(self) -> dict:
        """For the run's result: how many processes, which backend."""
        return {"processes": self.size, "backend": dist.get_backend(), "device": str(self.device)}

    def check_agreement(self, what: str, payload: bytes) -> None:
        """Fail on every rank if the ranks' ``payload`` differ (a SHA-256, all-gathered)."""
        digest = torch.frombuffer(bytearray(hashlib.sha256(payload).digest()), dtype=torch.uint8)
        digest = digest.to(self.device)
        gathered = [torch.empty_like(digest) for _ in range(self.size)]
        dist.all_gather(gathered, digest)
        differ = [rank for rank, d in enumerate(gathered) if not torch.equal(d, gathered[0])]
        if differ:
            raise SecateursError(
                f"the processes disagree on {what}: rank(s) {', '.join(map(str, differ))} "
                "differ from rank 0; launch every process with the same command line, files "
                "and seed"
            )

    def parallel(self, windows: int, batch_size: int) -> DataParallel:
        """This rank's share of ``windows`` and the reduction of every block's statistics."""
        shares = batch_shares(windows, batch_size, self.size)
        batches = [-(-(s.stop - s.start) // batch_size) for s in shares]
        return DataParallel(
            shares[self.rank],
            lambda stats: reduce_stats(stats, batches, batch_size, self.device),
            lambda kept: combine_targets(kept, batches, self.device),
        )

    def local(self, cfg, log: Callable[[str], None]):
        """The configuration as this rank runs it, and its log; the ranks' configurations
        must agree first. Only rank 0 logs and shows progress."""
        text = json.dumps(cfg.flags(), sort_keys=True, default=str)
        self.check_agreement("the configuration (command line)", text.encode())
        cfg = cfg.replace(device=str(self.device), progress=cfg.execution.progress and self.leader)
        return cfg, (log if self.leader else lambda _m: None)

    def calibration(self, prepared, batch_size: int) -> DataParallel | None:
        """This rank's part of the calibration, once the ranks agree on the windows."""
        windows = prepared.windows
        if windows is None:
            return None
        digest = hashlib.sha256(windows.cpu().numpy().tobytes())
        if prepared.batch is not None:
            digest.update(prepared.batch.token_mask.cpu().numpy().tobytes())
        self.check_agreement("the calibration windows", digest.digest())
        return self.parallel(windows.shape[0], batch_size)

    def check_masks(self, model: nn.Module) -> None:
        """Every rank must end with the same pruned weights' zeros (cheap insurance)."""
        digest = hashlib.sha256()
        for _, layer in iter_prunable(model):
            digest.update((weight_matrix(layer) == 0).cpu().numpy().tobytes())
        self.check_agreement("the masks they computed", digest.digest())


def start(device: torch.device) -> Launch | None:
    """Join the process group ``torchrun`` set up (gloo on CPU, NCCL on CUDA); None alone."""
    size = world_size()
    if size <= 1:
        return None
    rank = int(os.environ.get("RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        atexit.register(_close)
    return Launch(rank, size, device)


def _close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def batch_shares(windows: int, batch_size: int, size: int) -> list[slice]:
    """Contiguous whole batches per rank, in rank order, as even as they can be."""
    batches = -(-windows // batch_size)
    if batches < size:
        raise SecateursError(
            f"{windows} calibration windows make {batches} batch(es) of {batch_size}, fewer "
            f"than the {size} processes; raise --nsamples or lower --batch_size"
        )
    bounds = [batches * rank // size * batch_size for rank in range(size + 1)]
    return [slice(bounds[r], min(bounds[r + 1], windows)) for r in range(size)]


def _gather(values: list[torch.Tensor], batches: list[int], device: torch.device):
    """Every rank's per-batch tensors (same shape), in rank order then batch order."""
    most = max(batches)
    stacked = torch.stack(values).to(device)
    padded = stacked.new_zeros((most, *stacked.shape[1:]))
    padded[: stacked.shape[0]] = stacked
    gathered = [torch.empty_like(padded) for _ in batches]
    dist.all_gather(gathered, padded)
    return [row for part, count in zip(gathered, batches, strict=True) for row in part[:count]]


def _gather_records(
    records: list, kind: type, batches: list[int], device, to_tensor, what: str
) -> list:
    """Every rank's per-batch ``records`` (dataclasses of ``kind``) of ``what`` as dicts of
    tensors (None where a field is), in rank order then batch order; ``to_tensor(field,
    value)`` makes each field travel."""
    if len(records) != batches[dist.get_rank()]:
        raise RuntimeError(f"{what} saw {len(records)} batches, expected {batches}")
    columns = {}
    for field in fields(kind):
        values = [getattr(record, field.name) for record in records]
        columns[field.name] = (
            None
            if values[0] is None
            else _gather([to_tensor(field.name, v) for v in values], batches, device)
        )
    return [
        {key: None if column is None else column[index] for key, column in columns.items()}
        for index in range(sum(batches))
    ]


def reduce_stats(
    stats: dict[str, ActivationStats], batches: list[int], batch_size: int, device: torch.device
) -> None:
    """Refold every layer's statistics from all ranks' batch terms, in global batch order.

    Per-window terms (``sq``) are padded to ``batch_size`` rows to travel, then cut back.
    """

    def to_tensor(key: str, value) -> torch.Tensor:
        tensor = torch.as_tensor(value, device=device)
        return _pad_rows(tensor, batch_size) if key == "sq" else tensor

    for name in sorted(stats):
        layer = stats[name]
        rows = _gather_records(layer.terms, BatchTerms, batches, device, to_tensor, name)
        layer.reset()
        for row in rows:
            terms = BatchTerms(**{key: _scalar(key, value) for key, value in row.items()})
            terms.sq = terms.sq[: terms.windows]
            layer.fold(terms)
        layer.terms = None


def combine_targets(
    kept: list[BatchTarget], batches: list[int], device: torch.device
) -> list[BatchTarget]:
    """Every rank's batch terms of a reconstruction target, in global batch order (each rank
    then folds them as one process would: the same sums, bit for bit)."""

    def to_tensor(key: str, value) -> torch.Tensor:
        dtype = torch.int64 if key == "tokens" else torch.float64
        return torch.as_tensor(value, dtype=dtype, device=device)

    rows = _gather_records(kept, BatchTarget, batches, device, to_tensor, "a target")
    return [
        BatchTarget(**(row | {"energy": float(row["energy"]), "tokens": int(row["tokens"])}))
        for row in rows
    ]


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    return padded


def _scalar(key: str, value: torch.Tensor | None):
    if value is None:
        return None
    return int(value) if key in ("windows", "tokens", "gram_tokens") else value
