"""``secateurs shrink`` end to end on a tiny model: the saved folder loads without secateurs."""

import json
import subprocess
import sys

import pytest
from conftest import invoke
from safetensors.torch import save_file

from secateurs.core.model import load_tokenizer
from secateurs.jobs.session import load_eval_windows

RELOAD = """
import json, math, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

assert "secateurs" not in sys.modules
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
windows = load_file(sys.argv[2])["windows"]
with torch.no_grad():
    losses = [float(model(w[None], labels=w[None]).loss) for w in windows]
assert "secateurs" not in sys.modules
print(json.dumps({"ppl": math.exp(sum(losses) / len(losses)), "config": model.config.to_dict()}))
"""


def _shrink(model_dir, text_dir, tmp_path, *args):
    out = tmp_path / "small"
    report = tmp_path / "result.json"
    result = invoke(
        "shrink", "--model", model_dir, "--dataset", text_dir, "--seqlen", "32", "--nsamples",
        "8", "--eval_limit", "4", "--save_model", out, "--save_json", report, "--quiet", *args,
    )  # fmt: skip
    return result, out, report


@pytest.mark.parametrize(
    "args",
    [
        ("--neurons", "0.25"),
        ("--heads", "0.5", "--head_mode", "group", "--score", "flap"),
        ("--neurons", "0.25", "--heads", "0.5", "--blocks", "1", "--score", "ziplm"),
    ],
    ids=["neurons", "heads", "all"],
)
def test_shrunk_folder_reloads_in_plain_transformers_with_the_printed_perplexity(
    tiny_model_dir, text_dir, tmp_path, args
):
    result, out, report = _shrink(tiny_model_dir, text_dir, tmp_path, *args)
    assert result.exit_code == 0, result.output
    record = json.loads(report.read_text())
    assert record["parameters"]["pruned"] < record["parameters"]["dense"]
    assert f"pruned       perplexity {record['perplexity']['pruned']:.3f}" in result.output
    tokenizer = load_tokenizer(str(tiny_model_dir))
    windows = load_eval_windows(tokenizer, str(text_dir), 32, 4)
    save_file({"windows": windows.contiguous()}, tmp_path / "windows.safetensors")
    done = subprocess.run(
        [sys.executable, "-c", RELOAD, str(out), str(tmp_path / "windows.safetensors")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    reloaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert reloaded["ppl"] == pytest.approx(record["perplexity"]["pruned"], rel=1e-4)
    shrunk = record["shrinkage"]["config"]
    for name, change in shrunk.items():
        assert reloaded["config"][name] == change["after"]
    assert json.loads((out / "secateurs.json").read_text())["plan"] == record["plan"]


def test_shrink_refuses_bad_input_before_any_work(tiny_model_dir, text_dir, tmp_path):
    for args, message in [
        (("--neurons", "0.25", "--score", "nope"), "unknown --score"),
        ((), "nothing to remove"),
        (("--neurons", "1.5"), "in [0, 1)"),
        (("--blocks", "1", "--depth_score", "ziplm"), "unknown --depth_score"),
        (("--blocks", "9"), "would remove every block"),
    ]:
        result, out, report = _shrink(tiny_model_dir, text_dir, tmp_path, *args)
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert not out.exists() and not report.exists()


def test_head_cut_of_a_family_that_cannot_express_it_fails_before_calibrating(text_dir, tmp_path):
    from conftest import make_model, make_tokenizer

    folder = tmp_path / "tiny-opt"
    make_model("opt").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    result, out, _ = _shrink(folder, text_dir, tmp_path, "--heads", "0.5")
    assert result.exit_code == 2
    assert "transformers cannot express" in result.output
    assert "perplexity" not in result.output
    assert not out.exists()


def test_params_budget_and_neurons_are_exclusive(tiny_model_dir, text_dir, tmp_path):
    result, _, _ = _shrink(
        tiny_model_dir, text_dir, tmp_path, "--params", "0.1", "--neurons", "0.2"
    )
    assert result.exit_code == 2 and "not both" in result.output
    result, _, report = _shrink(tiny_model_dir, text_dir, tmp_path, "--params", "0.1")
    assert result.exit_code == 0, result.output
    assert "budget       10% of the parameters" in result.output
    record = json.loads(report.read_text())
    assert 1 - record["parameters"]["pruned"] / record["parameters"]["dense"] == pytest.approx(
        0.1, abs=0.02
    )
