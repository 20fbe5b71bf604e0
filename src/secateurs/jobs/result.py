"""One place that assembles a pruning run's result and writes it, for every backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from secateurs.core.model import parameter_count
from secateurs.errors import SecateursError
from secateurs.formats.checkpoint import rewrite_folder
from secateurs.io import atomic_dir
from secateurs.jobs.plan import Plan
from secateurs.jobs.report import plot_layers, versions, write_json, write_log
from secateurs.jobs.scoring import score_files, scoring_data
from secateurs.jobs.session import Prepared


def calibration_record(plan: Plan, prepared: Prepared) -> dict[str, Any]:
    """What the scores came from: calibration samples, score files, or the weights alone."""
    cfg, method = plan.config, plan.method
    if cfg.safety.load_wanda_score:
        return {"score_files": {k: str(v) for k, v in score_files(cfg, method).items()}}
    if prepared.windows is None:
        return {}
    return {"data": scoring_data(cfg, method), "samples": int(prepared.windows.shape[0])}


def config_record(plan: Plan, prepared: Prepared) -> dict[str, Any]:
    """The run's settings by flag name, with what the plan resolved (seqlen, true ratio)."""
    return plan.config.flags() | {"seqlen": prepared.seqlen, "sparsity_ratio": plan.ratio}


def result_record(plan: Plan, prepared: Prepared, model, report, **parts: Any) -> dict[str, Any]:
    """A prune's result: configuration, model, pruning report, then ``parts`` (perplexity,
    sparsity check, timings, memory, ...) as the backend measured them."""
    options = plan.options
    result = {
        "config": config_record(plan, prepared),
        "calibration": calibration_record(plan, prepared),
        "pattern": plan.pattern.describe(),
        "window_bos": prepared.window_bos(plan.config.data.window_bos),
        "idf_form": getattr(options, "idf_form", None),
        "versions": versions(),
        "model": {"class": type(model).__name__, "parameters": parameter_count(model)},
        "perplexity": {
            "eval_dataset": prepared.eval_name,
            "windows": int(prepared.eval_windows.shape[0]),
        },
        "prune": report.to_dict(),
    }
    if "perplexity" in parts:
        parts["perplexity"] = result["perplexity"] | parts["perplexity"]
    return result | parts


def finish_folder(folder: Path, result: dict[str, Any], save_format: str) -> None:
    """Compress a written model folder if asked, then add the run's result to it."""
    if save_format == "compressed":
        result["checkpoint"] = rewrite_folder(folder, save_format).as_dict()
    (folder / "secateurs.json").write_text(json.dumps(result, indent=2, default=str) + "\n")


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


def write_reports(plan: Plan, result: dict[str, Any]) -> None:
    """The JSON result, the readable log and the per-layer plot, where the run asked."""
    out = plan.config.output
    if out.save_json:
        write_json(out.save_json, result)
    if out.save_log:
        write_log(out.save_log, result)
    if out.save_plot:
        plot_layers(result, out.save_plot)


def _report_paths(plan: Plan) -> list[str]:
    out = plan.config.output
    return [str(path) for path in (out.save_json, out.save_log, out.save_plot) if path]


def model_not_saved(
    plan: Plan, result: dict[str, Any], path: str, exc: SecateursError | OSError
) -> SecateursError:
    """The error for a model that could not be written (a full disk, a folder we may not
    write), once the run's reports are written anyway: a failed save must not also cost the
    numbers a long run measured. The JSON result says that the model was not saved."""
    reason = str(exc) if isinstance(exc, SecateursError) else f"{exc.strerror or exc}"
    result["model_not_saved"] = {"path": path, "error": reason}
    message = f"the model was not saved: {reason}"
    reports = _report_paths(plan)
    try:
        write_reports(plan, result)
    except (SecateursError, OSError) as second:
        return SecateursError(f"{message}; the results could not be written either: {second}")
    if reports:
        message += f". The results were written to {', '.join(reports)}"
    return SecateursError(message)
