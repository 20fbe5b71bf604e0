"""Compare pruning methods side by side on one model: one calibration set, one dense score.

Every (method, pattern, ratio) run is cached on disk under a key of its whole configuration,
so rerunning the same comparison skips what is done and a sweep that dies can continue.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from secateurs.core.patterns import NMSparsity, parse_pattern
from secateurs.errors import SecateursError
from secateurs.evaluate.perplexity import check_sparsity
from secateurs.io import atomic_write_text, ensure_writable
from secateurs.jobs.prune import (
    Prepared,
    PruneConfig,
    check_config,
    evaluate_model,
    load,
    needs_calibration,
    prepare,
    prune_loaded,
    with_batch_size,
)
from secateurs.jobs.report import versions
from secateurs.methods.idf import DEFAULT_IDF_FORM, check_idf_form
from secateurs.methods.registry import METHODS

DEFAULT_METHODS = ("wanda", "wanda_idf", "wanda_spiky", "wanda_select", "magnitude")
# Settings that do not change a run's numbers, left out of its cache key.
_NOT_IN_KEY = (
    "save_model",
    "save_json",
    "save_log",
    "keep_shape",
    "progress",
    "eval_dense",
    "device",
    # compare reports perplexity only; zero-shot and the per-layer plot are prune's outputs
    "eval_zero_shot",
    "zero_shot_limit",
    "zero_shot_batch_size",
    "save_plot",
    # streamed pruning saves the same tensors as in memory (tested)
    "offload",
    "max_memory",
)


@dataclass
class Comparison:
    """The rows of a finished comparison and where its files are."""

    dense_ppl: float
    rows: list[dict[str, Any]]
    files: dict[str, str]


# IDF settings, which change only the runs of methods that read the IDF.
_IDF_SETTINGS = ("idf_form", "idf_power", "idf_floor")


def _reads_idf(cfg: PruneConfig) -> bool:
    method = METHODS.get(cfg.prune_method)
    return method is not None and "idf" in method.needs


def plan_runs(
    base: PruneConfig,
    methods: list[str],
    patterns: list[str],
    ratios: list[float],
    idf_forms: list[str] | None = None,
):
    """Every configuration to run, checked up front; N:M patterns run once, at N/M.

    Methods that read the IDF run once per form in ``idf_forms`` (default: ``base``'s form).
    """
    if not methods or not patterns or not ratios or idf_forms == []:
        raise SecateursError(
            "give at least one method, one sparsity type, one ratio and one IDF form"
        )
    forms = [check_idf_form(form) for form in idf_forms or [base.idf_form]]
    base = with_batch_size(base)
    runs = []
    for sparsity_type in patterns:
        pattern = parse_pattern(sparsity_type, use_variant=base.use_variant)
        wanted = [pattern.ratio] if isinstance(pattern, NMSparsity) else ratios
        for ratio in wanted:
            for method in methods:
                cfg = replace(
                    base, prune_method=method, sparsity_type=sparsity_type, sparsity_ratio=ratio
                )
                for form in forms if _reads_idf(cfg) else [base.idf_form]:
                    runs.append(replace(cfg, idf_form=form))
                    check_config(runs[-1])
    return runs


def run_key(cfg: PruneConfig) -> str:
    """A short digest of every setting that can change a run's result."""
    ignored = _NOT_IN_KEY if _reads_idf(cfg) else _NOT_IN_KEY + _IDF_SETTINGS
    settings = {k: v for k, v in asdict(cfg).items() if k not in ignored}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def run_label(cfg: PruneConfig, forms: list[str]) -> str:
    """The method's name, with its IDF form when several forms are compared or not the default."""
    if _reads_idf(cfg) and (len(forms) > 1 or cfg.idf_form != DEFAULT_IDF_FORM):
        return f"{cfg.prune_method}[{cfg.idf_form}]"
    return cfg.prune_method


def _cached(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")
    return value


def _one_run(cfg: PruneConfig, prepared: Prepared) -> dict[str, Any]:
    method, pattern, ratio = check_config(cfg)
    model = load(cfg, prepared)
    report, memory = prune_loaded(model, cfg, prepared, method, ratio)
    check = check_sparsity(model, pattern, ratio, report.block_ratios)
    start = time.perf_counter()
    ppl = evaluate_model(model, cfg, prepared, cfg.prune_method)
    return {
        "method": cfg.prune_method,
        "sparsity_type": cfg.sparsity_type,
        "pattern": pattern.describe(),
        "target_sparsity": ratio,
        "actual_sparsity": check.overall,
        "pattern_met": check.ok,
        "ppl_test": ppl,
        "prune_s": memory.seconds,
        "peak_rss": memory.peak_rss,
        "eval_s": time.perf_counter() - start,
        "phases_s": report.seconds,
        "recovery_mean_relative_error": report.mean_relative_error(),
        "guard_layers": sorted(report.alarms()),
    }


def _add_changes(rows: list[dict[str, Any]]) -> None:
    """Each row's perplexity change against wanda at the same pattern and target."""
    baseline = {
        (r["sparsity_type"], r["target_sparsity"]): r["ppl_test"]
        for r in rows
        if r["method"] == "wanda"
    }
    for row in rows:
        wanda = baseline.get((row["sparsity_type"], row["target_sparsity"]))
        row["change_vs_wanda"] = None if wanda is None else row["ppl_test"] / wanda - 1


def run_compare(
    base: PruneConfig,
    methods: list[str],
    patterns: list[str],
    ratios: list[float],
    out_dir: str | Path,
    log: Callable[[str], None] = print,
    idf_forms: list[str] | None = None,
) -> Comparison:
    """Run (or reuse) every configuration and write the table, CSV, JSON and plot."""
    base = with_batch_size(base)
    runs = plan_runs(base, methods, patterns, ratios, idf_forms)
    forms = sorted({cfg.idf_form for cfg in runs if _reads_idf(cfg)})
    out = Path(out_dir)
    cache = out / "runs"
    ensure_writable(cache, "--out")
    cache.mkdir(parents=True, exist_ok=True)
    prepared = prepare(base, any(needs_calibration(cfg) for cfg in runs))

    def dense() -> dict[str, Any]:
        log("evaluating the dense model")
        return {"ppl_test": evaluate_model(load(base, prepared), base, prepared, "dense")}

    dense_key = run_key(replace(base, prune_method="dense", sparsity_ratio=0.0))
    dense_ppl = _cached(cache / f"dense-{dense_key}.json", dense)["ppl_test"]
    rows = []
    for index, cfg in enumerate(runs, 1):
        name = run_label(cfg, forms)
        label = f"{name} {cfg.sparsity_type} {cfg.sparsity_ratio}"
        path = cache / f"{run_key(cfg)}.json"
        log(f"[{index}/{len(runs)}] {label}" + (" (cached)" if path.exists() else ""))
        row = _cached(path, lambda cfg=cfg: _one_run(cfg, prepared))
        idf_form = cfg.idf_form if _reads_idf(cfg) else None
        rows.append(row | {"method": name, "idf_form": idf_form})
    _add_changes(rows)
    files = write_outputs(out, base, prepared, dense_ppl, rows)
    return Comparison(dense_ppl, rows, files)


def write_outputs(
    out: Path, base: PruneConfig, prepared: Prepared, dense_ppl: float, rows: list[dict]
) -> dict[str, str]:
    from secateurs.jobs.report import comparison_csv, comparison_table, plot_comparison

    settings = asdict(base) | {"seqlen": prepared.seqlen}
    for key in ("prune_method", "sparsity_type", "sparsity_ratio", "idf_form", *_NOT_IN_KEY):
        settings.pop(key)
    result = {
        "settings": settings,
        "versions": versions(),
        "eval_windows": int(prepared.eval_windows.shape[0]),
        "window_bos": prepared.window_bos(base.window_bos),
        "dense_ppl": dense_ppl,
        "rows": rows,
    }
    files = {
        "table": out / "comparison.md",
        "csv": out / "comparison.csv",
        "json": out / "comparison.json",
        "plot": out / "ppl_vs_sparsity.png",
    }
    atomic_write_text(files["table"], comparison_table(rows, dense_ppl) + "\n")
    atomic_write_text(files["csv"], comparison_csv(rows))
    atomic_write_text(files["json"], json.dumps(result, indent=2) + "\n")
    plot_comparison(rows, dense_ppl, files["plot"], title=f"{base.model} on {base.dataset}")
    return {name: str(path) for name, path in files.items()}
