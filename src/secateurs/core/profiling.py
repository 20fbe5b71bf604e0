"""Wall time and peak memory of a stretch of work."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import re
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def rss_bytes() -> int | None:
    """Resident memory of this process now (Linux), or None where it cannot be read."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class Measurement:
    """Filled in when the measured block ends."""

    seconds: float = 0.0
    start_rss: int | None = None
    peak_rss: int | None = None
    peak_is_lifetime: bool = False
    cuda_peak: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@contextlib.contextmanager
def measure(device: torch.device | str = "cpu") -> Iterator[Measurement]:
    """Time a block and record its peak resident memory (and CUDA peak on a GPU)."""
    device = torch.device(device)
    result = Measurement(start_rss=rss_bytes())
    result.peak_is_lifetime = not _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        yield result
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            result.cuda_peak = torch.cuda.max_memory_allocated(device)
        result.seconds = time.perf_counter() - start
        hwm = _status_kib("VmHWM")
        if hwm is not None:
            result.peak_rss = hwm * 1024
        else:
            result.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            result.peak_is_lifetime = True


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")  # runs ldconfig: once per process
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def give_back_memory() -> None:
    """Return freed heap pages to the system (glibc's ``malloc_trim``; elsewhere nothing).

    A freed block leaves holes in the heap that glibc keeps for reuse, and its adaptive mmap
    threshold sends later blocks' tensors there too: measured on SmolLM2, resident memory
    grew by about 6 MB a block without this, and stays flat with it.
    """
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)
