import math

import pytest
import torch
from conftest import make_model, make_windows

from secateurs.api import MethodPruner
from secateurs.core.model import iter_prunable, weight_matrix
from secateurs.core.patterns import NMSparsity, Unstructured, layer_mask, nm_mask, parse_pattern
from secateurs.core.stats import ActivationStats, StatsRequest
from secateurs.errors import SecateursError
from secateurs.evaluate.perplexity import check_sparsity
from secateurs.methods.magnitude import magnitude_score
from secateurs.methods.recovery import LeastSquaresStrategy, WeightRedistributor, output_error
from secateurs.methods.sparsegpt import sparsegpt_prune
from secateurs.methods.wanda import wanda_score


def layer_problem(rows=32, cols=256, tokens=1024, seed=0):
    """A weight and strongly correlated inputs (as in LLMs), with their norms and Gram."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=generator) / math.sqrt(cols)
    x = torch.randn(4, tokens // 4, cols, generator=generator) @ (0.3 * torch.eye(cols) + mix)
    weight = torch.randn(rows, cols, generator=generator)
    stats = ActivationStats(cols, request=StatsRequest(gram=True))
    stats.add_batch(x)
    return weight, stats


def naive_obs(weight, hessian, n, m, damp=0.01):
    """Sequential OBS with N:M groups, each step inverting the Hessian of the columns left."""
    w = weight.double().clone()
    h = hessian.double() + damp * torch.diagonal(hessian).double().mean() * torch.eye(
        hessian.shape[0], dtype=torch.float64
    )
    cols = w.shape[1]
    mask = torch.zeros_like(w, dtype=torch.bool)
    inverse_diag = [torch.linalg.inv(h[j:, j:])[0, 0] for j in range(cols)]
    for j in range(cols):
        if j % m == 0:
            d = torch.stack(inverse_diag[j : j + m])
            saliency = w[:, j : j + m].square() / d
            low = torch.argsort(saliency, dim=1, stable=True)[:, :n]
            mask[:, j : j + m].scatter_(1, low, True)
        hinv = torch.linalg.inv(h[j:, j:])
        removed = torch.where(mask[:, j], w[:, j], torch.zeros_like(w[:, j]))
        w[:, j:] -= (removed / hinv[0, 0]).unsqueeze(1) * hinv[0].unsqueeze(0)
    return w.masked_fill(mask, 0).float(), mask


def test_matches_a_direct_sequential_obs():
    weight, stats = layer_problem(rows=8, cols=16, tokens=200)
    new, mask = sparsegpt_prune(weight, stats.gram, nm=(2, 4), block_size=8)
    expected, expected_mask = naive_obs(weight, stats.gram, 2, 4)
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(new, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_lower_output_error_than_wanda_and_magnitude(pattern):
    weight, stats = layer_problem()
    gram = stats.gram
    if pattern == "2:4":
        new, mask = sparsegpt_prune(weight, gram, nm=(2, 4))
        others = [nm_mask(s(weight, stats), 2, 4) for s in (wanda_score, magnitude_score)]
    else:
        new, mask = sparsegpt_prune(weight, gram, 0.5)
        others = [layer_mask(s(weight, stats), 0.5) for s in (wanda_score, magnitude_score)]
    ours = output_error(new - weight, gram)
    for other in others:
        assert ours < 0.8 * output_error(weight.masked_fill(other, 0) - weight, gram)
    assert bool((new[mask] == 0).all())
    assert bool((new[~mask] != weight[~mask]).any()), "survivors must be updated"


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_keeps_the_pattern_exactly(ratio):
    weight, stats = layer_problem(rows=24, cols=200)
    _, mask = sparsegpt_prune(weight, stats.gram, ratio)
    assert int(mask.sum()) == int(weight.numel() * ratio)
    _, mask = sparsegpt_prune(weight, stats.gram, ratio, scope="row")
    assert bool((mask.sum(dim=1) == int(200 * ratio)).all())
    new, mask = sparsegpt_prune(weight, stats.gram, nm=(2, 4))
    assert bool((mask.reshape(24, 50, 4).sum(dim=2) == 2).all())
    assert bool(((new == 0) == mask).all())


def test_same_inputs_give_bit_identical_results():
    weight, stats = layer_problem()
    first = sparsegpt_prune(weight, stats.gram, 0.5)
    second = sparsegpt_prune(weight, stats.gram, 0.5)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_singular_hessians_are_handled():
    weight, _ = layer_problem(rows=8, cols=16)
    # dead channels and fewer tokens than columns: singular, still solved
    x = torch.randn(5, 16)
    x[:, 3] = 0
    new, mask = sparsegpt_prune(weight, x.T @ x, 0.5)
    assert bool(torch.isfinite(new).all()) and int(mask.sum()) == 64
    new, _ = sparsegpt_prune(weight, torch.zeros(16, 16), 0.5)
    assert bool(torch.isfinite(new).all())


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_weights_of_dead_inputs_go_first_however_large(nm):
    weight, _ = layer_problem(rows=8, cols=16)
    x = torch.randn(64, 16)
    x[:, [3, 9]] = 0
    weight[:, [3, 9]] = 100.0
    new, mask = sparsegpt_prune(weight, x.T @ x, 0.5, nm=nm, block_size=8)
    assert bool(mask[:, [3, 9]].all())
    assert bool((new[:, [3, 9]] == 0).all())


def test_a_hessian_that_cannot_be_factored_names_the_layer():
    weight, _ = layer_problem(rows=8, cols=16)
    broken = -torch.eye(16) * 1e6
    broken[0, 0] = 1.0
    with pytest.raises(SecateursError, match=r"model\.layers\.3\.mlp\.down_proj"):
        sparsegpt_prune(weight, broken, 0.5, layer="model.layers.3.mlp.down_proj")


def test_n_m_needs_blocks_in_multiples_of_m():
    weight, stats = layer_problem(rows=4, cols=24)
    with pytest.raises(SecateursError, match="multiples of 8"):
        sparsegpt_prune(weight, stats.gram, nm=(4, 8), block_size=12)


@pytest.mark.parametrize("sparsity_type", ["unstructured", "2:4"])
def test_engine_prunes_every_architecture(arch, sparsity_type):
    model = make_model(arch)
    report = MethodPruner(model, "sparsegpt", progress=False).prune(
        make_windows(), 0.5, sparsity_type
    )
    pattern = parse_pattern(sparsity_type, "layer")
    assert check_sparsity(model, pattern, 0.5).ok
    assert report.seconds["solve"] > 0
    assert all(abs(r.sparsity - 0.5) < 1e-9 for r in report.layers)


def test_engine_gives_bit_identical_weights():
    results = []
    for _ in range(2):
        model = make_model("llama", seed=2)
        MethodPruner(model, "sparsegpt", progress=False).prune(make_windows(seed=1), 0.5)
        results.append({n: weight_matrix(layer).clone() for n, layer in iter_prunable(model)})
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


def test_engine_beats_wanda_on_block_output():
    windows = make_windows(8, 32)
    dense = make_model("llama")
    with torch.no_grad():
        reference = dense(windows).logits
    errors = {}
    for method in ("wanda", "sparsegpt"):
        model = make_model("llama")
        MethodPruner(model, method, progress=False).prune(windows, 0.5, "2:4")
        with torch.no_grad():
            errors[method] = float((model(windows).logits - reference).norm())
    assert errors["sparsegpt"] < errors["wanda"]


def test_recovery_and_structured_patterns_are_refused():
    model = make_model("llama")
    redistributor = WeightRedistributor(LeastSquaresStrategy())
    pruner = MethodPruner(model, "sparsegpt", redistributor=redistributor, progress=False)
    with pytest.raises(SecateursError, match="use_recovery"):
        pruner.prune(make_windows(), 0.5)
    with pytest.raises(SecateursError, match="neuron"):
        MethodPruner(model, "sparsegpt", progress=False).prune(make_windows(), 0.5, "neuron")


def test_solve_refuses_the_variant():
    from secateurs.core.patterns import Variant
    from secateurs.methods.sparsegpt import solve

    weight, stats = layer_problem(rows=4, cols=8)
    with pytest.raises(SecateursError, match="variant"):
        solve(weight, stats, Variant(), 0.5, "x")
    _, mask = solve(weight, stats, NMSparsity(2, 4), 0.5, "x")
    assert int(mask.sum()) == 16
    _, mask = solve(weight, stats, Unstructured("row"), 0.5, "x")
    assert bool((mask.sum(dim=1) == 4).all())


def test_inverse_factor_is_the_upper_factor_of_the_damped_inverse():
    from secateurs.methods.sparsegpt import inverse_factor

    _, stats = layer_problem(rows=4, cols=48)
    gram = stats.gram.clone()
    gram[:, 5] = gram[5, :] = 0  # a channel that never fired
    before = gram.clone()
    h = gram.double()
    h[5, 5] = 1.0
    h += 0.01 * torch.diagonal(h).mean() * torch.eye(48, dtype=torch.float64)
    expected = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    factor = inverse_factor(gram, 0.01)
    assert factor.dtype == torch.float32 and factor.is_contiguous()
    # float32 LAPACK, as the reference: within a few float32 steps of the float64 factor
    scale = float(expected.abs().max())
    torch.testing.assert_close(factor.double(), expected, rtol=1e-4, atol=1e-5 * scale)
    assert torch.equal(factor, factor.triu())
    assert torch.equal(gram, before)  # the Gram is left as it was


def test_layers_sharing_a_gram_share_one_factorisation(monkeypatch):
    """q/k/v and gate/up see one input: one factorisation each, and the same weights as a
    factorisation per layer."""
    from secateurs.methods import sparsegpt

    calls = []
    real = sparsegpt.inverse_factor

    def counting(gram, damp, layer=""):
        calls.append(layer)
        return real(gram, damp, layer)

    monkeypatch.setattr(sparsegpt, "inverse_factor", counting)
    shared = make_model("llama")
    MethodPruner(shared, "sparsegpt", progress=False).prune(make_windows(), 0.5)
    assert len(calls) == 4 * shared.config.num_hidden_layers  # q/k/v, o, gate/up, down

    class EveryTime:
        def get(self, gram, damp, layer):
            return real(gram, damp, layer)

    monkeypatch.setattr(sparsegpt, "_LAST_FACTOR", EveryTime())
    single = make_model("llama")
    MethodPruner(single, "sparsegpt", progress=False).prune(make_windows(), 0.5)
    for name, tensor in shared.state_dict().items():
        assert torch.equal(tensor, single.state_dict()[name]), name
