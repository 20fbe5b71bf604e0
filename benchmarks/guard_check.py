"""Channel guard on SmolLM2's own activations: which layers each IDF form gets flagged on.

The dense model's first blocks are calibrated one after another (no pruning, so every form
sees the same activations); each layer is scored by Wanda, and by wanda_idf and wanda_select
with the seed's IDF and with the default form, and every score goes through the guard.
"""

from __future__ import annotations

import json

import torch
from _common import bench_parser, bench_windows, result_header, save_result

from secateurs.core.engine import calibrate_block, run_block
from secateurs.core.guard import check_channels
from secateurs.core.model import (
    capture_block_inputs,
    find_blocks,
    find_linears,
    load_model,
    weight_matrix,
)
from secateurs.core.stats import StatsRequest
from secateurs.methods.registry import METHODS
from secateurs.methods.selectivity import DEFAULT_IDF_FORM, SelectivityOptions

RUNS = (("wanda", "seed"), ("wanda_idf", "seed"), ("wanda_select", "seed"))
RUNS += (("wanda_idf", DEFAULT_IDF_FORM), ("wanda_select", DEFAULT_IDF_FORM))


def label(method: str, form: str) -> str:
    reads_idf = hasattr(METHODS[method].make_options(), "idf_form")
    return f"{method}[{form}]" if reads_idf else method


def main() -> None:
    parser = bench_parser(__doc__, "guard_check")
    parser.add_argument("--blocks", type=int, default=8)
    parser.set_defaults(nsamples=4)
    args = parser.parse_args()
    windows, _ = bench_windows(args, eval_limit=1)
    model, _ = load_model(args.model)
    inputs = capture_block_inputs(model, windows, torch.device("cpu"), args.batch_size)
    blocks = find_blocks(model)[1][: args.blocks]
    flagged: dict[str, list[dict]] = {label(m, f): [] for m, f in RUNS}
    layers_seen = 0
    for index, block in enumerate(blocks):
        layers = find_linears(block)
        layers_seen += len(layers)
        # the IDF form is the score's, not the statistics': one calibration serves every form
        request = StatsRequest(selectivity=SelectivityOptions().thresholds())
        stats = calibrate_block(block, layers, inputs, args.batch_size, request, None)
        for form in dict.fromkeys(f for _, f in RUNS):
            for method in (m for m, f in RUNS if f == form):
                options = METHODS[method].make_options({"idf_form": form})
                for name, layer in layers.items():
                    score = METHODS[method].compute(
                        weight_matrix(layer), stats[name], options, name
                    )
                    alarm = check_channels(score, stats[name].sq_norm)
                    if alarm is not None:
                        flagged[label(method, form)].append(
                            {
                                "layer": f"{index}.{name}",
                                "channels": alarm.count,
                                "energy_share": alarm.energy_share,
                            }
                        )
        inputs.hidden = run_block(block, inputs, args.batch_size, keep_outputs=True)
    summary = {
        key: {
            "flagged": len(hits),
            "of": layers_seen,
            "max_energy_share": max((h["energy_share"] for h in hits), default=0.0),
        }
        for key, hits in flagged.items()
    }
    for key, row in summary.items():
        print(
            f"{key:<24} {row['flagged']:>3} of {row['of']} layers flagged, "
            f"largest written-off energy share {row['max_energy_share']:.0%}"
        )
    save_result(args, result_header(args) | {"summary": summary, "flagged": flagged})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
