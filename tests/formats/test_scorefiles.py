import json

import pytest
import torch
from conftest import make_model

from secateurs.core.model import iter_prunable, weight_matrix
from secateurs.errors import SecateursError
from secateurs.formats.scorefiles import (
    ScoreFileMissingError,
    dump_scores,
    load_scores,
    model_fingerprint,
    read_metadata,
    score_path,
)


def _scores(model, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(weight_matrix(layer).shape, generator=generator)
        for name, layer in iter_prunable(model)
    }


def test_round_trip_keeps_raw_scores_and_metadata(tmp_path):
    model = make_model("llama")
    scores = _scores(model)
    path = score_path(tmp_path, "wandg", "align")
    dump_scores(path, scores, {"model": "tiny", "method": "wandg"}, model)
    loaded = load_scores(path, model)
    assert all(torch.equal(loaded[n], scores[n]) for n in scores)
    metadata = read_metadata(path)
    assert json.loads(metadata.pop("fingerprint")) == model_fingerprint(model)
    assert metadata == {"model": "tiny", "method": "wandg"}
    assert not path.read_bytes().startswith(b"\x80")  # safetensors, not a pickle


def test_missing_file_gives_the_seed_message(tmp_path):
    path = score_path(tmp_path, "wanda", "align")
    with pytest.raises(FileNotFoundError, match="run with --dump_wanda_score first") as info:
        load_scores(path, make_model("llama"))
    assert str(path) in str(info.value)
    assert isinstance(info.value, (ScoreFileMissingError, SecateursError))


def test_dump_refuses_an_existing_file(tmp_path):
    model = make_model("llama")
    path = score_path(tmp_path, "wandg", "align")
    dump_scores(path, _scores(model), {"model": "tiny"}, model)
    with pytest.raises(SecateursError, match="already exists"):
        dump_scores(path, _scores(model), {"model": "tiny"}, model)


def test_other_model_and_other_shapes_are_refused(tmp_path):
    llama = make_model("llama")
    path = score_path(tmp_path, "wandg", "align")
    dump_scores(path, _scores(llama), {"model": "tiny-llama"}, llama)
    with pytest.raises(SecateursError, match="computed on other weights"):
        load_scores(path, make_model("llama", seed=1))
    with pytest.raises(SecateursError, match="does not match this model's linear layers"):
        load_scores(path, make_model("opt"))
    reshaped = {name: score[:, :-1].contiguous() for name, score in _scores(llama).items()}
    bad = score_path(tmp_path, "wandg", "bad")
    dump_scores(bad, reshaped, {"model": "tiny-llama"}, llama)
    with pytest.raises(SecateursError, match="dump the scores again"):
        load_scores(bad, llama)
