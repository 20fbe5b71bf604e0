"""A structured pruning job: blocks, heads and neurons out, compensated, cut, measured, saved.

Everything that needs no weights is checked first (methods, shares, paths, data), the data is
tokenized before the model loads, and the saved folder is written atomically: an ordinary
Hugging Face folder of the same class, narrower and shallower, that plain transformers loads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from secateurs.config import check_dtype
from secateurs.core.model import (
    choose_seqlen,
    load_config,
    load_model,
    load_tokenizer,
    parameter_count,
)
from secateurs.core.profiling import measure
from secateurs.core.stats import StatsRequest, token_classes
from secateurs.core.structure import StructurePruner, StructureSpec, neuron_share_for
from secateurs.data import text
from secateurs.errors import SecateursError
from secateurs.evaluate.perplexity import perplexity
from secateurs.evaluate.speed import measure_speed
from secateurs.formats.shrink import check_cut_possible, cut_structure
from secateurs.io import check_folder_files, ensure_free
from secateurs.jobs.plan import check_device
from secateurs.jobs.report import plural, versions, write_json
from secateurs.jobs.result import save_pruned_model
from secateurs.jobs.session import load_eval_windows
from secateurs.methods.units import UNIT_METHODS, unit_method


@dataclass(frozen=True)
class ShrinkJob:
    """Everything a ``secateurs shrink`` run needs."""

    model: str = "smollm2-135m"
    structure: StructureSpec = field(default_factory=lambda: StructureSpec(neurons=0.25))
    params: float | None = None
    score: str = "ziplm"
    depth_score: str = "angular"
    dataset: str = "wiki-sample"
    nsamples: int = 32
    seqlen: int | None = 512
    seed: int = 0
    window_bos: str = "auto"
    eval_limit: int | None = None
    eval_batch_size: int = 1
    eval_dense: bool = True
    speed: bool = False
    save_model: str | None = None
    save_json: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 1
    cache_dir: str | None = None
    trust_remote_code: bool = False
    progress: bool = True

    def check(self) -> None:
        """Every check that needs no weights: names, counts, paths, data."""
        spec = self.structure
        if self.params is None:
            spec.require_work()
        elif spec.neurons:
            raise SecateursError("give --params or --neurons, not both: --params sets --neurons")
        if spec.neurons or spec.heads or self.params is not None:
            unit_method(self.score, "width")
        if spec.blocks:
            unit_method(self.depth_score, "depth")
        for flag, value in (
            ("--nsamples", self.nsamples),
            ("--batch_size", self.batch_size),
            ("--eval_batch_size", self.eval_batch_size),
        ):
            if value <= 0:
                raise SecateursError(f"{flag} must be at least 1, got {value}")
        if self.eval_limit is not None and self.eval_limit <= 0:
            raise SecateursError(f"--eval_limit must be at least 1, got {self.eval_limit}")
        check_dtype(self.dtype)
        check_device(self.device)
        text.check_window_bos(self.window_bos)
        text.resolve_source(self.dataset)
        ensure_free(self.save_model, "--save_model")
        ensure_free(self.save_json, "--save_json")


def _statistics(job: ShrinkJob):
    """The statistics the chosen width method reads beyond the engine's own."""
    method = UNIT_METHODS.get(job.score)
    return method.statistics if method is not None and method.kind == "width" else None


def run_shrink(job: ShrinkJob, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a structured pruning job end to end; its result (also written where asked)."""
    job.check()
    check_folder_files(job.model)
    device = check_device(job.device)
    config = load_config(job.model, job.cache_dir, job.trust_remote_code)
    seqlen = choose_seqlen(config, job.seqlen)
    tokenizer = load_tokenizer(job.model, job.cache_dir, job.trust_remote_code)
    bos = text.window_bos_token(job.window_bos, config, tokenizer)
    source = text.resolve_source(job.dataset)
    windows = text.calibration_windows(tokenizer, source, job.nsamples, seqlen, job.seed, bos)
    eval_windows = load_eval_windows(tokenizer, job.dataset, seqlen, job.eval_limit, bos)
    model, _ = load_model(
        job.model, job.cache_dir, check_dtype(job.dtype), job.trust_remote_code, tokenizer
    )
    if job.params is not None:
        share = neuron_share_for(model, job.params, job.structure)
        job = replace(job, structure=replace(job.structure, neurons=share))
        log(f"budget       {job.params:.0%} of the parameters: {share:.1%} of every MLP's neurons")
    timings: dict[str, float] = {}
    result: dict[str, Any] = {
        "model": job.model,
        "structure": job.structure.__dict__,
        "score": job.score if job.structure.neurons or job.structure.heads else None,
        "depth_score": job.depth_score if job.structure.blocks else None,
        "calibration": {"dataset": job.dataset, "nsamples": job.nsamples, "seqlen": seqlen},
        "evaluation": {"dataset": job.dataset, "windows": int(eval_windows.shape[0])},
        "versions": versions(),
    }

    def ppl(label: str) -> float:
        start = time.perf_counter()
        value = perplexity(
            model, eval_windows, device, job.eval_batch_size, job.progress, f"{label} perplexity"
        )
        timings[f"eval_{label}"] = time.perf_counter() - start
        log(f"{label:<12} perplexity {value:.3f} ({plural(eval_windows.shape[0], 'window')})")
        return value

    request = _statistics(job)
    pruner = StructurePruner(
        model,
        job.structure,
        unit_method(job.score, "width").fn
        if job.structure.neurons or job.structure.heads
        else None,
        unit_method(job.depth_score, "depth").fn if job.structure.blocks else None,
        request or StatsRequest(),
        device,
        job.batch_size,
        job.progress,
    )
    check_cut_possible(model, job.structure)
    dense = ppl("dense") if job.eval_dense else None
    speed_dense = measure_speed(model) if job.speed else None
    labels = token_classes(windows, request.classes) if request and request.classes else None
    start = time.perf_counter()
    with measure(device) as memory:
        plan = pruner.prune(windows, labels)
        shrinkage = cut_structure(model, plan)
    timings["prune"] = time.perf_counter() - start
    log(
        f"parameters   {shrinkage.parameters_before:,} -> {shrinkage.parameters_after:,} "
        f"({shrinkage.parameters_after / shrinkage.parameters_before:.3f}x)"
    )
    for name, (before, after) in shrinkage.config_changes.items():
        if not isinstance(after, list):
            log(f"config       {name}: {before} -> {after}")
    if plan.removed_blocks:
        log(f"removed      blocks {', '.join(map(str, plan.removed_blocks))}")
    pruned = ppl("pruned")
    result |= {
        "plan": plan.to_dict(),
        "shrinkage": shrinkage.to_dict(),
        "parameters": {"dense": shrinkage.parameters_before, "pruned": parameter_count(model)},
        "perplexity": {"dense": dense, "pruned": pruned},
        "memory": memory.to_dict(),
        "timings": timings,
    }
    if job.speed and speed_dense is not None:
        speed = measure_speed(model)
        result["speed"] = {"dense": speed_dense.to_dict(), "pruned": speed.to_dict()}
        prefill = speed.prefill_tokens_per_s / speed_dense.prefill_tokens_per_s
        decode = speed.decode_tokens_per_s / speed_dense.decode_tokens_per_s
        log(f"speed-up     prefill {prefill:.2f}x, decode {decode:.2f}x")
    if job.save_json:
        write_json(job.save_json, result)
    if job.save_model:
        save_pruned_model(model, tokenizer, job.save_model, result)
        log(f"saved        {job.save_model} (loads with AutoModelForCausalLM.from_pretrained)")
    return result
