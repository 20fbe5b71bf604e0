"""A pruning job whose model streams from disk (``--offload disk``, or ``--max_memory``).

Chosen before any weights load: the checks refuse what needs the whole model at once, and
the output folder is written block by block inside one atomic folder, so an interrupted
run leaves nothing behind. The blocks come from :mod:`secateurs.formats.streaming`; pruning itself
is the engine's, the same as in memory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from secateurs.core.engine import check_pattern_fits
from secateurs.core.patterns import SparsityPattern
from secateurs.errors import SecateursError
from secateurs.formats.checkpoint import is_compressed
from secateurs.formats.streaming import (
    DiskBlocks,
    build_skeleton,
    checkpoint_bytes,
    model_folder,
    parse_memory,
    streamed_perplexity,
)
from secateurs.io import atomic_dir
from secateurs.jobs.prune import DTYPES, check_device, finish_folder, prune_loaded, result_record
from secateurs.jobs.report import fmt_bytes, write_json, write_log
from secateurs.methods.registry import Method

OFFLOAD_MODES = ("auto", "none", "disk")


def _needs_whole_model(cfg: Any, method: Method, pattern: SparsityPattern) -> str | None:
    """Why this run cannot stream its blocks, or None if it can."""
    if "gradients" in method.needs or "set_difference" in method.needs:
        return f"{method.name} backpropagates through the whole model"
    if cfg.dump_wanda_score or cfg.load_wanda_score:
        return "score files are read and written for the whole model at once"
    if cfg.eval_attack:
        return "--eval_attack generates text with the whole model"
    if getattr(cfg, "eval_zero_shot", None) is not None:
        return "--eval_zero_shot scores answers with the whole model"
    if cfg.sparsity_allocation == "owl":
        return "OWL's outlier pass runs over the whole dense model first"
    if pattern.structured and not cfg.keep_shape:
        return "cutting pruned neurons out reshapes the whole model (add --keep_shape)"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "a data-parallel (torchrun) run holds the model in every process"
    return None


def check_offload(cfg: Any, method: Method, pattern: SparsityPattern) -> bool:
    """Whether this run streams its model from disk; a clear error if it must but cannot.

    ``auto`` streams when ``--max_memory`` is given and the weights, in the run's dtype,
    exceed it.
    """
    if cfg.offload not in OFFLOAD_MODES:
        raise SecateursError(
            f"--offload must be one of {', '.join(OFFLOAD_MODES)}, got '{cfg.offload}'"
        )
    limit = parse_memory(cfg.max_memory) if cfg.max_memory is not None else None
    if cfg.offload == "none" or (cfg.offload == "auto" and limit is None):
        return False
    folder = model_folder(cfg.model, cfg.cache_dir)
    if is_compressed(folder):
        raise SecateursError(
            f"'{cfg.model}' is a compressed checkpoint, and streaming reads dense shards; run "
            "with --offload none, or write a dense copy first: secateurs convert --model "
            f"{cfg.model} --save_model DIR --save_format dense"
        )
    if cfg.offload == "auto":
        size = checkpoint_bytes(folder, DTYPES[cfg.dtype])
        if size <= limit:
            return False
        why = (
            f"the weights take {size:,} bytes ({fmt_bytes(size)}), more than --max_memory "
            f"{cfg.max_memory}"
        )
    else:
        why = "--offload disk"
    if cfg.save_model is None:
        raise SecateursError(
            f"{why}: the model streams from disk and its pruned blocks are written as they are "
            "done, so pass --save_model DIR"
        )
    reason = _needs_whole_model(cfg, method, pattern)
    if reason is not None:
        raise SecateursError(
            f"{why}, but {reason}; run it in memory (--offload none, enough RAM) or choose "
            "a block-by-block setting (wanda, sparsegpt, ... with uniform allocation)"
        )
    return True


def run_streamed(
    cfg: Any,
    method: Method,
    pattern: SparsityPattern,
    ratio: float,
    prepared: Any,
    timings: dict[str, float],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Prune with the model's blocks streamed from disk; write, evaluate, return the result."""
    dtype, device = DTYPES[cfg.dtype], check_device(cfg.device)
    folder = model_folder(cfg.model, cfg.cache_dir)
    log(f"streaming {cfg.model} from {folder} block by block")
    start = time.perf_counter()
    model = build_skeleton(folder, dtype, cfg.trust_remote_code)
    timings["load_model"] = time.perf_counter() - start
    check_pattern_fits(model, pattern)

    def evaluate(source: Path, label: str) -> float:
        start = time.perf_counter()
        value = streamed_perplexity(
            model,
            source,
            prepared.eval_windows,
            dtype,
            device,
            cfg.eval_batch_size,
            cfg.progress,
            f"{label} perplexity",
        )
        timings[f"eval_{label}"] = time.perf_counter() - start
        log(f"{label} perplexity: {value:.3f}")
        return value

    dense_ppl = evaluate(folder, "dense") if cfg.eval_dense else None
    log(f"pruning with {method.name}, {pattern.describe()}, sparsity {ratio}")
    with atomic_dir(Path(cfg.save_model)) as tmp:
        store = DiskBlocks(model, folder, dtype, tmp)
        start = time.perf_counter()
        store.write_outer()
        report, memory = prune_loaded(model, cfg, prepared, method, ratio, log, store=store)
        store.finish()
        prepared.tokenizer.save_pretrained(tmp)
        timings["prune"] = time.perf_counter() - start
        ratios = report.block_ratios or [ratio] * len(store.blocks)
        check = store.sparsity(pattern, ratios)
        pruned_ppl = evaluate(tmp, "pruned")
        result = result_record(cfg, prepared, method, pattern, ratio, model, report)
        result |= {
            "offload": {"mode": "disk", "source": str(folder), "shards": store.shards},
            "perplexity": result["perplexity"] | {"dense": dense_ppl, "pruned": pruned_ppl},
            "sparsity": check.to_dict(),
            "attack": None,
            "timings": timings,
            "memory": memory.to_dict(),
        }
        finish_folder(tmp, result, cfg.save_format)
    log(f"saved the pruned model to {cfg.save_model} ({cfg.save_format})")
    if cfg.save_json:
        write_json(cfg.save_json, result)
    if cfg.save_log:
        write_log(cfg.save_log, result)
    return result
