import math

import torch
from conftest import make_model, make_windows

from secateurs.evaluate import check_sparsity, perplexity
from secateurs.model import iter_prunable, weight_matrix
from secateurs.patterns import NeuronSparsity, NMSparsity, Unstructured, Variant


def test_perplexity_matches_the_reference_formula(arch):
    model = make_model(arch)
    windows = make_windows(5, 20)
    with torch.no_grad():
        losses = [float(model(w.unsqueeze(0), labels=w.unsqueeze(0)).loss) for w in windows]
    expected = math.exp(sum(loss * 20 for loss in losses) / (5 * 20))
    for batch_size in (1, 2, 5):
        value = perplexity(model, windows, batch_size=batch_size, progress=False)
        assert math.isclose(value, expected, rel_tol=1e-4)


def test_sparsity_check_counts_zeros_and_finds_violations():
    model = make_model("llama")
    check = check_sparsity(model, Unstructured("row"), 0.5)
    assert check.overall == 0.0 and not check.ok
    for _, layer in iter_prunable(model):
        weight = weight_matrix(layer)
        weight.view(weight.shape[0], -1, 4)[:, :, :2] = 0
    assert check_sparsity(model, NMSparsity(2, 4), 0.5).ok
    assert check_sparsity(model, Unstructured("row"), 0.5).ok
    assert not check_sparsity(model, NMSparsity(3, 4), 0.75).ok
    assert check_sparsity(model).overall == 0.5


def test_sparsity_check_of_neuron_and_variant_patterns():
    from secateurs.pruning import MethodPruner

    model = make_model("opt")
    assert not check_sparsity(model, NeuronSparsity(), 0.5).ok
    MethodPruner(model, "wanda", progress=False).prune(make_windows(), 0.5, "neuron")
    check = check_sparsity(model, NeuronSparsity(), 0.5)
    assert check.ok, check.violations
    assert 0.0 < check.overall < 0.5  # attention stays dense
    assert not check_sparsity(model, Variant(), 0.5).ok
    variant = make_model("opt")
    MethodPruner(variant, "wanda", progress=False).prune(make_windows(), 0.5, use_variant=True)
    assert check_sparsity(variant, Variant(), 0.5).ok
