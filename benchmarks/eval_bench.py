"""Benchmark: seconds per evaluation window, whole logits vs the chunked output head.

`full_logits_nll` is how evaluation worked before: the model returns the logits of every
token of the window at once (512 x vocabulary floats). `window_nll` applies the output head
to a few tokens at a time. Both score the same windows, taking turns, in one run; rows give
the median seconds per window, the largest logits tensor each holds, and the perplexity of
both on those windows (they must agree to 1e-4).

    python benchmarks/eval_bench.py --models smollm2-135m,gemma3-270m --windows 6

Writes benchmarks/results/eval_bench.json and the table between the markers in BENCHMARKS.md.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from _common import bench_parser, result_header, save_result

from secateurs.core.model import load_config, load_model
from secateurs.data import text as data
from secateurs.evaluate.perplexity import LOGIT_CHUNK_BYTES, full_logits_nll, window_nll
from secateurs.jobs.report import replace_marked_section
from secateurs.jobs.session import load_eval_windows


def measure(name: str, seqlen: int, dataset: str, count: int) -> dict:
    model, tokenizer = load_model(name)
    bos = data.window_bos_token("auto", load_config(name), tokenizer)
    windows = load_eval_windows(tokenizer, dataset, seqlen, count, bos)
    vocab = model.get_output_embeddings().weight.shape[0]
    ways = {"whole logits": full_logits_nll, "chunked head": window_nll}
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    nll: dict[str, list[float]] = {way: [] for way in ways}
    with torch.no_grad():
        window_nll(model, windows[:1])  # warm-up
        for window in windows.split(1):
            for way, fn in ways.items():
                start = time.perf_counter()
                nll[way].append(float(fn(model, window)))
                seconds[way].append(time.perf_counter() - start)
    whole = (seqlen - 1) * vocab * 4
    return {
        "model": name,
        "vocab": vocab,
        "windows": windows.shape[0],
        "bos": bos,
        "median_s": {way: statistics.median(v) for way, v in seconds.items()},
        "perplexity": {way: math.exp(sum(v) / len(v)) for way, v in nll.items()},
        "largest_logits_bytes": {
            "whole logits": whole,
            "chunked head": min(whole, LOGIT_CHUNK_BYTES),
        },
    }


def main() -> None:
    parser = bench_parser(__doc__, "eval_bench")
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--windows", type=int, default=6)
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        rows.append(measure(name, args.seqlen, args.dataset, args.windows))
        print(rows[-1], flush=True)
    result = result_header(args) | {"rows": rows}
    save_result(args, result)
    lines = [
        f"Evaluation on `{args.dataset}`, first {args.windows} test windows of {args.seqlen} "
        f"tokens, one window per forward, the two ways taking turns, medians; "
        f"{result['machine']}, {result['date']}.",
        "",
        "| model | vocabulary | s/window whole logits | s/window chunked | ratio "
        "| largest logits held (MB) whole / chunked | perplexity whole / chunked |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s, mb, ppl = row["median_s"], row["largest_logits_bytes"], row["perplexity"]
        lines.append(
            f"| {row['model']} | {row['vocab']} | {s['whole logits']:.2f} "
            f"| {s['chunked head']:.2f} | {s['chunked head'] / s['whole logits']:.2f}x "
            f"| {mb['whole logits'] / 2**20:.0f} / {mb['chunked head'] / 2**20:.0f} "
            f"| {ppl['whole logits']:.4f} / {ppl['chunked head']:.4f} |"
        )
    replace_marked_section(args.markdown, "eval_bench", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
