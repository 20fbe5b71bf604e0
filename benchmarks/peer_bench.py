"""Peer benchmark: secateurs against llm-compressor on the same model, data and threads.

llm-compressor (``llmcompressor==0.14.0.1``) runs its Wanda and SparseGPT modifiers; secateurs
runs wanda, sparsegpt, wanda + least-squares recovery and the frontier's methods (``alps``,
``sparsegpt+recp``, ``alps+recp``: ``frontier_bench.py``'s rows), which llm-compressor lacks and
which are compared with its SparseGPT; both at 50% unstructured and 2:4.
Every run is a process of its own (``_peer_worker.py``; llm-compressor's under ``.venv-peer``,
made by ``make peer-venv``, because it pins an older transformers) on the same fp32 model
folder, the same calibration token ids and the same thread count; the runs are interleaved
over ``--repeats``. Each pruned model is evaluated here, by the same code, on the same test
windows.

    make peer-venv
    python benchmarks/peer_bench.py --eval_limit 32

Writes benchmarks/results/peer_bench.json and its section of BENCHMARKS.md.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from _common import (
    ROOT,
    bench_parser,
    bench_windows,
    result_header,
    run_isolated,
    save_result,
)
from safetensors.torch import load_file, save_file

from secateurs.core.model import load_model, resolve_model_path
from secateurs.core.patterns import parse_pattern
from secateurs.evaluate.perplexity import check_sparsity, perplexity
from secateurs.jobs.report import replace_marked_section

RUNS = [
    ("wanda", "llmcompressor"),
    ("wanda", "secateurs"),
    ("sparsegpt", "llmcompressor"),
    ("sparsegpt", "secateurs"),
    ("wanda+least_squares", "secateurs"),
    ("alps", "secateurs"),
    ("sparsegpt+recp", "secateurs"),
    ("alps+recp", "secateurs"),
]
PATTERNS = ("unstructured", "2:4")
WORKER = Path(__file__).resolve().parent / "_peer_worker.py"


def run_worker(args, tool: str, method: str, pattern: str, model_dir: Path, ids: Path, out: Path):
    """One pruning process; its timing and memory, read back from its result file."""
    python = args.peer_python if tool == "llmcompressor" else sys.executable
    command = [
        str(python),
        str(WORKER),
        *("--tool", tool, "--method", method, "--pattern", pattern),
        *("--model_dir", str(model_dir), "--calibration", str(ids), "--out", str(out)),
        *("--threads", str(args.threads), "--batch_size", str(args.batch_size)),
    ]
    run_isolated(command, ROOT / "src", f"{tool} {method} {pattern}")
    return json.loads((out / "peer_run.json").read_text())


def evaluate(args, out: Path, pattern: str, eval_windows: torch.Tensor) -> dict:
    """Perplexity and sparsity of the dense model with a run's pruned weights loaded."""
    model, _ = load_model(args.model)
    missing = model.load_state_dict(load_file(out / "pruned_linears.safetensors"), strict=False)
    if missing.unexpected_keys:
        raise RuntimeError(f"pruned weights do not fit the model: {missing.unexpected_keys[:3]}")
    check = check_sparsity(model, parse_pattern(pattern, "layer"), 0.5)
    ppl = perplexity(model, eval_windows, batch_size=args.eval_batch_size, progress=False)
    del model
    gc.collect()
    return {"ppl": ppl, "sparsity": check.overall, "pattern_ok": check.ok}


def mask_agreement(first: Path, second: Path) -> dict:
    """Share of zero-mask entries the two tools' pruned weights disagree on, by block."""
    a = load_file(first / "pruned_linears.safetensors")
    b = load_file(second / "pruned_linears.safetensors")
    by_block: dict[int, list[int]] = {}
    for name, weight in a.items():
        block = int(name.split(".layers.")[1].split(".")[0])
        counts = by_block.setdefault(block, [0, 0])
        counts[0] += int(((weight == 0) != (b[name] == 0)).sum())
        counts[1] += weight.numel()
    shares = {block: differ / total for block, (differ, total) in sorted(by_block.items())}
    total = sum(c[0] for c in by_block.values()) / sum(c[1] for c in by_block.values())
    return {"mask_disagreement": total, "mask_disagreement_by_block": shares}


def summarise(runs: list[dict]) -> list[dict]:
    """Medians over repeats per (method, pattern, tool), with ours/theirs ratios."""
    rows = {}
    for run in runs:
        rows.setdefault((run["method"], run["pattern"], run["tool"]), []).append(run)
    table = []
    for (method, pattern, tool), group in rows.items():
        table.append(
            {
                "method": method,
                "pattern": pattern,
                "tool": tool,
                "repeats": len(group),
                "ppl": group[0]["ppl"],
                "sparsity": group[0]["sparsity"],
                "pattern_ok": group[0]["pattern_ok"],
                "prune_s": statistics.median(r["prune_s"] for r in group),
                "peak_rss": statistics.median(r["peak_rss"] for r in group),
                # the peak above the process's own footprint before pruning (libraries, model)
                "peak_added": statistics.median(
                    r["peak_rss"] - r["rss_before_prune"] for r in group
                ),
            }
        )
    theirs = {(r["method"], r["pattern"]): r for r in table if r["tool"] == "llmcompressor"}
    for row in table:
        # a method llm-compressor lacks is held against its SparseGPT, the yardstick
        peer = theirs.get((row["method"], row["pattern"])) or theirs.get(
            ("sparsegpt", row["pattern"])
        )
        if row["tool"] == "secateurs" and peer is not None:
            row["against"] = f"{peer['method']} (llmcompressor)"
            row["time_ours_over_theirs"] = row["prune_s"] / peer["prune_s"]
            row["ppl_ours_over_theirs"] = row["ppl"] / peer["ppl"]
            row["peak_ours_over_theirs"] = row["peak_rss"] / peer["peak_rss"]
            row["added_ours_over_theirs"] = row["peak_added"] / max(peer["peak_added"], 1)
    return table


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_md(rows: list[dict]) -> str:
    head = (
        "| method | pattern | tool | ppl | prune s | peak RSS | added by pruning | against "
        "| time ours/theirs | ppl ours/theirs | peak ours/theirs | added ours/theirs |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = [
        f"| {r['method']} | {r['pattern']} | {r['tool']} | {r['ppl']:.2f} | {r['prune_s']:.1f} "
        f"| {r['peak_rss'] / 2**20:,.0f} MiB | {r['peak_added'] / 2**20:,.0f} MiB "
        f"| {r.get('against', '-')} "
        f"| {fmt(r.get('time_ours_over_theirs'), '.2f')} "
        f"| {fmt(r.get('ppl_ours_over_theirs'), '.3f')} "
        f"| {fmt(r.get('peak_ours_over_theirs'), '.2f')} "
        f"| {fmt(r.get('added_ours_over_theirs'), '.2f')} |"
        for r in rows
    ]
    return head + "\n".join(body)


def main() -> None:
    parser = bench_parser(__doc__, "peer_bench")
    parser.add_argument("--eval_batch_size", type=int, default=4)
    parser.add_argument("--eval_limit", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--peer_python", default=str(ROOT / ".venv-peer" / "bin" / "python"))
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument("--methods", default=None, help="only these methods (comma-separated)")
    parser.add_argument("--keep", default=None, help="keep every run's pruned weights here")
    parser.add_argument("--section", default="peer_bench", help="BENCHMARKS.md marker")
    args = parser.parse_args()
    if not Path(args.peer_python).exists():
        sys.exit(f"no peer venv at {args.peer_python}: run `make peer-venv` first")

    windows, eval_windows = bench_windows(args, args.eval_limit)
    model_dir = Path(resolve_model_path(args.model))
    runs = []
    selected = [run for run in RUNS if args.methods is None or run[0] in args.methods.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.keep:
            tmp = args.keep
            Path(tmp).mkdir(parents=True, exist_ok=True)
        ids = Path(tmp) / "calibration.safetensors"
        save_file({"input_ids": windows.contiguous()}, ids)
        for repeat in range(args.repeats):
            for pattern in args.patterns.split(","):
                for method, tool in selected:
                    out = Path(tmp) / f"{tool}-{method}-{pattern.replace(':', '_')}-{repeat}"
                    run = run_worker(args, tool, method, pattern, model_dir, ids, out)
                    # pruning is deterministic: the first repeat's model is the one evaluated
                    if repeat == 0:
                        run |= evaluate(args, out, pattern, eval_windows)
                    runs.append(run)
                    print(json.dumps(run), flush=True)
                for method in {m for m, _ in selected}:
                    outs = {
                        tool: Path(tmp) / f"{tool}-{method}-{pattern.replace(':', '_')}-0"
                        for m, tool in selected
                        if m == method
                    }
                    if repeat == 0 and len(outs) == 2:
                        agreement = mask_agreement(*outs.values())
                        print(method, pattern, json.dumps(agreement), flush=True)
                        runs.append({"method": method, "pattern": pattern} | agreement)
    rows = summarise([run for run in runs if "tool" in run])
    result = {
        **result_header(args),
        "eval_windows": int(eval_windows.shape[0]),
        "model_dir": str(model_dir),
        "runs": runs,
        "rows": rows,
    }
    save_result(args, result)
    print(table_md(rows))
    replace_marked_section(Path(args.markdown), args.section, table_md(rows))


if __name__ == "__main__":
    main()
