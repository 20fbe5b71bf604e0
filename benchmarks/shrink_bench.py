"""Benchmark: neuron pruning, masked vs cut out, against the dense model on SmolLM2 + wiki-sample.

For each neuron ratio: Wanda removes that share of every MLP's neurons; the masked model
keeps the zeros (same size, same speed), the shrunk one has them cut out (`shrink_mlps`, what
`--save_model` writes). Rows give parameters, safetensors size, forward latency (median over
interleaved repeats, as a ratio to the dense model measured in the same run) and perplexity of
both forms (they must agree).

    python benchmarks/shrink_bench.py                     # ratios 0.25 and 0.5
    python benchmarks/shrink_bench.py --ratios 0.5 --repeats 9

Writes benchmarks/results/shrink_bench.json and the table between the markers in
BENCHMARKS.md.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from _common import bench_parser, bench_windows, result_header, save_result

from secateurs.api import WandaPruner
from secateurs.core.model import load_model
from secateurs.evaluate.perplexity import perplexity
from secateurs.formats.shrink import shrink_mlps
from secateurs.jobs.report import replace_marked_section


def file_bytes(model: torch.nn.Module) -> int:
    """Size of the model's safetensors file(s) as save_pretrained writes them."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def latencies(models: dict[str, torch.nn.Module], batch: torch.Tensor, repeats: int) -> dict:
    """Median seconds of one forward pass per model, the models taking turns each repeat."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(batch)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(batch)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def measure_ratio(args, ratio: float, dense, windows, eval_windows) -> dict:
    masked = copy.deepcopy(dense)
    WandaPruner(masked, batch_size=args.batch_size, progress=False).prune(windows, ratio, "neuron")
    shrunk = copy.deepcopy(masked)
    shrinkage = shrink_mlps(shrunk)
    batch = eval_windows[: args.latency_batch]
    speed = latencies({"dense": dense, "masked": masked, "shrunk": shrunk}, batch, args.repeats)
    ppl = {
        name: perplexity(model, eval_windows, batch_size=args.eval_batch_size, progress=False)
        for name, model in (("masked", masked), ("shrunk", shrunk))
    }
    return {
        "ratio": ratio,
        "mlp_width": [shrinkage.width_before, shrinkage.width_after],
        "parameters": [shrinkage.parameters_before, shrinkage.parameters_after],
        "file_bytes": {"masked": file_bytes(masked), "shrunk": file_bytes(shrunk)},
        "latency_s": speed,
        "ppl": ppl,
    }


def table(result: dict) -> str:
    lines = [
        "| neuron ratio | MLP width | parameters | file MB (masked -> shrunk) "
        "| forward vs dense (masked / shrunk) | ppl masked | ppl shrunk |",
        "|---|---|---|---|---|---|---|",
        f"| 0 (dense) | {result['rows'][0]['mlp_width'][0]} "
        f"| {result['rows'][0]['parameters'][0] / 1e6:.1f} M | {result['dense_bytes'] / 1e6:.0f} "
        f"| 1.00x | {result['dense_ppl']:.2f} | - |",
    ]
    for r in result["rows"]:
        speed, size = r["latency_s"], r["file_bytes"]
        lines.append(
            f"| {r['ratio']} | {r['mlp_width'][1]} | {r['parameters'][1] / 1e6:.1f} M "
            f"| {size['masked'] / 1e6:.0f} -> {size['shrunk'] / 1e6:.0f} "
            f"| {speed['masked'] / speed['dense']:.2f}x / {speed['shrunk'] / speed['dense']:.2f}x "
            f"| {r['ppl']['masked']:.2f} | {r['ppl']['shrunk']:.2f} |"
        )
    return "\n".join(lines)


def update_markdown(result: dict, path: Path) -> None:
    cfg = result["settings"]
    body = (
        f"SmolLM2-135M (fp32), Wanda neuron scores, calibration {cfg['nsamples']} x "
        f"{cfg['seqlen']} tokens of `wiki-sample` (seed 0); forward pass of "
        f"{cfg['latency_batch']} x {cfg['seqlen']} tokens, median of {cfg['repeats']} "
        f"interleaved repeats; perplexity on {result['eval_windows']} test windows. "
        f"Machine: {result['machine']}; {result['date']}.\n\n{table(result)}"
    )
    replace_marked_section(path, "shrink_bench", body)


def main() -> None:
    parser = bench_parser(__doc__, "shrink_bench")
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--eval_batch_size", type=int, default=4)
    parser.add_argument("--eval_limit", type=int, default=32, help="0 = the whole test split")
    parser.add_argument("--latency_batch", type=int, default=4, help="windows per timed forward")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()

    windows, eval_windows = bench_windows(args, args.eval_limit or None)
    dense, _ = load_model(args.model)
    rows = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        rows.append(measure_ratio(args, ratio, dense, windows, eval_windows))
        print(json.dumps(rows[-1]), flush=True)
    result = {
        **result_header(args),
        "eval_windows": int(eval_windows.shape[0]),
        "dense_ppl": perplexity(
            dense, eval_windows, batch_size=args.eval_batch_size, progress=False
        ),
        "dense_bytes": file_bytes(dense),
        "rows": rows,
    }
    save_result(args, result)
    print(table(result))
    update_markdown(result, Path(args.markdown))


if __name__ == "__main__":
    main()
