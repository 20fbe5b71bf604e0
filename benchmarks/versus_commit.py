"""Benchmark: this checkout's Wanda prune against an earlier commit's, in one run.

The earlier commit is exported (``git archive``) into a temporary folder; each prune runs in a
process of its own with that version's ``src`` first on the path, on the same model, the same
calibration windows and the same threads, interleaved over ``--repeats``. The prune call alone
is timed; the masks of every run are compared with the earlier commit's at batch size 1.

    python benchmarks/versus_commit.py --commit 644e221 --batch_sizes 1,8

Writes benchmarks/results/versus_commit.json and its section of BENCHMARKS.md.
"""

from __future__ import annotations

import json
import statistics
import subprocess
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

from secateurs.jobs.report import replace_marked_section

WORKER = """
import json, sys, time, torch
from safetensors.torch import load_file, save_file
from secateurs.core.model import iter_prunable, load_model, weight_matrix
from secateurs.api import MethodPruner
windows = load_file(sys.argv[1])["windows"]
model, _ = load_model(sys.argv[2])
pruner = MethodPruner(model, "wanda", batch_size=int(sys.argv[3]), progress=False)
start = time.perf_counter()
pruner.prune(windows, 0.5)
seconds = time.perf_counter() - start
masks = {n: (weight_matrix(l) == 0).to(torch.uint8) for n, l in iter_prunable(model)}
save_file(masks, sys.argv[4])
print(json.dumps({"seconds": seconds}))
"""


def run(src: Path, args, windows: Path, batch_size: int, masks: Path) -> float:
    command = [sys.executable, "-c", WORKER, str(windows), args.model, str(batch_size), str(masks)]
    stdout = run_isolated(command, src, f"the prune of {src}")
    return json.loads(stdout.strip().splitlines()[-1])["seconds"]


def differing(a: Path, b: Path) -> int:
    first, second = load_file(a), load_file(b)
    return sum(int((first[n] != second[n]).sum()) for n in first)


def main() -> None:
    parser = bench_parser(__doc__, "versus_commit")
    parser.add_argument("--commit", required=True)
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(v) for v in args.batch_sizes.split(",")]
    windows, _ = bench_windows(args, 1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = tmp / "old"
        old.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.commit, "src"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        save_file({"windows": windows.contiguous()}, tmp / "windows.safetensors")
        versions = {"old": old / "src", "new": ROOT / "src"}
        times: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for size in sizes:
                for label, src in versions.items():
                    masks = tmp / f"{label}-{size}.safetensors"
                    seconds = run(src, args, tmp / "windows.safetensors", size, masks)
                    times.setdefault(f"{label}-{size}", []).append(seconds)
                    print(label, size, f"{seconds:.1f} s", flush=True)
        reference = tmp / f"old-{sizes[0]}.safetensors"
        rows = [
            {
                "version": label,
                "batch_size": size,
                "prune_s": statistics.median(times[f"{label}-{size}"]),
                "runs_s": times[f"{label}-{size}"],
                "mask_entries_differing_from_old_first": differing(
                    tmp / f"{label}-{size}.safetensors", reference
                ),
            }
            for size in sizes
            for label in versions
        ]
    base = next(r for r in rows if r["version"] == "old" and r["batch_size"] == 8)
    for row in rows:
        row["time_vs_old_batch_8"] = row["prune_s"] / base["prune_s"]
    result = result_header(args) | {"rows": rows, "torch_threads": torch.get_num_threads()}
    save_result(args, result)
    lines = [
        f"### This checkout against commit `{args.commit}` (`benchmarks/versus_commit.py`)",
        "",
        f"Wanda 50% unstructured, {args.model}, {args.nsamples} x {args.seqlen} calibration "
        f"windows, prune call alone, medians of {args.repeats} interleaved runs; "
        f"{result['machine']}; {result['date']}.",
        "",
        f"| version | batch size | prune s | runs s | time vs old at batch 8 "
        f"| mask entries differing from old at batch {sizes[0]} |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        runs = ", ".join(f"{v:.1f}" for v in r["runs_s"])
        lines.append(
            f"| {r['version']} | {r['batch_size']} | {r['prune_s']:.1f} | {runs} "
            f"| {r['time_vs_old_batch_8']:.2f}x | {r['mask_entries_differing_from_old_first']:,} |"
        )
    body = "\n".join(lines)
    replace_marked_section(args.markdown, "versus_commit", body)
    print(body)


if __name__ == "__main__":
    main()
