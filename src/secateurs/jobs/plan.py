"""From a configuration to a plan, once: every check that needs no weights, in one place.

:func:`resolve` looks the method up, parses the pattern, checks the device, the data sources,
the output paths and the score files, and decides the backend (in memory, streamed from disk,
or data-parallel). The rules about which features combine read the capabilities that each
method declares (:class:`secateurs.methods.registry.Method`), never method names. Everything
after it reads the plan instead of checking again.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch

from secateurs.config import DTYPES, RunConfig
from secateurs.core.patterns import (
    SetDifference,
    SparsityPattern,
    effective_ratio,
    parse_pattern,
)
from secateurs.core.recovery import BlockReconstruction
from secateurs.data import text
from secateurs.errors import SecateursError
from secateurs.evaluate.zeroshot import ZeroShotPlan, prepare_zero_shot
from secateurs.formats.checkpoint import is_compressed
from secateurs.formats.streaming import checkpoint_bytes, model_folder, parse_memory
from secateurs.io import ensure_free
from secateurs.jobs.report import check_plot_path, fmt_bytes
from secateurs.jobs.scoring import check_score_args
from secateurs.methods.allocation import check_allocation
from secateurs.methods.dsnot import DSnoTOptions, MaskRefiner
from secateurs.methods.recovery import (
    InverseWandaStrategy,
    LeastSquaresStrategy,
    MaskedRefit,
    WeightRedistributor,
)
from secateurs.methods.registry import METHODS, Method, get_method

BACKENDS = ("memory", "streamed", "parallel")
_KIND_NAMES = {
    "unstructured": "unstructured (per row or layer)",
    "nm": "N:M sparsity",
    "variant": "the Wanda variant",
    "neuron": "neuron sparsity",
}


def check_device(name: str) -> torch.device:
    """The torch device ``--device name`` asks for, checked to compute here, or a clear error."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise SecateursError(f"unknown --device '{name}': use cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SecateursError("--device cuda was asked for but no CUDA GPU is visible; use cpu")
    try:
        float(torch.ones(1, device=device).sum())  # a device that computes and hands data back
    except (RuntimeError, NotImplementedError, AssertionError) as exc:
        # e.g. --device mps on a build without MPS, cuda:7 on a one-GPU machine
        raise SecateursError(
            f"--device {name} is not available in this torch build or on this machine "
            f"({type(exc).__name__}); use cpu" + (" or cuda" if torch.cuda.is_available() else "")
        ) from exc
    return device


def world_size() -> int:
    """Processes of a torchrun launch (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_redistributor(cfg: RunConfig) -> WeightRedistributor | None:
    """The recovery asked for by the configuration (its parameters checked), or None."""
    spec = cfg.recovery
    if not spec.use_recovery:
        return None
    if spec.recovery == "inverse_wanda":
        strategy = InverseWandaStrategy(
            spec.inverse_wanda_update_fraction, spec.inverse_wanda_max_relative_update
        )
    else:
        strategy = LeastSquaresStrategy(spec.least_squares_damp)
    return WeightRedistributor(strategy, spec.recovery_report_fraction)


def make_reconstruction(cfg: RunConfig) -> BlockReconstruction | None:
    """The block reconstruction asked for by the configuration, or None."""
    spec = cfg.recovery
    if spec.reconstruct == "none":
        if spec.reconstruct_epochs:
            raise SecateursError(
                "--reconstruct_epochs trains after a block reconstruction: add "
                "--reconstruct dense (or pruned)"
            )
        return None
    return BlockReconstruction(
        MaskedRefit(spec.least_squares_damp),
        spec.reconstruct,
        spec.reconstruct_epochs,
        spec.reconstruct_lr,
    )


def make_refiner(cfg: RunConfig) -> MaskRefiner | None:
    """The mask refinement asked for by the configuration, or None."""
    spec = cfg.sparsity
    if spec.refine == "none":
        return None
    return MaskRefiner(DSnoTOptions(spec.dsnot_cycles, spec.dsnot_threshold, spec.dsnot_var_power))


def with_batch_size(cfg: RunConfig, streamed: bool = False) -> RunConfig:
    """``cfg`` with its calibration batch size: the user's, else 8 in memory and 1 streamed.

    On a CPU, batches of 1, 2 and 8 windows run a block at the same rate (BENCHMARKS.md);
    a streamed run is there to save memory, and batch 1 holds an eighth of the activations.
    """
    if cfg.data.batch_size is not None:
        return cfg
    return replace(cfg, data=replace(cfg.data, batch_size=1 if streamed else 8))


def needs_calibration(cfg: RunConfig, method: Method) -> bool:
    """Whether the run needs calibration (or scoring) windows at all."""
    if cfg.safety.load_wanda_score:
        return False
    return (
        method.calibrated
        or cfg.recovery.use_recovery
        or cfg.sparsity.sparsity_allocation == "owl"
        or cfg.sparsity.refine != "none"
        or cfg.recovery.reconstruct != "none"
        or method.whole_model is not None
    )


@dataclass(frozen=True)
class Plan:
    """A checked configuration and what it resolved to."""

    config: RunConfig
    method: Method
    pattern: SparsityPattern
    ratio: float
    device: torch.device
    dtype: torch.dtype
    backend: str
    zero_shot: ZeroShotPlan | None = None

    @property
    def options(self) -> Any:
        return self.config.method.options

    @property
    def streamed(self) -> bool:
        return self.backend == "streamed"


def _check_method(cfg: RunConfig, method: Method, pattern: SparsityPattern) -> None:
    """The method's capabilities against the rest of the configuration."""
    if method.updates_weights and cfg.recovery.use_recovery:
        raise SecateursError(
            f"{method.name} already updates the surviving weights to minimise each layer's "
            "output error, so --use_recovery has nothing left to do; drop --use_recovery (or "
            "use wanda with --use_recovery --recovery least_squares)"
        )
    if cfg.sparsity.refine != "none":
        if method.updates_weights:
            raise SecateursError(
                f"{method.name} chooses masks and updates weights itself; --refine dsnot "
                "refines the masks of a score method (wanda, magnitude, ria, ...)"
            )
        if method.reads_score_table or cfg.safety.load_wanda_score:
            raise SecateursError(
                "--refine dsnot reads each block's calibration statistics; it does not combine "
                "with gradient scores, loaded scores or set difference"
            )
        make_refiner(cfg).check(pattern)
    if pattern.kind not in method.patterns:
        supported = " or ".join(_KIND_NAMES[k] for k in _KIND_NAMES if k in method.patterns)
        raise SecateursError(
            f"{method.name} prunes {supported}, not {pattern.describe()}; drop --use_variant "
            "or choose another --sparsity_type"
        )


def _check_sources(cfg: RunConfig) -> None:
    text.resolve_source(cfg.data.dataset)
    text.resolve_source(cfg.evaluation.eval_dataset or cfg.data.dataset)
    ensure_free(cfg.output.save_model, "--save_model")
    ensure_free(cfg.output.save_json, "--save_json")
    ensure_free(cfg.output.save_log, "--save_log")
    check_plot_path(cfg.output.save_plot)


def zero_shot_planned(cfg: RunConfig) -> ZeroShotPlan | None:
    """The checked zero-shot tasks (their data reachable), or None without --eval_zero_shot."""
    spec = cfg.evaluation
    if cfg.safety.dump_wanda_score and (spec.eval_zero_shot is not None or cfg.output.save_plot):
        raise SecateursError(
            "--dump_wanda_score stops before pruning, so there is nothing to score or plot; "
            "drop --eval_zero_shot/--save_plot, or prune in a second run with --load_wanda_score"
        )
    if spec.eval_zero_shot is None:
        return None
    return prepare_zero_shot(spec.eval_zero_shot, spec.zero_shot_limit, spec.zero_shot_batch_size)


def _whole_model_reason(cfg: RunConfig, method: Method, pattern: SparsityPattern) -> str | None:
    """Why this run cannot stream its blocks, or None if it can."""
    if not method.streamable:
        return f"{method.name} scores from a pass over the whole model"
    if cfg.safety.use_diff:
        return "--use_diff holds the base model's weights beside the model's"
    if cfg.safety.dump_wanda_score or cfg.safety.load_wanda_score:
        return "score files are read and written for the whole model at once"
    if cfg.safety.eval_attack:
        return "--eval_attack generates text with the whole model"
    if cfg.evaluation.eval_zero_shot is not None:
        return "--eval_zero_shot scores answers with the whole model"
    if cfg.sparsity.sparsity_allocation == "owl":
        return "OWL's outlier pass runs over the whole dense model first"
    if pattern.structured and not cfg.output.keep_shape:
        return "cutting pruned neurons out reshapes the whole model (add --keep_shape)"
    if world_size() > 1:
        return "a data-parallel (torchrun) run holds the model in every process"
    return None


def streams(cfg: RunConfig, method: Method, pattern: SparsityPattern) -> bool:
    """Whether this run streams its model from disk; a clear error if it must but cannot.

    ``auto`` streams when ``--max_memory`` is given and the weights, in the run's dtype,
    exceed it.
    """
    spec = cfg.execution
    limit = parse_memory(spec.max_memory) if spec.max_memory is not None else None
    if spec.offload == "none" or (spec.offload == "auto" and limit is None):
        return False
    name = cfg.model.model
    folder = model_folder(name, cfg.model.cache_dir)
    if is_compressed(folder):
        raise SecateursError(
            f"'{name}' is a compressed checkpoint, and streaming reads dense shards; run "
            "with --offload none, or write a dense copy first: secateurs convert --model "
            f"{name} --save_model DIR --save_format dense"
        )
    if spec.offload == "auto":
        size = checkpoint_bytes(folder, DTYPES[cfg.model.dtype])
        if size <= limit:
            return False
        why = (
            f"the weights take {size:,} bytes ({fmt_bytes(size)}), more than --max_memory "
            f"{spec.max_memory}"
        )
    else:
        why = "--offload disk"
    if cfg.output.save_model is None:
        raise SecateursError(
            f"{why}: the model streams from disk and its pruned blocks are written as they are "
            "done, so pass --save_model DIR"
        )
    reason = _whole_model_reason(cfg, method, pattern)
    if reason is not None:
        raise SecateursError(
            f"{why}, but {reason}; run it in memory (--offload none, enough RAM) or choose "
            "a block-by-block setting (wanda, sparsegpt, ... with uniform allocation)"
        )
    return True


def check_parallel(cfg: RunConfig, method: Method) -> None:
    """Refuse, before any work, what a data-parallel run cannot reproduce bit for bit."""
    if world_size() <= 1:
        return
    reason = None
    if method.serial_only:
        reason = f"{method.name}'s {method.serial_only}"
    elif not method.calibrated and not method.updates_weights:
        reason = f"{method.name} does not calibrate block by block"
    elif cfg.safety.dump_wanda_score or cfg.safety.load_wanda_score:
        reason = "score files are written and read by one process"
    elif cfg.sparsity.sparsity_allocation == "owl":
        reason = "OWL's outlier pass is not split across processes"
    elif cfg.recovery.reconstruct != "none" and cfg.recovery.reconstruct_epochs > 0:
        reason = "--reconstruct_epochs trains in one process (add --reconstruct_epochs 0)"
    elif cfg.recovery.use_recovery and cfg.recovery.recovery_report_fraction < 1.0:
        reason = (
            "the recovery report samples tokens in one sequence (add "
            "--recovery_report_fraction 1 for an exact report)"
        )
    if reason is not None:
        safe = ", ".join(m.name for m in METHODS.values() if m.parallel_safe)
        raise SecateursError(
            f"this run was launched on {world_size()} processes, but {reason}; launch it as "
            f"one process (python -m secateurs ...), or choose {safe}"
        )


def check_run(cfg: RunConfig) -> tuple[Method, SparsityPattern, float]:
    """Every check that needs neither model nor data; the method, pattern and true ratio."""
    method = get_method(cfg.method.prune_method)
    make_redistributor(cfg)
    make_reconstruction(cfg)
    spec = cfg.sparsity
    pattern = parse_pattern(spec.sparsity_type, spec.scope or method.scope, spec.use_variant)
    ratio = effective_ratio(pattern, spec.sparsity_ratio)
    _check_method(cfg, method, pattern)
    check_allocation(spec.sparsity_allocation, pattern, spec.owl_threshold, spec.owl_lambda)
    _check_sources(cfg)
    if method.set_difference:
        pattern, ratio = SetDifference(cfg.safety.p, cfg.safety.q), 0.0
    check_score_args(cfg, method)
    return method, pattern, ratio


def resolve(cfg: RunConfig) -> Plan:
    """Check a configuration once and decide how it runs."""
    method, pattern, ratio = check_run(cfg)
    device = check_device(cfg.execution.device)
    if device.type == "cpu" and cfg.model.dtype == "float16":
        warnings.warn(
            "--dtype float16 on a CPU runs about 3x slower than float32 (CPUs have no fast "
            "float16 matrix kernels); use --dtype float32, or bfloat16 for half the memory",
            stacklevel=2,
        )
    zero_shot = zero_shot_planned(cfg)
    streamed = streams(cfg, method, pattern)
    check_parallel(cfg, method)
    backend = "streamed" if streamed else "parallel" if world_size() > 1 else "memory"
    return Plan(
        with_batch_size(cfg, streamed),
        method,
        pattern,
        ratio,
        device,
        DTYPES[cfg.model.dtype],
        backend,
        zero_shot,
    )
