import math

import torch
from conftest import make_model, make_windows

from secateurs.core.model import iter_prunable, weight_matrix
from secateurs.core.patterns import NeuronSparsity, NMSparsity, Unstructured, Variant
from secateurs.evaluate.perplexity import check_sparsity, perplexity


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
    from secateurs.api import MethodPruner

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


def test_chunked_head_gives_the_whole_logits_perplexity(arch, monkeypatch):
    """Same NLL as the model's whole logits (Gemma's soft-capping included), a slice of the
    vocabulary at a time, so the vocabulary-wide logits of a window never exist at once."""
    from secateurs.evaluate import perplexity as evaluate

    model = make_model(arch)
    windows = make_windows(3, 20)
    # 2 windows x 19 tokens x 30 entries: five slices of the 128-word vocabulary, the last short
    monkeypatch.setattr(evaluate, "LOGIT_CHUNK_BYTES", 4 * 2 * 19 * 30)
    sizes = []
    real_finish = evaluate._finish_logits
    monkeypatch.setattr(
        evaluate,
        "_finish_logits",
        lambda m, logits: sizes.append(logits.numel()) or real_finish(m, logits),
    )
    with torch.no_grad():
        whole = evaluate.full_logits_nll(model, windows[:2])
        sizes.clear()
        chunked = evaluate.window_nll(model, windows[:2])
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    assert len(sizes) == 1 + 5 and max(sizes) <= 2 * 19 * 30
    with torch.no_grad():
        expected = math.exp(float(evaluate.full_logits_nll(model, windows).mean()))
    assert math.isclose(perplexity(model, windows, progress=False), expected, rel_tol=1e-4)


def test_unknown_logit_transform_falls_back_to_the_whole_logits(monkeypatch):
    """A model whose logits are changed in a way the chunked path does not copy is caught."""
    import pytest

    from secateurs.evaluate import perplexity as evaluate

    model = make_model("gemma3")  # soft-capped; pretend we did not know
    monkeypatch.setattr(evaluate, "_finish_logits", lambda _model, logits: logits)
    windows = make_windows(2, 20)
    assert evaluate.chunked_nll(model, windows) is None
    with pytest.warns(UserWarning, match="whole logits"), torch.no_grad():
        nll = evaluate.window_nll(model, windows)
    torch.testing.assert_close(nll, evaluate.full_logits_nll(model, windows))


def test_sliced_nll_matches_a_float64_computation():
    """The vocabulary-sliced NLL is as exact as fp32 allows (checked in float64)."""
    from secateurs.evaluate import perplexity as evaluate

    model = make_model("llama")
    windows = make_windows(2, 20)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1].double()
        targets = windows[:, 1:]
        lse = torch.logsumexp(logits, dim=-1)
        exact = (lse - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).mean(dim=1)
        for fn in (evaluate.window_nll, evaluate.full_logits_nll):
            torch.testing.assert_close(fn(model, windows).double(), exact, rtol=0, atol=1e-6)
