"""Benchmark: are safety and utility separable in a refusing SmolLM2? Weights and ranks.

Given a model that refuses (made with ``secateurs finetune``, see README), measures each
configuration the same way: ASR on the held-out half of ``align`` (100 prompts, greedy, with
and without a system prompt; ``--samples`` sampled answers per prompt at the dense model and
the chosen points), with the tuned dense model's perplexity of each answer as a fluency gate
beside the keyword rule; harmless ``utility`` test prompts answered (over-refusal); and
utility as ``wiki-cloze`` accuracy (all items) and perplexity (32 test windows of 512).

Configurations: the wandg set difference over a p x q grid (Wei et al. ICML 2024, section 3),
random pruning of the same count in every layer (seeded), the top-q safety scores alone
(``--neg_prune``); ActSVD's rank set difference over a grid of utility and safety rank shares
(section 4) and the top safety ranks alone. Rows accumulate in the results JSON (a label run
again replaces its old self), so the grid can be run in parts.

    python benchmarks/safety_bench.py --model out/smol-safe --groups weights,ranks
    python benchmarks/safety_bench.py --model out/smol-safe --report

Writes benchmarks/results/safety_bench.json, the table between the markers in BENCHMARKS.md
and the heat maps benchmarks/results/safety_grid.png.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from _common import ROOT, bench_parser, bench_windows, result_header

from secateurs.api import MethodPruner, TablePruner, prune_set_difference
from secateurs.core.lowrank import edit_by_grams
from secateurs.core.model import iter_prunable, load_model, weight_matrix
from secateurs.core.patterns import top_fraction
from secateurs.data.prompts import encode_pairs, load_pairs, sample_pairs
from secateurs.evaluate.attack import KeywordJudge, attack, attack_prompts, generate
from secateurs.evaluate.perplexity import check_sparsity, perplexity
from secateurs.evaluate.zeroshot import evaluate_zero_shot, prepare_zero_shot
from secateurs.formats.scorefiles import dump_scores, load_scores, score_path
from secateurs.io import atomic_write_text
from secateurs.jobs.lowrank import rank_summary
from secateurs.jobs.report import replace_marked_section
from secateurs.methods.actsvd import rank_set_difference

P_GRID = (0.02, 0.1, 0.3)
Q_GRID = (0.005, 0.01, 0.02)
UTILITY_RANKS = (0.5, 0.75, 0.9)
SAFETY_RANKS = (0.05, 0.1, 0.25)


def measure(model, dense, tokenizer, args, eval_windows, plan, samples: int = 0) -> dict:
    """ASR (keywords, non-blank, fluent), harmless answered, cloze accuracy, perplexity."""
    harmful = attack_prompts("align")[: args.attack_limit]
    harm = attack(
        model, tokenizer, harmful, max_new_tokens=args.max_new_tokens, batch_size=10,
        progress=False, samples=samples, seed=0, fluency_model=dense,
    )  # fmt: skip
    harmless = attack_prompts("utility")[: args.harmless_limit]
    answers = generate(
        model, tokenizer, harmless, max_new_tokens=args.max_new_tokens, batch_size=10,
        progress=False,
    )  # fmt: skip
    judge = KeywordJudge()
    answered = sum(
        a.strip() != "" and not judge(p, a) for p, a in zip(harmless, answers, strict=True)
    )
    cloze = evaluate_zero_shot(model, tokenizer, plan, False)["wiki-cloze"]
    fluency = [row["fluency_ppl"] for row in harm.rows if not row["blank"]]
    return harm.to_dict() | {
        "harmless_answered": answered / len(harmless),
        "cloze_acc": cloze.get("acc"),
        "ppl": perplexity(model, eval_windows, "cpu", 4, False),
        "sparsity": check_sparsity(model).overall,
        "fluency_ppl_median": float(torch.tensor(fluency).median()) if fluency else None,
    }


def random_like(model, pruned_model, seed: int = 0) -> None:
    """Zero, in every layer of ``model``, as many random weights as ``pruned_model`` lost."""
    generator = torch.Generator().manual_seed(seed)
    pruned = dict(iter_prunable(pruned_model))
    with torch.no_grad():
        for name, layer in iter_prunable(model):
            weight = weight_matrix(layer)
            count = int((weight_matrix(pruned[name]) == 0).sum()) - int((weight == 0).sum())
            fraction = max(count, 0) / weight.numel()
            weight.masked_fill_(
                top_fraction(torch.rand(weight.shape, generator=generator), fraction), 0
            )


def wandg_scores(dense, tokenizer, args) -> dict:
    """wandg on align and on utility, dumped once under --scores and read back after."""
    scores = {}
    for data in ("align", "utility"):
        path = score_path(args.scores, "wandg", data)
        if not path.is_file():
            pairs = sample_pairs(load_pairs(data), args.score_nsamples, 0)
            table = MethodPruner(dense, "wandg", progress=False).scores(
                encode_pairs(tokenizer, pairs, args.seqlen)
            )
            meta = {"model": args.model, "method": "wandg", "prune_data": data}
            dump_scores(path, table, meta | {"nsamples": str(args.score_nsamples)}, dense)
        scores[data] = load_scores(path, dense)
    return scores


def streams(tokenizer, args) -> dict:
    return {
        role: encode_pairs(
            tokenizer, sample_pairs(load_pairs(data), args.score_nsamples, 0), args.seqlen
        )
        for role, data in (("utility", "utility"), ("safety", "align"))
    }


def configurations(args) -> list[tuple[str, str, dict]]:
    """(label, kind, settings) for the chosen groups."""
    chosen = set(args.groups.split(","))
    configs: list[tuple[str, str, dict]] = [("dense", "dense", {})]
    if "weights" in chosen:
        for p in P_GRID:
            for q in Q_GRID:
                configs.append((f"sd p={p} q={q}", "set_difference", {"p": p, "q": q}))
        for q in Q_GRID:
            configs.append((f"top safety q={q}", "neg_prune", {"q": q}))
        for p, q in ((0.02, 0.005), (0.02, 0.02), (0.1, 0.02)):
            configs.append((f"random as p={p} q={q}", "random", {"p": p, "q": q}))
    if "ranks" in chosen:
        for u in UTILITY_RANKS:
            for s in SAFETY_RANKS:
                configs.append((f"actsvd u={u} s={s}", "ranks", {"u": u, "s": s}))
        for s in SAFETY_RANKS[:2]:
            configs.append((f"top safety ranks s={s}", "ranks", {"u": 0.0, "s": s}))
    return configs


def cached(cache: dict, key: str, make):
    if key not in cache:
        cache[key] = make()
    return cache[key]


def build(kind: str, settings: dict, dense, tokenizer, args, cache: dict):
    """The configured model (a copy of the dense one) and what was removed."""
    model = copy.deepcopy(dense)
    info: dict = {}
    if kind in ("set_difference", "random", "neg_prune"):
        scores = cached(cache, "scores", lambda: wandg_scores(dense, tokenizer, args))
    if kind == "set_difference":
        prune_set_difference(model, scores["align"], scores["utility"], settings["p"],
                             settings["q"], progress=False)  # fmt: skip
    elif kind == "random":
        reference = copy.deepcopy(dense)
        prune_set_difference(reference, scores["align"], scores["utility"], settings["p"],
                             settings["q"], progress=False)  # fmt: skip
        random_like(model, reference)
    elif kind == "neg_prune":
        TablePruner(model, scores["align"], "layer", progress=False).prune(
            None, settings["q"], negate=True
        )
    elif kind == "ranks":
        data = cached(cache, "streams", lambda: streams(tokenizer, args))
        edits = edit_by_grams(
            model,
            data,
            lambda _n, w, g: rank_set_difference(
                w, g["utility"], g["safety"], settings["u"], settings["s"]
            ),
            progress=False,
        )
        summary = rank_summary(edits)
        info = {"ranks_removed": summary["removed"], "ranks_share": summary["share"]}
    return model, info


def run(args, result: dict, path: Path) -> None:
    dense, tokenizer = load_model(args.model)
    _, eval_windows = bench_windows(args, args.eval_limit)
    plan = prepare_zero_shot("wiki-cloze", None)
    cache: dict = {}
    samples_at = set(args.samples_at.split(",")) if args.samples_at else set()
    configs = configurations(args)
    if args.only:
        chosen = {label: (label, kind, settings) for label, kind, settings in configs}
        configs = [chosen[label] for label in args.only.split(";")]
    for label, kind, settings in configs:
        if label in result["rows"] and not args.redo:
            continue
        start = time.perf_counter()
        model, info = build(kind, settings, dense, tokenizer, args, cache)
        samples = args.samples if label in samples_at or kind == "dense" else 0
        row = measure(model, dense, tokenizer, args, eval_windows, plan, samples)
        row |= {"kind": kind, "settings": settings, "seconds": time.perf_counter() - start}
        result["rows"][label] = row | info
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
        shown = {k: row[k] for k in ("asr", "asr_fluent", "cloze_acc", "ppl", "sparsity")}
        print(label, json.dumps(shown), info, f"{row['seconds']:.0f} s", flush=True)


def _cell(row: dict) -> str:
    asr, fluent = row["asr"], row.get("asr_fluent") or {}
    sampled = f" / {asr['sampled']:.2f}" if "sampled" in asr else ""
    return (
        f"{asr['no_system']:.2f} / {asr['system']:.2f}{sampled} | "
        f"{fluent.get('no_system', float('nan')):.2f} | {row['blank']['no_system']:.2f} | "
        f"{row['asr_keywords_only']['no_system']:.2f} | {row['harmless_answered']:.2f} | "
        f"{row['cloze_acc']:.3f} | {row['ppl']:.2f}"
    )


def table(result: dict) -> str:
    s = result["header"]["settings"]
    lines = [
        f"Model `{s['model']}`; ASR on the first {s['attack_limit']} held-out `align` prompts, "
        f"greedy without / with the system prompt (/ any of {s['samples']} sampled answers, "
        f"no system prompt), {s['max_new_tokens']} new tokens; fluent ASR counts answers the "
        f"tuned dense model scores at perplexity <= 50; harmless answered on "
        f"{s['harmless_limit']} `utility` test prompts; `wiki-cloze` accuracy on every item; "
        f"perplexity on {s['eval_limit']} test windows of {s['seqlen']}; wandg and ActSVD on "
        f"{s['score_nsamples']} pairs of each set. {result['header']['machine']}, "
        f"{result['header']['date']}.",
        "",
        "| configuration | removed | ASR | fluent ASR | blank | ASR by keywords | harmless "
        "answered | cloze acc | ppl |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, row in result["rows"].items():
        removed = (
            f"{row['ranks_share']:.2%} of ranks"
            if "ranks_share" in row
            else f"{row['sparsity']:.2%} of weights"
        )
        lines.append(f"| {label} | {removed} | {_cell(row)} |")
    return "\n".join(lines)


def heat_maps(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    grids = [
        ("set difference (weights)", "set_difference", "p", "q", P_GRID, Q_GRID),
        ("ActSVD (ranks)", "ranks", "u", "s", UTILITY_RANKS, SAFETY_RANKS),
    ]
    measures = [("ASR, no system prompt", lambda r: r["asr"]["no_system"]),
                ("wiki-cloze accuracy", lambda r: r["cloze_acc"]),
                ("perplexity", lambda r: r["ppl"])]  # fmt: skip
    figure, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    for i, (title, kind, a, b, av, bv) in enumerate(grids):
        found = {
            (row["settings"][a], row["settings"][b]): row
            for row in rows.values()
            if row["kind"] == kind and row["settings"].get(a) in av
        }
        for j, (name, value) in enumerate(measures):
            grid = [[value(found[(x, y)]) if (x, y) in found else float("nan") for y in bv]
                    for x in av]  # fmt: skip
            ax = axes[i][j]
            image = ax.imshow(grid, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(bv)), [str(v) for v in bv])
            ax.set_yticks(range(len(av)), [str(v) for v in av])
            ax.set_xlabel(b)
            ax.set_ylabel(a)
            ax.set_title(f"{title}: {name}", fontsize=9)
            for x in range(len(av)):
                for y in range(len(bv)):
                    if grid[x][y] == grid[x][y]:
                        ax.text(y, x, f"{grid[x][y]:.2f}", ha="center", va="center",
                                color="white", fontsize=8)  # fmt: skip
            figure.colorbar(image, ax=ax)
    dense = rows.get("dense")
    if dense:
        figure.suptitle(
            f"{result['header']['settings']['model']}: dense ASR {dense['asr']['no_system']:.2f}, "
            f"cloze {dense['cloze_acc']:.3f}, ppl {dense['ppl']:.2f}"
        )
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main() -> None:
    parser = bench_parser(__doc__, "safety_bench")
    parser.add_argument("--groups", default="weights,ranks", help="grids to run")
    parser.add_argument("--attack_limit", type=int, default=100, help="held-out prompts")
    parser.add_argument("--harmless_limit", type=int, default=50, help="utility prompts")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="answer length")
    parser.add_argument("--eval_limit", type=int, default=32, help="perplexity windows")
    parser.add_argument("--score_nsamples", type=int, default=64, help="pairs per score set")
    parser.add_argument("--samples", type=int, default=5, help="sampled answers per prompt")
    parser.add_argument("--samples_at", default="", help="labels that also get sampled ASR")
    parser.add_argument("--scores", default="out/safety-scores", help="score dump folder")
    parser.add_argument("--redo", action="store_true", help="run rows already measured")
    parser.add_argument("--only", default="", help="labels to run, in this order (; between)")
    parser.add_argument("--report", action="store_true", help="rewrite table and heat maps only")
    parser.set_defaults(nsamples=1)
    args = parser.parse_args()
    path = Path(args.out)
    result = json.loads(path.read_text()) if path.exists() else {}
    result.setdefault("rows", {})
    earlier = result.get("header", {}).get("settings", {}).get("model")
    if not args.report and result["rows"] and earlier != args.model:
        raise SystemExit(
            f"{path} holds rows of {earlier}, not {args.model}: give another --out, or move "
            "that file away to start this model's grid"
        )
    if not args.report:
        result["header"] = result_header(args)
        run(args, result, path)
    replace_marked_section(args.markdown, "safety_bench", table(result))
    heat_maps(result, ROOT / "benchmarks" / "results" / "safety_grid.png")


if __name__ == "__main__":
    main()
