"""Benchmark: the cost of the ``wandg`` gradient pass against plain forward passes.

On the same samples (the scoring half of ``align``, chat-formatted), in one process, with the
runs interleaved over ``--repeats``: the gradient pass at each ``--batch_sizes`` value, one
plain forward pass per sample (what the reference's per-sample loop costs before its backward)
and batched plain forward passes of the same groups of samples. Also checks that every batch
size gives the same scores as batch size 1 (to float rounding).

    python benchmarks/wandg_bench.py --score_nsamples 48

Writes benchmarks/results/wandg_bench.json and its section of BENCHMARKS.md.
"""

from __future__ import annotations

import statistics
import time

import torch
from _common import bench_parser, result_header, save_result

from secateurs.core.model import load_model
from secateurs.core.passes import gradient_magnitudes, length_groups
from secateurs.data.prompts import encode_pairs, load_pairs, sample_pairs
from secateurs.jobs.report import replace_marked_section


def forward_per_sample(model, batch) -> None:
    with torch.inference_mode():
        for row in range(batch.input_ids.shape[0]):
            model(input_ids=batch.input_ids[row : row + 1, : int(batch.lengths[row])])


def forward_batched(model, batch, batch_size: int) -> None:
    with torch.inference_mode():
        for rows in length_groups(batch, batch_size):
            model(input_ids=batch.input_ids[rows, : int(batch.lengths[rows[0]])])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def max_relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-30)) for n in b)


def table_md(result: dict) -> str:
    lines = [
        "| batch size | wandg s | batched forward s | wandg / batched forward "
        "| wandg / per-sample forward | max rel. gap to batch 1 |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['batch_size']} | {row['wandg_s']:.2f} | {row['forward_s']:.2f} "
            f"| {row['wandg_vs_forward']:.2f}x | {row['wandg_vs_per_sample']:.2f}x "
            f"| {row['gap_to_batch_1']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__, "wandg_bench")
    parser.add_argument("--score_nsamples", type=int, default=48)
    parser.add_argument("--batch_sizes", default="1,4,8,16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(v) for v in args.batch_sizes.split(",")]
    model, tokenizer = load_model(args.model)
    pairs = sample_pairs(load_pairs("align"), args.score_nsamples, 0)
    batch = encode_pairs(tokenizer, pairs, args.seqlen)
    tokens = int(batch.lengths.sum())
    times: dict[str, list[float]] = {"per_sample": []}
    scores = {}
    for _ in range(args.repeats):
        times["per_sample"].append(timed(lambda: forward_per_sample(model, batch)))
        for size in sizes:
            times.setdefault(f"forward{size}", []).append(
                timed(lambda size=size: forward_batched(model, batch, size))
            )
            start = time.perf_counter()
            scores[size] = gradient_magnitudes(model, batch, progress=False, batch_size=size)
            times.setdefault(f"wandg{size}", []).append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    rows = [
        {
            "batch_size": size,
            "wandg_s": median[f"wandg{size}"],
            "forward_s": median[f"forward{size}"],
            "wandg_vs_forward": median[f"wandg{size}"] / median[f"forward{size}"],
            "wandg_vs_per_sample": median[f"wandg{size}"] / median["per_sample"],
            "gap_to_batch_1": max_relative_gap(scores[size], scores[sizes[0]]),
        }
        for size in sizes
    ]
    result = result_header(args) | {
        "samples": len(pairs),
        "tokens": tokens,
        "per_sample_forward_s": median["per_sample"],
        "times": times,
        "rows": rows,
    }
    save_result(args, result)
    body = (
        "### wandg cost (`benchmarks/wandg_bench.py`)\n\n"
        f"{args.model}, {len(pairs)} `align` scoring pairs ({tokens} tokens, chat template), "
        f"medians of {args.repeats} interleaved repeats; one plain forward per sample: "
        f"{median['per_sample']:.2f} s. {result['machine']}; {result['date']}.\n\n"
        f"{table_md(result)}"
    )
    replace_marked_section(args.markdown, "wandg_bench", body)
    print(body)


if __name__ == "__main__":
    main()
