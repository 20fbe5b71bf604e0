"""Benchmark: Wanda's prune time against its floor, two plain forward passes, in one process.

Pruning sequentially needs, at its heart, two passes of the calibration windows through every
decoder block: one to gather each layer's input statistics, one to carry the pruned block's
outputs to the next block. This script measures, on the same windows, batches and threads:

1. **floor**: one plain forward pass of the windows through the decoder blocks (no head), as
   the propagation pass runs it; the floor is twice that.
2. **prune**: the whole prune (input capture, calibration, scores, masks, propagation) of
   Wanda 50% unstructured, SparseGPT 50% unstructured and the Wanda variant, each on a fresh
   copy of the model; prune / (2 x forward), the median of ``--repeats`` interleaved repeats.
3. **profile** (Wanda, once): where the time goes, block by block: the calibration forwards
   (the same partial pass with hooks that record nothing), the statistic accumulation (the
   rest of the calibration pass), scores, selection, mask application, propagation forwards,
   and what is left (copies, allocations, bookkeeping).

    python benchmarks/floor_bench.py                      # 16 x 256 and 32 x 512

Writes benchmarks/results/floor_bench.json and its section of BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from typing import Any

import torch
from _common import ROOT, bench_parser, result_header, save_result

from secateurs.api import MethodPruner
from secateurs.core.engine import run_block
from secateurs.core.guard import check_channels
from secateurs.core.model import (
    StopForward,
    capture_block_inputs,
    find_blocks,
    find_linears,
    iter_prunable,
    load_model,
    load_tokenizer,
    weight_matrix,
)
from secateurs.core.patterns import row_mask, zero_masked
from secateurs.core.stats import ActivationStats
from secateurs.data import text
from secateurs.jobs.report import replace_marked_section
from secateurs.methods.wanda import wanda_score

RUNS = (
    ("wanda", "wanda", False),
    ("sparsegpt", "sparsegpt", False),
    ("wanda variant", "wanda", True),
)


def cpu_model() -> str:
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def forward_seconds(model, windows: torch.Tensor, batch_size: int) -> float:
    """One plain forward pass of ``windows`` through every decoder block (inputs captured
    first, not timed: the prune captures them once too)."""
    inputs = capture_block_inputs(model, windows, torch.device("cpu"), batch_size)
    _, blocks = find_blocks(model)
    start = time.perf_counter()
    for index, block in enumerate(blocks):
        inputs.hidden = run_block(block, inputs, batch_size, True, index=index)
    return time.perf_counter() - start


def prune_seconds(model, windows, method: str, variant: bool, batch_size: int):
    start = time.perf_counter()
    report = MethodPruner(model, method, progress=False, batch_size=batch_size).prune(
        windows, 0.5, "unstructured", use_variant=variant
    )
    return time.perf_counter() - start, report.seconds


def _timed(clock: dict[str, float], key: str):
    @contextlib.contextmanager
    def span():
        start = time.perf_counter()
        yield
        clock[key] += time.perf_counter() - start

    return span()


def _partial_pass(block, layers, inputs, batch_size: int, index: int, stats) -> None:
    """The calibration pass: up to the block's last linear layer, recording each distinct
    input into ``stats`` (layers fed the same tensor share it, as in the engine), or nothing."""
    last_name = list(layers)[-1]
    seen: dict[str, Any] = {"input": None, "owner": None}
    shares: dict[str, str] = {}

    def hook(name: str, x: torch.Tensor) -> None:
        if stats is not None and name not in shares:
            if x is seen["input"]:
                shares[name] = seen["owner"]
            else:
                seen["input"], seen["owner"] = x, name
                stats[name].add_batch(x)
        if name == last_name:
            raise StopForward

    handles = [
        layer.register_forward_pre_hook(lambda _m, args, n=name: hook(n, args[0]))
        for name, layer in layers.items()
    ]
    try:
        run_block(block, inputs, batch_size, False, index=index)
    finally:
        for handle in handles:
            handle.remove()
    for name, owner in shares.items():
        stats[name] = stats[owner]


def profile_wanda(model, windows: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Wanda 50% unstructured, block by block, with each stage timed on its own."""
    clock = dict.fromkeys(
        (
            "capture",
            "calibration forward",
            "statistics",
            "score",
            "selection",
            "apply",
            "guard and records",
            "propagation forward",
            "total",
        ),
        0.0,
    )
    total = time.perf_counter()
    with _timed(clock, "capture"):
        inputs = capture_block_inputs(model, windows, torch.device("cpu"), batch_size)
    _, blocks = find_blocks(model)
    for index, block in enumerate(blocks):
        layers = find_linears(block)
        stats = {n: ActivationStats(weight_matrix(layer).shape[1]) for n, layer in layers.items()}
        with _timed(clock, "calibration forward"):
            _partial_pass(block, layers, inputs, batch_size, index, None)
        start = time.perf_counter()
        _partial_pass(block, layers, inputs, batch_size, index, stats)
        clock["statistics"] += time.perf_counter() - start
        for name, layer in layers.items():
            weight = weight_matrix(layer)
            with _timed(clock, "score"):
                score = wanda_score(weight, stats[name])
            with _timed(clock, "selection"):
                mask = row_mask(score, 0.5)
            with _timed(clock, "guard and records"):
                check_channels(score, stats[name].sq_norm)
                int(torch.count_nonzero(mask))
            with _timed(clock, "apply"):
                zero_masked(weight, mask)
        with _timed(clock, "propagation forward"):
            inputs.hidden = run_block(block, inputs, batch_size, True, index=index)
    # the statistics pass also ran the forward: it counts once in the total (a prune runs one
    # calibration pass), and the statistics are what that pass cost beyond the plain one
    clock["total"] = time.perf_counter() - total - clock["calibration forward"]
    clock["statistics"] -= clock["calibration forward"]
    clock["other"] = clock["total"] - sum(v for k, v in clock.items() if k != "total")
    return clock


def one_setting(base, tokenizer, nsamples: int, seqlen: int, args) -> dict[str, Any]:
    source = text.resolve_source(args.dataset)
    windows = text.calibration_windows(tokenizer, source, nsamples, seqlen, seed=0)
    rows: dict[str, list[float]] = {name: [] for name, _, _ in RUNS}
    phases: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in RUNS}
    forwards: list[float] = []
    for repeat in range(args.repeats):
        for name, method, variant in RUNS:
            forward = forward_seconds(copy.deepcopy(base), windows, args.batch_size)
            seconds, split = prune_seconds(
                copy.deepcopy(base), windows, method, variant, args.batch_size
            )
            forwards.append(forward)
            rows[name].append(seconds / (2 * forward))
            phases[name].append(split | {"prune": seconds, "forward": forward})
            print(
                f"{nsamples} x {seqlen} repeat {repeat + 1}: {name} {seconds:.1f} s, "
                f"forward {forward:.1f} s, ratio {seconds / (2 * forward):.3f}",
                flush=True,
            )
    profile = profile_wanda(copy.deepcopy(base), windows, args.batch_size)
    run = {"nsamples": nsamples, "seqlen": seqlen, "profile": profile}
    if forwards:
        run |= {
            "forward_s_median": statistics.median(forwards),
            "ratio_median": {name: statistics.median(values) for name, values in rows.items()},
            "ratios": rows,
            "phases": phases,
        }
    return run


def block_weights(model) -> int:
    """How many weights the decoder blocks' linear layers hold (what the masks cost scales with)."""
    return sum(weight_matrix(layer).numel() for _, layer in iter_prunable(model))


def markdown(result: dict[str, Any]) -> str:
    timed = [row for row in result["settings_runs"] if "ratio_median" in row]
    lines = [
        f"{result['model']} (fp32), Wanda / SparseGPT / the Wanda variant at 50% unstructured, "
        f"batch {result['settings']['batch_size']}, {result['settings']['repeats']} interleaved "
        f"repeats (median). Machine: {result['cpu']}, {result['machine']}; {result['date']}.",
    ]
    if timed:
        lines += [
            "",
            "| calibration | 1 forward s | wanda / 2 fwd | sparsegpt / 2 fwd | variant / 2 fwd |",
            "|---|---|---|---|---|",
        ]
    for row in timed:
        ratio = row["ratio_median"]
        lines.append(
            f"| {row['nsamples']} x {row['seqlen']} | {row['forward_s_median']:.2f} | "
            f"{ratio['wanda']:.3f} | {ratio['sparsegpt']:.3f} | {ratio['wanda variant']:.3f} |"
        )
    weights = result["block_weights"]
    lines += [
        "",
        "Where Wanda's time goes (one profiled run, seconds and share of the total; ns per "
        f"block weight, {weights / 1e6:.1f} M weights):",
        "",
    ]
    lines.append(
        "| stage | "
        + " | ".join(f"{r['nsamples']} x {r['seqlen']}" for r in result["settings_runs"])
        + " |"
    )
    lines.append("|---|" + "---|" * len(result["settings_runs"]))
    for stage in result["settings_runs"][0]["profile"]:
        cells = []
        for row in result["settings_runs"]:
            profile = row["profile"]
            cells.append(
                f"{profile[stage]:.2f} ({profile[stage] / profile['total']:.1%}; "
                f"{profile[stage] / weights * 1e9:.2f} ns)"
            )
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__, "floor_bench")
    parser.add_argument(
        "--repeats", type=int, default=3, help="0: only the profile (a big shape, for example)"
    )
    parser.add_argument("--settings", default="16x256,32x512")
    args = parser.parse_args()
    torch.manual_seed(0)
    base, _ = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    runs = []
    for setting in args.settings.split(","):
        nsamples, seqlen = (int(part) for part in setting.split("x"))
        runs.append(one_setting(base, tokenizer, nsamples, seqlen, args))
    result = result_header(args) | {
        "model": args.model,
        "cpu": cpu_model(),
        "block_weights": block_weights(base),
        "settings_runs": runs,
    }
    save_result(args, result)
    table = markdown(result)
    print(table)
    if args.markdown and args.repeats > 0:  # a profile alone does not replace the ratios
        replace_marked_section(ROOT / args.markdown, "floor_bench", table)


if __name__ == "__main__":
    main()
