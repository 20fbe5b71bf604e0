"""What every benchmark script shares: its command line and where results go."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from secateurs.core.model import load_config, load_tokenizer
from secateurs.data import text as data
from secateurs.io import atomic_write_text
from secateurs.jobs.report import versions

ROOT = Path(__file__).resolve().parent.parent


def bench_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """A parser with the model, data and output options common to the benchmarks."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="built-in name or folder")
    parser.add_argument("--dataset", default="wiki-sample", help="calibration and test text")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    parser.add_argument("--batch_size", type=int, default=8, help="calibration batch")
    parser.add_argument(
        "--out",
        default=str(ROOT / "benchmarks" / "results" / f"{name}.json"),
        help="results JSON (rows already there are kept)",
    )
    parser.add_argument(
        "--markdown",
        default=str(ROOT / "BENCHMARKS.md"),
        help="file whose marked table is rewritten; another path for side runs",
    )
    return parser


def bench_windows(
    args: argparse.Namespace,
    eval_limit: int | None = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
):
    """The seeded calibration windows (``--nsamples`` x ``--seqlen`` unless given) and the first
    ``eval_limit`` test windows (all if None) of ``--seqlen`` tokens, each starting with BOS
    where the family needs it (``--window_bos auto``, as `secateurs prune` does: Gemma)."""
    config, tokenizer = load_config(args.model), load_tokenizer(args.model)
    bos = data.window_bos_token("auto", config, tokenizer)
    source = data.resolve_source(args.dataset)
    windows = data.calibration_windows(
        tokenizer, source, nsamples or args.nsamples, seqlen or args.seqlen, 0, bos
    )
    tokens = data.evaluation_tokens(tokenizer, source)
    return windows, data.evaluation_windows(tokens, args.seqlen, eval_limit, source, bos)


def result_header(args: argparse.Namespace) -> dict[str, Any]:
    """Where and how a benchmark ran: its settings, the machine, the date, the versions."""
    return {
        "settings": vars(args),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions(),
    }


def save_result(args: argparse.Namespace, result: dict[str, Any]) -> None:
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")


def run_isolated(command: list[str], src: Path, what: str) -> str:
    """Run ``command`` in a fresh process with only ``src`` on the import path; its stdout.

    Raises with the tail of its stderr, naming ``what``, when it fails.
    """
    env = {"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-4000:]}")
    return done.stdout
