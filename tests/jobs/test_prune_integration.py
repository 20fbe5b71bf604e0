"""End to end on the built-in SmolLM2 model and Wikipedia text, at small settings."""

import json

import pytest
import torch

from secateurs.config import RunConfig
from secateurs.core.model import iter_prunable, load_model, weight_matrix
from secateurs.data import assets
from secateurs.jobs.prune import run_prune

pytestmark = pytest.mark.integration

SMALL = {
    "model": "smollm2-135m",
    "dataset": "wiki-sample",
    "nsamples": 8,
    "seqlen": 128,
    "eval_limit": 8,
    "progress": False,
}


def test_wiki_sample_is_clean_and_split_deterministically():
    train, test = assets.wiki_sample_split("train"), assets.wiki_sample_split("test")
    assert len(test) >= 10 and len(train) > 8 * len(test)
    assert not set(train) & set(test)
    assert assets.wiki_sample_split("test") == test
    joined = "\n\n".join(test)
    for markup in ("[[", "]]", "{{", "}}", "<ref", "{|"):
        assert markup not in joined


@pytest.fixture(scope="module")
def results():
    quiet = lambda _m: None  # noqa: E731
    return {
        method: run_prune(RunConfig.from_flags(prune_method=method, **SMALL), log=quiet)
        for method in ("wanda", "magnitude")
    }


def test_wanda_beats_magnitude_and_hits_the_target(results):
    wanda, magnitude = results["wanda"], results["magnitude"]
    assert wanda["perplexity"]["dense"] == magnitude["perplexity"]["dense"]
    assert wanda["perplexity"]["dense"] < wanda["perplexity"]["pruned"]
    assert wanda["perplexity"]["pruned"] < magnitude["perplexity"]["pruned"]
    for result in results.values():
        assert result["sparsity"]["violations"] == []
        assert result["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-6)
        assert len(result["sparsity"]["layers"]) == 30 * 7


def test_saved_model_reloads_with_the_same_zeros_and_perplexity(tmp_path):
    saved = tmp_path / "smol-2-4"
    result = run_prune(
        RunConfig.from_flags(sparsity_type="2:4", eval_dense=False, save_model=str(saved), **SMALL),
        log=lambda _m: None,
    )
    stored = json.loads((saved / "secateurs.json").read_text())
    assert stored["perplexity"]["pruned"] == result["perplexity"]["pruned"]
    model, _ = load_model(str(saved))
    for _, layer in iter_prunable(model):
        weight = weight_matrix(layer)
        groups = (weight == 0).view(weight.shape[0], -1, 4).sum(-1)
        assert bool((groups >= 2).all())
    again = run_prune(
        RunConfig.from_flags(
            **(SMALL | {"model": str(saved)}), prune_method="magnitude", sparsity_ratio=0.0
        ),
        log=lambda _m: None,
    )
    assert again["perplexity"]["dense"] == pytest.approx(result["perplexity"]["pruned"], rel=1e-5)
    assert torch.get_num_threads() >= 1


def test_neuron_pruned_smollm2_saves_narrower_with_the_same_perplexity(tmp_path):
    saved = tmp_path / "smol-neurons"
    result = run_prune(
        RunConfig.from_flags(
            sparsity_type="neuron", eval_dense=False, save_model=str(saved), **SMALL
        ),
        log=lambda _m: None,
    )
    assert result["saved_model"]["width_after"] == 768
    assert result["saved_model"]["parameters_after"] < result["model"]["parameters"]
    model, _ = load_model(str(saved))
    assert model.config.intermediate_size == 768
    assert sum(p.numel() for p in model.parameters()) == result["saved_model"]["parameters_after"]
    again = run_prune(
        RunConfig.from_flags(
            **(SMALL | {"model": str(saved)}), prune_method="magnitude", sparsity_ratio=0.0
        ),
        log=lambda _m: None,
    )
    assert again["perplexity"]["dense"] == pytest.approx(result["perplexity"]["pruned"], rel=1e-4)
