"""SIGTERM and SIGHUP stop a run the way Ctrl-C does: every temporary file and folder is
removed, the exit code is 128 + the signal's number, and stderr holds one line.

A signal's default action kills a process without unwinding its stack, so the atomic
writers' cleanup never ran and a killed job left its hidden temporary folder behind. Real
processes are signalled at stages that a file on disk marks; every command that writes is
also signalled in process, at the moment an output would be published.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import invoke, make_model, make_tokenizer, random_text

import secateurs.io

SRC = Path(__file__).parents[1] / "src"

# A runner that keeps the in-memory save's temporary folder open until it is signalled: that
# save takes milliseconds on a tiny model, too short a window to signal into reliably.
_SLOW_SAVE = """
import runpy, sys, time
import secateurs.jobs.result as result
finish = result.finish_folder
def held(folder, *args):
    finish(folder, *args)
    (folder / "held").touch()
    time.sleep(120)
result.finish_folder = held
sys.argv[0] = "secateurs"
runpy.run_module("secateurs", run_name="__main__")
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A saved tiny LLaMA, and text whose test split makes the evaluation last seconds (the
    streamed run evaluates the pruned model while its output is still a temporary folder)."""
    root = tmp_path_factory.mktemp("signals")
    make_model("llama").save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    text = root / "text"
    text.mkdir()
    (text / "train.txt").write_text(random_text(4000, seed=1))
    (text / "test.txt").write_text(random_text(30000, seed=2))
    return root / "model", text


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.lstrip(".").startswith(name))


def _temporary(parent: Path, name: str) -> Path | None:
    return next(iter(parent.glob(f".{name}.*.tmp")), None)


def _default_hangup() -> None:
    """The command's own SIGHUP behaviour even when the tests run under ``nohup`` (an ignored
    signal stays ignored across exec, and the command rightly leaves it so)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _signal_when(
    command: list[str], out: Path, marker: Callable[[Path], bool], signum: int
) -> subprocess.CompletedProcess:
    """Run ``command``; send ``signum`` once its temporary output folder shows ``marker``."""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    with subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_hangup,
    ) as process:
        deadline = time.monotonic() + 240
        while process.poll() is None and time.monotonic() < deadline:
            tmp = _temporary(out.parent, out.name)
            if tmp is not None and marker(tmp):
                process.send_signal(signum)
                break
            time.sleep(0.005)
        stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _prune(model: Path, text: Path, *args: str) -> list[str]:
    return [
        *(sys.executable, "-m", "secateurs", "prune", "--model", str(model)),
        *("--dataset", str(text), "--seqlen", "32", "--nsamples", "4", "--quiet"),
        *("--eval_batch_size", "1", "--no_eval_dense", *args),
    ]


def _check_stopped(done: subprocess.CompletedProcess, signum: int, out: Path) -> None:
    assert done.returncode != 0, "the run finished before the signal: make it longer"
    assert done.returncode == 128 + signum, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: stopped by"), done.stderr
    assert signal.Signals(signum).name in lines[0]
    assert _leftovers(out.parent, out.name) == []
    assert not list(out.parent.glob(".tmp*"))  # nor a writer's own temporary


def _has(name: str) -> Callable[[Path], bool]:
    return lambda tmp: (tmp / name).exists()


@pytest.mark.parametrize(
    ("stage", "marker"),
    [
        ("just created", lambda tmp: True),
        ("a pruned block written", _has("model-00002-of-00004.safetensors")),
        ("evaluating the written model", _has("model.safetensors.index.json")),
    ],
)
def test_sigterm_during_a_streamed_save_leaves_nothing(tmp_path, inputs, stage, marker):
    out = tmp_path / "out"
    command = _prune(*inputs, "--offload", "disk", "--save_model", str(out))
    done = _signal_when(command, out, marker, signal.SIGTERM)
    _check_stopped(done, signal.SIGTERM, out)


def test_sighup_during_a_streamed_save_leaves_nothing(tmp_path, inputs):
    out = tmp_path / "out"
    command = _prune(*inputs, "--offload", "disk", "--save_model", str(out))
    done = _signal_when(command, out, _has("model.safetensors.index.json"), signal.SIGHUP)
    _check_stopped(done, signal.SIGHUP, out)


def test_sigterm_during_an_in_memory_save_leaves_nothing(tmp_path, inputs):
    model, text = inputs
    out, report = tmp_path / "out", tmp_path / "r.json"
    command = _prune(model, text, "--eval_limit", "4", "--save_model", str(out))
    command[1:3] = ["-c", _SLOW_SAVE]
    command += ["--save_json", str(report)]
    done = _signal_when(command, out, _has("held"), signal.SIGTERM)
    _check_stopped(done, signal.SIGTERM, out)
    assert not report.exists()  # the run was stopped before it finished: no result either


class _Unhandled(Exception):
    """What the test's own SIGTERM handler raises: the command did not handle the signal."""


@pytest.fixture
def stop_at_publish(tmp_path, monkeypatch):
    """The command's first output under ``tmp_path / "out"`` that is about to be published
    sends this process SIGTERM instead (a cache of tokens elsewhere is published as usual).

    A handler of the test's own stands in for the default action (which would kill pytest),
    and must be back in place after the command.
    """

    def unhandled(signum, frame):
        raise _Unhandled(signum)

    previous = signal.signal(signal.SIGTERM, unhandled)
    publish = secateurs.io._publish
    out = tmp_path / "out"

    def signalled(tmp: Path, target: Path) -> None:
        if target == out or out in target.parents:
            os.kill(os.getpid(), signal.SIGTERM)
        publish(tmp, target)

    monkeypatch.setattr(secateurs.io, "_publish", signalled)
    yield unhandled
    signal.signal(signal.SIGTERM, previous)


def _tiny_model(path: Path) -> Path:
    make_model("llama").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["prune", "--save_model", "{out}"],
        ["prune", "--save_json", "{out}"],
        ["prune", "--dump_wanda_score", "--save", "{out}"],
        ["eval", "--save_json", "{out}"],
        ["compare", "--methods", "magnitude", "--sparsity_types", "unstructured", "--out", "{out}"],
        ["finetune", "--steps", "1", "--nsamples", "2", "--seqlen", "32", "--save_model", "{out}"],
        ["convert", "--save_model", "{out}"],
    ],
    ids=lambda command: " ".join(command[:2]),
)
def test_every_writing_command_stops_cleanly(tmp_path, stop_at_publish, command):
    model = _tiny_model(tmp_path / "model")
    text = tmp_path / "text"
    text.mkdir()
    (text / "train.txt").write_text(random_text(2000, seed=1))
    (text / "test.txt").write_text(random_text(400, seed=2))
    out = tmp_path / "out"
    args = [str(out) if arg == "{out}" else arg for arg in command]
    inputs = ["--model", str(model)]
    if command[0] != "convert":
        inputs += ["--dataset", str(text)]
    if command[0] in ("prune", "eval", "compare"):
        inputs += ["--seqlen", "32"]
    if command[0] in ("prune", "compare"):
        inputs += ["--nsamples", "2"]
    result = invoke(*args[:1], *inputs, *args[1:], "--quiet")
    assert result.exit_code == 143, result.output
    assert "error: stopped by SIGTERM" in result.output
    assert not any(p.name.startswith(".") for p in tmp_path.rglob("*")), "a temporary is left"
    assert _leftovers(tmp_path, "out") in ([], ["out"])  # a compare cache folder may stay
    assert signal.getsignal(signal.SIGTERM) is stop_at_publish


def _exit_code(action: Callable[[], None]) -> int:
    import typer

    from secateurs.cli import _guarded

    with pytest.raises(typer.Exit) as info:
        _guarded(action)
    return info.value.exit_code


def test_a_stop_that_a_library_turned_into_its_own_error_is_still_a_stop(stop_at_publish):
    def action() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except KeyboardInterrupt as exc:  # what torch's C code does with an error it meets
            raise ValueError("could not determine the shape of object type") from exc

    assert _exit_code(action) == 143
    assert signal.getsignal(signal.SIGTERM) is stop_at_publish


def test_an_ignored_hangup_stays_ignored(stop_at_publish):
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
    try:

        def action() -> None:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

        assert _exit_code(action) == 143
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
