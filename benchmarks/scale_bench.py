"""Benchmark: streamed pruning (``--offload disk``) at scale, against its floor and cost law.

Each (model folder, method) pair is one ``secateurs prune`` process:

    secateurs prune --model DIR --prune_method M --offload disk --save_model OUT \\
        --nsamples 8 --seqlen 128 --eval_limit 1 --no_eval_dense --save_json OUT.json

and per run it reports: wall time; the process's peak resident memory, CPU time, bytes read
from and written to the block device and major page faults (the kernel's, from ``wait4``);
a timeline of resident memory and I/O sampled from ``/proc``; the run's own JSON timings and
the engine's phases; the weights read and written (folder sizes); and the floor

    floor = 2 x forward + source bytes / read bandwidth + saved bytes / write bandwidth

where one forward is the run's own ``propagate`` phase (every calibration window through
every block once) and the bandwidths are measured first on the work folder's disk: a
sequential file of ``--bandwidth_mib`` (1 GiB) written and fsynced, dropped from the page
cache, read back. Then the cost law: prune seconds per parameter per calibration token, and
peak memory against the largest block's bytes. Each saved folder is checked shard by shard
(one ``safe_open`` at a time): its index against its shards, every tensor the model class
expects present with its shape (a skeleton on the meta device), and the zeros of every 2-D
block weight, against the run's own sparsity record.

With ``--in_memory``, each model whose weights take at most half of the memory is pruned
once more with the whole model in memory (``--offload none``, the same calibration batch),
and its saved folder is compared with the streamed one tensor by tensor: same zeros in
every block weight, same values.

Before each run the source folder is dropped from the page cache (``posix_fadvise
DONTNEED``; ``--cache warm`` keeps it), so the reads are the disk's whenever the folder does
not fit in memory anyway. Make a model with ``benchmarks/make_shaped_model.py``:

    python benchmarks/make_shaped_model.py --config 1b --out /data/shaped-1b
    python benchmarks/scale_bench.py --models /data/shaped-1b --methods wanda,sparsegpt \\
        --work /data/scale-work --in_memory

Writes benchmarks/results/scale_bench.json and its table between the markers
``scale_bench`` in BENCHMARKS.md. The work folder needs room for one saved copy of the
largest model (saved folders are deleted after their check unless ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from _common import ROOT, result_header, save_result
from safetensors import safe_open

from secateurs.jobs.report import replace_marked_section

INDEX_FILE = "model.safetensors.index.json"
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}
MiB, GiB = 2**20, 2**30
# predictions come only from runs of models with at least this many block parameters
MIN_PREDICT_PARAMETERS = 10**8


# ---- disk --------------------------------------------------------------------------------


def drop_cache(path: Path) -> None:
    """Ask the kernel to drop a file's (or a folder's files') clean pages from the cache."""
    if not hasattr(os, "posix_fadvise"):
        return
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_bandwidth(folder: Path, size: int, chunk: int = 64 * MiB) -> dict[str, float]:
    """Sequential write (with fsync) and cold read of one ``size``-byte file in ``folder``."""
    path = folder / "bandwidth.bin"
    block = os.urandom(chunk)  # incompressible, in case the storage compresses
    chunks = max(1, size // chunk)
    try:
        start = time.perf_counter()
        with open(path, "wb", buffering=0) as file:
            for _ in range(chunks):
                file.write(block)
            os.fsync(file.fileno())
        write_s = time.perf_counter() - start
        drop_cache(path)
        buffer = bytearray(chunk)
        start = time.perf_counter()
        with open(path, "rb", buffering=0) as file:
            while file.readinto(buffer):
                pass
        read_s = time.perf_counter() - start
    finally:
        path.unlink(missing_ok=True)
    total = chunks * chunk
    return {"bytes": total, "write": total / write_s, "read": total / read_s}


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


# ---- checkpoints ---------------------------------------------------------------------------


def shard_header(shard: Path) -> dict[str, dict]:
    with open(shard, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(size))
    header.pop("__metadata__", None)
    return header


def weight_map(folder: Path) -> dict[str, str]:
    index = folder / INDEX_FILE
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    with safe_open(folder / "model.safetensors", "pt") as handle:
        return dict.fromkeys(handle.keys(), "model.safetensors")


def tensor_entries(folder: Path) -> dict[str, dict]:
    """Every tensor's dtype, shape and bytes, from the shards' headers (no data read)."""
    entries = {}
    for shard in sorted(set(weight_map(folder).values())):
        for name, entry in shard_header(folder / shard).items():
            begin, end = entry["data_offsets"]
            entries[name] = {"dtype": entry["dtype"], "shape": entry["shape"], "bytes": end - begin}
    return entries


def block_of(name: str) -> str | None:
    """``model.layers.7`` for ``model.layers.7.mlp.up_proj.weight``; None outside the stack."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return None


def describe_model(folder: Path) -> dict[str, Any]:
    """Parameters, bytes, the largest block and the embedding of a checkpoint folder."""
    config = json.loads((folder / "config.json").read_text())
    entries = tensor_entries(folder)
    blocks: dict[str, int] = {}
    block_parameters = 0
    for name, entry in entries.items():
        block = block_of(name)
        if block is not None:
            blocks[block] = blocks.get(block, 0) + entry["bytes"]
            block_parameters += entry["bytes"] // _ITEMSIZE.get(entry["dtype"], 4)
    grams = [
        e["shape"][1] ** 2 * 4 for n, e in entries.items() if block_of(n) and len(e["shape"]) == 2
    ]
    manifest = folder / "shaped_model.json"
    shaped = json.loads(manifest.read_text()) if manifest.is_file() else {}
    count = 0
    for entry in entries.values():
        numel = 1
        for dim in entry["shape"]:
            numel *= dim
        count += numel
    return {
        "folder": str(folder),
        "name": shaped.get("shape") or folder.name,
        "parameters": count,
        "block_parameters": block_parameters,
        "weight_bytes": sum(e["bytes"] for e in entries.values()),
        "dtype": sorted({e["dtype"] for e in entries.values()}),
        "blocks": len(blocks),
        "largest_block_bytes": max(blocks.values(), default=0),
        "largest_tensor_bytes": max(e["bytes"] for e in entries.values()),
        "largest_gram_bytes": max(grams, default=0),
        "hidden_size": config.get("hidden_size"),
        "vocab_size": config.get("vocab_size"),
        "tie_word_embeddings": config.get("tie_word_embeddings"),
        "shaped": shaped or None,
    }


def check_saved(folder: Path, recorded: dict[str, float] | None) -> dict[str, Any]:
    """Read a saved folder one shard at a time: index against shards, the model's expected
    tensors present with their shapes, and the zeros of every 2-D block weight."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    mapping = weight_map(folder)
    problems: list[str] = []
    layers: dict[str, float] = {}
    zeros = total = stored = 0
    shapes: dict[str, list[int]] = {}
    shards = sorted(set(mapping.values()))
    for shard in shards:
        with safe_open(folder / shard, "pt") as handle:
            names = set(handle.keys())
            listed = {n for n, s in mapping.items() if s == shard}
            if names != listed:
                problems.append(f"{shard}: tensors {sorted(names ^ listed)[:3]} differ from index")
            for name in sorted(names):
                part = handle.get_slice(name)
                shape = list(part.get_shape())
                shapes[name] = shape
                numel = 1
                for dim in shape:
                    numel *= dim
                stored += numel * _ITEMSIZE.get(part.get_dtype(), 4)
                if block_of(name) is None or len(shape) != 2:
                    continue
                weight = handle.get_tensor(name)
                count = int((weight == 0).sum())
                del weight
                layers[name.removesuffix(".weight")] = count / numel
                zeros += count
                total += numel
    index = folder / INDEX_FILE
    if index.is_file():
        size = json.loads(index.read_text())["metadata"]["total_size"]
        if size != stored:
            problems.append(f"index total_size {size} != {stored} bytes in the shards")
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    for name, tensor in skeleton.state_dict().items():
        if name in tied:
            continue
        if name not in shapes:
            problems.append(f"missing {name}")
        elif shapes[name] != list(tensor.shape):
            problems.append(f"{name}: shape {shapes[name]} != {list(tensor.shape)}")
    difference = None
    if recorded:
        common = set(recorded) & set(layers)
        difference = max((abs(recorded[n] - layers[n]) for n in common), default=None)
        if len(common) != len(layers):
            problems.append(f"{len(layers) - len(common)} block weights not in the run's record")
    values = list(layers.values())
    return {
        "shards": len(shards),
        "tensors": len(mapping),
        "loads_by_shards": not problems,
        "problems": problems[:10],
        "overall": zeros / total if total else 0.0,
        "layer_min": min(values, default=0.0),
        "layer_max": max(values, default=0.0),
        "layers": layers,
        "max_difference_from_record": difference,
    }


# ---- runs ----------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Samples a process's resident memory and I/O counters from /proc every ``every`` s."""

    def __init__(self, pid: int, every: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[dict[str, float]] = []
        self.done = threading.Event()
        self.start_time = time.perf_counter()

    def read(self) -> dict[str, float] | None:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            io = Path(f"/proc/{self.pid}/io").read_text()
        except OSError:
            return None
        sample = {"t": round(time.perf_counter() - self.start_time, 2)}
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                sample["rss"] = int(line.split()[1]) * 1024
        for line in io.splitlines():
            key, value = line.split(":")
            if key in ("rchar", "wchar", "read_bytes", "write_bytes"):
                sample[key] = int(value)
        return sample

    def run(self) -> None:
        while not self.done.wait(self.every):
            sample = self.read()
            if sample is not None:
                self.samples.append(sample)


def prune_command(
    args, model: Path, method: str, save: Path, result: Path, streamed: bool = True
) -> list[str]:
    """The ``secateurs prune`` command of one run, streamed or with the model in memory."""
    return [
        sys.executable,
        "-m",
        "secateurs",
        "prune",
        "--model",
        str(model),
        "--dataset",
        args.dataset,
        "--prune_method",
        method,
        "--sparsity_ratio",
        str(args.sparsity_ratio),
        "--offload",
        "disk" if streamed else "none",
        "--save_model",
        str(save),
        "--save_json",
        str(result),
        "--nsamples",
        str(args.nsamples),
        "--batch_size",
        str(args.batch_size),
        "--seqlen",
        str(args.seqlen),
        "--eval_limit",
        str(args.eval_limit),
        "--no_eval_dense",
        *args.extra.split(),
    ]


def run_process(command: list[str], log: Path, every: float) -> dict[str, Any]:
    """Run to the end with output to ``log``: status, wall seconds, the kernel's usage."""
    start = time.perf_counter()
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=out, cwd=ROOT, env=dict(os.environ))
        sampler = Sampler(process.pid, every)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        sampler.done.set()
        sampler.join()
    wall = time.perf_counter() - start
    last = sampler.samples[-1] if sampler.samples else {}
    return {
        "returncode": os.waitstatus_to_exitcode(status),
        "wall_s": wall,
        "peak_rss": usage.ru_maxrss * 1024,
        "cpu_user_s": usage.ru_utime,
        "cpu_sys_s": usage.ru_stime,
        # blocks of 512 bytes that went to and from the device (page-cache hits excluded)
        "disk_read_bytes": usage.ru_inblock * 512,
        "disk_write_bytes": usage.ru_oublock * 512,
        "major_faults": usage.ru_majflt,
        # read()/write() bytes up to the last sample (mapped reads are not counted)
        "syscall_read_bytes": last.get("rchar"),
        "syscall_write_bytes": last.get("wchar"),
        "timeline": sampler.samples,
        "tail": log.read_text(errors="replace")[-1500:],
    }


def launch(
    args, model: Path, method: str, work: Path, tag: str, streamed: bool = True
) -> tuple[dict, Path, dict | None]:
    """One ``secateurs prune`` process saving to ``work / tag``: its measurements, its saved
    folder, and its JSON result (None if it failed, with its log's tail printed)."""
    save, result_file, log = work / tag, work / f"{tag}.json", work / f"{tag}.log"
    shutil.rmtree(save, ignore_errors=True)
    result_file.unlink(missing_ok=True)  # a result left by an earlier run is not this run's
    if args.cache == "cold":
        drop_cache(model)
    print(f"{tag}: running, log in {log}", flush=True)
    command = prune_command(args, model, method, save, result_file, streamed)
    row = run_process(command, log, args.sample_s)
    if row["returncode"] != 0 or not result_file.is_file():
        print(f"{tag}: failed ({row['returncode']})\n{row['tail']}", flush=True)
        return row, save, None
    return row, save, json.loads(result_file.read_text())


def one_run(args, model: Path, info: dict, method: str, work: Path, band: dict) -> dict:
    tag = f"{info['name']}-{method}".replace("/", "_")
    row, save, saved = launch(args, model, method, work, tag)
    row |= {"model": info["name"], "folder": str(model), "method": method}
    if saved is None:
        return row
    phases = saved["prune"]["seconds"]
    row |= {
        "timings": saved["timings"],
        "phases": phases,
        "prune_peak_rss": saved["memory"]["peak_rss"],
        "start_rss": saved["memory"]["start_rss"],
        "pruned_perplexity": saved["perplexity"]["pruned"],
        "recorded_sparsity": saved["sparsity"]["overall"],
        "source_bytes": info["weight_bytes"],
        "saved_bytes": folder_bytes(save, "*.safetensors"),
    }
    forward = phases["propagate"]
    row["bandwidth"] = band  # rows of other sweeps (--append) keep the disk they were timed on
    row["floor"] = {
        "forward_s": forward,
        "read_s": row["source_bytes"] / band["read"],
        "write_s": row["saved_bytes"] / band["write"],
    }
    row["floor"]["total_s"] = 2 * forward + row["floor"]["read_s"] + row["floor"]["write_s"]
    # the run's prune time outside the engine's phases: reading, writing, freeing blocks
    row["prune_other_s"] = saved["timings"]["prune"] - sum(phases.values())
    start = time.perf_counter()
    row["check"] = check_saved(save, saved["sparsity"].get("layers"))
    row["check"]["seconds"] = time.perf_counter() - start
    if args.in_memory and fits_in_memory(info):
        row["in_memory"] = in_memory_run(args, model, method, work, tag, save)
    if not args.keep:
        shutil.rmtree(save, ignore_errors=True)
    brief = {k: row[k] for k in ("wall_s", "peak_rss", "disk_read_bytes", "disk_write_bytes")}
    print(f"{tag}: {brief}, timings {saved['timings']}, phases {phases}", flush=True)
    return row


def fits_in_memory(info: dict) -> bool:
    """Whether the model's weights take at most half of this machine's memory (the in-memory
    run holds them, plus the saved copy's buffers)."""
    return info["weight_bytes"] <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2


def in_memory_run(args, model: Path, method: str, work: Path, tag: str, streamed: Path) -> dict:
    """The same prune with the whole model in memory, and whether its saved weights equal
    the streamed run's (masks and values)."""
    run, save, saved = launch(args, model, method, work, f"{tag}-memory", streamed=False)
    out = {k: run[k] for k in ("returncode", "wall_s", "peak_rss")}
    if saved is not None:
        out["prune_s"] = saved["timings"]["prune"]
        out |= compare_saved(streamed, save)
    if not args.keep:
        shutil.rmtree(save, ignore_errors=True)
    return out


def compare_saved(first: Path, second: Path) -> dict[str, Any]:
    """Tensor by tensor (one pair in memory at a time): do two saved folders hold the same
    names, the same zeros in every 2-D block weight, and the same values?"""
    one, two = weight_map(first), weight_map(second)
    masks = values = True
    differing: list[str] = []
    for name in sorted(set(one) & set(two)):
        with safe_open(first / one[name], "pt") as a, safe_open(second / two[name], "pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
        same = x.shape == y.shape and torch.equal(x, y)
        if block_of(name) is not None and x.dim() == 2 and not torch.equal(x == 0, y == 0):
            masks = False
        if not same:
            values = False
            differing.append(name)
    tied = {"lm_head.weight"}  # saved once by a tied model, whichever way it was written
    return {
        "same_names": set(one) - tied == set(two) - tied,
        "identical_masks": masks,
        "identical_weights": values,
        "differing": differing[:5],
    }


def cost_law(row: dict, info: dict, args) -> dict[str, float]:
    """The run's time as three terms, each per the unit it grows with.

    - forward: calibrate + propagate, per block parameter per calibration token;
    - masks: score + solve + recover (sorting, the guard, zeroing; SparseGPT's solve), per
      block parameter: it does not depend on the calibration tokens;
    - I/O: prune time outside the engine's phases (reading, writing, freeing blocks, the
      outer modules' copy), per GiB of weights; and what the run does after pruning (the
      saved folder's sparsity check and evaluation read it back) with the process's start,
      also per GiB.
    """
    tokens = args.nsamples * args.seqlen
    ph, timings = row["phases"], row["timings"]
    gib = info["weight_bytes"] / GiB
    before = timings.get("data", 0.0) + timings.get("load_model", 0.0)
    return {
        "tokens": tokens,
        "forward_ns_per_param_token": (ph["calibrate"] + ph["propagate"] + ph["capture"])
        / (info["block_parameters"] * tokens)
        * 1e9,
        "masks_ns_per_param": (ph["score"] + ph["solve"] + ph["recover"])
        / info["block_parameters"]
        * 1e9,
        "io_s_per_gib": row["prune_other_s"] / gib,
        "after_s_per_gib": (row["wall_s"] - timings["prune"] - before) / gib,
        "hidden_buffer_bytes": args.nsamples * args.seqlen * (info["hidden_size"] or 0) * 4,
        "peak_over_block": row["peak_rss"] / info["largest_block_bytes"],
        "growth_over_block": (row["prune_peak_rss"] - row["start_rss"])
        / info["largest_block_bytes"],
    }


def shape_sizes(shape: str, vocab: int, itemsize: int = 4) -> dict[str, int]:
    """Block parameters, weight bytes and largest block of a make_shaped_model shape."""
    import make_shaped_model as shaped

    config = shaped.shape_config(shape, vocab, torch.float32)
    tensors = shaped.plan_tensors(config)
    blocks: dict[str, int] = {}
    for tensor in tensors:
        block = block_of(tensor.name)
        if block is not None:
            blocks[block] = blocks.get(block, 0) + tensor.numel
    return {
        "block_parameters": sum(blocks.values()),
        "weight_bytes": sum(t.numel for t in tensors) * itemsize,
        "largest_block_bytes": max(blocks.values()) * itemsize,
    }


def predict(result: dict, shapes: list[str], args) -> list[dict[str, Any]]:
    """Each shape's streamed run, from the cost law of the largest model run per method
    (same calibration tokens, same machine): prune and wall seconds, peak RSS, disk. None
    from runs of models under ``MIN_PREDICT_PARAMETERS`` block parameters."""
    out = []
    largest: dict[str, tuple[dict, dict]] = {}
    for row in result["runs"]:
        if "cost" not in row:
            continue
        info = result["models"][row["folder"]]
        if info["block_parameters"] < MIN_PREDICT_PARAMETERS:
            continue  # a small model's run is its process's fixed costs, not the law
        held = largest.get(row["method"])
        if held is None or info["parameters"] > held[1]["parameters"]:
            largest[row["method"]] = (row, info)
    for method, (row, info) in largest.items():
        cost = row["cost"]
        shaped = info.get("shaped") or {}
        vocab = shaped.get("vocab_size_of_tokenizer", 49152)
        itemsize = info["weight_bytes"] // max(info["parameters"], 1)
        for shape in shapes:
            size = shape_sizes(shape, vocab, itemsize)
            gib = size["weight_bytes"] / GiB
            prune = (
                cost["forward_ns_per_param_token"] * size["block_parameters"] * cost["tokens"]
                + cost["masks_ns_per_param"] * size["block_parameters"]
            ) / 1e9 + cost["io_s_per_gib"] * gib
            out.append(
                {
                    "shape": shape,
                    "method": method,
                    "from": info["name"],
                    "prune_s": prune,
                    "wall_s": prune + cost["after_s_per_gib"] * gib,
                    "peak_rss": row["start_rss"]
                    + cost["growth_over_block"] * size["largest_block_bytes"],
                    "weight_bytes": size["weight_bytes"],
                    "disk_bytes": 2 * size["weight_bytes"],
                }
            )
    return out


# ---- report --------------------------------------------------------------------------------


def merge_runs(previous: dict, result: dict) -> dict:
    """``previous`` with ``result``'s runs in place of its runs of the same model and method,
    and the others added after them."""
    new = {(row["folder"], row["method"]): row for row in result["runs"]}
    runs = []
    for row in previous["runs"]:
        runs.append(new.pop((row["folder"], row["method"]), None) or row)
        runs[-1].setdefault("bandwidth", previous["bandwidth"])
    return result | {
        "models": previous["models"] | result["models"],
        "runs": runs + list(new.values()),
    }


def disk_note(result: dict) -> str:
    """The measured disk bandwidth, one figure per sweep when rows come from several."""
    sweeps: dict[str, list[str]] = {}
    for row in result["runs"]:
        band = row.get("bandwidth", result["bandwidth"])
        speed = f"{band['write'] / MiB:.0f} MiB/s write (fsynced), {band['read'] / MiB:.0f} MiB/s"
        name = result["models"][row["folder"]]["name"]
        sweeps.setdefault(speed, []).append(f"{name} {row['method']}")
    probe = f"{result['bandwidth']['bytes'] / GiB:.1f} GiB sequential file"
    if len(sweeps) == 1:
        return f"Disk: {next(iter(sweeps))} cold read, {probe}."
    parts = "; ".join(f"{speed} ({', '.join(rows)})" for speed, rows in sweeps.items())
    return f"Disk, measured before each sweep on a {probe} (write, cold read): {parts}."


def table(args, result: dict) -> str:
    lines = [
        f"Streamed pruning (`--offload disk`) of LlamaForCausalLM-shaped checkpoints with "
        f"seeded random weights (`benchmarks/make_shaped_model.py`), {args.nsamples} x "
        f"{args.seqlen} calibration windows ({getattr(args, 'batch_size', 1)} per forward), "
        f"sparsity {args.sparsity_ratio}, one evaluation "
        f"window, no dense evaluation; each run its own process, source "
        f"{'dropped from' if args.cache == 'cold' else 'left in'} the page cache before it; "
        f"{result['machine']}, {result['date']}. {disk_note(result)}",
        "",
        "| model | method | parameters | weights | wall s | CPU s | prune s | calibrate / score "
        "/ solve / propagate s | prune outside phases s | floor s | prune / floor | peak RSS "
        "| device read / written |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    models = result["models"]
    for row in result["runs"]:
        info = models[row["folder"]]
        if row["returncode"] != 0 or "timings" not in row:
            lines.append(
                f"| {info['name']} | {row['method']} | | | {row['wall_s']:.0f} | | failed "
                f"({row['returncode']}) | | | | | {row['peak_rss'] / GiB:.2f} GiB | |"
            )
            continue
        ph, floor = row["phases"], row["floor"]["total_s"]
        lines.append(
            f"| {info['name']} | {row['method']} | {info['parameters'] / 1e9:.3f} B "
            f"| {info['weight_bytes'] / GiB:.2f} GiB | {row['wall_s']:.1f} "
            f"| {row['cpu_user_s'] + row['cpu_sys_s']:.1f} | {row['timings']['prune']:.1f} "
            f"| {ph['calibrate']:.1f} / {ph['score']:.1f} / "
            f"{ph['solve']:.1f} / {ph['propagate']:.1f} | {row['prune_other_s']:.1f} "
            f"| {floor:.1f} | {row['timings']['prune'] / floor:.2f} "
            f"| {row['peak_rss'] / GiB:.2f} GiB | {row['disk_read_bytes'] / GiB:.2f} / "
            f"{row['disk_write_bytes'] / GiB:.2f} GiB |"
        )
    lines += [
        "",
        "Floor = 2 x forward (the run's propagate phase) + source bytes / read bandwidth + "
        "saved bytes / write bandwidth. Cost law: forward (calibrate + propagate) per block "
        "parameter per calibration token; masks (score, solve, recover) per block parameter; "
        "I/O (prune time outside the phases) and after pruning (start, sparsity check and "
        "evaluation reading the saved folder) per GiB of weights:",
        "",
        "| model | method | forward ns / parameter-token | masks ns / parameter | I/O s / GiB "
        "| after s / GiB | largest block | peak RSS / largest block | growth in pruning / "
        "largest block | hidden states |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["runs"]:
        if "cost" not in row:
            continue
        info, cost = models[row["folder"]], row["cost"]
        lines.append(
            f"| {info['name']} | {row['method']} | {cost['forward_ns_per_param_token']:.3f} "
            f"| {cost['masks_ns_per_param']:.1f} | {cost['io_s_per_gib']:.1f} "
            f"| {cost['after_s_per_gib']:.1f} "
            f"| {info['largest_block_bytes'] / MiB:.1f} MiB | {cost['peak_over_block']:.2f} "
            f"| {cost['growth_over_block']:.2f} | {cost['hidden_buffer_bytes'] / MiB:.1f} MiB |"
        )
    if result.get("predictions"):
        lines += [
            "",
            "Predicted by that law on this machine, same calibration tokens (vocabulary raised "
            "to the tokenizer's where smaller; disk = source plus saved folder):",
            "",
            "| shape | method | from | prune s | wall s | peak RSS | weights | disk |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for guess in result["predictions"]:
            lines.append(
                f"| {guess['shape']} | {guess['method']} | {guess['from']} "
                f"| {guess['prune_s']:.0f} | {guess['wall_s']:.0f} "
                f"| {guess['peak_rss'] / GiB:.1f} GiB | {guess['weight_bytes'] / GiB:.1f} GiB "
                f"| {guess['disk_bytes'] / GiB:.1f} GiB |"
            )
    compared = [row for row in result["runs"] if row.get("in_memory")]
    if compared:
        lines += [
            "",
            "The same prune with the whole model in memory (`--offload none`), for the models "
            "that fit in half of this machine's memory, against the streamed run's saved folder:",
            "",
            "| model | method | in memory: prune s | wall s | peak RSS | streamed peak RSS "
            "| masks identical | weights identical |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in compared:
            mem = row["in_memory"]
            name = models[row["folder"]]["name"]
            if "prune_s" not in mem:
                lines.append(f"| {name} | {row['method']} | failed ({mem['returncode']}) |||||")
                continue
            lines.append(
                f"| {name} | {row['method']} | {mem['prune_s']:.1f} | {mem['wall_s']:.1f} "
                f"| {mem['peak_rss'] / GiB:.2f} GiB | {row['peak_rss'] / GiB:.2f} GiB "
                f"| {'yes' if mem['identical_masks'] else 'no'} "
                f"| {'yes' if mem['identical_weights'] else 'no: ' + ', '.join(mem['differing'])} |"
            )
    lines += [
        "",
        "Saved folders, read back one shard at a time:",
        "",
        "| model | method | shards | loads by shards | sparsity from the shards | layer min / max "
        "| largest difference from the run's record |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["runs"]:
        check = row.get("check")
        if not check:
            continue
        diff = check["max_difference_from_record"]
        lines.append(
            f"| {models[row['folder']]['name']} | {row['method']} | {check['shards']} "
            f"| {'yes' if check['loads_by_shards'] else 'no: ' + '; '.join(check['problems'])} "
            f"| {check['overall']:.4f} | {check['layer_min']:.4f} / {check['layer_max']:.4f} "
            f"| {'' if diff is None else f'{diff:.1e}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="", help="model folders, comma-separated")
    parser.add_argument(
        "--methods", default="wanda,sparsegpt", help="prune methods, comma-separated"
    )
    parser.add_argument("--dataset", default="wiki-sample", help="calibration text")
    parser.add_argument("--nsamples", type=int, default=8, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=128, help="tokens per window")
    parser.add_argument(
        "--batch_size",
        type=int,
        default=1,
        help="calibration windows per forward, in both runs of a model (a Gram's float sums "
        "depend on it, so SparseGPT's masks do too)",
    )
    parser.add_argument("--eval_limit", type=int, default=1, help="evaluation windows")
    parser.add_argument("--sparsity_ratio", type=float, default=0.5, help="weights removed")
    parser.add_argument("--extra", default="", help="more prune flags, one string")
    parser.add_argument("--work", default=None, help="folder for saved models and logs")
    parser.add_argument("--keep", action="store_true", help="keep the saved folders")
    parser.add_argument(
        "--in_memory",
        action="store_true",
        help="also prune each model that fits in half the memory with the model in memory, "
        "and compare its saved weights and masks with the streamed run's",
    )
    parser.add_argument(
        "--cache",
        choices=("cold", "warm"),
        default="cold",
        help="drop each source folder from the page cache before its run (cold) or not",
    )
    parser.add_argument(
        "--bandwidth_mib", type=int, default=1024, help="size of the disk bandwidth probe file"
    )
    parser.add_argument("--sample_s", type=float, default=1.0, help="/proc sampling period")
    parser.add_argument(
        "--out",
        default=str(ROOT / "benchmarks" / "results" / "scale_bench.json"),
        help="results JSON (rewritten after every run)",
    )
    parser.add_argument(
        "--markdown", default=str(ROOT / "BENCHMARKS.md"), help="file whose table is rewritten"
    )
    parser.add_argument("--section", default="scale_bench", help="BENCHMARKS.md marker")
    parser.add_argument(
        "--predict",
        default="llama-2-7b,llama-3-8b",
        help="make_shaped_model shapes to predict from the largest run (empty: none)",
    )
    parser.add_argument(
        "--render", action="store_true", help="only write the table of the --out JSON again"
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the runs already in --out that this sweep does not repeat (same model and "
        "method), so a long sweep can be run in parts",
    )
    args = parser.parse_args()
    if args.render:
        result = json.loads(Path(args.out).read_text())
        kept = argparse.Namespace(**result["settings"])
        shapes = [x for x in args.predict.split(",") if x]
        for folder in result["models"]:
            if Path(folder).is_dir():  # what this version reads of a model
                result["models"][folder] = describe_model(Path(folder))
        for row in result["runs"]:  # the law as this version computes it
            if "timings" in row:
                row["cost"] = cost_law(row, result["models"][row["folder"]], kept)
        result["predictions"] = predict(result, shapes, kept)
        text = table(kept, result)
        replace_marked_section(args.markdown, args.section, text)
        print(text)
        return
    folders = [Path(m) for m in args.models.split(",") if m]
    if not folders:
        parser.error("give --models DIR[,DIR...] (or --render)")
    if args.append and not Path(args.out).is_file():
        parser.error(f"--append keeps the runs of --out, and {args.out} is not a file")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="scale-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    result = result_header(args)  # the machine line names the threads the runs get
    torch.set_num_threads(1)  # this process only samples and checks; the runs have the cores
    result["bandwidth"] = disk_bandwidth(work, args.bandwidth_mib * MiB)
    band = result["bandwidth"]
    print(
        f"disk: write {band['write'] / MiB:.0f} MiB/s, read {band['read'] / MiB:.0f} MiB/s",
        flush=True,
    )
    result["models"] = {str(f): describe_model(f) for f in folders}
    result["runs"] = []
    previous = json.loads(Path(args.out).read_text()) if args.append else None
    for folder in folders:
        info = result["models"][str(folder)]
        for method in args.methods.split(","):
            row = one_run(args, folder, info, method, work, band)
            if "timings" in row:
                row["cost"] = cost_law(row, info, args)
            result["runs"].append(row)
            save_result(args, merge_runs(previous, result) if previous else result)
    if previous:
        result = merge_runs(previous, result)
    shapes = [x for x in args.predict.split(",") if x]
    result["predictions"] = predict(result, shapes, args)
    save_result(args, result)
    text = table(args, result)
    if args.markdown:
        replace_marked_section(args.markdown, args.section, text)
    print(text)
    if not args.work and not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
