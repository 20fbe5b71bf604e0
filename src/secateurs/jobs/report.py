"""Human-readable summaries and machine-readable results of a run."""

from __future__ import annotations

import csv
import io
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from secateurs.errors import SecateursError
from secateurs.evaluate.zeroshot import summary_lines as zero_shot_lines
from secateurs.io import atomic_file, atomic_write_text, ensure_free

_PACKAGES = ("secateurs", "torch", "transformers", "datasets", "safetensors", "accelerate")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def plural(count: int, noun: str) -> str:
    """``1 window``, ``2 windows``."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def fmt_bytes(count: int | None) -> str:
    if count is None:
        return "n/a"
    return f"{count / 2**20:,.0f} MiB"


def fmt_ppl(value: float | None) -> str:
    return "skipped" if value is None else f"{value:.3f}"


def calibration_line(result: dict[str, Any]) -> str:
    """Where the scores came from: calibration samples, score files, or no data at all."""
    cfg, calibration = result["config"], result["calibration"]
    if "score_files" in calibration:
        return f"scores           loaded from {', '.join(calibration['score_files'].values())}"
    if not calibration:
        return f"calibration      none: {cfg['prune_method']} scores the weights alone"
    return (
        f"calibration      {calibration['data']}: {calibration['samples']} x {cfg['seqlen']} "
        f"tokens, seed {cfg['seed']}"
    )


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The lines `secateurs prune` prints at the end, and writes with --save_log."""
    if "perplexity" not in result:  # --dump_wanda_score stops before pruning
        return [f"scores           {result['scores']} (raw scores; nothing was pruned)"]
    cfg, ppl, sp = result["config"], result["perplexity"], result["sparsity"]
    timing, memory = result["timings"], result["memory"]
    lines = [
        f"model            {cfg['model']} ({result['model']['parameters']:,} parameters)",
        f"method           {cfg['prune_method']}, {result['pattern']}, "
        f"target {cfg['sparsity_ratio']}",
        calibration_line(result),
        f"evaluation       {ppl['eval_dataset']}: {plural(ppl['windows'], 'window')} of "
        f"{cfg['seqlen']}",
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
    refits = result["prune"].get("reconstruction")
    if refits:
        by_aim: dict[str, list[dict]] = {}
        for refit in refits:
            by_aim.setdefault(refit["aim"], []).append(refit)
        parts = [
            f"{aim} {_mean(r['relative_error_before'] for r in rows):.4f} -> "
            f"{_mean(r['relative_error_after'] for r in rows):.4f}"
            for aim, rows in by_aim.items()
        ]
        lines.insert(
            6,
            f"reconstruction   {cfg['reconstruct']} stream, mean relative error against the "
            f"target: {', '.join(parts)}",
        )
    saved = result.get("saved_model")
    if saved:
        lines.append(
            f"saved model      MLP width {saved['width_before']} -> {saved['width_after']}, "
            f"{saved['parameters_after']:,} parameters"
        )
    if result.get("idf_form"):
        lines[1] += f", IDF form {result['idf_form']}"
    allocation = result["prune"].get("allocation") or {}
    if allocation.get("block_ratios"):
        lines[1] += f", {allocation['kind']} block ratios (mean {allocation['mean_ratio']:.4f})"
    guard = result["prune"].get("guard")
    if guard:
        lines.append(
            f"WARNING          the scores of {plural(len(guard), 'layer')} are zero on whole "
            "high-energy input channels (see guard below / in the JSON): expect a collapsed model"
        )
    attack = result.get("attack")
    if attack:
        asr = ", ".join(f"{k} {v:.3f}" for k, v in attack["asr"].items())
        lines.append(f"attack (ASR)     {asr} over {attack['prompts']} held-out prompts")
        if any(attack.get("blank", {}).values()):
            blank = ", ".join(f"{k} {v:.3f}" for k, v in attack["blank"].items())
            lines.append(f"blank answers    {blank} (not counted as successful attacks)")
    if result.get("zero_shot"):
        lines += zero_shot_lines(result["zero_shot"])
    lines += [f"  violation: {v}" for v in sp["violations"]]
    return lines


def guard_lines(guard: dict[str, dict[str, Any]]) -> list[str]:
    """The channel guard's findings, one line per flagged layer."""
    if not guard:
        return ["channel guard: no layer scores high-energy input channels zero"]
    lines = ["channel guard: layers whose scores are zero on high-energy input channels"]
    for name, alarm in guard.items():
        channels = ", ".join(str(c) for c in alarm["channels"])
        lines.append(
            f"  {name:<40} {alarm['count']} channel(s), {alarm['energy_share']:.1%} of the "
            f"input energy; largest: {channels}"
        )
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
    guard = result["prune"].get("guard")
    body = [*summary_lines(result), "", *([] if guard is None else guard_lines(guard))]
    body += ["", *recovery_lines(result["prune"]["layers"])]
    body += ["", "per-layer sparsity (measured):"]
    body += [f"  {name:<48} {value:.4f}" for name, value in result["sparsity"]["layers"].items()]
    atomic_write_text(path, "\n".join(body) + "\n")


def _change(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def comparison_table(rows: list[dict[str, Any]], dense_ppl: float) -> str:
    """A markdown table of a method comparison, with the dense model first."""
    lines = [
        "| method | sparsity type | actual_sparsity | ppl_test | change vs wanda | prune s |",
        "|---|---|---|---|---|---|",
        f"| dense | - | 0.0000 | {dense_ppl:.2f} | - | - |",
    ]
    for r in rows:
        met = "" if r["pattern_met"] else " (pattern NOT met)"
        guard = f" (guard: {len(r['guard_layers'])} layers)" if r.get("guard_layers") else ""
        lines.append(
            f"| {r['method']}{guard} | {r['sparsity_type']} | {r['actual_sparsity']:.4f}{met} "
            f"| {r['ppl_test']:.2f} | {_change(r['change_vs_wanda'])} | {r['prune_s']:.1f} |"
        )
    return "\n".join(lines)


_CSV_COLUMNS = (
    "method",
    "sparsity_type",
    "target_sparsity",
    "actual_sparsity",
    "ppl_test",
    "change_vs_wanda",
    "prune_s",
    "pattern_met",
)


def comparison_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, _CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot_comparison(
    rows: list[dict[str, Any]], dense_ppl: float, path: str | Path, title: str = ""
) -> None:
    """Perplexity against actual sparsity: a line per method and sparsity type."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in rows:
        series.setdefault((r["method"], r["sparsity_type"]), []).append(
            (r["actual_sparsity"], r["ppl_test"])
        )
    methods = list(dict.fromkeys(method for method, _ in series))
    types = list(dict.fromkeys(kind for _, kind in series))
    colors = plt.get_cmap("tab10")
    for (method, sparsity_type), points in series.items():
        points.sort()
        axes.plot(
            *zip(*points, strict=True),
            color=colors(methods.index(method) % 10),
            marker="osD^v<>"[types.index(sparsity_type) % 7],
            linestyle="-" if sparsity_type == "unstructured" else ":",
            label=f"{method} ({sparsity_type})",
        )
    xs = [r["actual_sparsity"] for r in rows]
    axes.set_xlim(max(0.0, min(xs) - 0.1), min(1.0, max(xs) + 0.1))
    axes.ticklabel_format(axis="x", useOffset=False)
    axes.axhline(dense_ppl, color="grey", linestyle="--", label=f"dense ({dense_ppl:.2f})")
    axes.set_yscale("log")
    axes.set_xlabel("actual sparsity of the decoder's linear layers")
    axes.set_ylabel("perplexity (log scale)")
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


def check_plot_path(path: str | None) -> None:
    """--save_plot names a new .png file in a writable place."""
    if path is None:
        return
    if Path(path).suffix.lower() != ".png":
        raise SecateursError(
            f"--save_plot writes a PNG image: give a path ending in .png, not '{path}'"
        )
    ensure_free(path, "--save_plot")


def _block_index(name: str, order: dict[str, int]) -> int:
    """The number at the end of a block's name (model.layers.7 -> 7), else its position."""
    tail = name.rsplit(".", 1)[-1]
    return int(tail) if tail.isdigit() else order.setdefault(name, len(order))


def plot_layers(result: dict[str, Any], path: str | Path) -> None:
    """Per-layer sparsity (and recovery error, when recovery ran) by block and sublayer."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    layers = result["prune"]["layers"]
    recovered = [layer for layer in layers if layer.get("recovery")]
    figure, axes = plt.subplots(
        2 if recovered else 1, 1, figsize=(8, 7 if recovered else 4), sharex=True, squeeze=False
    )
    order: dict[str, int] = {}
    sublayers = list(dict.fromkeys(layer["sublayer"] for layer in layers))
    colors = plt.get_cmap("tab10")
    for i, sublayer in enumerate(sublayers):
        own = [layer for layer in layers if layer["sublayer"] == sublayer]
        blocks = [_block_index(layer["block"], order) for layer in own]
        style = {"color": colors(i % 10), "marker": "o", "markersize": 3}
        axes[0][0].plot(blocks, [layer["sparsity"] for layer in own], label=sublayer, **style)
        done = [layer for layer in own if layer.get("recovery")]
        if done:
            xs = [_block_index(layer["block"], order) for layer in done]
            errors = [layer["recovery"] for layer in done]
            axes[1][0].plot(xs, [e["relative_error_after"] for e in errors], **style)
            axes[1][0].plot(
                xs, [e["relative_error_before"] for e in errors], linestyle=":", **style
            )
    cfg = result["config"]
    allocation = cfg.get("sparsity_allocation", "uniform")
    axes[0][0].set_title(
        f"{cfg['model']}: {cfg['prune_method']}, {result['pattern']}"
        + ("" if allocation == "uniform" else f", {allocation} allocation")
        + f" (overall {result['sparsity']['overall']:.4f})"
    )
    axes[0][0].set_ylabel("sparsity")
    axes[0][0].legend(fontsize=7, ncol=2)
    if recovered:
        axes[1][0].set_ylabel("relative output error")
        axes[1][0].set_title(
            f"recovery ({cfg['recovery']}): solid after, dotted without recovery", fontsize=9
        )
    axes[-1][0].set_xlabel("block")
    figure.tight_layout()
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


def replace_marked_section(path: str | Path, name: str, body: str) -> None:
    """Put ``body`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in a markdown
    file (appended with its markers if they are not there yet)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    path = Path(path)
    section = f"{start}\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    atomic_write_text(path, text)
