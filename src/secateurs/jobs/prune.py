"""A whole pruning job: check the input, load, calibrate, prune, verify, evaluate, save.

:func:`secateurs.jobs.plan.resolve` checks everything that needs no model first; the data
is tokenized before the weights load, so a bad dataset or window count fails in seconds.
The backend the plan chose runs the rest: in memory here (alone or as one rank of a
``torchrun`` launch), or streamed from disk (:mod:`secateurs.jobs.streamed`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from secateurs.config import RunConfig
from secateurs.core.engine import check_pattern_fits
from secateurs.data.prompts import check_chat_template
from secateurs.errors import SecateursError
from secateurs.evaluate.perplexity import check_sparsity
from secateurs.formats.shrink import shrink_mlps, width_field
from secateurs.io import check_folder_files
from secateurs.jobs import distributed
from secateurs.jobs.plan import Plan, resolve
from secateurs.jobs.report import versions, write_json
from secateurs.jobs.result import (
    config_record,
    model_not_saved,
    result_record,
    save_pruned_model,
    write_reports,
)
from secateurs.jobs.scoring import attack_run, dump_run
from secateurs.jobs.session import Prepared, evaluate_model, load, prepare, prune_loaded
from secateurs.jobs.session import run_zero_shot as zero_shot_of
from secateurs.jobs.streamed import run_streamed


def run_dump(plan: Plan, model, prepared: Prepared, log) -> dict[str, Any]:
    """``--dump_wanda_score``: write the raw scores under ``--save`` and stop without pruning."""
    start = time.perf_counter()
    cfg, method = plan.config, plan.method
    path = dump_run(model, cfg, method, prepared.calibration, prepared.seqlen, plan.device, log)
    log(f"wrote the raw {method.name} scores to {path}; nothing was pruned")
    return {
        "config": config_record(plan, prepared) | {"sparsity_ratio": cfg.sparsity.sparsity_ratio},
        "versions": versions(),
        "scores": str(path),
        "timings": {"score": time.perf_counter() - start},
    }


def run_prune(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a pruning job end to end and return its result (also written where asked)."""
    plan = resolve(cfg)
    check_folder_files(cfg.model.model)  # a damaged file named now, not a loader's riddle later
    launch = distributed.start(plan.device)
    if launch is not None:
        local, log = launch.local(plan.config, log)
        plan = replace(plan, config=local, device=launch.device)
    cfg, method, pattern = plan.config, plan.method, plan.pattern
    timings: dict[str, float] = {}
    prepared = prepare(plan)
    timings["data"] = prepared.seconds
    parallel = None if launch is None else launch.calibration(prepared, cfg.data.batch_size)
    if plan.streamed:
        return run_streamed(plan, prepared, timings, log)
    if cfg.safety.eval_attack:
        check_chat_template(prepared.tokenizer)

    log(f"loading {cfg.model.model}")
    start = time.perf_counter()
    model = load(plan, prepared)
    timings["load_model"] = time.perf_counter() - start
    check_pattern_fits(model, pattern)
    if cfg.safety.dump_wanda_score:
        result = run_dump(plan, model, prepared, log)
        if cfg.output.save_json:
            write_json(cfg.output.save_json, result)
        return result
    shrink = pattern.structured and cfg.output.save_model is not None and not cfg.output.keep_shape
    if shrink:
        width_field(model.config)

    def evaluate(label: str) -> float:
        start = time.perf_counter()
        value = evaluate_model(model, plan, prepared, label)
        timings[f"eval_{label}"] = time.perf_counter() - start
        log(f"{label} perplexity: {value:.3f}")
        return value

    def run_zero_shot(label: str) -> dict[str, Any]:
        return zero_shot_of(
            model, prepared, plan.zero_shot, label, timings, log, cfg.execution.progress
        )

    leader = launch is None or launch.leader
    dense = cfg.evaluation.eval_dense and leader
    dense_ppl = evaluate("dense") if dense else None
    zero_shot: dict[str, Any] | None = None
    if plan.zero_shot is not None:
        zero_shot = {"tasks": plan.zero_shot.tasks, "limit": plan.zero_shot.limit}
        zero_shot["dense"] = run_zero_shot("dense") if dense else None
    log(f"pruning with {method.name}, {pattern.describe()}, sparsity {plan.ratio}")
    report, memory = prune_loaded(model, plan, prepared, log, parallel=parallel)
    timings["prune"] = memory.seconds
    if launch is not None:
        launch.check_masks(model)
        if not leader:  # rank 0 evaluates and writes
            return {"rank": launch.rank, "timings": timings, "memory": memory.to_dict()}

    check = check_sparsity(model, pattern, plan.ratio, report.block_ratios)
    pruned_ppl = evaluate("pruned")
    if zero_shot is not None:
        zero_shot["pruned"] = run_zero_shot("pruned")
    attack_result = None
    if cfg.safety.eval_attack:
        start = time.perf_counter()
        attack_result = attack_run(model, prepared.tokenizer, cfg, plan.device)
        timings["attack"] = time.perf_counter() - start
        log(", ".join(f"ASR {k}: {v:.3f}" for k, v in attack_result["asr"].items()))

    result = result_record(
        plan,
        prepared,
        model,
        report,
        perplexity={"dense": dense_ppl, "pruned": pruned_ppl},
        sparsity=check.to_dict(),
        attack=attack_result,
        zero_shot=zero_shot,
        timings=timings,
        memory=memory.to_dict(),
    )
    if launch is not None:
        result["parallel"] = launch.describe()
    if shrink:
        shrinkage = shrink_mlps(model)
        result["saved_model"] = shrinkage.to_dict()
        log(
            f"cut the pruned neurons out: MLP width {shrinkage.width_before} -> "
            f"{shrinkage.width_after}, parameters {shrinkage.parameters_before:,} -> "
            f"{shrinkage.parameters_after:,}"
        )
    out = cfg.output
    if out.save_model:
        try:
            save_pruned_model(model, prepared.tokenizer, out.save_model, result, out.save_format)
        except (SecateursError, OSError) as exc:
            raise model_not_saved(plan, result, out.save_model, exc) from exc
        log(f"saved the pruned model to {out.save_model} ({out.save_format})")
    write_reports(plan, result)
    return result
