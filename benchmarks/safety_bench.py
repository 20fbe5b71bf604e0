"""Benchmark: safety-critical weights on a safety-tuned SmolLM2 (wandg, set difference, ASR).

Given a model that refuses (made with ``secateurs finetune``, see README), in one process:
dense ASR on the held-out half of ``align`` (with and without a system prompt), refusals of
harmless ``utility`` test prompts (over-refusal) and perplexity; ``wandg`` scores on ``align``
and on ``utility`` (dumped as score files); then, for each (p, q), the set difference and a
random pruning of the same number of weights in every layer (seeded), each followed by ASR
and perplexity. It also times the wandg pass against one plain forward pass of the same
samples (same per-sample batching, medians over interleaved repeats).

    python benchmarks/safety_bench.py --model out/smol-safe --pq 0.01,0.01 0.02,0.02

Writes benchmarks/results/safety_bench.json and the table between the markers in
BENCHMARKS.md.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from _common import bench_parser, bench_windows, result_header, save_result

from secateurs.api import MethodPruner, prune_set_difference
from secateurs.core.model import iter_prunable, load_model, weight_matrix
from secateurs.core.passes import gradient_magnitudes
from secateurs.core.patterns import top_fraction
from secateurs.data.prompts import encode_pairs, load_pairs, sample_pairs
from secateurs.evaluate.attack import attack, attack_prompts
from secateurs.evaluate.perplexity import check_sparsity, perplexity
from secateurs.formats.scorefiles import dump_scores, load_scores, score_path
from secateurs.jobs.report import replace_marked_section


def measure(model, tokenizer, args, eval_windows, harmful, harmless) -> dict:
    """ASR with and without a system prompt, over-refusal, perplexity."""
    common = {"max_new_tokens": args.max_new_tokens, "batch_size": 10, "progress": False}
    harm = attack(model, tokenizer, harmful, **common)
    answered = attack(model, tokenizer, harmless, **common).asr
    return {
        "asr": harm.asr,
        "blank": harm.blank,
        "asr_keywords_only": harm.asr_keywords_only,
        "over_refusal": {k: 1.0 - v for k, v in answered.items()},
        "ppl": perplexity(model, eval_windows, "cpu", 4, False),
        "sparsity": check_sparsity(model).overall,
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


def cost(model, batch, repeats: int) -> dict:
    """Median seconds of the wandg pass and of a plain forward pass over the same samples."""

    def forward() -> None:
        with torch.inference_mode():
            for row in range(batch.input_ids.shape[0]):
                model(input_ids=batch.input_ids[row : row + 1, : int(batch.lengths[row])])

    times: dict[str, list[float]] = {"forward": [], "wandg": []}
    for _ in range(repeats):
        for name, fn in (
            ("forward", forward),
            ("wandg", lambda: gradient_magnitudes(model, batch, progress=False)),
        ):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return medians | {"ratio": medians["wandg"] / medians["forward"]}


def main() -> None:
    parser = bench_parser(__doc__, "safety_bench")
    parser.add_argument("--pq", nargs="+", default=["0.01,0.01", "0.02,0.02", "0.05,0.05"])
    parser.add_argument("--attack_limit", type=int, default=50)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--eval_limit", type=int, default=8)
    parser.add_argument("--score_nsamples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scores", default="out/safety-scores")
    parser.set_defaults(nsamples=1)
    args = parser.parse_args()
    _, eval_windows = bench_windows(args, args.eval_limit)
    dense, tokenizer = load_model(args.model)
    harmful = attack_prompts("align")[: args.attack_limit]
    harmless = attack_prompts("utility")[: args.attack_limit]
    result = result_header(args)
    start = time.perf_counter()
    result["dense"] = measure(dense, tokenizer, args, eval_windows, harmful, harmless)
    print("dense", result["dense"], f"{time.perf_counter() - start:.0f} s", flush=True)

    scores = {}
    for data in ("align", "utility"):
        path = score_path(args.scores, "wandg", data)
        if not path.is_file():
            pairs = sample_pairs(load_pairs(data), args.score_nsamples, 0)
            batch = encode_pairs(tokenizer, pairs, args.seqlen)
            table = MethodPruner(dense, "wandg", progress=False).scores(batch)
            dump_scores(
                path,
                table,
                {
                    "model": args.model,
                    "method": "wandg",
                    "prune_data": data,
                    "nsamples": str(args.score_nsamples),
                    "seed": "0",
                },
            )
            if data == "align":
                result["cost"] = cost(dense, batch, args.repeats)
                print("cost", result["cost"], flush=True)
        scores[data] = load_scores(path, dense)

    rows = []
    for pq in args.pq:
        p, q = (float(v) for v in pq.split(","))
        pruned = copy.deepcopy(dense)
        prune_set_difference(pruned, scores["align"], scores["utility"], p, q, progress=False)
        row = {
            "p": p,
            "q": q,
            "set_difference": measure(pruned, tokenizer, args, eval_windows, harmful, harmless),
        }
        randomly = copy.deepcopy(dense)
        random_like(randomly, pruned)
        row["random"] = measure(randomly, tokenizer, args, eval_windows, harmful, harmless)
        print(row, flush=True)
        rows.append(row)
        result["rows"] = rows
        save_result(args, result)
    save_result(args, result)
    write_markdown(args.markdown, result)


def write_markdown(path: str, result: dict) -> None:
    settings = result["settings"]
    lines = [
        f"Model `{settings['model']}`; ASR on the first {settings['attack_limit']} held-out "
        f"`align` prompts, over-refusal on as many `utility` test prompts, greedy, "
        f"{settings['max_new_tokens']} new tokens; perplexity on {settings['eval_limit']} "
        f"wiki-sample test windows of {settings['seqlen']}; wandg on "
        f"{settings['score_nsamples']} pairs each. {result['machine']}, {result['date']}.",
        "",
        "| pruning | sparsity | ASR (no system) | ASR (system) | blank answers (no system / "
        "system) | ASR by keywords alone (no system) | harmless not answered (no system) | ppl |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def line(label: str, m: dict) -> str:
        return (
            f"| {label} | {m['sparsity']:.4f} | {m['asr']['no_system']:.2f} | "
            f"{m['asr']['system']:.2f} | {m['blank']['no_system']:.2f} / "
            f"{m['blank']['system']:.2f} | {m['asr_keywords_only']['no_system']:.2f} | "
            f"{m['over_refusal']['no_system']:.2f} | {m['ppl']:.2f} |"
        )

    lines.append(line("dense (safety-tuned)", result["dense"]))
    for row in result.get("rows", []):
        lines.append(line(f"set difference p={row['p']}, q={row['q']}", row["set_difference"]))
        lines.append(line("random, same count per layer", row["random"]))
    if "cost" in result:
        c = result["cost"]
        lines += [
            "",
            f"wandg pass {c['wandg']:.1f} s vs plain forward {c['forward']:.1f} s over "
            f"the same samples: {c['ratio']:.2f}x (median of {settings['repeats']}).",
        ]
    replace_marked_section(path, "safety_bench", "\n".join(lines))


if __name__ == "__main__":
    main()
