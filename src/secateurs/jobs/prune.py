"""A whole pruning job: check the input, load, calibrate, prune, verify, evaluate, save.

Every check that needs no model runs first; the data is tokenized before the weights load,
so a bad dataset or window count fails in seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from secateurs.core.engine import check_pattern_fits
from secateurs.core.model import (
    choose_seqlen,
    load_config,
    load_model,
    load_tokenizer,
    parameter_count,
)
from secateurs.core.patterns import (
    SCOPES,
    NMSparsity,
    SetDifference,
    SparsityPattern,
    Unstructured,
    effective_ratio,
    parse_pattern,
)
from secateurs.core.profiling import give_back_memory, measure
from secateurs.core.stats import SelectivityOptions
from secateurs.data import text as data
from secateurs.data.prompts import PromptBatch, check_chat_template
from secateurs.errors import SecateursError
from secateurs.evaluate.perplexity import check_sparsity, perplexity
from secateurs.evaluate.zeroshot import METRICS, ZeroShotPlan, evaluate_zero_shot, prepare_zero_shot
from secateurs.formats.checkpoint import check_save_format, rewrite_folder
from secateurs.formats.shrink import shrink_mlps, width_field
from secateurs.io import atomic_dir, ensure_free
from secateurs.jobs import distributed
from secateurs.jobs.report import check_plot_path, plot_layers, versions, write_json, write_log
from secateurs.jobs.scoring import (
    attack_run,
    check_score_args,
    configured_pruner,
    dump_run,
    is_set_difference,
    prompt_batch,
    prune_from_table,
    score_files,
    scoring_data,
    uses_table,
)
from secateurs.methods.allocation import allocate, check_allocation
from secateurs.methods.idf import DEFAULT_IDF_FORM
from secateurs.methods.recovery import (
    STRATEGIES,
    InverseWandaStrategy,
    LeastSquaresStrategy,
    WeightRedistributor,
)
from secateurs.methods.registry import Method, check_classes, check_ria_alpha, get_method

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_dtype(name: str) -> torch.dtype:
    """The torch dtype that ``--dtype name`` asks for, or a clear error."""
    if name not in DTYPES:
        raise SecateursError(f"--dtype must be one of {', '.join(DTYPES)}, got '{name}'")
    return DTYPES[name]


@dataclass
class PruneConfig:
    """Every setting of a pruning run; names follow the reference command line."""

    model: str = "smollm2-135m"
    prune_method: str = "wanda"
    sparsity_ratio: float = 0.5
    sparsity_type: str = "unstructured"
    scope: str | None = None
    dataset: str = "wiki-sample"
    eval_dataset: str | None = None
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0
    batch_size: int | None = None  # see with_batch_size
    eval_batch_size: int = 1
    eval_limit: int | None = None
    eval_dense: bool = True
    device: str = "cpu"
    dtype: str = "float32"
    cache_dir: str | None = None
    trust_remote_code: bool = False
    save_model: str | None = None
    save_format: str = "dense"
    save_json: str | None = None
    save_log: str | None = None
    keep_shape: bool = False
    progress: bool = True
    use_recovery: bool = False
    recovery: str = "inverse_wanda"
    inverse_wanda_update_fraction: float = 0.3
    inverse_wanda_max_relative_update: float = 2.0
    least_squares_damp: float = 0.01
    recovery_report_fraction: float = 0.0625
    use_variant: bool = False
    neuronrank_max_classes: int = 128
    tau_percentile: float = 0.6
    top_quantile: float = 0.9
    idf_clip: float = 10.0
    spiky_clip: float = 10.0
    exact_selectivity: bool = False
    idf_form: str = DEFAULT_IDF_FORM
    idf_power: float = 0.5
    idf_floor: float = 0.5
    ria_alpha: float = 0.5
    sparsity_allocation: str = "uniform"
    owl_threshold: float = 5.0
    owl_lambda: float = 0.08
    window_bos: str = "auto"
    prune_data: str | None = None
    utility_data: str = "utility"
    entangle_prompt_feat: bool = False
    save: str | None = None
    dump_wanda_score: bool = False
    load_wanda_score: bool = False
    neg_prune: bool = False
    p: float = 0.02
    q: float = 0.02
    eval_attack: bool = False
    save_attack_res: bool = False
    attack_max_new_tokens: int = 64
    attack_batch_size: int = 8
    attack_limit: int | None = None
    offload: str = "auto"
    max_memory: str | None = None
    eval_zero_shot: str | None = None
    zero_shot_limit: int | None = None
    zero_shot_batch_size: int = 8
    save_plot: str | None = None

    def selectivity(self) -> SelectivityOptions:
        return SelectivityOptions(
            self.tau_percentile,
            self.top_quantile,
            self.idf_clip,
            self.spiky_clip,
            exact=self.exact_selectivity,
            idf_form=self.idf_form,
            idf_power=self.idf_power,
            idf_floor=self.idf_floor,
        )


def check_device(name: str) -> torch.device:
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


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value <= 0:
        raise SecateursError(f"{flag} must be at least 1, got {value}")


def with_batch_size(cfg: PruneConfig, streamed: bool = False) -> PruneConfig:
    """``cfg`` with its calibration batch size: the user's, else 8 in memory and 1 streamed.

    On a CPU, batches of 1, 2 and 8 windows run a block at the same rate (BENCHMARKS.md);
    a streamed run is there to save memory, and batch 1 holds an eighth of the activations.
    """
    if cfg.batch_size is not None:
        return cfg
    return replace(cfg, batch_size=1 if streamed else 8)


def check_eval_args(cfg: PruneConfig) -> None:
    _positive(cfg.eval_limit, "--eval_limit")
    _positive(cfg.eval_batch_size, "--eval_batch_size")
    check_dtype(cfg.dtype)
    check_device(cfg.device)


def make_redistributor(cfg: PruneConfig) -> WeightRedistributor | None:
    """The recovery asked for by the configuration (its parameters checked), or None."""
    if not cfg.use_recovery:
        return None
    if cfg.recovery == "inverse_wanda":
        strategy = InverseWandaStrategy(
            cfg.inverse_wanda_update_fraction, cfg.inverse_wanda_max_relative_update
        )
    elif cfg.recovery == "least_squares":
        strategy = LeastSquaresStrategy(cfg.least_squares_damp)
    else:
        raise SecateursError(
            f"unknown --recovery '{cfg.recovery}'; choose one of: {', '.join(STRATEGIES)}"
        )
    return WeightRedistributor(strategy, cfg.recovery_report_fraction)


def check_config(cfg: PruneConfig) -> tuple[Method, SparsityPattern, float]:
    """Every check that needs neither model nor data; the method, pattern and true ratio."""
    method = get_method(cfg.prune_method)
    make_redistributor(cfg)
    if cfg.scope is not None and cfg.scope not in SCOPES:
        raise SecateursError(f"--scope must be one of {', '.join(SCOPES)}, got '{cfg.scope}'")
    pattern = parse_pattern(cfg.sparsity_type, cfg.scope or method.scope, cfg.use_variant)
    ratio = effective_ratio(pattern, cfg.sparsity_ratio)
    if "selectivity" in method.needs:
        cfg.selectivity()
    if "classes" in method.needs:
        check_classes(cfg.neuronrank_max_classes)
    check_ria_alpha(cfg.ria_alpha)
    check_solver(method, pattern, cfg)
    check_allocation(cfg.sparsity_allocation, pattern, cfg.owl_threshold, cfg.owl_lambda)
    _positive(cfg.nsamples, "--nsamples")
    _positive(cfg.batch_size, "--batch_size")
    check_eval_args(cfg)
    data.check_window_bos(cfg.window_bos)
    data.resolve_source(cfg.dataset)
    data.resolve_source(cfg.eval_dataset or cfg.dataset)
    ensure_free(cfg.save_model, "--save_model")
    check_save_format(cfg.save_format)
    ensure_free(cfg.save_json, "--save_json")
    ensure_free(cfg.save_log, "--save_log")
    check_plot_path(cfg.save_plot)
    if is_set_difference(method):
        pattern, ratio = SetDifference(cfg.p, cfg.q), 0.0
    _positive(cfg.attack_max_new_tokens, "--attack_max_new_tokens")
    _positive(cfg.attack_batch_size, "--attack_batch_size")
    _positive(cfg.attack_limit, "--attack_limit")
    check_score_args(cfg, method)
    return method, pattern, ratio


def check_solver(method: Method, pattern: SparsityPattern, cfg: PruneConfig) -> None:
    """A method that updates survivors itself takes no recovery and no structured pattern."""
    if method.solver is None:
        return
    if cfg.use_recovery:
        raise SecateursError(
            f"{method.name} already updates the surviving weights to minimise each layer's "
            "output error, so --use_recovery has nothing left to do; drop --use_recovery (or "
            "use wanda with --use_recovery --recovery least_squares)"
        )
    if type(pattern) not in (Unstructured, NMSparsity):
        raise SecateursError(
            f"{method.name} prunes unstructured (per row or layer) or N:M sparsity, not "
            f"{pattern.describe()}; drop --use_variant or choose another --sparsity_type"
        )


def load_eval_windows(
    tokenizer, dataset: str, seqlen: int, limit: int | None, bos: int | None = None
) -> torch.Tensor:
    """Test-split windows of an evaluation source, each starting with ``bos`` if given."""
    source = data.resolve_source(dataset)
    tokens = data.evaluation_tokens(tokenizer, source)
    return data.evaluation_windows(tokens, seqlen, limit, source, bos)


def save_pruned_model(
    model, tokenizer, path: str, result: dict[str, Any], save_format: str = "dense"
) -> None:
    """A Hugging Face folder (safetensors) plus the run's result, written atomically.

    ``save_format="compressed"`` stores sparse weights as bitmask and values
    (:mod:`secateurs.formats.checkpoint`); ``result["checkpoint"]`` then says what that saved.
    """
    with atomic_dir(Path(path)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        finish_folder(tmp, result, save_format)


def finish_folder(folder: Path, result: dict[str, Any], save_format: str) -> None:
    """Compress a written model folder if asked, then add the run's result to it."""
    if save_format == "compressed":
        result["checkpoint"] = rewrite_folder(folder, save_format).as_dict()
    (folder / "secateurs.json").write_text(json.dumps(result, indent=2, default=str) + "\n")


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


def prepare(cfg: PruneConfig, calibrate: bool) -> Prepared:
    """Tokenizer, calibration and evaluation windows, before any weights load."""
    config = load_config(cfg.model, cfg.cache_dir, cfg.trust_remote_code)
    seqlen = choose_seqlen(config, cfg.seqlen)
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir, cfg.trust_remote_code)
    bos = data.window_bos_token(cfg.window_bos, config, tokenizer)
    start = time.perf_counter()
    windows = batch = None
    method = get_method(cfg.prune_method)
    if calibrate and (cfg.prune_data or is_set_difference(method)):
        batch = prompt_batch(cfg, tokenizer, scoring_data(cfg, method), seqlen)
        windows = batch.input_ids
    elif calibrate:
        source = data.resolve_source(cfg.dataset)
        windows = data.calibration_windows(tokenizer, source, cfg.nsamples, seqlen, cfg.seed, bos)
    eval_name = cfg.eval_dataset or cfg.dataset
    eval_windows = load_eval_windows(tokenizer, eval_name, seqlen, cfg.eval_limit, bos)
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


def load(cfg: PruneConfig, prepared: Prepared):
    """The model, in the configured dtype, with the prepared tokenizer."""
    model, _ = load_model(
        cfg.model, cfg.cache_dir, DTYPES[cfg.dtype], cfg.trust_remote_code, prepared.tokenizer
    )
    return model


def evaluate_model(model, cfg: PruneConfig, prepared: Prepared, label: str) -> float:
    return perplexity(
        model,
        prepared.eval_windows,
        check_device(cfg.device),
        cfg.eval_batch_size,
        cfg.progress,
        f"{label} perplexity",
    )


def prune_loaded(
    model,
    cfg: PruneConfig,
    prepared: Prepared,
    method: Method,
    ratio: float,
    log: Callable[[str], None] = lambda _m: None,
    store=None,
    parallel=None,
):
    """Prune a loaded model as the checked ``cfg`` says; the report, time and memory used.

    A ``store`` streams the blocks of a skeleton model (:mod:`secateurs.jobs.streamed`);
    ``parallel`` is this process's part of a data-parallel run (:mod:`secateurs.jobs.distributed`).
    """
    device = check_device(cfg.device)
    if uses_table(cfg, method):
        with measure(device) as memory:
            report = prune_from_table(
                model,
                cfg,
                method,
                ratio,
                prepared.batch if prepared.batch is not None else prepared.windows,
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
        device=check_device(cfg.device),
        progress=cfg.progress,
        redistributor=make_redistributor(cfg),
        store=store,
        parallel=parallel,
    )
    with measure(check_device(cfg.device)) as memory:
        plan = allocate(
            model,
            prepared.windows,
            cfg.sparsity_allocation,
            ratio,
            cfg.owl_threshold,
            cfg.owl_lambda,
            check_device(cfg.device),
            cfg.batch_size,
            cfg.progress,
            None if prepared.batch is None else prepared.batch.token_mask,
        )
        report = pruner.prune(
            prepared.batch if prepared.batch is not None else prepared.windows,
            ratio,
            cfg.sparsity_type,
            cfg.scope,
            cfg.use_variant,
            block_ratios=plan.ratios,
            negate=cfg.neg_prune,
        )
    report.allocation = plan.to_dict()
    return report, memory


def needs_calibration(cfg: PruneConfig) -> bool:
    method = get_method(cfg.prune_method)
    if cfg.load_wanda_score:
        return False
    return (
        method.calibrated
        or cfg.use_recovery
        or cfg.sparsity_allocation == "owl"
        or "gradients" in method.needs
    )


def run_dump(cfg: PruneConfig, model, prepared: Prepared, method: Method, log) -> dict[str, Any]:
    """``--dump_wanda_score``: write the raw scores under ``--save`` and stop without pruning."""
    start = time.perf_counter()
    batch = prepared.batch if prepared.batch is not None else prepared.windows
    path = dump_run(model, cfg, method, batch, prepared.seqlen, check_device(cfg.device))
    log(f"wrote the raw {method.name} scores to {path}; nothing was pruned")
    return {
        "config": asdict(cfg) | {"seqlen": prepared.seqlen},
        "versions": versions(),
        "scores": str(path),
        "timings": {"score": time.perf_counter() - start},
    }


def zero_shot_planned(cfg: PruneConfig) -> ZeroShotPlan | None:
    """The checked zero-shot tasks (their data reachable), or None without --eval_zero_shot."""
    if cfg.dump_wanda_score and (cfg.eval_zero_shot is not None or cfg.save_plot):
        raise SecateursError(
            "--dump_wanda_score stops before pruning, so there is nothing to score or plot; "
            "drop --eval_zero_shot/--save_plot, or prune in a second run with --load_wanda_score"
        )
    if cfg.eval_zero_shot is None:
        _positive(cfg.zero_shot_limit, "--zero_shot_limit")
        return None
    return prepare_zero_shot(cfg.eval_zero_shot, cfg.zero_shot_limit, cfg.zero_shot_batch_size)


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


def calibration_record(cfg: PruneConfig, prepared: Prepared, method: Method) -> dict[str, Any]:
    """What the scores came from: calibration samples, score files, or the weights alone."""
    if cfg.load_wanda_score:
        return {"score_files": {k: str(v) for k, v in score_files(cfg, method).items()}}
    if prepared.windows is None:
        return {}
    return {"data": scoring_data(cfg, method), "samples": int(prepared.windows.shape[0])}


def result_record(
    cfg: PruneConfig, prepared: Prepared, method: Method, pattern, ratio: float, model, report
) -> dict[str, Any]:
    """What every prune's result records of its configuration, model and pruning report."""
    return {
        "config": asdict(cfg) | {"seqlen": prepared.seqlen, "sparsity_ratio": ratio},
        "calibration": calibration_record(cfg, prepared, method),
        "pattern": pattern.describe(),
        "window_bos": prepared.window_bos(cfg.window_bos),
        "idf_form": cfg.idf_form if "idf" in method.needs else None,
        "versions": versions(),
        "model": {
            "class": type(model).__name__,
            "parameters": parameter_count(model),
        },
        "perplexity": {
            "eval_dataset": prepared.eval_name,
            "windows": int(prepared.eval_windows.shape[0]),
        },
        "prune": report.to_dict(),
    }


def run_prune(cfg: PruneConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a pruning job end to end and return its result (also written where asked)."""
    method, pattern, ratio = check_config(cfg)
    zero_shot_plan = zero_shot_planned(cfg)
    from secateurs.jobs.streamed import check_offload, run_streamed  # it builds on this module

    streamed = check_offload(cfg, method, pattern)
    cfg = with_batch_size(cfg, streamed)
    distributed.check_parallel(cfg, method)
    launch = distributed.start(check_device(cfg.device))
    if launch is not None:
        cfg, log = launch.local(cfg, log)
    timings: dict[str, float] = {}
    prepared = prepare(cfg, needs_calibration(cfg))
    timings["data"] = prepared.seconds
    parallel = None if launch is None else launch.calibration(prepared, cfg.batch_size)
    if streamed:
        return run_streamed(cfg, method, pattern, ratio, prepared, timings, log)
    if cfg.eval_attack:
        check_chat_template(prepared.tokenizer)

    log(f"loading {cfg.model}")
    start = time.perf_counter()
    model = load(cfg, prepared)
    timings["load_model"] = time.perf_counter() - start
    check_pattern_fits(model, pattern)
    if cfg.dump_wanda_score:
        result = run_dump(cfg, model, prepared, method, log)
        if cfg.save_json:
            write_json(cfg.save_json, result)
        return result
    shrink = pattern.structured and cfg.save_model is not None and not cfg.keep_shape
    if shrink:
        width_field(model.config)

    def evaluate(label: str) -> float:
        start = time.perf_counter()
        value = evaluate_model(model, cfg, prepared, label)
        timings[f"eval_{label}"] = time.perf_counter() - start
        log(f"{label} perplexity: {value:.3f}")
        return value

    leader = launch is None or launch.leader
    dense_ppl = evaluate("dense") if cfg.eval_dense and leader else None
    zero_shot: dict[str, Any] | None = None
    if zero_shot_plan is not None:
        zero_shot = {"tasks": zero_shot_plan.tasks, "limit": zero_shot_plan.limit}
        zero_shot["dense"] = (
            run_zero_shot(model, prepared, zero_shot_plan, "dense", timings, log, cfg.progress)
            if cfg.eval_dense and leader
            else None
        )
    log(f"pruning with {method.name}, {pattern.describe()}, sparsity {ratio}")
    report, memory = prune_loaded(model, cfg, prepared, method, ratio, log, parallel=parallel)
    timings["prune"] = memory.seconds
    if launch is not None:
        launch.check_masks(model)
        if not leader:  # rank 0 evaluates and writes
            return {"rank": launch.rank, "timings": timings, "memory": memory.to_dict()}

    check = check_sparsity(model, pattern, ratio, report.block_ratios)
    pruned_ppl = evaluate("pruned")
    if zero_shot is not None:
        zero_shot["pruned"] = run_zero_shot(
            model, prepared, zero_shot_plan, "pruned", timings, log, cfg.progress
        )
    attack_result = None
    if cfg.eval_attack:
        start = time.perf_counter()
        attack_result = attack_run(model, prepared.tokenizer, cfg, check_device(cfg.device))
        timings["attack"] = time.perf_counter() - start
        log(", ".join(f"ASR {k}: {v:.3f}" for k, v in attack_result["asr"].items()))

    result = result_record(cfg, prepared, method, pattern, ratio, model, report)
    result |= {
        "perplexity": result["perplexity"] | {"dense": dense_ppl, "pruned": pruned_ppl},
        "sparsity": check.to_dict(),
        "attack": attack_result,
        "zero_shot": zero_shot,
        "timings": timings,
        "memory": memory.to_dict(),
    }
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
    if cfg.save_model:
        save_pruned_model(model, prepared.tokenizer, cfg.save_model, result, cfg.save_format)
        log(f"saved the pruned model to {cfg.save_model} ({cfg.save_format})")
    if cfg.save_json:
        write_json(cfg.save_json, result)
    if cfg.save_log:
        write_log(cfg.save_log, result)
    if cfg.save_plot:
        plot_layers(result, cfg.save_plot)
    return result
