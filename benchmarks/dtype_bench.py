"""Benchmark: Wanda in bf16 against fp32 on the CPU: prune time, evaluation speed, masks, ppl.

Both prune the same model from the same calibration windows in one process, taking turns
over ``--repeats``; the prune call and the evaluation are timed separately. The bf16 masks
are compared with the fp32 ones entry by entry, and both pruned models are evaluated in
their own dtype and, for the bf16 masks, also as fp32 weights with the bf16 run's zeros (so
the mask's own effect is seen apart from bf16 arithmetic).

    python benchmarks/dtype_bench.py --repeats 2 --eval_limit 8

Writes benchmarks/results/dtype_bench.json and the table between the markers in
BENCHMARKS.md.
"""

from __future__ import annotations

import statistics
import time

import torch
from _common import bench_parser, bench_windows, result_header, save_result

from secateurs.api import WandaPruner
from secateurs.core.model import find_blocks, find_linears, load_model, weight_matrix
from secateurs.evaluate.perplexity import perplexity
from secateurs.jobs.report import replace_marked_section

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    _, blocks = find_blocks(model)
    return {
        f"{i}.{name}": weight_matrix(layer).eq(0).cpu()
        for i, block in enumerate(blocks)
        for name, layer in find_linears(block).items()
    }


def run_once(args, dtype: torch.dtype, windows, eval_windows) -> dict:
    model, _ = load_model(args.model, dtype=dtype)
    start = time.perf_counter()
    WandaPruner(model, batch_size=args.batch_size, progress=False).prune(windows, 0.5)
    prune_s = time.perf_counter() - start
    start = time.perf_counter()
    ppl = perplexity(model, eval_windows, "cpu", 1, False)
    eval_s = (time.perf_counter() - start) / len(eval_windows)
    return {"prune_s": prune_s, "eval_s_per_window": eval_s, "ppl": ppl, "model": model}


def fp32_with_masks(args, zeros: dict[str, torch.Tensor]) -> torch.nn.Module:
    model, _ = load_model(args.model, dtype=torch.float32)
    _, blocks = find_blocks(model)
    with torch.no_grad():
        for i, block in enumerate(blocks):
            for name, layer in find_linears(block).items():
                weight_matrix(layer).masked_fill_(zeros[f"{i}.{name}"], 0)
    return model


def main() -> None:
    parser = bench_parser(__doc__, "dtype_bench")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--eval_limit", type=int, default=8)
    args = parser.parse_args()
    windows, eval_windows = bench_windows(args, args.eval_limit)
    runs: dict[str, list[dict]] = {name: [] for name in DTYPES}
    kept: dict[str, dict[str, torch.Tensor]] = {}
    for _ in range(args.repeats):
        for name, dtype in DTYPES.items():
            row = run_once(args, dtype, windows, eval_windows)
            kept[name] = masks(row.pop("model"))
            runs[name].append(row)
            print(name, row, flush=True)
    differing = sum(int((kept["fp32"][k] != kept["bf16"][k]).sum()) for k in kept["fp32"])
    total = sum(v.numel() for v in kept["fp32"].values())
    mixed = perplexity(fp32_with_masks(args, kept["bf16"]), eval_windows, "cpu", 1, False)
    summary = {
        name: {
            key: statistics.median(r[key] for r in rows)
            for key in ("prune_s", "eval_s_per_window", "ppl")
        }
        for name, rows in runs.items()
    }
    result = result_header(args) | {
        "runs": runs,
        "summary": summary,
        "mask_entries_differing": differing,
        "mask_entries": total,
        "ppl_fp32_weights_bf16_masks": mixed,
    }
    save_result(args, result)
    fp32, bf16 = summary["fp32"], summary["bf16"]
    text = "\n".join(
        [
            f"{args.model}, Wanda 50% unstructured, {args.nsamples} x {args.seqlen} "
            f"{args.dataset} (seed 0), batch {args.batch_size}; perplexity on the first "
            f"{args.eval_limit} test windows; medians of {args.repeats} interleaved runs; "
            f"{result['machine']}; {result['date']}.",
            "",
            "| dtype | prune s | vs fp32 | eval s/window | vs fp32 | perplexity |",
            "|---|---|---|---|---|---|",
            f"| fp32 | {fp32['prune_s']:.1f} | 1.00x | {fp32['eval_s_per_window']:.2f} | 1.00x "
            f"| {fp32['ppl']:.3f} |",
            f"| bf16 | {bf16['prune_s']:.1f} | {bf16['prune_s'] / fp32['prune_s']:.2f}x | "
            f"{bf16['eval_s_per_window']:.2f} | "
            f"{bf16['eval_s_per_window'] / fp32['eval_s_per_window']:.2f}x | {bf16['ppl']:.3f} |",
            "",
            f"bf16 masks differ from fp32 in {differing:,} of {total:,} entries "
            f"({differing / total:.2%}); fp32 weights with the bf16 masks: perplexity "
            f"{mixed:.3f}.",
        ]
    )
    replace_marked_section(args.markdown, "dtype_bench", text)
    print(text)


if __name__ == "__main__":
    main()
