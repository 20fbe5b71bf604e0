"""Benchmark: the one-shot quality frontier, every method against SparseGPT in one run.

For each sparsity setting (50% and 70% unstructured, 2:4, 4:8) the same calibration windows
prune a fresh copy of the model with each row's method, then perplexity is measured on the
same test windows (all of them by default). Rows:

- ``wanda``, ``sparsegpt``, ``alps`` (Meng et al. 2024);
- ``wanda+ls``: Wanda's mask, survivors refit by least squares (``--use_recovery``);
- ``wanda+dsnot`` and ``wanda+ls+dsnot``: the mask refined by DSnoT first (``--refine dsnot``);
- ``+recp`` and ``+rec``: block reconstruction (``--reconstruct pruned`` / ``dense``): each
  block's ``o_proj`` and ``down_proj`` refit to the unpruned block on the pruned stream, or to
  the dense model's block on the dense stream; ``+train``: then every surviving weight of
  the block trained towards it (``--reconstruct_epochs 4``, ``--train_lr``).

Prune time is given as a ratio to SparseGPT's in the same run and setting, perplexity as a
change against SparseGPT's; peak resident memory is the kernel's counter during the prune.
``--cloze_limit N`` also measures ``wiki-cloze`` accuracy (lm-eval, first N items) of the
dense model and of each row run in that call (the issue asks it of the best three).
Rows already in the results file are kept (a row run again replaces its old self), so the grid
can be run in parts: ``--rows`` and ``--settings`` pick them.

    python benchmarks/frontier_bench.py --settings 2:4,0.7 --rows sparsegpt,wanda+ls,alps
    python benchmarks/frontier_bench.py --settings 2:4 --rows alps+recp --cloze_limit 200
    python benchmarks/frontier_bench.py --report

Writes benchmarks/results/frontier_bench[_MODEL].json and its table in BENCHMARKS.md.
"""

from __future__ import annotations

import copy
import gc
import json
from datetime import datetime
from pathlib import Path

from _common import ROOT, bench_parser, bench_windows, result_header, save_result

from secateurs.api import MethodPruner
from secateurs.core.model import load_model
from secateurs.core.patterns import effective_ratio, parse_pattern
from secateurs.core.profiling import measure
from secateurs.core.recovery import BlockReconstruction, WeightRedistributor
from secateurs.evaluate.perplexity import check_sparsity, perplexity
from secateurs.evaluate.zeroshot import evaluate_zero_shot, prepare_zero_shot
from secateurs.jobs.report import replace_marked_section
from secateurs.methods.dsnot import MaskRefiner
from secateurs.methods.recovery import LeastSquaresStrategy, MaskedRefit

SETTINGS = ("0.5", "2:4", "4:8", "0.7")
ROWS = (
    "sparsegpt",
    "sparsegpt+recp",
    "sparsegpt+rec",
    "wanda",
    "wanda+dsnot",
    "wanda+recp",
    "wanda+rec",
    "wanda+recp+train",
    "wanda+ls",
    "wanda+ls+dsnot",
    "wanda+ls+recp",
    "wanda+ls+rec",
    "wanda+ls+recp+train",
    "alps",
    "alps+recp",
    "alps+rec",
)
STREAMS = {"recp": "pruned", "rec": "dense"}
TRAIN_EPOCHS = 4  # +train: Adam passes over the calibration windows per block


def pattern_of(setting: str) -> tuple[str, float]:
    """(sparsity type, ratio) of a setting: a ratio for unstructured, or N:M."""
    return ("unstructured", float(setting)) if ":" not in setting else (setting, 0.5)


def pruner_for(model, row: str, batch_size: int, lr: float = 1e-4) -> MethodPruner:
    """The pruner a row names: a method, with least squares, DSnoT and block reconstruction
    where it says so."""
    method, *extras = row.split("+")
    stream = next((STREAMS[e] for e in extras if e in STREAMS), None)
    epochs = TRAIN_EPOCHS if "train" in extras else 0
    reconstruction = None
    if stream is not None:
        reconstruction = BlockReconstruction(MaskedRefit(), stream, epochs, lr)
    return MethodPruner(
        model,
        method,
        batch_size=batch_size,
        progress=False,
        redistributor=WeightRedistributor(LeastSquaresStrategy()) if "ls" in extras else None,
        refiner=MaskRefiner() if "dsnot" in extras else None,
        reconstruction=reconstruction,
    )


def cloze(model, tokenizer, plan) -> float:
    """``wiki-cloze`` accuracy of ``model`` on the prepared items."""
    return evaluate_zero_shot(model, tokenizer, plan, False)["wiki-cloze"]["acc"]


def run_row(dense, row: str, setting: str, windows, eval_windows, args, zero_shot=None) -> dict:
    model = copy.deepcopy(dense)
    sparsity_type, target = pattern_of(setting)
    pruner = pruner_for(model, row, args.batch_size, args.train_lr)
    pattern = parse_pattern(sparsity_type, pruner.default_scope)
    ratio = effective_ratio(pattern, target)
    gc.collect()
    with measure() as memory:
        pruner.prune(windows, ratio, sparsity_type)
    check = check_sparsity(model, pattern, ratio)
    ppl = perplexity(model, eval_windows, batch_size=args.eval_batch_size, progress=False)
    accuracy = None if zero_shot is None else cloze(model, *zero_shot)
    del model
    gc.collect()
    return (
        {
            "row": row,
            "setting": setting,
            "ppl": ppl,
            "sparsity": check.overall,
            "pattern_ok": check.ok,
            "prune_s": memory.seconds,
            "peak_rss": memory.peak_rss,
        }
        | ({"train_lr": args.train_lr} if "train" in row else {})
        | ({"cloze_acc": accuracy, "cloze_limit": args.cloze_limit} if zero_shot else {})
    )


def markdown(result: dict) -> str:
    settings = result["header"]["settings"]
    body, crossed = [], False
    for setting in SETTINGS:
        rows = [r for r in result["rows"] if r["setting"] == setting]
        base = next((r for r in rows if r["row"] == "sparsegpt"), None)
        for r in sorted(rows, key=lambda r: ROWS.index(r["row"])):
            versus = f"{r['ppl'] / base['ppl'] - 1:+.1%}" if base else "n/a"
            ratio = f"{r['prune_s'] / base['prune_s']:.2f}x" if base else "n/a"
            if base and not same_call(r, base):
                ratio, crossed = f"({ratio})", True
            name = f"{float(setting):.0%} unstructured" if ":" not in setting else setting
            body.append(
                f"| {name} | {r['row']} | {r['ppl']:.2f} | {versus} | {r['prune_s']:.1f} | "
                f"{ratio} | {r['sparsity']:.4f} | {r['peak_rss'] / 2**20:,.0f} MiB | "
                f"{format(r['cloze_acc'], '.3f') if 'cloze_acc' in r else ''} |"
            )
    # this machine's speed varies between calls, so a ratio across them is marked
    across = (
        "; a time ratio in parentheses is against the SparseGPT row of another call of the "
        "script (another day or load of this shared machine), so it is only indicative"
        if crossed
        else ""
    )
    return "\n".join(
        [
            f"{settings['model']} (fp32), calibration {settings['nsamples']} x "
            f"{settings['seqlen']} (seed 0), perplexity on {result['eval_windows']} test windows "
            f"(dense {result['dense_ppl']:.2f}). {result['header']['machine']}; "
            f"{result['header']['date']}. Time and perplexity against SparseGPT at the same "
            f"setting, in the same run{across}." + cloze_note(result),
            "",
            "| setting | method | ppl | vs sparsegpt | prune s | time / sparsegpt | sparsity | "
            "peak RSS | cloze |",
            "|---|---|---|---|---|---|---|---|---|",
            *body,
        ]
    )


def same_call(row: dict, base: dict) -> bool:
    """Whether two rows were timed in one call of this script (rows before calls were
    recorded count as another call)."""
    return row is base or (row.get("call") is not None and row.get("call") == base.get("call"))


def cloze_note(result: dict) -> str:
    """The sentence naming the cloze items and the dense model's accuracy, where measured."""
    if "dense_cloze" not in result:
        return ""
    return (
        f" `wiki-cloze` accuracy on its first {result['cloze_limit']} items where given "
        f"(dense {result['dense_cloze']:.3f})."
    )


def main() -> None:
    parser = bench_parser(__doc__, "frontier_bench")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated methods")
    parser.add_argument("--eval_limit", type=int, default=None, help="test windows (all)")
    parser.add_argument("--eval_batch_size", type=int, default=4)
    parser.add_argument("--train_lr", type=float, default=1e-4, help="+train rows: Adam's lr")
    parser.add_argument(
        "--cloze_limit",
        type=int,
        default=0,
        help="also measure wiki-cloze accuracy on this many items for the rows run (0: none)",
    )
    parser.add_argument("--report", action="store_true", help="rewrite the table only")
    args = parser.parse_args()
    for setting in args.settings.split(","):
        if setting not in SETTINGS:
            parser.error(f"unknown setting {setting}; choose from {', '.join(SETTINGS)}")
    for row in args.rows.split(","):
        if row not in ROWS:
            parser.error(f"unknown row {row}; choose from {', '.join(ROWS)}")
    path = Path(args.out)
    result = json.loads(path.read_text()) if path.exists() else {"rows": []}
    if result["rows"] and result["header"]["settings"]["model"] != args.model:
        parser.error(f"{path} holds another model's rows; give --out")
    if args.cloze_limit and result.get("cloze_limit", args.cloze_limit) != args.cloze_limit:
        parser.error(
            f"{path} holds cloze accuracies on {result['cloze_limit']} items; give "
            f"--cloze_limit {result['cloze_limit']} (or another --out)"
        )
    if not args.report:
        dense, tokenizer = load_model(args.model)
        windows, eval_windows = bench_windows(args, args.eval_limit)
        zero_shot = None
        if args.cloze_limit:
            zero_shot = (tokenizer, prepare_zero_shot("wiki-cloze", args.cloze_limit))
            if "dense_cloze" not in result:
                result |= {"dense_cloze": cloze(dense, *zero_shot), "cloze_limit": args.cloze_limit}
        if "dense_ppl" not in result:
            result["dense_ppl"] = perplexity(
                dense, eval_windows, batch_size=args.eval_batch_size, progress=False
            )
        result |= {"header": result_header(args), "eval_windows": int(eval_windows.shape[0])}
        call = datetime.now().isoformat(timespec="seconds")  # rows timed under the same load
        for setting in args.settings.split(","):
            for row in args.rows.split(","):
                measured = run_row(dense, row, setting, windows, eval_windows, args, zero_shot)
                measured["call"] = call
                result["rows"] = [
                    r for r in result["rows"] if (r["row"], r["setting"]) != (row, setting)
                ] + [measured]
                save_result(args, result)
                print(json.dumps(measured), flush=True)
    table = markdown(result)
    print(table)
    replace_marked_section(ROOT / args.markdown, f"frontier_bench:{Path(args.out).stem}", table)


if __name__ == "__main__":
    main()
