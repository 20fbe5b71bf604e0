import itertools

import pytest
import torch
from conftest import invoke, invoke_prune, make_model, make_windows
from test_sparsegpt import layer_problem

from secateurs.api import MethodPruner
from secateurs.core.model import iter_prunable, weight_matrix
from secateurs.errors import SecateursError
from secateurs.methods.alps import ALPSOptions, alps_prune, refit_on_support
from secateurs.methods.sparsegpt import sparsegpt_prune


def objective(weight, new, gram):
    """The layer objective ||X (W - W0)^T||^2 through the Gram, in float64."""
    delta = (new - weight).double()
    return float(torch.einsum("ij,jk,ik->", delta, gram.double(), delta))


def enumerated_objectives(weight, gram, pruned):
    """The objective of every mask pruning ``pruned`` entries of the layer, each mask's kept
    weights refit exactly (least squares on the support, rows independent), sorted."""
    rows, cols = weight.shape
    h, w = gram.double(), weight.double()
    found = []
    for chosen in itertools.combinations(range(rows * cols), pruned):
        keep = torch.ones(rows * cols, dtype=torch.bool)
        keep[list(chosen)] = False
        keep = keep.view(rows, cols)
        new = torch.zeros_like(w)
        for r in range(rows):
            s = keep[r]
            if s.any():
                new[r, s] = torch.linalg.solve(h[s][:, s], (w[r] @ h)[s])
        found.append(objective(w, new, h))
    return sorted(found)


@pytest.mark.parametrize("seed", range(4))
def test_lands_among_the_best_masks_of_a_tiny_layer(seed):
    # choosing the mask is NP-hard: ALPS is a heuristic, so the test asks for a place among
    # the best tenth of all 252 masks (it is first or second on three of these four), and
    # for never doing worse than SparseGPT on the same problem
    weight, stats = layer_problem(rows=2, cols=5, tokens=40, seed=seed)
    gram = stats.gram.double()
    new, mask = alps_prune(weight.double(), gram, 0.5, options=ALPSOptions(cg_iterations=20))
    assert int(mask.sum()) == 5 and torch.equal(new == 0, mask)
    found = enumerated_objectives(weight, gram, 5)
    ours = objective(weight, new, gram)
    assert sum(value < ours - 1e-9 for value in found) < len(found) // 10
    theirs, _ = sparsegpt_prune(weight, stats.gram, 0.5)
    assert ours <= objective(weight, theirs, gram)


@pytest.mark.parametrize(("ratio", "nm"), [(0.5, None), (0.7, None), (0.5, (2, 4))])
def test_beats_sparsegpt_on_the_layer_objective(ratio, nm):
    weight, stats = layer_problem(rows=32, cols=128, tokens=1024)
    ours, mask = alps_prune(weight, stats.gram, ratio, nm=nm)
    theirs, their_mask = sparsegpt_prune(weight, stats.gram, ratio, nm=nm)
    assert int(mask.sum()) == int(their_mask.sum())
    assert objective(weight, ours, stats.gram) < objective(weight, theirs, stats.gram)


def test_masks_keep_the_pattern():
    weight, stats = layer_problem(rows=8, cols=32, tokens=256)
    _, layer = alps_prune(weight, stats.gram, 0.6)
    assert int(layer.sum()) == int(8 * 32 * 0.6)
    _, rows = alps_prune(weight, stats.gram, 0.5, scope="row")
    assert rows.sum(dim=1).tolist() == [16] * 8
    _, groups = alps_prune(weight, stats.gram, nm=(2, 4))
    assert bool((groups.view(8, 8, 4).sum(dim=2) == 2).all())


def test_refit_solves_the_support_system():
    weight, stats = layer_problem(rows=4, cols=16, tokens=256)
    h = stats.gram / stats.gram.diagonal().mean()
    keep = torch.rand(4, 16, generator=torch.Generator().manual_seed(1)) < 0.5
    target = weight @ h
    solved = refit_on_support(h, target, torch.zeros_like(weight), keep, 64)
    for r in range(4):
        s = keep[r]
        exact = torch.linalg.solve(h[s][:, s].double(), target[r, s].double())
        torch.testing.assert_close(solved[r, s].double(), exact, rtol=1e-3, atol=1e-4)
    assert bool((solved[~keep] == 0).all())


def test_prunes_a_model_identically_twice_with_exact_counts():
    windows = make_windows(4, 16)
    masks = []
    for _ in range(2):
        model = make_model("llama")
        MethodPruner(model, "alps", progress=False).prune(windows, 0.5, "2:4")
        masks.append({n: weight_matrix(m) == 0 for n, m in iter_prunable(model)})
    for name, mask in masks[0].items():
        assert torch.equal(mask, masks[1][name])
        assert bool((mask.view(mask.shape[0], -1, 4).sum(dim=2) >= 2).all())


def test_options_are_checked():
    with pytest.raises(SecateursError, match="alps_iterations"):
        ALPSOptions(iterations=0)
    result = invoke("prune", "--prune_method", "alps", "--alps_cg_iterations", "-1")
    assert result.exit_code != 0 and "--alps_cg_iterations must be at least 0" in result.output


def test_a_gram_changed_in_place_is_decomposed_again():
    weight, stats = layer_problem(rows=8, cols=32, tokens=256)
    gram = stats.gram.clone()
    alps_prune(weight, gram, 0.5)
    gram.add_(50 * torch.eye(32))
    again, _ = alps_prune(weight, gram, 0.5)
    fresh, _ = alps_prune(weight, gram.clone(), 0.5)
    assert torch.equal(again, fresh)


def test_prunes_from_the_command_line_and_refuses_what_it_cannot_combine(tiny_model_dir, text_dir):
    out = invoke_prune(tiny_model_dir, text_dir, "--prune_method", "alps", "--nsamples", "4",
                       "--eval_limit", "1", "--sparsity_type", "2:4")  # fmt: skip
    assert out.exit_code == 0, out.output
    for args, message in (
        (("--use_recovery",), "drop --use_recovery"),
        (("--refine", "dsnot"), "alps chooses masks and updates weights itself"),
        (("--sparsity_type", "neuron"), "alps prunes unstructured"),
    ):
        bad = invoke_prune(tiny_model_dir, text_dir, "--prune_method", "alps", *args)
        assert bad.exit_code == 2 and message in bad.output, bad.output
