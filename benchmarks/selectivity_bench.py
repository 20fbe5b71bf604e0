"""Benchmark: what the selectivity statistics cost, and how close streaming is to exact.

On SmolLM2 + wiki-sample at 50% unstructured it prunes, in turn and ``--repeats`` times,
with wanda, wanda_select (streamed histograms, the default) and wanda_select with exact
quantiles (every activation kept). It reports the median prune time of each against wanda
measured in the same run, the peak resident memory while pruning, the bytes the statistics
of the widest layer input hold, and, on the same dense activations of blocks 0, 10 and 20,
the largest difference between the streamed and the exact IDF and spikiness.

    python benchmarks/selectivity_bench.py               # 32 x 512 calibration, 3 repeats

Writes benchmarks/results/selectivity_bench.json and a section of BENCHMARKS.md.
"""

from __future__ import annotations

import gc
import json
import statistics
from pathlib import Path

import torch
from _common import bench_parser, bench_windows, result_header, save_result

from secateurs.api import MethodPruner
from secateurs.core.model import (
    find_blocks,
    find_linears,
    load_config,
    load_model,
    weight_matrix,
)
from secateurs.core.profiling import measure
from secateurs.core.stats import ActivationStats, MagnitudeHistogram, StatsRequest
from secateurs.jobs.report import replace_marked_section
from secateurs.methods.selectivity import SelectivityOptions, channel_idf

SETTINGS = {
    "wanda": ("wanda", None),  # no selectivity statistics (held: 0)
    "wanda_select (streamed)": ("wanda_select", SelectivityOptions()),
    "wanda_select (exact)": ("wanda_select", SelectivityOptions(exact=True)),
}


def run_once(args, label: str, windows) -> dict:
    method, options = SETTINGS[label]
    model, _ = load_model(args.model)
    pruner = MethodPruner(
        model, method, options=options, batch_size=args.batch_size, progress=False
    )
    gc.collect()
    with measure() as timing:
        report = pruner.prune(windows, 0.5, "unstructured")
    row = {
        "setting": label,
        "prune_s": timing.seconds,
        "calibrate_s": report.seconds["calibrate"],
        "peak_rss": timing.peak_rss,
        "start_rss": timing.start_rss,
    }
    del model, pruner
    gc.collect()
    return row


def accuracy_on_dense(args, windows, every: int = 10) -> dict:
    """Streamed and exact statistics of the very same dense activations, every few blocks."""
    model, _ = load_model(args.model)
    _, blocks = find_blocks(model)
    pairs: dict[str, tuple[ActivationStats, ActivationStats]] = {}
    handles = []
    for index in range(0, len(blocks), every):
        for name, layer in find_linears(blocks[index]).items():
            width = weight_matrix(layer).shape[1]
            pairs[f"{index}.{name}"] = tuple(
                ActivationStats(width, request=StatsRequest(selectivity=options.thresholds()))
                for options in (SelectivityOptions(), SelectivityOptions(exact=True))
            )

            def hook(_module, inputs, _output, key=f"{index}.{name}") -> None:
                for stats in pairs[key]:
                    stats.add_batch(inputs[0])

            handles.append(layer.register_forward_hook(hook))
    with torch.no_grad():
        for start in range(0, windows.shape[0], args.batch_size):
            model(windows[start : start + args.batch_size], use_cache=False)
    for handle in handles:
        handle.remove()
    form = SelectivityOptions()  # the IDF in the default form, as the run's scores read it
    streamed = {k: (channel_idf(a, form), a.spikiness) for k, (a, _) in pairs.items()}
    exact = {k: (channel_idf(b, form), b.spikiness) for k, (_, b) in pairs.items()}
    return differences(streamed, exact)


def _tensors(obj: object) -> list[torch.Tensor]:
    """Every tensor an object holds, directly, in lists, or in a histogram it owns."""
    found = []
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, list):
            found += [v for v in value if isinstance(v, torch.Tensor)]
        elif isinstance(value, MagnitudeHistogram):
            found += _tensors(value)
    return found


def held_bytes(options: SelectivityOptions, channels: int, tokens: int) -> int:
    """Bytes the selectivity statistics of one layer input hold after ``tokens`` tokens."""
    stats = ActivationStats(channels, request=StatsRequest(selectivity=options.thresholds()))
    stats.add_batch(torch.zeros(1, tokens, channels))
    return sum(t.numel() * t.element_size() for t in _tensors(stats._selectivity))


def differences(streamed: dict, exact: dict) -> dict:
    idf = torch.cat([(streamed[k][0] - exact[k][0]).abs() for k in exact])
    spiky = torch.cat([((streamed[k][1] - exact[k][1]) / exact[k][1]).abs() for k in exact])
    rate = torch.cat([(torch.exp(-streamed[k][0]) - torch.exp(-exact[k][0])).abs() for k in exact])
    return {
        "layers": len(exact),
        "channels": int(idf.numel()),
        "idf_abs_max": float(idf.max()),
        "idf_abs_median": float(idf.median()),
        "active_rate_abs_max": float(rate.max()),
        "spikiness_rel_max": float(spiky.max()),
        "spikiness_rel_median": float(spiky.median()),
    }


def markdown(result: dict) -> str:
    cfg, rows = result["settings"], result["summary"]
    lines = [
        f"SmolLM2-135M (fp32), 50% unstructured, calibration {cfg['nsamples']} x {cfg['seqlen']} "
        f"tokens of `wiki-sample`, batch {cfg['batch_size']}; medians of {cfg['repeats']} "
        f"interleaved repeats. Machine: {result['machine']}; {result['date']}.",
        "",
        "| setting | prune s (median) | vs wanda | calibrate s (median) | vs wanda "
        "| RSS growth while pruning (max) | statistics held, widest layer input |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['prune_s']:.1f} | {r['vs_wanda']:.2f}x "
            f"| {r['calibrate_s']:.1f} | {r['calibrate_vs_wanda']:.2f}x "
            f"| {r['peak_rss'] / 2**20:,.0f} MiB | {r['held'] / 2**20:,.2f} MiB |"
        )
    d = result["streamed_vs_exact"]
    lines += [
        "",
        f"Streamed against exact on the same dense activations of {d['layers']} layers "
        "(blocks 0, 10, 20) "
        f"({d['channels']:,} channels): active rate within {d['active_rate_abs_max']:.4f}, "
        f"IDF within {d['idf_abs_max']:.4f} (median {d['idf_abs_median']:.5f}), spikiness "
        f"within {d['spikiness_rel_max']:.2%} relative (median {d['spikiness_rel_median']:.3%}).",
    ]
    return "\n".join(lines)


def summarize(args, rows: list[dict]) -> list[dict]:
    """Median prune and calibrate times against wanda's, memory growth, statistics held."""
    config = load_config(args.model)
    widest = max(config.hidden_size, config.intermediate_size)
    tokens = args.nsamples * args.seqlen

    def median(label: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["setting"] == label)

    summary = []
    for label, (_, options) in SETTINGS.items():
        summary.append(
            {
                "setting": label,
                "prune_s": median(label, "prune_s"),
                "vs_wanda": median(label, "prune_s") / median("wanda", "prune_s"),
                "calibrate_s": median(label, "calibrate_s"),
                "calibrate_vs_wanda": median(label, "calibrate_s") / median("wanda", "calibrate_s"),
                "peak_rss": max(
                    r["peak_rss"] - r["start_rss"] for r in rows if r["setting"] == label
                ),
                "held": 0 if label == "wanda" else held_bytes(options, widest, tokens),
            }
        )
    return summary


def main() -> None:
    parser = bench_parser(__doc__, "selectivity_bench")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    windows, _ = bench_windows(args)
    rows = []
    for repeat in range(args.repeats):
        for label in SETTINGS:
            rows.append(run_once(args, label, windows) | {"repeat": repeat})
            print(json.dumps(rows[-1]), flush=True)
    result = {
        **result_header(args),
        "rows": rows,
        "summary": summarize(args, rows),
        "streamed_vs_exact": accuracy_on_dense(args, windows),
    }
    save_result(args, result)
    text = markdown(result)
    print(text)
    replace_marked_section(Path(args.markdown), "selectivity_bench", text)


if __name__ == "__main__":
    main()
