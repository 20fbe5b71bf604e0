"""Compare pruning methods side by side on one model: one calibration set, one dense score.

Every (method, pattern, ratio) run is cached on disk under a key of its whole configuration,
so rerunning the same comparison skips what is done and a sweep that dies can continue.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secateurs.config import DTYPES, RunConfig
from secateurs.core.patterns import NMSparsity, parse_pattern
from secateurs.core.spec import to_flags
from secateurs.errors import SecateursError
from secateurs.evaluate.perplexity import check_sparsity
from secateurs.io import atomic_write_text, ensure_writable
from secateurs.jobs.plan import Plan, check_device, check_run, needs_calibration, with_batch_size
from secateurs.jobs.report import versions
from secateurs.jobs.session import Prepared, evaluate_model, load, prepare, prune_loaded
from secateurs.methods.selectivity import DEFAULT_IDF_FORM, check_idf_form

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


def _reads_idf(cfg: RunConfig) -> bool:
    """Whether the run's method reads the IDF, so that its form matters."""
    return hasattr(cfg.method.options, "idf_form")


def plan_runs(
    base: dict[str, Any],
    methods: list[str],
    patterns: list[str],
    ratios: list[float],
    idf_forms: list[str] | None = None,
) -> list[RunConfig]:
    """Every configuration to run, from the base flags, checked up front; N:M patterns run
    once, at N/M.

    Methods that read the IDF run once per form in ``idf_forms`` (default: the base's form).
    """
    if not methods or not patterns or not ratios or idf_forms == []:
        raise SecateursError(
            "give at least one method, one sparsity type, one ratio and one IDF form"
        )
    forms = [check_idf_form(form) for form in idf_forms or [base.get("idf_form", DEFAULT_IDF_FORM)]]
    runs = []
    for sparsity_type in patterns:
        pattern = parse_pattern(sparsity_type, use_variant=base.get("use_variant", False))
        wanted = [pattern.ratio] if isinstance(pattern, NMSparsity) else ratios
        for ratio in wanted:
            for method in methods:
                flags = base | {
                    "prune_method": method,
                    "sparsity_type": sparsity_type,
                    "sparsity_ratio": ratio,
                }
                cfg = with_batch_size(RunConfig.from_flags(**flags))
                for form in forms if _reads_idf(cfg) else [None]:
                    runs.append(cfg if form is None else cfg.replace(idf_form=form))
                    check_run(runs[-1])
    return runs


def _key(settings: dict[str, Any]) -> str:
    kept = {k: v for k, v in settings.items() if k not in _NOT_IN_KEY}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def run_key(cfg: RunConfig) -> str:
    """A short digest of every setting that can change a run's result."""
    return _key(cfg.flags())


def _dense_settings(cfg: RunConfig) -> dict[str, Any]:
    """What the dense model's perplexity depends on: the model, the data and the evaluation."""
    return to_flags(cfg.model) | to_flags(cfg.data) | to_flags(cfg.evaluation)


def run_label(cfg: RunConfig, forms: list[str]) -> str:
    """The method's name, with its IDF form when several forms are compared or not the default."""
    name = cfg.method.prune_method
    if _reads_idf(cfg) and (len(forms) > 1 or cfg.method.options.idf_form != DEFAULT_IDF_FORM):
        return f"{name}[{cfg.method.options.idf_form}]"
    return name


def _read_cached(path: Path) -> dict[str, Any] | None:
    """A finished run's cached result, or None. An entry that does not parse (written by
    something other than this cache's atomic writes, or damaged since) is run again: it only
    saves time, so it is never trusted and never fatal."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        warnings.warn(f"the cached run {path} is corrupt ({exc}); running it again", stacklevel=2)
        return None


def _cached(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    cached = _read_cached(path)
    if cached is not None:
        return cached
    value = compute()
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")
    return value


def _plan(cfg: RunConfig, device) -> Plan:
    """A run of the comparison: in memory, on the device checked once for all runs."""
    method, pattern, ratio = check_run(cfg)
    return Plan(cfg, method, pattern, ratio, device, DTYPES[cfg.model.dtype], "memory")


def _one_run(plan: Plan, prepared: Prepared) -> dict[str, Any]:
    model = load(plan, prepared)
    report, memory = prune_loaded(model, plan, prepared)
    check = check_sparsity(model, plan.pattern, plan.ratio, report.block_ratios)
    start = time.perf_counter()
    name = plan.method.name
    ppl = evaluate_model(model, plan, prepared, name)
    return {
        "method": name,
        "sparsity_type": plan.config.sparsity.sparsity_type,
        "pattern": plan.pattern.describe(),
        "target_sparsity": plan.ratio,
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
    base: dict[str, Any],
    methods: list[str],
    patterns: list[str],
    ratios: list[float],
    out_dir: str | Path,
    log: Callable[[str], None] = print,
    idf_forms: list[str] | None = None,
) -> Comparison:
    """Run (or reuse) every configuration (``base`` flags with each method, pattern and
    ratio) and write the table, CSV, JSON and plot."""
    runs = plan_runs(base, methods, patterns, ratios, idf_forms)
    forms = sorted({cfg.method.options.idf_form for cfg in runs if _reads_idf(cfg)})
    out = Path(out_dir)
    cache = out / "runs"
    ensure_writable(cache, "--out")
    cache.mkdir(parents=True, exist_ok=True)
    device = check_device(runs[0].execution.device)
    plans = [_plan(cfg, device) for cfg in runs]
    calibrate = any(needs_calibration(plan.config, plan.method) for plan in plans)
    prepared = prepare(plans[0], calibrate)

    def dense() -> dict[str, Any]:
        log("evaluating the dense model")
        return {"ppl_test": evaluate_model(load(plans[0], prepared), plans[0], prepared, "dense")}

    dense_key = _key(_dense_settings(runs[0]))
    dense_ppl = _cached(cache / f"dense-{dense_key}.json", dense)["ppl_test"]
    rows = []
    for index, plan in enumerate(plans, 1):
        cfg = plan.config
        name = run_label(cfg, forms)
        label = f"{name} {cfg.sparsity.sparsity_type} {cfg.sparsity.sparsity_ratio}"
        path = cache / f"{run_key(cfg)}.json"
        log(f"[{index}/{len(runs)}] {label}" + (" (cached)" if path.exists() else ""))
        row = _cached(path, lambda plan=plan: _one_run(plan, prepared))
        idf_form = cfg.method.options.idf_form if _reads_idf(cfg) else None
        rows.append(row | {"method": name, "idf_form": idf_form})
    _add_changes(rows)
    files = write_outputs(out, runs[0], prepared, dense_ppl, rows)
    return Comparison(dense_ppl, rows, files)


def write_outputs(
    out: Path, base: RunConfig, prepared: Prepared, dense_ppl: float, rows: list[dict]
) -> dict[str, str]:
    from secateurs.jobs.report import comparison_csv, comparison_table, plot_comparison

    settings = base.flags() | {"seqlen": prepared.seqlen}
    for key in ("prune_method", "sparsity_type", "sparsity_ratio", "idf_form", *_NOT_IN_KEY):
        settings.pop(key, None)
    result = {
        "settings": settings,
        "versions": versions(),
        "eval_windows": int(prepared.eval_windows.shape[0]),
        "window_bos": prepared.window_bos(base.data.window_bos),
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
    plot_comparison(
        rows, dense_ppl, files["plot"], title=f"{base.model.model} on {base.data.dataset}"
    )
    return {name: str(path) for name, path in files.items()}
