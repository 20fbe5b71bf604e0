"""Zero-shot accuracy of an in-memory model through lm-evaluation-harness.

Task names are lm-evaluation-harness names, plus the built-in offline ``wiki-cloze``
(:mod:`secateurs.evaluate.cloze`). Everything that can fail without a model (unknown names, hub data
that cannot be reached) fails in :func:`prepare_zero_shot`, before any pruning work.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from secateurs.errors import SecateursError
from secateurs.evaluate.cloze import TASK_NAME, builtin_task_dir

# The seven zero-shot tasks of the Wanda paper (and most pruning papers since).
DEFAULT_TASKS = (
    "boolq",
    "rte",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)
METRICS = ("acc", "acc_norm")
HUB_PROBE_SECONDS = 3.0


@dataclass
class ZeroShotPlan:
    """Checked task names, the example limit, and the lm-eval task manager that knows them."""

    tasks: list[str]
    limit: int | None
    batch_size: int
    manager: Any


def parse_tasks(spec: str) -> list[str]:
    """Comma-separated task names, in order, without repeats."""
    names = list(dict.fromkeys(part.strip() for part in spec.split(",") if part.strip()))
    if not names:
        raise SecateursError(
            f"--eval_zero_shot needs task names, e.g. {TASK_NAME} (built in, offline) or "
            f"{','.join(DEFAULT_TASKS[:2])}; given without a value it runs "
            f"{', '.join(DEFAULT_TASKS)}"
        )
    return names


def _offline_error(hub: list[str], reason: str) -> SecateursError:
    return SecateursError(
        f"zero-shot task(s) {', '.join(hub)} need their data from the Hugging Face hub, which "
        f"{reason}; use the built-in offline task instead (--eval_zero_shot {TASK_NAME}), or "
        "connect to the hub once (later runs can set HF_HUB_OFFLINE=1 and use the cached data)"
    )


def _failure(exc: OSError) -> str:
    """Why the hub gave no data, in the words of the offline message."""
    if hub_offline():
        return "is switched off here (HF_HUB_OFFLINE) and the data are not in the local cache"
    return f"did not serve them ({type(exc).__name__})"


def hub_offline() -> bool:
    """Whether the user turned the hub off (the data must then be in the local cache)."""
    from huggingface_hub import constants

    flags = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def hub_reachable() -> bool:
    """A cheap probe: can a TCP connection to the hub's endpoint be opened?"""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=HUB_PROBE_SECONDS):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _progress_off() -> Iterator[None]:
    """No progress bars from lm-eval or datasets: both draw them on ``sys.stderr``."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        yield


@contextlib.contextmanager
def _no_git_hash() -> Iterator[None]:
    """lm-eval records ``git describe`` of the working folder, which says nothing about an
    in-memory model and prints git's error outside a repository; skip it."""
    from lm_eval import evaluator

    original = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs every step at INFO; keep its errors only while it runs."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _task_manager(names: list[str]):
    from lm_eval.tasks import TaskManager

    hub = [n for n in names if n != TASK_NAME]
    include = [str(builtin_task_dir())] if TASK_NAME in names else None
    with _quiet_lm_eval():
        return TaskManager(include_path=include, include_defaults=bool(hub))


def prepare_zero_shot(spec: str, limit: int | None, batch_size: int = 8) -> ZeroShotPlan:
    """Check the tasks and make sure their data can be read; no model is needed."""
    names = parse_tasks(spec)
    for value, flag in ((limit, "--zero_shot_limit"), (batch_size, "--zero_shot_batch_size")):
        if value is not None and value <= 0:
            raise SecateursError(f"{flag} must be at least 1, got {value}")
    manager = _task_manager(names)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise SecateursError(
            f"unknown zero-shot task(s) {', '.join(unknown)}: use {TASK_NAME} (built in) or "
            f"lm-evaluation-harness task names such as {', '.join(DEFAULT_TASKS)}"
        )
    hub = [n for n in names if n != TASK_NAME]
    if hub and not hub_offline() and not hub_reachable():
        raise _offline_error(hub, "cannot be reached from this machine")
    if hub:
        try:
            with _quiet_lm_eval():
                manager.load(hub)  # fetches the data now (or reads it from the cache)
        except OSError as exc:  # ConnectionError, a missing cached file, ...
            raise _offline_error(hub, _failure(exc)) from exc
    return ZeroShotPlan(names, limit, batch_size, manager)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def task_metrics(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """acc (and acc_norm where the task has it) with stderr, per task, from lm-eval's output."""
    found = {}
    for task, values in results["results"].items():
        entry: dict[str, Any] = {}
        for metric in METRICS:
            if f"{metric},none" in values:
                entry[metric] = _number(values[f"{metric},none"])
                entry[f"{metric}_stderr"] = _number(values.get(f"{metric}_stderr,none"))
        if not entry:
            continue
        samples = results.get("n-samples", {}).get(task)
        entry["examples"] = samples["effective"] if samples else None
        found[task] = entry
    return found


def evaluate_zero_shot(
    model, tokenizer, plan: ZeroShotPlan, progress: bool = True
) -> dict[str, dict[str, Any]]:
    """Accuracy of ``model`` (as it is in memory, on its own device) on the planned tasks."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    quiet = contextlib.nullcontext() if progress else _progress_off()
    with _quiet_lm_eval(), _no_git_hash(), quiet:
        # a copy: lm-eval gives the tokenizer it is handed a pad token, and the caller saves its own
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=plan.batch_size)
        try:
            output = simple_evaluate(
                model=lm,
                tasks=plan.tasks,
                num_fewshot=0,
                task_manager=plan.manager,
                limit=plan.limit,
                log_samples=False,
            )
        except OSError as exc:
            hub = [n for n in plan.tasks if n != TASK_NAME]
            raise _offline_error(hub, _failure(exc)) from exc
    return task_metrics(output)


def _fmt(entry: dict[str, Any] | None, metric: str) -> str:
    if not entry or entry.get(metric) is None:
        return "-"
    stderr = entry.get(f"{metric}_stderr")
    return f"{entry[metric]:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")


def summary_lines(zero_shot: dict[str, Any], label: str = "zero-shot        ") -> list[str]:
    """One line per task: dense -> pruned (or one model's) acc, and acc_norm."""
    dense, pruned = zero_shot.get("dense") or {}, zero_shot.get("pruned") or {}
    lines = []
    for task in dict.fromkeys([*dense, *pruned]):
        reference = pruned.get(task) or dense.get(task)
        parts = []
        for metric in METRICS:
            if metric not in reference:
                continue
            values = [_fmt(side.get(task), metric) for side in (dense, pruned) if side]
            parts.append(f"{metric} {' -> '.join(values)}")
        examples = reference.get("examples")
        name = f"{task} ({examples} examples)" if examples else task
        lines.append(f"{label}{name}: {'; '.join(parts)}")
    return lines
