"""One pruning run of the peer benchmark, in a process of its own.

Run by ``peer_bench.py``: ``--tool secateurs`` under the package's venv, ``--tool
llmcompressor`` under ``.venv-peer``. Both load the same fp32 model folder, calibrate on the same
token ids (a safetensors file), prune with ``--threads`` threads, and save the pruned weights of
the decoder's linear layers (safetensors, plain tensors: no tool-specific checkpoint format) for
``peer_bench.py`` to load into the dense model and evaluate. The prune wall time and peak resident
memory are measured around the pruning call alone, by the same code for both tools.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

SRC = Path(__file__).resolve().parent.parent / "src" / "secateurs"


def _profiling():
    """``secateurs.core.profiling`` loaded from its file: it needs only the standard library and
    torch, so the peer's venv can use it without importing the package."""
    spec = importlib.util.spec_from_file_location("_profiling", SRC / "core" / "profiling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def prune_secateurs(model, ids: torch.Tensor, method: str, pattern: str, batch_size: int):
    # the frontier benchmark's row names (alps, sparsegpt+recp, ...) build the same pruners here
    from frontier_bench import pruner_for

    row = "wanda+ls" if method == "wanda+least_squares" else method
    pruner = pruner_for(model, row, batch_size)
    return lambda: pruner.prune(ids, 0.5, pattern)


def prune_llmcompressor(model, ids: torch.Tensor, method: str, pattern: str, batch_size: int):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    modifier_class = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}[method]
    structure = "0:0" if pattern == "unstructured" else pattern
    modifier = modifier_class(sparsity=0.5, mask_structure=structure, ignore=["re:.*lm_head"])
    rows = ids.tolist()
    dataset = Dataset.from_dict(
        {"input_ids": rows, "attention_mask": [[1] * len(rows[0])] * len(rows)}
    )

    def run():
        oneshot(
            model=model,
            dataset=dataset,
            recipe=modifier,
            num_calibration_samples=len(rows),
            max_seq_length=len(rows[0]),
            shuffle_calibration_samples=False,
            batch_size=batch_size,
            pipeline="sequential",
        )

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tool", choices=("secateurs", "llmcompressor"), required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--pattern", required=True)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--calibration", required=True, help="safetensors file with 'input_ids'")
    parser.add_argument("--out", required=True, help="folder for the pruned model and result")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    ids = load_file(args.calibration)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    build = prune_secateurs if args.tool == "secateurs" else prune_llmcompressor
    run = build(model, ids, args.method, args.pattern, args.batch_size)
    profiling = _profiling()
    with profiling.measure() as memory:
        run()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    weights = {
        f"{name}.weight": module.weight.detach().contiguous()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"
    }
    save_file(weights, out / "pruned_linears.safetensors")
    result = {
        "tool": args.tool,
        "method": args.method,
        "pattern": args.pattern,
        "threads": torch.get_num_threads(),
        "prune_s": memory.seconds,
        "peak_rss": memory.peak_rss,
        "rss_before_prune": memory.start_rss,
        "save_s": time.perf_counter() - start,
    }
    (out / "peer_run.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
