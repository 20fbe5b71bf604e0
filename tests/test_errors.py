"""No traceback reaches the user: every class of bad input or environment is one line, exit 2,
and leaves nothing behind; unexpected errors are exit 1 and show a traceback with --debug."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import invoke, invoke_prune, random_text


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output


def test_non_text_dataset(tmp_path, tiny_model_dir, text_dir):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    before = _files(tmp_path)
    result = invoke_prune(tiny_model_dir, binary, "--save_json", tmp_path / "r.json")
    _one_line_error(result, "is not UTF-8 text")
    assert _files(tmp_path) == before


def test_corrupt_or_partial_weights(tmp_path, tiny_model_dir, text_dir):
    weights = tiny_model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = _files(tmp_path)
    result = invoke_prune(
        tiny_model_dir, text_dir, "--nsamples", "2", "--save_model", tmp_path / "o"
    )
    _one_line_error(result, "truncated or corrupt")
    again = invoke("eval", "--model", tiny_model_dir, "--dataset", text_dir, "--seqlen", "32")
    _one_line_error(again, "truncated or corrupt")
    assert _files(tmp_path) == before


@pytest.mark.parametrize("flag", ["--save_model", "--save_json", "--save_log"])
def test_output_under_a_file(tmp_path, tiny_model_dir, text_dir, flag):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    before = _files(tmp_path)
    result = invoke_prune(tiny_model_dir, text_dir, flag, blocker / "sub" / "out")
    _one_line_error(result, "is a file, not a folder")
    compare = invoke(
        "compare", "--model", tiny_model_dir, "--dataset", text_dir, "--out", blocker / "c"
    )
    _one_line_error(compare, "is a file, not a folder")
    assert _files(tmp_path) == before


def test_output_in_a_read_only_folder(tmp_path, tiny_model_dir, text_dir, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # root ignores permission bits, so the check is made to see what an ordinary user sees
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    before = _files(tmp_path)
    result = invoke_prune(tiny_model_dir, text_dir, "--save_json", locked / "r.json")
    _one_line_error(result, "is not writable")
    compare = invoke("compare", "--model", tiny_model_dir, "--dataset", text_dir, "--out", locked)
    _one_line_error(compare, "is not writable")
    assert _files(tmp_path) == before


def test_write_failure_during_save_leaves_nothing(tmp_path, tiny_model_dir, text_dir, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("secateurs.jobs.result.write_log", disk_full)
    result = invoke_prune(
        tiny_model_dir, text_dir, "--nsamples", "2", "--save_log", tmp_path / "r.log"
    )
    _one_line_error(result, "No space left on device")
    assert not (tmp_path / "r.log").exists()
    from secateurs.io import atomic_file

    with pytest.raises(Exception, match="No space left"), atomic_file(tmp_path / "x.txt") as tmp:
        raise OSError(28, "No space left on device", str(tmp))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.parametrize("device", ["mps", "cuda:7", "xpu", "tpu"])
def test_unsupported_device(tiny_model_dir, text_dir, device):
    import torch

    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    result = invoke_prune(tiny_model_dir, text_dir, "--device", device)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--device" in result.output and "use cpu" in result.output


def test_text_too_short_for_one_window(tmp_path, tiny_model_dir):
    short = tmp_path / "short.txt"
    short.write_text(random_text(32))  # exactly one window of 32: no room for a random start
    result = invoke_prune(tiny_model_dir, short, "--nsamples", "1")
    _one_line_error(result, "too few for one window of 32")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text(random_text(5))
    _one_line_error(invoke_prune(tiny_model_dir, tiny, "--nsamples", "1"), "too few")
    evaluated = invoke("eval", "--model", tiny_model_dir, "--dataset", tiny, "--seqlen", "32")
    _one_line_error(evaluated, "fewer than one window")


def test_a_real_bug_is_exit_1_with_its_traceback_only_under_debug(
    tiny_model_dir, text_dir, monkeypatch
):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("secateurs.jobs.prune.run_prune", bug)
    result = invoke_prune(tiny_model_dir, text_dir)
    assert result.exit_code == 1
    assert "unexpected ZeroDivisionError" in result.output and "--debug" in result.output
    debug = invoke_prune(tiny_model_dir, text_dir, "--debug")
    assert isinstance(debug.exception, ZeroDivisionError)


def test_the_real_command_prints_no_traceback(tmp_path, tiny_model_dir):
    """Through a real process: stderr holds one error line, no Python traceback."""
    binary = tmp_path / "data.bin"
    binary.write_bytes(b"\x00\xff" * 100)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "secateurs",
            "prune",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(binary),
            "--seqlen",
            "32",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("error:") and len(done.stderr.strip().splitlines()) == 1
