"""A hostile environment (a full disk, a folder we may not write, a damaged input file, too
little memory) is one line and exit 2 that says what to do, never "a bug" and exit 1; and what
a run had finished is still written when a later write fails."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from conftest import invoke, invoke_prune
from safetensors import SafetensorError
from transformers import PreTrainedModel

_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def _error_line(result, *parts: str) -> str:
    """The one ``error:`` line of an exit-2 failure, holding every one of ``parts``."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output and "This is a bug" not in result.output
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def _no_output_named(folder: Path, name: str) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.lstrip(".").startswith(name)]


def _failing_save(monkeypatch, error: BaseException) -> None:
    def save(self, folder, *args, **kwargs):
        Path(folder, "model.safetensors").write_bytes(b"half")  # a write that got part way
        raise error

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        (SafetensorError(_FULL), "No space left on device"),
        (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
    ],
    ids=["disk full", "disk full in safetensors", "permission denied"],
)
def test_a_failed_model_save_still_writes_the_results(
    tmp_path, tiny_model_dir, text_dir, monkeypatch, error, reason
):
    _failing_save(monkeypatch, error)
    out, report, log = tmp_path / "pruned", tmp_path / "r.json", tmp_path / "r.log"
    result = invoke_prune(
        tiny_model_dir,
        text_dir,
        *("--nsamples", "2", "--save_model", out, "--save_json", report, "--save_log", log),
    )
    line = _error_line(result, reason, "the model was not saved", str(report))
    assert str(log) in line
    _no_output_named(tmp_path, "pruned")
    written = json.loads(report.read_text())
    assert written["perplexity"]["pruned"] > 0
    assert reason in written["model_not_saved"]["error"]
    assert "per-layer sparsity" in log.read_text()


def test_a_failed_save_says_when_the_results_failed_too(
    tmp_path, tiny_model_dir, text_dir, monkeypatch
):
    _failing_save(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("secateurs.jobs.result.write_json", full)
    report = tmp_path / "r.json"
    result = invoke_prune(
        tiny_model_dir,
        text_dir,
        *("--nsamples", "2", "--save_model", tmp_path / "m", "--save_json", report),
    )
    _error_line(result, "the model was not saved", "the results could not be written either")
    assert not report.exists()


def test_finetune_prints_what_it_trained_before_a_failed_save(
    tmp_path, tiny_model_dir, text_dir, monkeypatch
):
    _failing_save(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    result = invoke(
        "finetune",
        *("--model", tiny_model_dir, "--dataset", text_dir, "--save_model", tmp_path / "ft"),
        *("--steps", "1", "--nsamples", "2", "--seqlen", "32", "--quiet"),
    )
    _error_line(result, "No space left on device")
    assert "loss" in result.output
    _no_output_named(tmp_path, "ft")


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def test_a_truncated_weights_file_is_named_by_eval_and_convert(tmp_path, tiny_model_dir, text_dir):
    weights = _truncate(tiny_model_dir / "model.safetensors")
    evaluated = invoke("eval", "--model", tiny_model_dir, "--dataset", text_dir, "--seqlen", "32")
    _error_line(evaluated, str(weights), "truncated or corrupt")
    converted = invoke("convert", "--model", tiny_model_dir, "--save_model", tmp_path / "c")
    _error_line(converted, str(weights), "truncated or corrupt")
    _no_output_named(tmp_path, "c")
    streamed = invoke_prune(
        tiny_model_dir, text_dir, "--offload", "disk", "--save_model", tmp_path / "s"
    )
    _error_line(streamed, str(weights), "truncated or corrupt")
    _no_output_named(tmp_path, "s")


def test_a_corrupt_json_file_is_named(tmp_path, tiny_model_dir, text_dir):
    config = tiny_model_dir / "config.json"
    config.write_text(config.read_text()[:40])
    converted = invoke("convert", "--model", tiny_model_dir, "--save_model", tmp_path / "c")
    _error_line(converted, str(config), "truncated or corrupt")
    pruned = invoke_prune(tiny_model_dir, text_dir, "--nsamples", "2")
    _error_line(pruned, str(config), "truncated or corrupt")


def test_a_damaged_score_file_is_exit_2(tmp_path, tiny_model_dir, text_dir):
    scores = tmp_path / "scores"
    dumped = invoke_prune(
        tiny_model_dir, text_dir, "--nsamples", "2", "--dump_wanda_score", "--save", scores
    )
    assert dumped.exit_code == 0, dumped.output
    (path,) = (scores / "wanda_score").iterdir()
    _truncate(path)
    loaded = invoke_prune(
        tiny_model_dir, text_dir, "--nsamples", "2", "--load_wanda_score", "--save", scores
    )
    _error_line(loaded, "truncated or corrupt")


def test_a_corrupt_compare_cache_entry_is_run_again(tmp_path, tiny_model_dir, text_dir):
    args = ("compare", "--model", tiny_model_dir, "--dataset", text_dir, "--seqlen", "32")
    args += ("--nsamples", "2", "--methods", "magnitude", "--sparsity_types", "unstructured")
    args += ("--out", tmp_path / "c", "--quiet")
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    for entry in (tmp_path / "c" / "runs").iterdir():
        entry.write_text(entry.read_text()[:10])
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert "warning:" in again.output and "running it again" in again.output
    assert json.loads((tmp_path / "c" / "comparison.json").read_text())["rows"]


@pytest.mark.parametrize(
    "error",
    [MemoryError(), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")],
    ids=["host", "GPU"],
)
def test_running_out_of_memory_is_exit_2(tiny_model_dir, text_dir, monkeypatch, error):
    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr("secateurs.jobs.prune.run_prune", out_of_memory)
    _error_line(invoke_prune(tiny_model_dir, text_dir), "out of memory")


@pytest.mark.parametrize("command", ["prune", "eval", "compare", "attack", "finetune", "convert"])
def test_every_command_takes_debug(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "--debug" in result.output


def test_debug_shows_the_error_of_a_damaged_file(tmp_path, tiny_model_dir):
    _truncate(tiny_model_dir / "model.safetensors")
    result = invoke("convert", "--model", tiny_model_dir, "--save_model", tmp_path / "c", "--debug")
    assert result.exit_code != 0 and not isinstance(result.exception, SystemExit)
