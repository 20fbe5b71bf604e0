"""``--offload disk`` and ``--max_memory`` from the command line: same output, clear refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import invoke_prune, make_model, make_tokenizer
from safetensors.torch import load_file


def _tensors(folder) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in folder.glob("*.safetensors"):
        out |= load_file(shard)
    return out


def _result(folder) -> dict:
    return json.loads((folder / "secateurs.json").read_text())


@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("--sparsity_type", "neuron", "--keep_shape"),
        ("--prune_method", "alps", "--sparsity_type", "2:4", "--batch_size", "1"),
        ("--refine", "dsnot"),
        ("--reconstruct", "pruned", "--batch_size", "1"),
        ("--prune_method", "sparsegpt", "--reconstruct", "dense", "--batch_size", "1"),
    ],
)
def test_disk_run_saves_what_the_memory_run_saves(tiny_model_dir, text_dir, tmp_path, extra):
    common = ("--nsamples", "8", "--eval_limit", "4", *extra)
    memory = invoke_prune(tiny_model_dir, text_dir, *common, "--save_model", tmp_path / "m")
    disk = invoke_prune(
        tiny_model_dir, text_dir, *common, "--save_model", tmp_path / "d", "--offload", "disk"
    )
    assert memory.exit_code == 0, memory.output
    assert disk.exit_code == 0, disk.output
    saved_memory, saved_disk = _tensors(tmp_path / "m"), _tensors(tmp_path / "d")
    assert saved_memory.keys() == saved_disk.keys()
    assert all(torch.equal(saved_memory[k], saved_disk[k]) for k in saved_memory)
    assert (tmp_path / "d" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "d" / "tokenizer.json").is_file()
    in_memory, streamed = _result(tmp_path / "m"), _result(tmp_path / "d")
    assert streamed["offload"]["mode"] == "disk"
    if "--batch_size" not in extra:
        # the default calibration batch: 8 in memory, 1 streamed; Wanda's masks do not depend
        # on it (the float sums of a Gram matrix do: the runs above that build one give it)
        assert (in_memory["config"]["batch_size"], streamed["config"]["batch_size"]) == (8, 1)
    assert streamed["perplexity"] == in_memory["perplexity"]
    assert streamed["sparsity"] == in_memory["sparsity"]


def test_max_memory_below_the_weights_streams(tiny_model_dir, text_dir, tmp_path):
    common = ("--nsamples", "8", "--eval_limit", "2", "--no_eval_dense")
    small = invoke_prune(
        tiny_model_dir, text_dir, *common, "--max_memory", "100KB", "--save_model", tmp_path / "s"
    )
    large = invoke_prune(
        tiny_model_dir, text_dir, *common, "--max_memory", "1GB", "--save_model", tmp_path / "l"
    )
    assert small.exit_code == 0 and large.exit_code == 0, small.output + large.output
    assert _result(tmp_path / "s")["offload"]["mode"] == "disk"
    assert "offload" not in _result(tmp_path / "l")


def test_disk_needs_save_model(tiny_model_dir, text_dir, tmp_path):
    result = invoke_prune(tiny_model_dir, text_dir, "--nsamples", "8", "--offload", "disk")
    assert result.exit_code == 2
    assert "--save_model" in result.output


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("--prune_method", "wandg"), "scores from a pass over the whole model"),
        (("--sparsity_allocation", "owl"), "OWL"),
        (("--sparsity_type", "neuron"), "--keep_shape"),
        (("--eval_attack",), "--eval_attack"),
    ],
)
def test_disk_refuses_what_needs_the_whole_model(tiny_model_dir, text_dir, tmp_path, args, reason):
    out = tmp_path / "out"
    result = invoke_prune(tiny_model_dir, text_dir, "--offload", "disk", "--save_model", out, *args)
    assert result.exit_code == 2, result.output
    assert reason in result.output
    assert not out.exists()


def test_bad_offload_values_fail_clearly(tiny_model_dir, text_dir):
    mode = invoke_prune(tiny_model_dir, text_dir, "--offload", "ram")
    amount = invoke_prune(tiny_model_dir, text_dir, "--max_memory", "plenty")
    assert mode.exit_code == 2 and "--offload" in mode.output
    assert amount.exit_code == 2 and "--max_memory" in amount.output


def test_a_tied_head_is_counted_once_when_streamed(text_dir, tmp_path):
    folder = tmp_path / "tiny-gemma3"
    model = make_model("gemma3")
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    common = ("--nsamples", "4", "--eval_limit", "2", "--no_eval_dense")
    for name, extra in (("m", ()), ("d", ("--offload", "disk"))):
        out = invoke_prune(folder, text_dir, *common, "--save_model", tmp_path / name, *extra)
        assert out.exit_code == 0, out.output
    expected = sum(p.numel() for p in model.parameters())
    assert _result(tmp_path / "m")["model"]["parameters"] == expected
    assert _result(tmp_path / "d")["model"]["parameters"] == expected


def test_gemma_reconstruction_through_its_post_norms_streams_as_in_memory(text_dir, tmp_path):
    folder = tmp_path / "tiny-gemma3"
    make_model("gemma3").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    common = ("--nsamples", "4", "--eval_limit", "2", "--reconstruct", "pruned")
    common += ("--batch_size", "1", "--no_eval_dense")
    for name, extra in (("m", ()), ("d", ("--offload", "disk"))):
        out = invoke_prune(folder, text_dir, *common, "--save_model", tmp_path / name, *extra)
        assert out.exit_code == 0, out.output
    in_memory, streamed = _tensors(tmp_path / "m"), _tensors(tmp_path / "d")
    assert in_memory.keys() == streamed.keys()
    assert all(torch.equal(in_memory[k], streamed[k]) for k in in_memory)
    refits = _result(tmp_path / "m")["prune"]["reconstruction"]
    assert [r["aim"] for r in refits[1::2]] == ["block"] * (len(refits) // 2)
