"""A pruning job whose model streams from disk (``--offload disk``, or ``--max_memory``).

Chosen before any weights load (:func:`secateurs.jobs.plan.streams` refuses what needs the
whole model at once), and the output folder is written block by block inside one atomic
folder, so an interrupted run leaves nothing behind. The blocks come from
:mod:`secateurs.formats.streaming`; pruning itself is the engine's, the same as in memory.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from secateurs.core.engine import check_pattern_fits
from secateurs.errors import SecateursError
from secateurs.formats.streaming import (
    DiskBlocks,
    build_skeleton,
    model_folder,
    streamed_perplexity,
)
from secateurs.io import atomic_dir
from secateurs.jobs.plan import Plan
from secateurs.jobs.result import finish_folder, model_not_saved, result_record, write_reports
from secateurs.jobs.session import Prepared, prune_loaded


def run_streamed(
    plan: Plan, prepared: Prepared, timings: dict[str, float], log: Callable[[str], None]
) -> dict[str, Any]:
    """Prune with the model's blocks streamed from disk; write, evaluate, return the result."""
    cfg = plan.config
    folder = model_folder(cfg.model.model, cfg.model.cache_dir)
    log(f"streaming {cfg.model.model} from {folder} block by block")
    start = time.perf_counter()
    model = build_skeleton(folder, plan.dtype, cfg.model.trust_remote_code)
    timings["load_model"] = time.perf_counter() - start
    check_pattern_fits(model, plan.pattern)

    def evaluate(source: Path, label: str) -> float:
        start = time.perf_counter()
        value = streamed_perplexity(
            model,
            source,
            prepared.eval_windows,
            plan.dtype,
            plan.device,
            cfg.evaluation.eval_batch_size,
            cfg.execution.progress,
            f"{label} perplexity",
        )
        timings[f"eval_{label}"] = time.perf_counter() - start
        log(f"{label} perplexity: {value:.3f}")
        return value

    dense_ppl = evaluate(folder, "dense") if cfg.evaluation.eval_dense else None
    log(f"pruning with {plan.method.name}, {plan.pattern.describe()}, sparsity {plan.ratio}")
    result: dict[str, Any] | None = None
    try:
        with atomic_dir(Path(cfg.output.save_model)) as tmp:
            # closed before the folder is published or removed: no shard write outlives it
            with contextlib.closing(DiskBlocks(model, folder, plan.dtype, tmp)) as store:
                start = time.perf_counter()
                store.write_outer()
                report, memory = prune_loaded(model, plan, prepared, log, store=store)
                store.finish()
            prepared.tokenizer.save_pretrained(tmp)
            timings["prune"] = time.perf_counter() - start
            ratios = report.block_ratios or [plan.ratio] * len(store.blocks)
            check = store.sparsity(plan.pattern, ratios)
            pruned_ppl = evaluate(tmp, "pruned")
            result = result_record(
                plan,
                prepared,
                model,
                report,
                offload={"mode": "disk", "source": str(folder), "shards": store.shards},
                perplexity={"dense": dense_ppl, "pruned": pruned_ppl},
                sparsity=check.to_dict(),
                attack=None,
                timings=timings,
                memory=memory.to_dict(),
            )
            finish_folder(tmp, result, cfg.output.save_format)
    except (SecateursError, OSError) as exc:
        if result is None:  # the blocks were not all written: nothing finished to keep
            raise
        raise model_not_saved(plan, result, cfg.output.save_model, exc) from exc
    log(f"saved the pruned model to {cfg.output.save_model} ({cfg.output.save_format})")
    write_reports(plan, result)
    return result
