"""Human-readable summaries and machine-readable results of a run."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from secateurs.io import atomic_write_text

_PACKAGES = ("secateurs", "torch", "transformers", "datasets", "safetensors", "accelerate")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def fmt_bytes(count: int | None) -> str:
    if count is None:
        return "n/a"
    return f"{count / 2**20:,.0f} MiB"


def fmt_ppl(value: float | None) -> str:
    return "skipped" if value is None else f"{value:.3f}"


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The lines `secateurs prune` prints at the end, and writes with --save_log."""
    cfg, ppl, sp = result["config"], result["perplexity"], result["sparsity"]
    timing, memory = result["timings"], result["memory"]
    lines = [
        f"model            {cfg['model']} ({result['model']['parameters']:,} parameters)",
        f"method           {cfg['prune_method']}, {result['pattern']}, "
        f"target {cfg['sparsity_ratio']}",
        f"calibration      {cfg['dataset']}: {cfg['nsamples']} x {cfg['seqlen']} tokens, "
        f"seed {cfg['seed']}",
        f"evaluation       {ppl['eval_dataset']}: {ppl['windows']} windows of {cfg['seqlen']}",
        f"dense ppl        {fmt_ppl(ppl['dense'])}",
        f"pruned ppl       {fmt_ppl(ppl['pruned'])}",
        f"sparsity         {sp['overall']:.4f} over {len(sp['layers'])} linear layers "
        f"({'every layer meets the pattern' if not sp['violations'] else 'VIOLATIONS'})",
        f"prune time       {timing['prune']:.1f} s",
        f"peak memory      {fmt_bytes(memory['peak_rss'])} resident during pruning",
    ]
    recovery = result["prune"].get("recovery_mean_relative_error")
    if recovery:
        lines.insert(
            6,
            f"recovery         {cfg['recovery']}: mean relative output error "
            f"{recovery['before']:.4f} -> {recovery['after']:.4f}",
        )
    lines += [f"  violation: {v}" for v in sp["violations"]]
    return lines


def recovery_lines(layers: list[dict[str, Any]]) -> list[str]:
    """Per-sublayer pruning and recovery, grouped by block."""
    lines: list[str] = []
    block = None
    for layer in layers:
        if layer["block"] != block:
            block = layer["block"]
            lines.append(f"Processing layer: {block}")
        rows, cols = layer["shape"]
        lines.append(f"  Sublayer: {layer['sublayer']}")
        lines.append(
            f"    Pruned {layer['pruned']}/{rows * cols} weights ({layer['sparsity']:.2%})"
        )
        recovery = layer.get("recovery")
        if recovery:
            lines.append(
                f"    Recovery - Relative error: {recovery['relative_error_after']:.6f} "
                f"(without recovery {recovery['relative_error_before']:.6f})"
            )
    return lines


def write_json(path: str | Path, result: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(result, indent=2, default=str) + "\n")


def write_log(path: str | Path, result: dict[str, Any]) -> None:
    body = [*summary_lines(result), "", *recovery_lines(result["prune"]["layers"])]
    body += ["", "per-layer sparsity (measured):"]
    body += [f"  {name:<48} {value:.4f}" for name, value in result["sparsity"]["layers"].items()]
    atomic_write_text(path, "\n".join(body) + "\n")
