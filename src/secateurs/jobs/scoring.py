"""Runs that score outside the block loop: ``wandg``, score dump/load, set difference, attack.

Every check of :func:`check_score_args` needs no model: the score files are opened before
any weights load. The fingerprint of the model a file was computed on, and its layers'
shapes, are compared with the loaded model before any weight changes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from secateurs import __version__
from secateurs.api import MethodPruner, TablePruner, prune_set_difference
from secateurs.config import RunConfig
from secateurs.core.engine import PruneReport
from secateurs.data import prompts
from secateurs.data.prompts import PromptBatch
from secateurs.errors import SecateursError
from secateurs.evaluate.attack import attack, save_responses
from secateurs.formats.scorefiles import (
    check_dumpable,
    check_loadable,
    check_model_name,
    dump_scores,
    load_scores,
    score_path,
)
from secateurs.io import ensure_free
from secateurs.methods.registry import Method, get_method

SET_DIFFERENCE_SCORE = "wandg"


def scoring_data(cfg: RunConfig, method: Method) -> str:
    """What the run's scores come from: --prune_data, else align (set difference) or --dataset."""
    return cfg.data.prune_data or ("align" if method.set_difference else cfg.data.dataset)


def score_files(cfg: RunConfig, method: Method) -> dict[str, Path]:
    """The score files a run reads or writes: ``{"safety": ..., "utility": ...}`` or one."""
    data = scoring_data(cfg, method)
    if method.set_difference:
        return {
            "safety": score_path(cfg.safety.save, SET_DIFFERENCE_SCORE, prompts.data_label(data)),
            "utility": score_path(
                cfg.safety.save, SET_DIFFERENCE_SCORE, prompts.data_label(cfg.safety.utility_data)
            ),
        }
    return {"scores": score_path(cfg.safety.save, method.name, prompts.data_label(data))}


def check_score_args(cfg: RunConfig, method: Method) -> None:
    """Flags of this stage that contradict each other, missing files, and occupied paths."""
    if cfg.data.prune_data is not None:
        prompts.check_prompt_data(cfg.data.prune_data)
    if method.set_difference:
        prompts.check_prompt_data(scoring_data(cfg, method))
        prompts.check_prompt_data(cfg.safety.utility_data)
    if cfg.safety.dump_wanda_score and cfg.safety.load_wanda_score:
        raise SecateursError(
            "--dump_wanda_score and --load_wanda_score are mutually exclusive: dump in one run, "
            "load in the next"
        )
    if (cfg.safety.dump_wanda_score or cfg.safety.load_wanda_score) and not cfg.safety.save:
        raise SecateursError("score files live under --save DIR; pass --save with this flag")
    if cfg.safety.dump_wanda_score and method.set_difference:
        raise SecateursError(
            f"--dump_wanda_score with wandg_set_difference: dump each score set with "
            f"--prune_method {SET_DIFFERENCE_SCORE} instead (--prune_data align, then utility)"
        )
    if method.updates_weights and (
        cfg.safety.dump_wanda_score or cfg.safety.load_wanda_score or cfg.safety.neg_prune
    ):
        raise SecateursError(
            f"{method.name} chooses masks and updates weights itself; it has no score to dump, "
            "load or negate. Use a score method such as wanda or wandg"
        )
    if cfg.sparsity.sparsity_allocation != "uniform" and uses_table(cfg, method):
        raise SecateursError(
            "--sparsity_allocation needs the block-by-block calibration; it does not combine "
            "with gradient scores, loaded scores or set difference"
        )
    if cfg.safety.save_attack_res and not cfg.safety.eval_attack:
        raise SecateursError("--save_attack_res saves --eval_attack's responses; add --eval_attack")
    if cfg.safety.save_attack_res and not cfg.safety.save:
        raise SecateursError("--save_attack_res writes under --save DIR; pass --save")
    if cfg.safety.save_attack_res:
        ensure_free(attack_path(cfg), "attack responses")
    if cfg.recovery.use_recovery and (cfg.safety.load_wanda_score or uses_table(cfg, method)):
        raise SecateursError(
            "--use_recovery needs the block-by-block calibration; it does not combine with "
            "gradient scores, loaded scores or set difference"
        )
    if not (cfg.safety.dump_wanda_score or cfg.safety.load_wanda_score):
        return
    for path in score_files(cfg, method).values():
        if cfg.safety.dump_wanda_score:
            check_dumpable(path)
        if cfg.safety.load_wanda_score:
            check_loadable(path)
            check_model_name(path, cfg.model.model)


def attack_path(cfg: RunConfig) -> Path:
    return Path(cfg.safety.save) / "attack" / f"{cfg.method.prune_method}-responses.jsonl"


def uses_table(cfg: RunConfig, method: Method) -> bool:
    """Whether the run prunes from a precomputed table instead of the block loop's scores."""
    return cfg.safety.load_wanda_score or method.reads_score_table


def prompt_batch(cfg: RunConfig, tokenizer, data: str, seqlen: int) -> PromptBatch:
    """Sampled, chat-formatted pairs of ``data`` for scoring."""
    pairs = prompts.sample_pairs(prompts.load_pairs(data), cfg.data.nsamples, cfg.data.seed)
    return prompts.encode_pairs(tokenizer, pairs, seqlen, cfg.data.entangle_prompt_feat)


def metadata(cfg: RunConfig, method: Method, data: str, seqlen: int) -> dict[str, str]:
    return {
        "method": method.name,
        "prune_data": data,
        "model": cfg.model.model,
        "nsamples": str(cfg.data.nsamples),
        "seed": str(cfg.data.seed),
        "seqlen": str(seqlen),
        "entangle_prompt_feat": str(cfg.data.entangle_prompt_feat),
        "secateurs_version": __version__,
    }


def configured_pruner(model, cfg: RunConfig, method: Method, **kwargs: Any) -> MethodPruner:
    """A pruner for ``method`` with the score options and batch size of a run's configuration."""
    return MethodPruner(
        model,
        method,
        options=cfg.flags(),
        batch_size=cfg.data.batch_size,
        **kwargs,
    )


def compute_scores(
    model, cfg: RunConfig, method: Method, batch: Any, device, progress: bool
) -> dict[str, Any]:
    pruner = configured_pruner(model, cfg, method, device=device, progress=progress)
    return pruner.scores(batch)


def dump_run(model, cfg: RunConfig, method: Method, batch: Any, seqlen: int, device) -> Path:
    """Score and write the raw scores; no weight changes."""
    data = cfg.data.prune_data or cfg.data.dataset
    path = score_files(cfg, method)["scores"]
    scores = compute_scores(model, cfg, method, batch, device, cfg.execution.progress)
    dump_scores(path, scores, metadata(cfg, method, data, seqlen), model)
    return path


def prune_from_table(
    model,
    cfg: RunConfig,
    method: Method,
    ratio: float,
    batch: Any,
    tokenizer,
    seqlen: int,
    device,
    log: Callable[[str], None],
) -> PruneReport:
    """Prune from loaded scores, a gradient pass, or the set difference of two score sets."""
    files = score_files(cfg, method) if cfg.safety.load_wanda_score else {}
    if method.set_difference:
        scorer = get_method(SET_DIFFERENCE_SCORE)
        if cfg.safety.load_wanda_score:
            safety = load_scores(files["safety"], model)
            utility = load_scores(files["utility"], model)
        else:
            log(f"scoring {SET_DIFFERENCE_SCORE} on {cfg.safety.utility_data} (utility)")
            utility_batch = prompt_batch(cfg, tokenizer, cfg.safety.utility_data, seqlen)
            utility = compute_scores(
                model, cfg, scorer, utility_batch, device, cfg.execution.progress
            )
            log(f"scoring {SET_DIFFERENCE_SCORE} on {cfg.data.prune_data or 'align'} (safety)")
            safety = compute_scores(model, cfg, scorer, batch, device, cfg.execution.progress)
        return prune_set_difference(
            model, safety, utility, cfg.safety.p, cfg.safety.q, cfg.execution.progress
        )
    if cfg.safety.load_wanda_score:
        table = load_scores(files["scores"], model)
    else:
        table = compute_scores(model, cfg, method, batch, device, cfg.execution.progress)
    pruner = TablePruner(model, table, method.scope, progress=cfg.execution.progress)
    return pruner.prune(
        None,
        ratio,
        cfg.sparsity.sparsity_type,
        cfg.sparsity.scope,
        cfg.sparsity.use_variant,
        negate=cfg.safety.neg_prune,
    )


def attack_run(model, tokenizer, cfg: RunConfig, device) -> dict[str, Any]:
    """ASR on the held-out half of ``align``; responses saved where asked."""
    held_out = [pair.prompt for pair in prompts.align_split("eval")][: cfg.safety.attack_limit]
    result = attack(
        model,
        tokenizer,
        held_out,
        max_new_tokens=cfg.safety.attack_max_new_tokens,
        batch_size=cfg.safety.attack_batch_size,
        device=device,
        progress=cfg.execution.progress,
    )
    if cfg.safety.save_attack_res:
        save_responses(attack_path(cfg), result.rows)
    return result.to_dict() | {
        "responses": str(attack_path(cfg)) if cfg.safety.save_attack_res else None
    }
