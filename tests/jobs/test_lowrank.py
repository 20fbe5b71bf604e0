"""secateurs lowrank (ActSVD) on a tiny chat LLaMA: ranks report, saved folder, bad input."""

import json

import pytest
import torch
from chat_helpers import chat_tokenizer, write_pairs
from conftest import invoke, make_model
from transformers import AutoModelForCausalLM

from secateurs.core.model import iter_prunable, weight_matrix


@pytest.fixture
def setup(tmp_path, text_dir):
    folder = tmp_path / "tiny-chat"
    make_model("llama").save_pretrained(folder)
    chat_tokenizer().save_pretrained(folder)
    safety, utility = tmp_path / "safety.jsonl", tmp_path / "utility.jsonl"
    write_pairs(safety, count=8, seed=0)
    write_pairs(utility, count=8, seed=50)
    return folder, safety, utility


def _lowrank(folder, safety, utility, *args):
    return invoke(
        "lowrank", "--model", folder, "--safety_data", safety, "--utility_data", utility,
        "--dataset", folder.parent / "text", "--seqlen", "32", "--eval_limit", "2", "--quiet",
        *args,
    )  # fmt: skip


def test_lowrank_edits_reports_and_saves(setup, tmp_path):
    folder, safety, utility = setup
    out, report = tmp_path / "edited", tmp_path / "r.json"
    args = ("--utility_ranks", "0.5", "--safety_ranks", "0.25")
    result = _lowrank(folder, safety, utility, *args, "--save_model", out, "--save_json", report)
    assert result.exit_code == 0, result.output
    assert "ranks        removed" in result.output
    ranks = json.loads(report.read_text())["ranks"]
    layers = ranks["layers"]
    assert set(layers) == {name for name, _ in iter_prunable(make_model("llama"))}
    for edit in layers.values():
        assert 0 <= edit["removed"] <= min(edit["safety"], edit["total"] - edit["utility"])
    assert ranks["removed"] == sum(edit["removed"] for edit in layers.values()) > 0
    edited = AutoModelForCausalLM.from_pretrained(out)
    dense = dict(iter_prunable(make_model("llama")))
    for name, layer in iter_prunable(edited):
        change = weight_matrix(layer) - weight_matrix(dense[name])
        assert int(torch.linalg.matrix_rank(change, atol=1e-5)) <= layers[name]["removed"]
    again = tmp_path / "again.json"
    assert _lowrank(folder, safety, utility, *args, "--save_json", again).exit_code == 0
    assert json.loads(again.read_text())["ranks"] == ranks


def test_lowrank_refuses_bad_input_before_loading(setup, tmp_path):
    folder, safety, utility = setup
    share = _lowrank(folder, safety, utility, "--utility_ranks", "1.5")
    assert share.exit_code == 2 and "--utility_ranks is a share" in share.output
    nothing = _lowrank(folder, safety, utility, "--safety_ranks", "0")
    assert nothing.exit_code == 2 and "nothing would change" in nothing.output
    missing = _lowrank(folder, tmp_path / "none.jsonl", utility)
    assert missing.exit_code == 2
    (tmp_path / "taken").mkdir()
    taken = _lowrank(folder, safety, utility, "--save_model", tmp_path / "taken")
    assert taken.exit_code == 2 and "--save_model" in taken.output
