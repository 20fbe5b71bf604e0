"""Benchmark: on-disk size and load time of dense and compressed sparse checkpoints.

The model is pruned with Wanda in memory (50% unstructured and 2:4; calibration windows as
given) and saved dense; each folder, and the unpruned model, is then written in fp32, fp16 and
bf16, dense and compressed (``secateurs.convert_folder``). Rows: safetensors bytes, the ratio to the
dense fp16 file of the same model, the ratio on the pruned matrices alone, seconds to load
with ``AutoModelForCausalLM.from_pretrained`` (median of interleaved repeats), and whether the
compressed folder loads to the same tensors, bit for bit, as the dense one.

    python benchmarks/checkpoint_bench.py                   # SmolLM2
    python benchmarks/checkpoint_bench.py --model gemma3-270m   # its own JSON and table

Writes benchmarks/results/checkpoint_bench[_<model>].json and the table between the
``checkpoint_bench[_<model>]`` markers in BENCHMARKS.md (no suffix for SmolLM2).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import bench_parser, bench_windows, result_header, save_result
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from secateurs.api import WandaPruner
from secateurs.core.model import load_model
from secateurs.formats.checkpoint import convert_folder
from secateurs.formats.streaming import model_folder
from secateurs.jobs.report import fmt_bytes, replace_marked_section

PATTERNS = {"dense (unpruned)": None, "wanda 50%": "unstructured", "wanda 2:4": "2:4"}
_HEADERS = ("_shape", "_layout")
DTYPES = ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16"))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def matrix_bytes(folder: Path) -> int:
    """Bytes the stored forms of the prunable weight matrices take (blocks' 2-D weights)."""
    total = 0
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as reader:
            for name in reader.keys():  # noqa: SIM118  (safe_open is not a mapping)
                if ".layers." in name and "norm" not in name and not name.endswith(_HEADERS):
                    tensor = reader.get_slice(name)
                    count = 1
                    for dim in tensor.get_shape():
                        count *= dim
                    total += count * _itemsize(tensor.get_dtype())
    return total


def _itemsize(name: str) -> int:
    return {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I64": 8}[name]


def load_seconds(folder: Path) -> float:
    start = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(folder)
    return time.perf_counter() - start


def same_tensors(dense: Path, compressed: Path) -> bool:
    first = AutoModelForCausalLM.from_pretrained(dense).state_dict()
    second = AutoModelForCausalLM.from_pretrained(compressed).state_dict()
    return first.keys() == second.keys() and all(
        torch.equal(first[k].view(torch.uint8), second[k].view(torch.uint8)) for k in first
    )


def write_variants(args, work: Path) -> tuple[dict[str, Path], dict[str, float]]:
    """Every (pattern, dtype, format) folder, the dense fp32 ones saved by the pruner; and the
    seconds each conversion took."""
    windows, _ = bench_windows(args, eval_limit=1)
    folders: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    for label, pattern in PATTERNS.items():
        base = work / f"{len(folders)}-fp32-dense"
        if pattern is None:
            shutil.copytree(model_folder(args.model), base)
        else:
            model, _ = load_model(args.model, dtype=torch.float32)
            WandaPruner(model, batch_size=args.batch_size).prune(
                windows, 0.5, sparsity_type=pattern
            )
            model.save_pretrained(base)
            del model
        folders[f"{label}|fp32|dense"] = base
        for dtype, name in DTYPES:
            for fmt in ("dense", "compressed"):
                if (name, fmt) == ("fp32", "dense"):
                    continue
                target = work / f"{base.name.split('-')[0]}-{name}-{fmt}"
                start = time.perf_counter()
                convert_folder(base, target, fmt, dtype)
                seconds[f"{label}|{name}|{fmt}"] = time.perf_counter() - start
                folders[f"{label}|{name}|{fmt}"] = target
        print(label, "written", flush=True)
    return folders, seconds


def measure(args, folders: dict[str, Path], seconds: dict[str, float]) -> list[dict]:
    loads: dict[str, list[float]] = {key: [] for key in folders}
    for _ in range(args.repeats):
        for key, folder in folders.items():
            loads[key].append(load_seconds(folder))
    rows = []
    for key, folder in folders.items():
        label, dtype, fmt = key.split("|")
        reference = folders[f"dense (unpruned)|{dtype}|dense"]
        fp16_dense = folders[f"{label}|fp16|dense"]
        own_dense = folders[f"{label}|{dtype}|dense"]
        rows.append(
            {
                "model": label,
                "dtype": dtype,
                "format": fmt,
                "bytes": folder_bytes(folder),
                "vs_dense_fp16": folder_bytes(folder) / folder_bytes(fp16_dense),
                "vs_unpruned_same_dtype": folder_bytes(folder) / folder_bytes(reference),
                "matrices_vs_dense": matrix_bytes(folder) / matrix_bytes(own_dense),
                "convert_s": seconds.get(key),
                "load_s": statistics.median(loads[key]),
                "same_as_dense": same_tensors(own_dense, folder) if fmt == "compressed" else None,
            }
        )
        print(rows[-1], flush=True)
    return rows


def table(args, result: dict) -> str:
    lines = [
        f"{args.model}, Wanda (calibration {args.nsamples} x {args.seqlen} {args.dataset}, "
        f"seed 0); load = `AutoModelForCausalLM.from_pretrained`, median of {args.repeats} "
        f"interleaved; {result['machine']}; {result['date']}.",
        "",
        "| model | dtype | format | safetensors | vs dense fp16 of the same model | pruned "
        "matrices vs their dense form | convert s | load s | loads bit-identical to dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        same = {None: "", True: "yes", False: "**no**"}[row["same_as_dense"]]
        convert = "" if row["convert_s"] is None else f"{row['convert_s']:.2f}"
        lines.append(
            f"| {row['model']} | {row['dtype']} | {row['format']} | {fmt_bytes(row['bytes'])} | "
            f"{row['vs_dense_fp16']:.3f}x | {row['matrices_vs_dense']:.3f}x | "
            f"{convert} | {row['load_s']:.2f} | {same} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__, "checkpoint_bench")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    marker = "checkpoint_bench"
    if args.model != "smollm2-135m":
        marker += "_" + args.model.replace("-", "_").replace("/", "_")
        args.out = args.out.replace("checkpoint_bench.json", f"{marker}.json")
    work = Path(tempfile.mkdtemp(prefix="checkpoint-bench-"))
    try:
        result = result_header(args) | {"rows": measure(args, *write_variants(args, work))}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save_result(args, result)
    marker = (
        "checkpoint_bench" if args.model == "smollm2-135m" else f"checkpoint_bench_{args.model}"
    )
    text = table(args, result)
    replace_marked_section(args.markdown, marker, text)
    print(text)


if __name__ == "__main__":
    main()
