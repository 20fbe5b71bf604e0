"""Benchmark: structured pruning's speed against quality, one-shot and after recovery.

Every configuration is pruned from the same dense model with the same calibration windows
(32 x 512 of `wiki-sample`, seed 0), cut to a smaller model of the same class, and measured:
perplexity on the first test windows, `wiki-cloze` accuracy (lm-eval, first N items), and speed
through plain transformers on this CPU (prefill 1 x 512 and greedy decode of 128 tokens with a
KV cache, fp32 and bf16, median of repeats), as a ratio to the dense model measured in the
same run. Baselines in the same table: today's uncompensated Wanda neuron pruning
(`--sparsity_type neuron`, then cut), magnitude neurons without compensation, and ShortGPT
block removal.

    python benchmarks/structure_bench.py --configs baseline25,ours25   # some rows
    python benchmarks/structure_bench.py --recover ours25 --minutes 12  # distil one row
    python benchmarks/structure_bench.py --report                       # table + PNG

Rows accumulate in benchmarks/results/structure_bench_<model>.json (a row run again
replaces its old self); --report writes the table into BENCHMARKS.md and the Pareto front
to benchmarks/results/structure_<model>.png.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import torch
import transformers
from _common import ROOT, bench_parser, bench_windows, result_header

from secateurs.api import WandaPruner
from secateurs.core.model import load_model, parameter_count
from secateurs.core.structure import StructurePruner, StructureSpec
from secateurs.data.prompts import text_batch
from secateurs.evaluate.perplexity import perplexity
from secateurs.evaluate.speed import measure_speed
from secateurs.evaluate.zeroshot import evaluate_zero_shot, prepare_zero_shot
from secateurs.formats.shrink import cut_structure, shrink_mlps
from secateurs.io import atomic_write_text
from secateurs.jobs.finetune import LoraOptions, finetune
from secateurs.jobs.report import replace_marked_section
from secateurs.methods.units import unit_method

# label: (kind, settings). kind "neuron" is today's masked-then-cut Wanda neuron pruning.
CONFIGS: dict[str, tuple[str, dict]] = {
    "baseline25": ("neuron", {"ratio": 0.25}),
    "baseline50": ("neuron", {"ratio": 0.5}),
    "magnitude25": ("units", {"neurons": 0.25, "score": "magnitude", "compensation": "none"}),
    "magnitude50": ("units", {"neurons": 0.5, "score": "magnitude", "compensation": "none"}),
    "shortgpt4": ("units", {"blocks": 4, "depth": "shortgpt", "compensation": "none"}),
    "shortgpt8": ("units", {"blocks": 8, "depth": "shortgpt", "compensation": "none"}),
    "shortgpt2": ("units", {"blocks": 2, "depth": "shortgpt", "compensation": "none"}),
    "depth4": ("units", {"blocks": 4, "depth": "angular"}),
    "depth2": ("units", {"blocks": 2, "depth": "angular"}),
    "depth8": ("units", {"blocks": 8, "depth": "angular"}),
    "wanda_ls25": ("units", {"neurons": 0.25, "score": "wanda"}),
    "flap_ls25": ("units", {"neurons": 0.25, "score": "flap"}),
    "ours25": ("units", {"neurons": 0.25, "score": "ziplm"}),
    "ours50": ("units", {"neurons": 0.5, "score": "ziplm"}),
    "flap_ls50": ("units", {"neurons": 0.5, "score": "flap"}),
    "ours_mix": ("units", {"neurons": 0.2, "heads": 0.34, "score": "ziplm"}),
    "ours_mix50": ("units", {"neurons": 0.4, "heads": 0.34, "score": "ziplm"}),
    "ours25_gemma_heads": ("units", {"neurons": 0.2, "heads": 0.25, "score": "ziplm"}),
}
# the same rows with the refit aimed at the dense model's block output in every block
CONFIGS |= {
    f"{label}_dense": ("units", CONFIGS[label][1] | {"target": "dense"})
    for label in ("ours25", "ours50", "flap_ls25", "flap_ls50", "ours_mix")
}


def speeds(model, repeats: int) -> dict:
    """Prefill and decode tokens/s in fp32 and bf16 (a bf16 copy of the model)."""
    out = {"float32": measure_speed(model, repeats=repeats).to_dict()}
    half = copy.deepcopy(model).to(torch.bfloat16)
    out["bfloat16"] = measure_speed(half, repeats=repeats).to_dict()
    return out


def prune_config(dense, label: str, windows, batch_size: int):
    """A pruned, cut copy of ``dense`` for configuration ``label``, and what it removed."""
    kind, cfg = CONFIGS[label]
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    if kind == "neuron":
        WandaPruner(model, batch_size=batch_size, progress=False).prune(
            windows, cfg["ratio"], "neuron"
        )
        shrink_mlps(model)
    else:
        spec = StructureSpec(
            neurons=cfg.get("neurons", 0.0),
            heads=cfg.get("heads", 0.0),
            blocks=cfg.get("blocks", 0),
            compensation=cfg.get("compensation", "least_squares"),
            target=cfg.get("target", "auto"),
        )
        width = unit_method(cfg.get("score", "ziplm"), "width").fn
        depth = unit_method(cfg.get("depth", "angular"), "depth").fn
        pruner = StructurePruner(model, spec, width, depth, batch_size=batch_size, progress=False)
        cut_structure(model, pruner.prune(windows))
    return model, time.perf_counter() - start


def quality(model, tokenizer, eval_windows, plan) -> dict:
    ppl = perplexity(model, eval_windows, batch_size=4, progress=False)
    cloze = evaluate_zero_shot(model, tokenizer, plan, False)["wiki-cloze"]
    return {"ppl": ppl, "cloze_acc": cloze.get("acc"), "cloze_acc_norm": cloze.get("acc_norm")}


def load_rows(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": {}}


def save_rows(path: Path, result: dict) -> None:
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")


def run_configs(args, result: dict, path: Path) -> None:
    dense, tokenizer = load_model(args.model)
    windows, eval_windows = bench_windows(args, args.eval_limit)
    plan = prepare_zero_shot("wiki-cloze", args.cloze_limit)
    if "dense" not in result["rows"] or args.redo_dense:
        row = quality(dense, tokenizer, eval_windows, plan)
        row["parameters"] = parameter_count(dense)
        result["rows"]["dense"] = row
    for label in args.configs.split(","):
        model, seconds = prune_config(dense, label, windows, args.batch_size)
        row = quality(model, tokenizer, eval_windows, plan)
        # dense and pruned timed back to back, so the ratio sees the same machine state
        dense_speed, pruned_speed = speeds(dense, args.repeats), speeds(model, args.repeats)
        row |= {
            "config": CONFIGS[label],
            "prune_s": seconds,
            "parameters": parameter_count(model),
            "speed": {"dense": dense_speed, "pruned": pruned_speed},
        }
        result["rows"][label] = row
        if args.save_models:
            model.save_pretrained(Path(args.save_models) / label)
            tokenizer.save_pretrained(Path(args.save_models) / label)
        save_rows(path, result)
        print(
            label, json.dumps({k: row[k] for k in ("ppl", "cloze_acc", "parameters")}), flush=True
        )


def recover(args, result: dict, path: Path) -> None:
    """Distil a saved row from the dense model within ``--minutes``, then measure it again."""
    label = args.recover
    dense, tokenizer = load_model(args.model)
    folder = Path(args.save_models) / label
    model, _ = load_model(str(folder), tokenizer=tokenizer)
    train_windows, eval_windows = bench_windows(
        args, args.eval_limit, args.train_samples, args.train_seqlen
    )
    batch = text_batch(train_windows)
    settings = {
        "lr": args.lr,
        "batch_size": args.train_batch,
        "train": "full",
        "lm_weight": args.lm_weight,
    }
    # the clock bounds the training, not a step count guessed from the first steps
    options = LoraOptions(steps=1_000_000, minutes=args.minutes, **settings)
    tuned, report = finetune(model, batch, options, progress=True, teacher=dense)
    plan = prepare_zero_shot("wiki-cloze", args.cloze_limit)
    row = quality(tuned, tokenizer, eval_windows, plan)
    row |= {
        "finetune": report.to_dict() | settings | {"minutes": args.minutes},
        "train_windows": f"{args.train_samples} x {args.train_seqlen}",
    }
    result["rows"][label].setdefault("recovered", {})
    result["rows"][label]["recovered"] = row
    save_rows(path, result)
    print(label, "recovered", json.dumps({k: row[k] for k in ("ppl", "cloze_acc")}), flush=True)


RELOAD = """
import json, math, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
windows = load_file(sys.argv[2])["windows"]
with torch.no_grad():
    losses = [float(model(w[None], labels=w[None]).loss) for w in windows]
assert "secateurs" not in sys.modules
print(json.dumps({"ppl": math.exp(sum(losses) / len(losses))}))
"""


def reload_check(args, result: dict, path: Path) -> None:
    """Each saved row loaded by plain transformers in a process without secateurs: its
    perplexity on the same windows, beside the one secateurs measured."""
    import sys
    import tempfile

    from _common import run_isolated
    from safetensors.torch import save_file

    _, eval_windows = bench_windows(args, args.eval_limit, 1, args.seqlen)
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "windows.safetensors"
        save_file({"windows": eval_windows.contiguous()}, file)
        for label in args.reload_check.split(","):
            saved = Path(args.save_models) / label
            out = run_isolated(
                [sys.executable, "-c", RELOAD, str(saved), str(file)], ROOT / "benchmarks", label
            )
            ppl = json.loads(out.strip().splitlines()[-1])["ppl"]
            result["rows"][label]["reloaded_ppl"] = ppl
            print(label, "secateurs", result["rows"][label]["ppl"], "plain transformers", ppl)
    save_rows(path, result)


def _measured(row: dict, dtype: str, what: str) -> float:
    key = f"{what}_tokens_per_s"
    return row["speed"]["pruned"][dtype][key] / row["speed"]["dense"][dtype][key]


def speedup(row: dict, dtype: str, what: str, rows: dict | None = None) -> float:
    """The speed-up of ``row``'s shape: the median over every row of the same parameter count
    (the same architecture runs at one speed; single timings on a shared machine scatter)."""
    if rows is None:
        return _measured(row, dtype, what)
    same = [r for r in rows.values() if "speed" in r and r["parameters"] == row["parameters"]]
    return statistics.median(_measured(r, dtype, what) for r in same)


def table(result: dict) -> str:
    dense = result["rows"]["dense"]
    lines = [
        "| configuration | parameters | prefill fp32 | decode fp32 | prefill bf16 | decode bf16 "
        "| ppl | cloze acc | ppl after recovery | cloze after |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| dense | {dense['parameters'] / 1e6:.1f} M | 1.00x | 1.00x | 1.00x | 1.00x "
        f"| {dense['ppl']:.2f} | {dense['cloze_acc']:.3f} | | |",
    ]
    rows = [(k, v) for k, v in result["rows"].items() if k != "dense"]
    everything = result["rows"]
    rows.sort(key=lambda kv: (speedup(kv[1], "float32", "prefill", everything), kv[0]))
    for label, row in rows:
        rec = row.get("recovered") or {}
        after = f"{rec['ppl']:.2f}" if rec else ""
        cloze_after = f"{rec['cloze_acc']:.3f}" if rec else ""
        ratios = " | ".join(
            f"{speedup(row, dtype, what, everything):.2f}x"
            for dtype in ("float32", "bfloat16")
            for what in ("prefill", "decode")
        )
        lines.append(
            f"| {label} {describe(row['config'])} | {row['parameters'] / 1e6:.1f} M | {ratios} "
            f"| {row['ppl']:.2f} | {row['cloze_acc']:.3f} | {after} | {cloze_after} |"
        )
    return "\n".join(lines)


def describe(config) -> str:
    kind, cfg = config
    if kind == "neuron":
        return f"(Wanda neurons {cfg['ratio']:.0%}, no compensation)"
    parts = []
    if cfg.get("neurons"):
        parts.append(f"{cfg['neurons']:.0%} neurons")
    if cfg.get("heads"):
        parts.append(f"{cfg['heads']:.0%} heads")
    if cfg.get("blocks"):
        parts.append(f"{cfg['blocks']} blocks by {cfg.get('depth', 'angular')}")
    method = cfg.get("score", "ziplm") if (cfg.get("neurons") or cfg.get("heads")) else ""
    compensation = cfg.get("compensation", "least_squares")
    target = f"target {cfg['target']}" if cfg.get("target", "auto") != "auto" else ""
    return f"({', '.join(parts)}; {' '.join(filter(None, (method, compensation, target)))})"


def plot(result: dict, path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = result["rows"]["dense"]
    ax.scatter([1.0], [dense["ppl"]], marker="*", s=120, color="black", label="dense")
    ceiling = 12 * dense["ppl"]
    styles = {"baseline": "tab:red", "magnitude": "tab:gray", "shortgpt": "tab:orange"}
    for label, row in result["rows"].items():
        if label == "dense":
            continue
        x = speedup(row, "float32", "decode", result["rows"])
        color = next((c for k, c in styles.items() if label.startswith(k)), "tab:blue")
        y = min(row["ppl"], ceiling)  # a wrecked row is drawn at the top edge, marked
        name = label if y == row["ppl"] else f"{label} (ppl {row['ppl']:.3g}, off scale)"
        ax.scatter([x], [y], color=color, marker="o" if y == row["ppl"] else "x")
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if row.get("recovered"):
            ax.scatter([x], [row["recovered"]["ppl"]], color=color, marker="^")
            ax.plot([x, x], [row["ppl"], row["recovered"]["ppl"]], color=color, lw=0.6, ls=":")
    ax.set_yscale("log")
    ax.set_ylim(top=ceiling * 1.3)
    ax.set_xlabel("decode speed-up, fp32, batch 1 (dense = 1)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"{model}: structured pruning, one-shot (o) and after recovery (^)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(args, result: dict) -> None:
    name = Path(args.model).name
    png = ROOT / "benchmarks" / "results" / f"structure_{name}.png"
    plot(result, png, name)
    head = result.get("header", {})
    body = (
        f"{name} (fp32 weights); calibration {args.nsamples} x {args.seqlen} of `wiki-sample` "
        f"(seed 0); perplexity on the first {args.eval_limit} test windows of {args.seqlen}; "
        f"`wiki-cloze` accuracy on its first {args.cloze_limit} items; speed = tokens/s of "
        "the pruned model over the dense one timed back to back in the same run (prefill 1 x "
        f"512, greedy decode of 128 tokens with a KV cache, median of {args.repeats}), then the "
        "median over the rows of the same shape (same parameter count: the same architecture). "
        f"Machine: {head.get('machine', '?')}; {head.get('date', '?')}.\n\n{table(result)}\n\n"
        f"![Pareto front](benchmarks/results/{png.name})"
    )
    replace_marked_section(Path(args.markdown), f"structure_bench_{name}", body)
    print(table(result))


def main() -> None:
    parser = bench_parser(__doc__, "structure_bench")
    parser.add_argument("--configs", default="", help="comma-separated row names (all)")
    parser.add_argument("--eval_limit", type=int, default=32, help="test windows")
    parser.add_argument("--cloze_limit", type=int, default=200, help="wiki-cloze items")
    parser.add_argument("--repeats", type=int, default=3, help="timings per speed figure")
    parser.add_argument("--redo_dense", action="store_true", help="measure the dense row again")
    parser.add_argument(
        "--save_models", default="/tmp/structure_models", help="where rows are saved"
    )
    parser.add_argument(
        "--recover", default="", help="one saved row to distil from the dense model"
    )
    parser.add_argument("--minutes", type=float, default=12.0, help="recovery time per row")
    parser.add_argument("--lr", type=float, default=1e-4, help="recovery learning rate")
    parser.add_argument("--lm_weight", type=float, default=1.0, help="label loss beside the KL")
    parser.add_argument("--train_batch", type=int, default=4, help="recovery batch")
    parser.add_argument("--train_samples", type=int, default=512, help="recovery windows")
    parser.add_argument("--train_seqlen", type=int, default=256, help="recovery window length")
    parser.add_argument(
        "--report", action="store_true", help="rewrite table and plot (after any run asked for)"
    )
    parser.add_argument("--reload_check", default="", help="saved rows to reload without secateurs")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    path = Path(args.out.replace(".json", f"_{Path(args.model).name}.json"))
    result = load_rows(path)
    if args.configs or args.recover or args.reload_check:  # a report keeps the runs' header
        result["header"] = result_header(args)
    if args.configs:
        run_configs(args, result, path)
    if args.recover:
        recover(args, result, path)
    if args.reload_check:
        reload_check(args, result, path)
    if args.report:
        report(args, result)


if __name__ == "__main__":
    main()
