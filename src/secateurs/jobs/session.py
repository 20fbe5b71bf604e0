"""What every backend of a pruning job shares: tokens and windows, the model, the prune itself.

The data is tokenized before the weights load, so a bad dataset or window count fails in
seconds; :func:`prune_loaded` runs the planned method on a loaded (or streamed) model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from secateurs.core.model import choose_seqlen, load_config, load_model, load_tokenizer
from secateurs.core.profiling import give_back_memory, measure
from secateurs.data import text
from secateurs.data.prompts import PromptBatch
from secateurs.evaluate.perplexity import perplexity
from secateurs.evaluate.zeroshot import METRICS, ZeroShotPlan, evaluate_zero_shot
from secateurs.jobs.plan import (
    Plan,
    make_reconstruction,
    make_redistributor,
    make_refiner,
    needs_calibration,
)
from secateurs.jobs.scoring import (
    configured_pruner,
    load_base_weights,
    prompt_batch,
    prune_from_table,
    scoring_data,
    uses_table,
)
from secateurs.methods.allocation import allocate


def load_eval_windows(
    tokenizer, dataset: str, seqlen: int, limit: int | None, bos: int | None = None
) -> torch.Tensor:
    """Test-split windows of an evaluation source, each starting with ``bos`` if given."""
    source = text.resolve_source(dataset)
    tokens = text.evaluation_tokens(tokenizer, source)
    return text.evaluation_windows(tokens, seqlen, limit, source, bos)


@dataclass
class Prepared:
    """What every run of one model and one dataset shares: tokens, windows, seqlen."""

    tokenizer: Any
    seqlen: int
    windows: torch.Tensor | None
    eval_windows: torch.Tensor
    eval_name: str
    seconds: float
    bos: int | None = None
    batch: PromptBatch | None = None

    def window_bos(self, rule: str) -> dict[str, Any]:
        """The BOS rule and what it resolved to, for the JSON result."""
        return {"rule": rule, "prefixed": self.bos is not None, "bos_token_id": self.bos}

    @property
    def calibration(self) -> PromptBatch | torch.Tensor | None:
        """The scoring batch where there is one, else the calibration windows."""
        return self.batch if self.batch is not None else self.windows


def prepare(plan: Plan, calibrate: bool | None = None) -> Prepared:
    """Tokenizer, calibration and evaluation windows, before any weights load.

    ``calibrate`` says whether to draw calibration windows (default: if the plan needs them).
    """
    cfg, method = plan.config, plan.method
    model = cfg.model
    config = load_config(model.model, model.cache_dir, model.trust_remote_code)
    seqlen = choose_seqlen(config, cfg.data.seqlen)
    tokenizer = load_tokenizer(model.model, model.cache_dir, model.trust_remote_code)
    bos = text.window_bos_token(cfg.data.window_bos, config, tokenizer)
    start = time.perf_counter()
    windows = batch = None
    if calibrate is None:
        calibrate = needs_calibration(cfg, method)
    if calibrate and (cfg.data.prune_data or method.set_difference):
        batch = prompt_batch(cfg, tokenizer, scoring_data(cfg, method), seqlen)
        windows = batch.input_ids
    elif calibrate:
        source = text.resolve_source(cfg.data.dataset)
        windows = text.calibration_windows(
            tokenizer, source, cfg.data.nsamples, seqlen, cfg.data.seed, bos
        )
    eval_name = cfg.evaluation.eval_dataset or cfg.data.dataset
    eval_windows = load_eval_windows(tokenizer, eval_name, seqlen, cfg.evaluation.eval_limit, bos)
    give_back_memory()  # tokenizing left freed heap behind: the weights should not sit on it
    return Prepared(
        tokenizer,
        seqlen,
        windows,
        eval_windows,
        eval_name,
        time.perf_counter() - start,
        bos,
        batch,
    )


def load(plan: Plan, prepared: Prepared):
    """The model, in the planned dtype, with the prepared tokenizer."""
    spec = plan.config.model
    model, _ = load_model(
        spec.model, spec.cache_dir, plan.dtype, spec.trust_remote_code, prepared.tokenizer
    )
    return model


def evaluate_model(model, plan: Plan, prepared: Prepared, label: str) -> float:
    """Perplexity of the model as it is now on the prepared evaluation windows."""
    return perplexity(
        model,
        prepared.eval_windows,
        plan.device,
        plan.config.evaluation.eval_batch_size,
        plan.config.execution.progress,
        f"{label} perplexity",
    )


def prune_loaded(
    model,
    plan: Plan,
    prepared: Prepared,
    log: Callable[[str], None] = lambda _m: None,
    store=None,
    parallel=None,
):
    """Prune a loaded model as the plan says; the report, time and memory used.

    A ``store`` streams the blocks of a skeleton model (:mod:`secateurs.jobs.streamed`);
    ``parallel`` is this process's part of a data-parallel run
    (:mod:`secateurs.jobs.distributed`).
    """
    cfg, method, device = plan.config, plan.method, plan.device
    if uses_table(cfg, method):
        with measure(device) as memory:
            report = prune_from_table(
                model,
                cfg,
                method,
                plan.ratio,
                prepared.calibration,
                prepared.tokenizer,
                prepared.seqlen,
                device,
                log,
            )
        return report, memory
    pruner = configured_pruner(
        model,
        cfg,
        method,
        tokenizer=prepared.tokenizer,
        device=device,
        progress=cfg.execution.progress,
        redistributor=make_redistributor(cfg),
        refiner=make_refiner(cfg),
        reconstruction=make_reconstruction(cfg),
        store=store,
        parallel=parallel,
        base=load_base_weights(cfg, model, log),
    )
    spec = cfg.sparsity
    with measure(device) as memory:
        allocation = allocate(
            model,
            prepared.windows,
            spec.sparsity_allocation,
            plan.ratio,
            spec.owl_threshold,
            spec.owl_lambda,
            device,
            cfg.data.batch_size,
            cfg.execution.progress,
            None if prepared.batch is None else prepared.batch.token_mask,
        )
        report = pruner.prune(
            prepared.calibration,
            plan.ratio,
            spec.sparsity_type,
            spec.scope,
            spec.use_variant,
            block_ratios=allocation.ratios,
            negate=cfg.safety.neg_prune,
        )
    report.allocation = allocation.to_dict()
    return report, memory


def run_zero_shot(
    model,
    prepared: Prepared,
    plan: ZeroShotPlan,
    label: str,
    timings: dict[str, float],
    log,
    progress: bool = True,
) -> dict[str, Any]:
    """Zero-shot accuracy of the model as it is now, timed under ``zero_shot_<label>``."""
    start = time.perf_counter()
    metrics = evaluate_zero_shot(model, prepared.tokenizer, plan, progress)
    timings[f"zero_shot_{label}"] = time.perf_counter() - start
    for task, entry in metrics.items():
        scores = ", ".join(f"{m} {entry[m]:.4f}" for m in METRICS if entry.get(m) is not None)
        log(f"{label} {task}: {scores}")
    return metrics
