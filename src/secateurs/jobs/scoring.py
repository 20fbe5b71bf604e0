"""Runs that score outside the block loop: ``wandg``, score dump/load, set difference, attack.

Every check of :func:`check_score_args` needs no model: the score files are opened before
any weights load. The fingerprint of the model a file was computed on, and its layers'
shapes, are compared with the loaded model before any weight changes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from secateurs import __version__
from secateurs.api import MethodPruner, TablePruner, prune_set_difference
from secateurs.config import RunConfig
from secateurs.core.engine import PruneReport
from secateurs.core.model import base_weights, load_config, load_model
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


def scoring_data(cfg: RunConfig, method: Method) -> str:
    """What the run's scores come from: --prune_data, else align (set difference) or --dataset."""
    return cfg.data.prune_data or ("align" if method.set_difference else cfg.data.dataset)


def score_name(cfg: RunConfig, method: Method) -> str:
    """The score a file holds: the method's (the set difference's chosen score), ``-diff``
    where it scores the change from ``--base_model``."""
    name = cfg.safety.set_difference_score if method.set_difference else method.name
    return f"{name}-diff" if cfg.safety.use_diff else name


def score_files(cfg: RunConfig, method: Method) -> dict[str, Path]:
    """The score files a run reads or writes: ``{"safety": ..., "utility": ...}`` or one."""
    data = scoring_data(cfg, method)
    name = score_name(cfg, method)
    if method.set_difference:
        return {
            "safety": score_path(cfg.safety.save, name, prompts.data_label(data)),
            "utility": score_path(
                cfg.safety.save, name, prompts.data_label(cfg.safety.utility_data)
            ),
        }
    return {"scores": score_path(cfg.safety.save, name, prompts.data_label(data))}


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
            f"--prune_method {cfg.safety.set_difference_score} instead (--prune_data align, "
            "then utility)"
        )
    if method.updates_weights and (
        cfg.safety.dump_wanda_score or cfg.safety.load_wanda_score or cfg.safety.neg_prune
    ):
        raise SecateursError(
            f"{method.name} chooses masks and updates weights itself; it has no score to dump, "
            "load or negate. Use a score method such as wanda or wandg"
        )
    if method.updates_weights and cfg.safety.use_diff:
        raise SecateursError(
            f"{method.name} chooses masks and updates weights itself; it has no score to take "
            "of a weight change. Use a score method such as wanda, wanda_v2 or wandg"
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
    block_work = (
        ("--use_recovery", cfg.recovery.use_recovery),
        ("--reconstruct", cfg.recovery.reconstruct != "none"),
    )
    for flag, asked in block_work:
        if asked and uses_table(cfg, method):  # a table: loaded scores, or a whole-model pass
            raise SecateursError(
                f"{flag} needs the block-by-block calibration; it does not combine with "
                "gradient scores, loaded scores or set difference"
            )
    if cfg.safety.use_diff and not cfg.safety.load_wanda_score:
        check_base_config(cfg)
    if not (cfg.safety.dump_wanda_score or cfg.safety.load_wanda_score):
        return
    for path in score_files(cfg, method).values():
        if cfg.safety.dump_wanda_score:
            check_dumpable(path)
        if cfg.safety.load_wanda_score:
            check_loadable(path)
            check_model_name(path, cfg.model.model)


# config fields that fix the shapes of the prunable layers
_SHAPE_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


def check_base_config(cfg: RunConfig) -> None:
    """``--use_diff``: the base model's config gives the same layers, read before any weight."""
    spec, name = cfg.model, cfg.safety.base_model
    ours = load_config(spec.model, spec.cache_dir, spec.trust_remote_code)
    base = load_config(name, spec.cache_dir, spec.trust_remote_code)
    for field in _SHAPE_FIELDS:
        if getattr(ours, field, None) != getattr(base, field, None):
            raise SecateursError(
                f"--base_model {name} has {field} {getattr(base, field, None)}, --model "
                f"{spec.model} has {getattr(ours, field, None)}: --use_diff needs the model "
                "--model was fine-tuned from, with the same architecture and sizes"
            )


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
        "use_diff": str(cfg.safety.use_diff),
        "base_model": cfg.safety.base_model or "",
        "secateurs_version": __version__,
    }


def load_base_weights(
    cfg: RunConfig, model, log: Callable[[str], None]
) -> dict[str, torch.Tensor] | None:
    """``--use_diff``: the prunable weights of ``--base_model``, checked against ``model``."""
    if not cfg.safety.use_diff:
        return None
    spec, name = cfg.model, cfg.safety.base_model
    log(f"loading the base model {name} (--use_diff)")
    base, _ = load_model(name, spec.cache_dir, model.dtype, spec.trust_remote_code, False)
    return base_weights(model, base, name)


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
    model, cfg: RunConfig, method: Method, batch: Any, device, progress: bool, base=None
) -> dict[str, Any]:
    pruner = configured_pruner(model, cfg, method, device=device, progress=progress, base=base)
    return pruner.scores(batch)


def dump_run(
    model, cfg: RunConfig, method: Method, batch: Any, seqlen: int, device, log=print
) -> Path:
    """Score and write the raw scores; no weight changes."""
    data = cfg.data.prune_data or cfg.data.dataset
    path = score_files(cfg, method)["scores"]
    base = load_base_weights(cfg, model, log)
    scores = compute_scores(model, cfg, method, batch, device, cfg.execution.progress, base)
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
    base = None if cfg.safety.load_wanda_score else load_base_weights(cfg, model, log)
    progress = cfg.execution.progress
    if method.set_difference:
        scorer = get_method(cfg.safety.set_difference_score)
        if cfg.safety.load_wanda_score:
            safety = load_scores(files["safety"], model)
            utility = load_scores(files["utility"], model)
        else:
            log(f"scoring {scorer.name} on {cfg.safety.utility_data} (utility)")
            utility_batch = prompt_batch(cfg, tokenizer, cfg.safety.utility_data, seqlen)
            utility = compute_scores(model, cfg, scorer, utility_batch, device, progress, base)
            log(f"scoring {scorer.name} on {cfg.data.prune_data or 'align'} (safety)")
            safety = compute_scores(model, cfg, scorer, batch, device, progress, base)
        return prune_set_difference(model, safety, utility, cfg.safety.p, cfg.safety.q, progress)
    if cfg.safety.load_wanda_score:
        table = load_scores(files["scores"], model)
    else:
        table = compute_scores(model, cfg, method, batch, device, progress, base)
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
        samples=cfg.safety.attack_samples,
        seed=cfg.data.seed,
    )
    if cfg.safety.save_attack_res:
        save_responses(attack_path(cfg), result.rows)
    return result.to_dict() | {
        "responses": str(attack_path(cfg)) if cfg.safety.save_attack_res else None
    }
