"""Score files name the model they were computed on by a fingerprint, not by a path."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model
from safetensors.torch import save_file

from secateurs.core.model import iter_prunable, weight_matrix
from secateurs.errors import SecateursError
from secateurs.formats.scorefiles import (
    check_model_name,
    dump_scores,
    load_scores,
    model_fingerprint,
    read_metadata,
    score_path,
)


def _scores(model) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        name: torch.rand(weight_matrix(layer).shape, generator=generator)
        for name, layer in iter_prunable(model)
    }


def _dump(tmp_path, model, name: str = "x"):
    path = score_path(tmp_path, "wanda", "align")
    dump_scores(path, _scores(model), {"model": name}, model)
    return path


def test_the_fingerprint_is_stored_in_the_metadata(tmp_path):
    model = make_model("llama")
    stored = json.loads(read_metadata(_dump(tmp_path, model))["fingerprint"])
    assert stored == model_fingerprint(model)
    assert stored["architecture"] == "LlamaForCausalLM (llama)"
    assert stored["layers"] == len(list(iter_prunable(model)))


def test_the_same_model_loads_whatever_its_path_was_called(tmp_path):
    model = make_model("llama")
    path = _dump(tmp_path, model, name="out/x")
    check_model_name(path, "./out/x")  # the path is no longer compared
    check_model_name(path, "/somewhere/else")
    again = make_model("llama")  # the same weights, loaded afresh
    assert load_scores(path, again).keys() == _scores(model).keys()


def test_another_model_with_the_same_shapes_is_refused(tmp_path):
    path = _dump(tmp_path, make_model("llama", seed=0))
    other = make_model("llama", seed=1)
    with pytest.raises(SecateursError, match="computed on other weights") as info:
        load_scores(path, other)
    assert str(path) in str(info.value)
    assert "dump the scores again" in str(info.value)


def test_another_architecture_with_the_same_layers_is_refused(tmp_path):
    llama, mistral = make_model("llama"), make_model("mistral")
    assert {n: weight_matrix(m).shape for n, m in iter_prunable(llama)} == {
        n: weight_matrix(m).shape for n, m in iter_prunable(mistral)
    }
    path = _dump(tmp_path, llama)
    with pytest.raises(SecateursError, match=r"LlamaForCausalLM \(llama\).*MistralForCausalLM"):
        load_scores(path, mistral)


def test_other_layers_are_named(tmp_path):
    path = _dump(tmp_path, make_model("llama"))
    with pytest.raises(SecateursError, match="does not match this model's linear layers"):
        load_scores(path, make_model("opt"))


def test_one_changed_weight_anywhere_changes_the_fingerprint():
    model = make_model("llama")
    before = model_fingerprint(model)
    last = list(iter_prunable(model))[-1][1]
    with torch.no_grad():
        weight_matrix(last)[0, 0] += 1.0  # the first entry of every layer is sampled
    assert model_fingerprint(model)["weights_sha256"] != before["weights_sha256"]
    assert model_fingerprint(model)["layers_sha256"] == before["layers_sha256"]


def test_the_same_weights_in_bfloat16_load_and_other_dtypes_are_named(tmp_path):
    path = _dump(tmp_path, make_model("llama"))
    assert load_scores(path, make_model("llama").to(torch.bfloat16))
    other = make_model("llama", seed=1).to(torch.bfloat16)
    with pytest.raises(SecateursError, match="computed in float32 and this model is bfloat16"):
        load_scores(path, other)


def test_a_file_without_fingerprint_falls_back_to_the_name_with_a_warning(tmp_path):
    model = make_model("llama")
    path = score_path(tmp_path, "wanda", "old")
    path.parent.mkdir(parents=True)
    save_file(_scores(model), str(path), metadata={"model": "tiny"})  # as older versions wrote
    with pytest.warns(UserWarning, match="no fingerprint"):
        check_model_name(path, "tiny")
    with pytest.warns(UserWarning), pytest.raises(SecateursError, match="not 'other'"):
        check_model_name(path, "other")
    # the weights cannot be compared, so any model with these layers loads
    assert load_scores(path, make_model("llama", seed=1)).keys() == _scores(model).keys()
