"""Benchmark: dense / magnitude / wanda at 50% unstructured, 2:4 and 4:8 on SmolLM2 + wiki-sample.

For every row it records perplexity on the test split, the measured sparsity, the prune wall
time, the peak resident memory during pruning, and, in the same run, the time of one plain
forward pass of the same calibration windows through the decoder (the floor: any sequential
method makes two such passes, one through each dense block and one through each pruned block).

    python benchmarks/prune_bench.py                 # CPU settings of the core issue
    python benchmarks/prune_bench.py --eval_limit 8  # a quick look

Writes benchmarks/results/prune_bench.json and the table between the markers in BENCHMARKS.md.

``--suite methods`` runs the stronger methods instead: wanda, sparsegpt, ria, wanda + OWL and
sparsegpt + OWL at 50% and 70% unstructured and 2:4 (OWL cannot shape 2:4), with each prune
time divided by Wanda's at the same setting in the same run. It writes
benchmarks/results/prune_bench_methods.json and its own section of BENCHMARKS.md, after every
row (a run cut short keeps what it finished).

``--rows wanda:uniform:unstructured:0.7,...`` runs only those rows (method:allocation:pattern:
target) and keeps the rows the results file already holds, replacing those it reruns; every
row carries the id of the run that made it, and a time ratio is given only against a Wanda row
of the same run.

``--suite timing --repeats N`` times the pruning call alone (no evaluation) of wanda, sparsegpt,
ria and wanda + OWL at 50% unstructured, interleaved N times, and reports the median of each
against Wanda's: on a shared machine, the per-row times of the methods suite are single shots.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path

import torch
from _common import bench_parser, bench_windows, result_header, save_result

from secateurs.api import MethodPruner
from secateurs.core.model import load_model, model_size_bytes
from secateurs.core.patterns import effective_ratio, parse_pattern
from secateurs.core.profiling import measure, rss_bytes
from secateurs.evaluate.perplexity import check_sparsity, perplexity
from secateurs.jobs.report import replace_marked_section
from secateurs.methods.allocation import allocate

RUNS = [
    ("magnitude", "unstructured"),
    ("wanda", "unstructured"),
    ("magnitude", "2:4"),
    ("wanda", "2:4"),
    ("magnitude", "4:8"),
    ("wanda", "4:8"),
]


# (method, allocation, sparsity type, ratio), grouped by setting, Wanda first in each group
METHOD_RUNS = [
    (method, allocation, sparsity_type, ratio)
    for sparsity_type, ratio in (("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5))
    for method, allocation in (
        ("wanda", "uniform"),
        ("sparsegpt", "uniform"),
        ("ria", "uniform"),
        ("wanda", "owl"),
        ("sparsegpt", "owl"),
    )
    if allocation == "uniform" or sparsity_type == "unstructured"
]


TIMING_RUNS = [
    ("wanda", "uniform"),
    ("sparsegpt", "uniform"),
    ("ria", "uniform"),
    ("wanda", "owl"),
]


def forward_floor(model, windows: torch.Tensor, batch_size: int) -> float:
    """Seconds for one plain forward pass of the windows through the decoder (no LM head)."""
    decoder = model.get_decoder()
    start = time.perf_counter()
    with torch.no_grad():
        for offset in range(0, windows.shape[0], batch_size):
            decoder(input_ids=windows[offset : offset + batch_size], use_cache=False)
    return time.perf_counter() - start


def run_row(args, method: str, sparsity_type: str, windows, eval_windows) -> dict:
    model, _ = load_model(args.model)
    row: dict = {"method": method, "pattern": sparsity_type}
    if method == "dense":
        row |= {"sparsity": check_sparsity(model).overall}
    else:
        pruner = MethodPruner(model, method, batch_size=args.batch_size, progress=False)
        pattern = parse_pattern(sparsity_type, pruner.default_scope)
        ratio = effective_ratio(pattern, 0.5)
        floors = []
        if pruner.calibrated:
            floors = [forward_floor(model, windows, args.batch_size) for _ in range(args.repeats)]
        gc.collect()
        with measure() as memory:
            report = pruner.prune(windows, ratio, sparsity_type)
        check = check_sparsity(model, pattern, ratio)
        row |= {
            "sparsity": check.overall,
            "pattern_ok": check.ok,
            "prune_s": memory.seconds,
            "phases_s": report.seconds,
            "peak_rss": memory.peak_rss,
            "rss_before_prune": memory.start_rss,
        }
        if floors:
            floor = statistics.median(floors)
            row |= {"forward_s": floor, "prune_over_two_forwards": memory.seconds / (2 * floor)}
    start = time.perf_counter()
    row["ppl"] = perplexity(model, eval_windows, batch_size=args.eval_batch_size, progress=False)
    row["eval_s"] = time.perf_counter() - start
    del model
    gc.collect()
    return row


def run_method_row(args, run: tuple, windows, eval_windows) -> dict:
    """One stronger-method row: prune (with the OWL pass, if any), check, evaluate."""
    method, allocation, sparsity_type, target = run
    model, _ = load_model(args.model)
    pruner = MethodPruner(model, method, batch_size=args.batch_size, progress=False)
    pattern = parse_pattern(sparsity_type, pruner.default_scope)
    ratio = effective_ratio(pattern, target)
    gc.collect()
    with measure() as memory:
        plan = allocate(
            model, windows, allocation, ratio, batch_size=args.batch_size, progress=False
        )
        report = pruner.prune(windows, ratio, sparsity_type, block_ratios=plan.ratios)
    check = check_sparsity(model, pattern, ratio, plan.ratios)
    start = time.perf_counter()
    ppl = perplexity(model, eval_windows, batch_size=args.eval_batch_size, progress=False)
    row = {
        "method": method,
        "allocation": allocation,
        "pattern": sparsity_type,
        "target": ratio,
        "ppl": ppl,
        "sparsity": check.overall,
        "pattern_ok": check.ok,
        "prune_s": memory.seconds,
        "outlier_pass_s": plan.seconds,
        "block_ratios": plan.ratios,
        "phases_s": report.seconds,
        "peak_rss": memory.peak_rss,
        "rss_before_prune": memory.start_rss,
        "eval_s": time.perf_counter() - start,
    }
    del model
    gc.collect()
    return row


def add_wanda_ratios(rows: list[dict]) -> None:
    """Each row's prune time and perplexity against uniform Wanda at its setting."""
    wanda = {
        (r["pattern"], r["target"]): r
        for r in rows
        if r["method"] == "wanda" and r["allocation"] == "uniform"
    }
    for row in rows:
        base = wanda.get((row["pattern"], row["target"]))
        same_run = base is not None and base.get("run") == row.get("run")
        row["time_vs_wanda"] = row["prune_s"] / base["prune_s"] if same_run else None
        row["ppl_vs_wanda"] = None if base is None else row["ppl"] / base["ppl"] - 1


def method_table(rows: list[dict]) -> str:
    head = (
        "| method | allocation | pattern | target | ppl | vs wanda | sparsity | prune s "
        "| time / wanda | OWL pass s | peak RSS during prune |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = []
    for r in rows:
        change = r.get("ppl_vs_wanda")
        owl = r["outlier_pass_s"] if r["allocation"] == "owl" else None
        body.append(
            f"| {r['method']} | {r['allocation']} | {r['pattern']} | {r['target']:.2f} "
            f"| {r['ppl']:.2f} | {'n/a' if change is None else f'{change:+.1%}'} "
            f"| {r['sparsity']:.4f} | {r['prune_s']:.1f} | {fmt(r.get('time_vs_wanda'), '.2f')} "
            f"| {fmt(owl, '.1f')} | {r['peak_rss'] / 2**20:,.0f} MiB |"
        )
    return head + "\n".join(body)


def update_methods_md(result: dict, path: Path) -> None:
    cfg = result["settings"]
    body = (
        f"SmolLM2-135M (fp32) on `wiki-sample`: calibration {cfg['nsamples']} x {cfg['seqlen']} "
        f"tokens (seed 0, batch {cfg['batch_size']}), perplexity on the first "
        f"{result['eval_windows']} test windows of {cfg['seqlen']} (dense: "
        f"{result['dense_ppl']:.2f}). Machine: {result['machine']}; {result['date']}. OWL: "
        "threshold 5, lambda 0.08.\n\n"
        f"{method_table(result['rows'])}"
    )
    replace_marked_section(path, "prune_bench_methods", body)


def row_key(row: dict) -> tuple:
    return (row["method"], row["allocation"], row["pattern"], round(row["target"], 6))


def parse_rows(text: str | None) -> list[tuple]:
    """The runs named by ``--rows`` (all of METHOD_RUNS when None)."""
    if text is None:
        return list(METHOD_RUNS)
    runs = []
    for item in text.split(","):
        method, allocation, *pattern, target = item.strip().split(":")
        runs.append((method, allocation, ":".join(pattern), float(target)))
    return runs


def previous_rows(args) -> tuple[list[dict], float | None]:
    """Rows (and dense perplexity) of the results file, kept when only some rows rerun."""
    path = Path(args.out)
    if args.rows is None or not path.exists():
        return [], None
    saved = json.loads(path.read_text())
    if saved.get("eval_windows") is None or saved["settings"]["nsamples"] != args.nsamples:
        return [], None
    return saved["rows"], saved.get("dense_ppl")


def run_methods(args, windows, eval_windows) -> None:
    """The stronger-method suite; results saved after every row."""
    kept, dense_ppl = previous_rows(args)
    if dense_ppl is None:
        dense, _ = load_model(args.model)
        dense_ppl = perplexity(dense, eval_windows, batch_size=args.eval_batch_size, progress=False)
        del dense
        gc.collect()
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    order = [row_key(r) for r in kept]
    rows: dict[tuple, dict] = {row_key(r): r for r in kept}
    for run in parse_rows(args.rows):
        row = run_method_row(args, run, windows, eval_windows) | {"run": run_id}
        if row_key(row) not in rows:
            order.append(row_key(row))
        rows[row_key(row)] = row
        ordered = [rows[k] for k in order]
        add_wanda_ratios(ordered)
        print(json.dumps({k: v for k, v in row.items() if k != "block_ratios"}), flush=True)
        result = {
            **result_header(args),
            "eval_windows": int(eval_windows.shape[0]),
            "dense_ppl": dense_ppl,
            "rows": ordered,
        }
        save_result(args, result)
        update_methods_md(result, Path(args.markdown))
    print(method_table([rows[k] for k in order]))


def time_prune(args, method: str, allocation: str, windows) -> dict:
    """Wall time and peak memory of one pruning call at 50% unstructured (no evaluation)."""
    model, _ = load_model(args.model)
    pruner = MethodPruner(model, method, batch_size=args.batch_size, progress=False)
    gc.collect()
    with measure() as memory:
        plan = allocate(model, windows, allocation, 0.5, batch_size=args.batch_size, progress=False)
        pruner.prune(windows, 0.5, "unstructured", block_ratios=plan.ratios)
    del model
    gc.collect()
    return {
        "method": method,
        "allocation": allocation,
        "prune_s": memory.seconds,
        "outlier_pass_s": plan.seconds,
        "peak_rss": memory.peak_rss,
    }


def timing_table(rows: list[dict]) -> str:
    head = (
        "| method | allocation | prune s (median) | all runs s | time vs wanda | "
        "peak RSS during prune |\n|---|---|---|---|---|---|\n"
    )
    body = [
        f"| {r['method']} | {r['allocation']} | {r['prune_s']:.1f} "
        f"| {', '.join(f'{t:.1f}' for t in r['runs_s'])} | {r['time_vs_wanda']:.2f}x "
        f"| {r['peak_rss'] / 2**20:,.0f} MiB |"
        for r in rows
    ]
    return head + "\n".join(body)


def run_timing(args, windows) -> None:
    """Interleaved prune-only repeats; medians and their ratio to Wanda's."""
    runs = [
        time_prune(args, method, allocation, windows)
        for _ in range(args.repeats)
        for method, allocation in TIMING_RUNS
    ]
    rows = []
    for method, allocation in TIMING_RUNS:
        mine = [r for r in runs if (r["method"], r["allocation"]) == (method, allocation)]
        rows.append(
            {
                "method": method,
                "allocation": allocation,
                "runs_s": [r["prune_s"] for r in mine],
                "prune_s": statistics.median(r["prune_s"] for r in mine),
                "peak_rss": max(r["peak_rss"] for r in mine),
            }
        )
    for row in rows:
        row["time_vs_wanda"] = row["prune_s"] / rows[0]["prune_s"]
    result = {**result_header(args), "runs": runs, "rows": rows}
    save_result(args, result)
    print(timing_table(rows))
    cfg = result["settings"]
    body = (
        f"Prune time alone at 50% unstructured, calibration {cfg['nsamples']} x "
        f"{cfg['seqlen']} tokens, {args.repeats} interleaved repeats, medians. Machine: "
        f"{result['machine']}; {result['date']}.\n\n{timing_table(rows)}"
    )
    replace_marked_section(Path(args.markdown), "prune_bench_timing", body)


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    head = (
        "| method | pattern | ppl | sparsity | prune s | 1 forward s | prune / 2 forwards "
        "| peak RSS during prune |\n|---|---|---|---|---|---|---|---|\n"
    )
    body = []
    for r in rows:
        peak = r.get("peak_rss")
        body.append(
            f"| {r['method']} | {r['pattern']} | {r['ppl']:.2f} | {r['sparsity']:.4f} "
            f"| {fmt(r.get('prune_s'), '.1f')} | {fmt(r.get('forward_s'), '.1f')} "
            f"| {fmt(r.get('prune_over_two_forwards'), '.2f')} "
            f"| {'n/a' if peak is None else f'{peak / 2**20:,.0f} MiB'} |"
        )
    return head + "\n".join(body)


def memory_note(result: dict) -> str:
    """Peak during pruning against 1.5x the fp32 model plus the calibration activations."""
    wanda = [r for r in result["rows"] if r["method"] == "wanda" and r.get("peak_rss")]
    if not wanda:
        return ""
    base, model_bytes = result["rss_runtime"], result["model_fp32_bytes"]
    acts = result["activation_bytes"]
    worst = max(r["peak_rss"] for r in wanda) - base
    budget = 1.5 * model_bytes + acts
    return (
        f"Memory: the largest Wanda peak is {worst / 2**20:,.0f} MiB above the "
        f"{base / 2**20:,.0f} MiB the process held before loading the model (libraries, "
        "tokenizer, data), against a "
        f"budget of 1.5 x {model_bytes / 2**20:,.0f} MiB (fp32 model) + "
        f"{acts / 2**20:,.0f} MiB (one buffer of calibration activations) = "
        f"{budget / 2**20:,.0f} MiB: ratio {worst / budget:.2f}."
    )


def update_benchmarks_md(result: dict, path: Path) -> None:
    cfg = result["settings"]
    body = (
        f"SmolLM2-135M (fp32) on `wiki-sample`: calibration {cfg['nsamples']} x {cfg['seqlen']} "
        f"tokens (seed 0, batch {cfg['batch_size']}), perplexity on "
        f"{result['eval_windows']} test windows of {cfg['seqlen']}. Machine: {result['machine']}; "
        f"{result['date']}. Target sparsity 0.5.\n\n"
        f"{table(result['rows'])}\n\n{memory_note(result)}"
    )
    replace_marked_section(path, "prune_bench", body)


def main() -> None:
    parser = bench_parser(__doc__, "prune_bench")
    parser.add_argument("--eval_batch_size", type=int, default=4)
    parser.add_argument("--eval_limit", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1, help="forward-floor timings per row")
    parser.add_argument("--suite", choices=("core", "methods", "timing"), default="core")
    parser.add_argument("--rows", default=None, help="methods suite: only these rows (see above)")
    args = parser.parse_args()

    windows, eval_windows = bench_windows(args, args.eval_limit)
    if args.suite == "timing":
        if args.out.endswith("prune_bench.json"):
            args.out = args.out.replace("prune_bench.json", "prune_bench_timing.json")
        run_timing(args, windows)
        return
    if args.suite == "methods":
        if args.out.endswith("prune_bench.json"):
            args.out = args.out.replace("prune_bench.json", "prune_bench_methods.json")
        run_methods(args, windows, eval_windows)
        return
    # What the process holds before any model: interpreter, libraries, tokenizer, token ids.
    gc.collect()
    rss_runtime = rss_bytes()
    probe, _ = load_model(args.model)
    model_bytes = model_size_bytes(probe)
    hidden = probe.get_input_embeddings().embedding_dim
    del probe
    gc.collect()

    rows = []
    for method, sparsity_type in [("dense", "-"), *RUNS]:
        row = run_row(args, method, sparsity_type, windows, eval_windows)
        rows.append(row)
        print(json.dumps(row), flush=True)

    result = {
        **result_header(args),
        "eval_windows": int(eval_windows.shape[0]),
        "rss_runtime": rss_runtime,
        "model_fp32_bytes": model_bytes,
        "activation_bytes": args.nsamples * args.seqlen * hidden * 4,
        "rows": rows,
    }
    save_result(args, result)
    print(table(rows))
    print(memory_note(result))
    if args.eval_limit is None:
        update_benchmarks_md(result, Path(args.markdown))


if __name__ == "__main__":
    main()
