"""Benchmark: Wanda with and without recovery at 50% unstructured and 2:4 on SmolLM2 + wiki-sample.

Rows: plain Wanda; Wanda + inverse-Wanda at the seed's conservative (0.2, 1.0), balanced
(0.3, 2.0) and aggressive (0.5, 5.0) settings; Wanda + least squares. For each: perplexity,
mean relative output error over layers before and after recovery, prune time, and the time
added against plain Wanda measured in the same run.

    python benchmarks/recovery_bench.py                  # 32 x 512 calibration, 32 eval windows
    python benchmarks/recovery_bench.py --eval_limit 0   # the whole test split

Writes benchmarks/results/recovery_bench.json and the table between the markers in
BENCHMARKS.md.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

from _common import bench_parser, bench_windows, result_header, save_result

from secateurs.api import WandaPruner
from secateurs.core.model import load_model
from secateurs.core.profiling import measure
from secateurs.evaluate.perplexity import perplexity
from secateurs.jobs.report import replace_marked_section
from secateurs.methods.recovery import (
    InverseWandaStrategy,
    LeastSquaresStrategy,
    WeightRedistributor,
)

SETTINGS = {
    "none": None,
    "inverse_wanda conservative (0.2, 1.0)": lambda: InverseWandaStrategy(0.2, 1.0),
    "inverse_wanda balanced (0.3, 2.0)": lambda: InverseWandaStrategy(0.3, 2.0),
    "inverse_wanda aggressive (0.5, 5.0)": lambda: InverseWandaStrategy(0.5, 5.0),
    "least_squares": LeastSquaresStrategy,
}


def run_row(args, pattern: str, label: str, windows, eval_windows) -> dict:
    model, _ = load_model(args.model)
    make = SETTINGS[label]
    redistributor = WeightRedistributor(make()) if make else None
    pruner = WandaPruner(
        model, batch_size=args.batch_size, progress=False, redistributor=redistributor
    )
    gc.collect()
    with measure() as timing:
        report = pruner.prune(windows, 0.5, pattern)
    row = {
        "pattern": pattern,
        "recovery": label,
        "prune_s": timing.seconds,
        "phases_s": report.seconds,
        "relative_error": report.mean_relative_error(),
        "ppl": perplexity(model, eval_windows, batch_size=args.eval_batch_size, progress=False),
    }
    del model
    gc.collect()
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| pattern | recovery | ppl | vs plain Wanda | rel. error before -> after "
        "| prune s | time vs plain Wanda |",
        "|---|---|---|---|---|---|---|",
    ]
    base = {r["pattern"]: r for r in rows if r["recovery"] == "none"}
    for r in rows:
        plain = base[r["pattern"]]
        err = r["relative_error"]
        err_text = "-" if err is None else f"{err['before']:.4f} -> {err['after']:.4f}"
        lines.append(
            f"| {r['pattern']} | {r['recovery']} | {r['ppl']:.2f} "
            f"| {r['ppl'] / plain['ppl'] - 1:+.1%} | {err_text} | {r['prune_s']:.1f} "
            f"| {r['prune_s'] / plain['prune_s']:.2f}x |"
        )
    return "\n".join(lines)


def update_markdown(result: dict, path: Path) -> None:
    cfg = result["settings"]
    body = (
        f"SmolLM2-135M (fp32), Wanda at 50%, calibration {cfg['nsamples']} x "
        f"{cfg['seqlen']} tokens of `wiki-sample` (seed 0), perplexity on {result['eval_windows']} "
        f"test windows of {cfg['seqlen']}. Machine: {result['machine']}; {result['date']}.\n\n"
        f"{table(result['rows'])}"
    )
    replace_marked_section(path, "recovery_bench", body)


def main() -> None:
    parser = bench_parser(__doc__, "recovery_bench")
    parser.add_argument("--eval_batch_size", type=int, default=4)
    parser.add_argument("--eval_limit", type=int, default=32, help="0 = the whole test split")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument(
        "--settings",
        default="all",
        help="comma-separated: none, conservative, balanced, aggressive, least_squares (or all)",
    )
    args = parser.parse_args()

    windows, eval_windows = bench_windows(args, args.eval_limit or None)
    chosen = [
        label
        for label in SETTINGS
        if args.settings == "all" or any(name in label for name in args.settings.split(","))
    ]
    if "none" not in chosen:
        chosen.insert(0, "none")  # every ratio needs its plain-Wanda row
    rows = []
    for pattern in args.patterns.split(","):
        for label in chosen:
            rows.append(run_row(args, pattern, label, windows, eval_windows))
            print(json.dumps(rows[-1]), flush=True)
    result = {
        **result_header(args),
        "eval_windows": int(eval_windows.shape[0]),
        "rows": rows,
    }
    save_result(args, result)
    print(table(rows))
    update_markdown(result, Path(args.markdown))


if __name__ == "__main__":
    main()
