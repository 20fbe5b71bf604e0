"""Benchmark: how close the block forward comes to this machine's matrix-multiply peak.

1. The peak: the best rate of large square matrix multiplies (fp32, and bf16 where the device
   has it), and of the model's own GEMM shapes (tokens x hidden times hidden x out).
2. One decoder block's forward over all calibration windows at several batch sizes: plain
   (what propagation does), and with the statistics hooks of a Wanda calibration pass; FLOPs
   counted (the block's linear layers, plus QK^T and PV of attention), rate and share of peak.
3. The top operators of one plain block forward (torch.profiler), and evaluation seconds per
   window with its rate.

    python benchmarks/speed_bench.py

Writes benchmarks/results/speed_bench.json and its section of BENCHMARKS.md.
"""

from __future__ import annotations

import torch
from _common import bench_parser, bench_windows, result_header, save_result
from torch.profiler import ProfilerActivity, profile

from secateurs.core.engine import calibrate_block, run_block
from secateurs.core.model import (
    capture_block_inputs,
    find_blocks,
    find_linears,
    load_model,
    weight_matrix,
)
from secateurs.core.stats import StatsRequest
from secateurs.evaluate.perplexity import perplexity
from secateurs.evaluate.speed import median_seconds
from secateurs.jobs.report import replace_marked_section


def gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, repeats: int) -> float:
    """FLOP/s of ``(m, k) @ (k, n)`` in ``dtype``, the median of ``repeats`` timed calls."""
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b, out=out)
    return 2 * m * k * n / median_seconds(lambda: torch.mm(a, b, out=out), repeats, warmup=0)


def has_fast_bf16() -> bool:
    with open("/proc/cpuinfo") as info:
        flags = info.read()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def block_flops(block, config, windows: int, seqlen: int) -> dict[str, float]:
    """FLOPs of one block's forward over ``windows`` windows of ``seqlen`` tokens."""
    params = sum(weight_matrix(layer).numel() for layer in find_linears(block).values())
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    linear = 2.0 * windows * seqlen * params
    attention = 4.0 * windows * heads * seqlen * seqlen * head_dim
    return {"linear": linear, "attention": attention, "total": linear + attention}


def profile_table(block, inputs, batch_size: int, rows: int = 8) -> list[dict]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_block(block, inputs, batch_size, keep_outputs=True)
    averages = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in averages)
    return [
        {"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total}
        for e in averages[:rows]
    ]


def main() -> None:
    parser = bench_parser(__doc__, "speed_bench")
    parser.add_argument("--batch_sizes", default="1,2,4,8,16")
    parser.add_argument("--block", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval_windows", type=int, default=4)
    args = parser.parse_args()
    windows, eval_windows = bench_windows(args, args.eval_windows)
    model, _ = load_model(args.model)
    config = model.config
    _, blocks = find_blocks(model)
    block = blocks[args.block]
    hidden, inter = config.hidden_size, config.intermediate_size
    tokens = args.nsamples * args.seqlen

    peak = {
        "fp32_square": max(gemm_rate(n, n, n, torch.float32, args.repeats) for n in (2048, 4096))
    }
    peak["fp32_model_shape"] = gemm_rate(tokens // 4, hidden, inter, torch.float32, args.repeats)
    if has_fast_bf16():
        peak["bf16_square"] = gemm_rate(4096, 4096, 4096, torch.bfloat16, args.repeats)
    fp32_peak = max(peak["fp32_square"], peak["fp32_model_shape"])
    flops = block_flops(block, config, args.nsamples, args.seqlen)

    rows = []
    for size in (int(v) for v in args.batch_sizes.split(",")):
        inputs = capture_block_inputs(model, windows, torch.device("cpu"), size)
        plain = median_seconds(
            lambda inputs=inputs, size=size: run_block(block, inputs, size, True),
            args.repeats,
            warmup=0,
        )
        calibrate = median_seconds(
            lambda inputs=inputs, size=size: calibrate_block(
                block, find_linears(block), inputs, size, StatsRequest(), None
            ),
            args.repeats,
            warmup=0,
        )
        rows.append(
            {
                "batch_size": size,
                "forward_s": plain,
                "calibrate_s": calibrate,
                "forward_gflops": flops["total"] / plain / 1e9,
                "share_of_peak": flops["total"] / plain / fp32_peak,
                "calibrate_over_forward": calibrate / plain,
            }
        )
        print(rows[-1], flush=True)
    best = min(rows, key=lambda r: r["forward_s"])
    inputs = capture_block_inputs(model, windows, torch.device("cpu"), best["batch_size"])
    top = profile_table(block, inputs, best["batch_size"])

    eval_s = (
        median_seconds(
            lambda: perplexity(model, eval_windows, progress=False),
            max(1, args.repeats // 2),
            warmup=0,
        )
        / eval_windows.shape[0]
    )
    eval_flops = (
        sum(block_flops(b, config, 1, args.seqlen)["total"] for b in blocks)
        + 2.0 * args.seqlen * hidden * config.vocab_size
    )
    result = result_header(args) | {
        "peak_flops": peak,
        "block_flops": flops,
        "rows": rows,
        "profile": top,
        "eval_s_per_window": eval_s,
        "eval_gflops": eval_flops / eval_s / 1e9,
        "eval_share_of_peak": eval_flops / eval_s / fp32_peak,
    }
    save_result(args, result)
    body = markdown(args, result, fp32_peak)
    replace_marked_section(args.markdown, "speed_bench", body)
    print(body)


def markdown(args, result: dict, fp32_peak: float) -> str:
    peak = result["peak_flops"]
    lines = [
        "### Block forward against the matrix-multiply peak (`benchmarks/speed_bench.py`)",
        "",
        f"{args.model}, block {args.block}, {args.nsamples} x {args.seqlen} windows; "
        f"{result['machine']}; {result['date']}. Peak (median of {args.repeats}): fp32 square "
        f"{peak['fp32_square'] / 1e9:.0f} GFLOP/s, fp32 at the model's MLP shape "
        f"{peak['fp32_model_shape'] / 1e9:.0f} GFLOP/s"
        + (
            f", bf16 square {peak['bf16_square'] / 1e9:.0f} GFLOP/s"
            if "bf16_square" in peak
            else ""
        )
        + f". One block forward is {result['block_flops']['total'] / 1e9:.0f} GFLOP "
        f"({result['block_flops']['attention'] / result['block_flops']['total']:.0%} attention).",
        "",
        "| batch size | forward s | GFLOP/s | share of fp32 peak | calibration pass s "
        "| calibration / forward |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['batch_size']} | {r['forward_s']:.3f} | {r['forward_gflops']:.0f} "
            f"| {r['share_of_peak']:.0%} | {r['calibrate_s']:.3f} "
            f"| {r['calibrate_over_forward']:.2f}x |"
        )
    lines += ["", "Top operators of one block forward (self CPU time):", ""]
    lines += ["| operator | seconds | share |", "|---|---|---|"]
    lines += [f"| `{p['op']}` | {p['self_s']:.3f} | {p['share']:.0%} |" for p in result["profile"]]
    lines += [
        "",
        f"Evaluation: {result['eval_s_per_window']:.2f} s per window of {args.seqlen} "
        f"({result['eval_gflops']:.0f} GFLOP/s, {result['eval_share_of_peak']:.0%} of fp32 peak).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
