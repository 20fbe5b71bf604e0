"""Benchmark: pruning streamed from disk against in memory, and data-parallel calibration.

Every run is its own ``secateurs prune`` process (Wanda, 50%, calibration windows as given,
one evaluation window, no dense evaluation). Parts:

- ``stream``: ``--offload none`` and ``--offload disk``, each at its default calibration
  batch and at the other's, taking turns, ``--repeats`` times each: the process's peak
  resident memory (the kernel's, read with ``wait4``), the peak during pruning (the run's
  own JSON), prune time and wall time, medians; the saved tensors compared bit for bit.
- ``cap``: both again inside a memory cgroup (a child of this process's own, so the cap
  nests under any the machine has) limited to ``--cap_mib``: streamed should finish, in
  memory should be killed.
- ``parallel``: ``torchrun --nproc_per_node 2`` (gloo) against one process with the same
  threads per process, the saved tensors compared bit for bit.

    python benchmarks/memory_bench.py --parts stream,cap,parallel [--all_threads]

Writes benchmarks/results/memory_bench.json and its table between the markers in
BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from _common import ROOT, bench_parser, result_header, save_result
from safetensors.torch import load_file

from secateurs.formats.streaming import checkpoint_bytes, model_folder
from secateurs.jobs.report import replace_marked_section


def prune_args(
    args, save: Path, extra: tuple[str, ...] = (), batch_size: int | None = None
) -> list[str]:
    return [
        "prune",
        "--model",
        args.model,
        "--dataset",
        args.dataset,
        "--prune_method",
        "wanda",
        "--sparsity_ratio",
        "0.5",
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        *(() if batch_size is None else ("--batch_size", str(batch_size))),
        "--eval_limit",
        "1",
        "--no_eval_dense",
        "--quiet",
        "--save_model",
        str(save),
        *extra,
    ]


def run(command: list[str], env: dict[str, str] | None = None, cgroup: Path | None = None) -> dict:
    """Run a command to its end: exit status, wall seconds, the kernel's peak RSS of it."""

    def enter_cgroup() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        env=env,
        preexec_fn=enter_cgroup,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    output = process.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": process.returncode,
        "wall_s": time.perf_counter() - start,
        "peak_rss": usage.ru_maxrss * 1024,
        "tail": output[-600:],
    }


def secateurs(
    args, save: Path, extra=(), cgroup: Path | None = None, batch_size: int | None = None
) -> dict:
    command = [sys.executable, "-m", "secateurs", *prune_args(args, save, extra, batch_size)]
    row = run(command, cgroup=cgroup)
    result = save / "secateurs.json"
    if row["returncode"] == 0 and result.is_file():
        saved = json.loads(result.read_text())
        row["prune_s"] = saved["timings"]["prune"]
        row["prune_peak_rss"] = saved["memory"]["peak_rss"]
        row["batch_size"] = saved["config"]["batch_size"]
    return row


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out |= load_file(shard)
    return out


def identical(a: Path, b: Path) -> bool:
    first, second = tensors(a), tensors(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# (offload, --batch_size): each mode at its default batch, and at the other's default
STREAM_MODES = {
    "memory": ("none", None),
    "memory_batch_1": ("none", 1),
    "disk": ("disk", None),
    "disk_batch_8": ("disk", 8),
}
STREAM_LABELS = {
    "memory": "in memory (default)",
    "memory_batch_1": "in memory",
    "disk": "streamed, --offload disk (default)",
    "disk_batch_8": "streamed, --offload disk",
}


def stream_part(args, work: Path) -> dict:
    modes = {mode: STREAM_MODES[mode] for mode in args.modes.split(",")}
    rows: dict[str, list[dict]] = {mode: [] for mode in modes}
    for repeat in range(args.repeats):
        for mode, (offload, batch) in modes.items():
            save = work / f"{mode}-{repeat}"
            rows[mode].append(secateurs(args, save, ("--offload", offload), batch_size=batch))
            print(mode, repeat, {k: v for k, v in rows[mode][-1].items() if k != "tail"})
    same = all(identical(work / "memory-0", work / f"{mode}-0") for mode in modes)

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[mode])

    summary = {
        mode: {
            key: median(mode, key) for key in ("peak_rss", "prune_peak_rss", "prune_s", "wall_s")
        }
        for mode in modes
    }
    for mode in modes:
        summary[mode]["batch_size"] = rows[mode][0].get("batch_size")
    return {"runs": rows, "median": summary, "identical_tensors": same}


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A child of this process's memory cgroup (v1 or v2) limited to ``limit`` bytes."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    v1 = [line.split(":", 2)[2] for line in lines if line.split(":")[1] == "memory"]
    if v1:
        parent, limit_file = Path("/sys/fs/cgroup/memory" + v1[0]), "memory.limit_in_bytes"
    else:
        parent, limit_file = Path("/sys/fs/cgroup" + lines[0].split(":", 2)[2]), "memory.max"
    group = parent / f"secateurs-memory-bench-{os.getpid()}"
    group.mkdir()
    try:
        (group / limit_file).write_text(str(limit))
        yield group
    finally:
        group.rmdir()


def cap_part(args, work: Path) -> dict:
    rows = {}
    for mode, offload in (("disk", "disk"), ("memory", "none")):
        with memory_cgroup(args.cap_mib * 2**20) as group:
            row = secateurs(
                args,
                work / f"capped-{mode}",
                ("--offload", offload),
                cgroup=group,
                batch_size=args.cap_batch_size,
            )
        row["completed"] = row["returncode"] == 0
        rows[mode] = row
        print("capped", mode, {k: v for k, v in row.items() if k != "tail"})
    return {
        "cap_mib": args.cap_mib,
        "batch_size": args.cap_batch_size,
        "method": "cgroup v1 memory.limit_in_bytes",
        "runs": rows,
    }


def parallel_part(args, work: Path) -> dict:
    """Two gloo ranks against one process with as many threads as each rank, and with all."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    runs = {"one process": ([sys.executable, "-m", "secateurs"], args.threads)}
    if args.all_threads:
        runs["one process, all threads"] = ([sys.executable, "-m", "secateurs"], os.cpu_count())
    two = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "secateurs"]
    runs["torchrun x2"] = (two, 1)
    rows = {}
    for number, (name, (launcher, threads)) in enumerate(runs.items()):
        save = work / f"parallel-{number}"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        row = run([*launcher, *prune_args(args, save, batch_size=args.batch_size)], env=env)
        row["threads_per_process"] = threads
        if (save / "secateurs.json").is_file():
            row["prune_s"] = json.loads((save / "secateurs.json").read_text())["timings"]["prune"]
            row["identical_to_torchrun"] = None
        rows[name] = row
        print(name, {k: v for k, v in row.items() if k != "tail"})
    reference = work / f"parallel-{len(runs) - 1}"
    for number, name in enumerate(list(runs)[:-1]):
        if rows[name]["returncode"] == 0:
            rows[name]["identical_to_torchrun"] = identical(work / f"parallel-{number}", reference)
    return {"threads_per_process": args.threads, "runs": rows}


def weights_mib(model: str) -> float:
    return checkpoint_bytes(model_folder(model), torch.float32) / 2**20


def table(args, result: dict) -> str:
    mib = 2**20
    lines = [
        f"`{args.model}` fp32 ({weights_mib(args.model):.0f} MiB of weights), Wanda 50% "
        f"unstructured, {args.nsamples} x "
        f"{args.seqlen} calibration windows, one evaluation window; each run its own "
        f"process; {result['machine']}, {result['date']}.",
        "",
    ]
    stream = result.get("stream")
    if stream:
        memory = stream["median"]["memory"]
        lines += [
            f"Streamed against in memory, taking turns, medians of {args.repeats}:",
            "",
            "| mode | batch | peak RSS, process | vs in memory | peak RSS, pruning | prune s "
            "| vs in memory | wall s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for mode, label in STREAM_LABELS.items():
            row = stream["median"].get(mode)
            if row is None:
                continue
            lines.append(
                f"| {label} | {row.get('batch_size')} | {row['peak_rss'] / mib:.0f} MiB | "
                f"{row['peak_rss'] / memory['peak_rss']:.2f}x | "
                f"{row['prune_peak_rss'] / mib:.0f} MiB | {row['prune_s']:.1f} | "
                f"{row['prune_s'] / memory['prune_s']:.2f}x | {row['wall_s']:.1f} |"
            )
        lines += [
            "",
            f"Saved tensors bit-identical across these runs: {stream['identical_tensors']}.",
            "",
        ]
    cap = result.get("cap")
    if cap:
        lines += [
            f"Under a hard cap of {cap['cap_mib']} MiB ({cap['method']}, a child cgroup), "
            f"calibration batch {cap['batch_size']}:",
            "",
            "| mode | exit status | finished | peak RSS |",
            "|---|---|---|---|",
        ]
        for mode, row in cap["runs"].items():
            lines.append(
                f"| {mode} | {row['returncode']} | {'yes' if row['completed'] else 'no'} "
                f"| {row['peak_rss'] / mib:.0f} MiB |"
            )
        lines.append("")
    parallel = result.get("parallel")
    if parallel:
        lines += [
            "Data-parallel calibration (gloo) against one process on the same windows:",
            "",
            "| run | threads per process | prune s | wall s | peak RSS (largest process) "
            "| saved tensors identical to torchrun x2 |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in parallel["runs"].items():
            same = row.get("identical_to_torchrun")
            lines.append(
                f"| {name} | {row['threads_per_process']} "
                f"| {row.get('prune_s', float('nan')):.1f} | {row['wall_s']:.1f} "
                f"| {row['peak_rss'] / mib:.0f} MiB | {'' if same is None else same} |"
            )
    return "\n".join(lines).rstrip()


def main() -> None:
    parser = bench_parser(__doc__, "memory_bench")
    parser.add_argument("--parts", default="stream,cap,parallel")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cap_mib", type=int, default=480)
    # smaller batches keep a block's temporaries small: the cap is on everything resident
    parser.add_argument("--cap_batch_size", type=int, default=1)
    parser.add_argument("--modes", default=",".join(STREAM_MODES), help="stream part's runs")
    parser.add_argument("--section", default="memory_bench", help="BENCHMARKS.md marker")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--all_threads", action="store_true", help="also time one process with every core"
    )
    args = parser.parse_args()
    parts = {"stream": stream_part, "cap": cap_part, "parallel": parallel_part}
    result = result_header(args)
    previous = Path(args.out)
    if previous.is_file():  # parts run separately keep each other's figures
        kept = json.loads(previous.read_text())
        result |= {k: v for k, v in kept.items() if k in parts}
    work = Path(tempfile.mkdtemp(prefix="memory-bench-"))
    try:
        for name in args.parts.split(","):
            result[name] = parts[name](args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save_result(args, result)
    text = table(args, result)
    replace_marked_section(args.markdown, args.section, text)
    print(text)


if __name__ == "__main__":
    main()
