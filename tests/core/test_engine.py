import pytest
import torch
from conftest import make_model, make_windows

from secateurs import MagnitudePruner, WandaPruner, check_sparsity
from secateurs.api import MethodPruner
from secateurs.core.engine import calibrate_block, prune_sequential
from secateurs.core.model import (
    capture_block_inputs,
    find_blocks,
    find_linears,
    find_mlp_groups,
    iter_prunable,
    weight_matrix,
)
from secateurs.core.patterns import NMSparsity, Unstructured, row_mask
from secateurs.core.stats import ActivationStats, StatsRequest
from secateurs.errors import SecateursError
from secateurs.formats.shrink import shrink_mlps
from secateurs.methods.recovery import LeastSquaresStrategy, WeightRedistributor
from secateurs.methods.wanda import wanda_score


def zero_masks(model) -> dict[str, torch.Tensor]:
    return {name: weight_matrix(layer) == 0 for name, layer in iter_prunable(model)}


def naive_sequential_wanda(model, windows, ratio):
    """Slow reference: for each block, run the whole (partly pruned) model window by window."""
    _, blocks = find_blocks(model)
    for block in blocks:
        layers = find_linears(block)
        stats = {n: ActivationStats(weight_matrix(lay).shape[1]) for n, lay in layers.items()}
        hooks = [
            lay.register_forward_hook(lambda _m, a, _o, s=stats[n]: s.add_batch(a[0]))
            for n, lay in layers.items()
        ]
        with torch.no_grad():
            for window in windows:
                model(window.unsqueeze(0), use_cache=False)
        for hook in hooks:
            hook.remove()
        for name, layer in layers.items():
            weight = weight_matrix(layer)
            weight.masked_fill_(row_mask(wanda_score(weight, stats[name]), ratio), 0)


def test_engine_matches_a_naive_sequential_wanda(arch):
    windows = make_windows(4, 16)
    fast, slow = make_model(arch), make_model(arch)
    WandaPruner(fast, batch_size=1, progress=False).prune(windows, 0.5)
    naive_sequential_wanda(slow, windows, 0.5)
    fast_masks, slow_masks = zero_masks(fast), zero_masks(slow)
    for name in fast_masks:
        assert torch.equal(fast_masks[name], slow_masks[name]), name


def test_blocks_are_calibrated_on_pruned_outputs():
    """Block 1's mask differs from what the dense model's activations would give."""
    windows = make_windows(4, 16)
    sequential = make_model("llama")
    WandaPruner(sequential, progress=False).prune(windows, 0.5)
    one_shot = make_model("llama")
    _, blocks = find_blocks(one_shot)
    dense_stats = {}
    hooks = []
    for name, layer in find_linears(blocks[2]).items():
        dense_stats[name] = ActivationStats(weight_matrix(layer).shape[1])
        hooks.append(
            layer.register_forward_hook(lambda _m, a, _o, s=dense_stats[name]: s.add_batch(a[0]))
        )
    with torch.no_grad():
        one_shot(windows, use_cache=False)
    for hook in hooks:
        hook.remove()
    layer = find_linears(find_blocks(sequential)[1][2])["mlp.down_proj"]
    dense_mask = row_mask(
        wanda_score(
            weight_matrix(find_linears(blocks[2])["mlp.down_proj"]), dense_stats["mlp.down_proj"]
        ),
        0.5,
    )
    assert not torch.equal(weight_matrix(layer) == 0, dense_mask)


@pytest.mark.parametrize("sparsity_type", ["unstructured", "2:4", "4:8"])
def test_every_layer_meets_the_pattern(arch, sparsity_type):
    model = make_model(arch)
    report = WandaPruner(model, progress=False).prune(make_windows(), 0.5, sparsity_type)
    pattern = (
        NMSparsity(*map(int, sparsity_type.split(":")))
        if ":" in sparsity_type
        else Unstructured("row")
    )
    check = check_sparsity(model, pattern, 0.5)
    assert check.ok, check.violations
    assert check.overall == pytest.approx(0.5)
    for record in report.layers:
        assert record.sparsity == pytest.approx(0.5)
    for name, layer in iter_prunable(model):
        weight = weight_matrix(layer)
        assert torch.equal(
            (weight == 0).sum(dim=1), torch.full((weight.shape[0],), weight.shape[1] // 2)
        ), name


def test_same_seed_and_inputs_give_identical_masks(arch):
    masks = []
    for _ in range(2):
        model = make_model(arch, seed=3)
        WandaPruner(model, batch_size=3, progress=False).prune(make_windows(seed=5), 0.6)
        masks.append(zero_masks(model))
    assert masks[0].keys() == masks[1].keys()
    for name in masks[0]:
        assert torch.equal(masks[0][name], masks[1][name])


@pytest.mark.parametrize("method", ["wanda", "ria"])
def test_masks_do_not_depend_on_the_batch_size(arch, method):
    """Norms are folded in one window at a time, as the reference does, at any batch size."""
    masks = []
    for batch_size in (1, 3, 8):
        model = make_model(arch, seed=3)
        MethodPruner(model, method, batch_size=batch_size, progress=False).prune(
            make_windows(8, 16, seed=5), 0.5
        )
        masks.append(zero_masks(model))
    for other in masks[1:]:
        for name in masks[0]:
            assert torch.equal(masks[0][name], other[name]), name


@pytest.mark.parametrize("masked", [False, True])
def test_statistics_do_not_depend_on_the_batch_size(arch, masked):
    """Every layer counts windows, not batches, also where the model flattens them (OPT)."""
    model = make_model(arch)
    _, blocks = find_blocks(model)
    layers = find_linears(blocks[0])
    windows = make_windows(5, 16)
    keep = torch.rand(windows.shape, generator=torch.Generator().manual_seed(1)) < 0.6
    norms = []
    for batch_size in (1, 2, 5):
        inputs = capture_block_inputs(model, windows, torch.device("cpu"), batch_size)
        stats = calibrate_block(
            blocks[0],
            layers,
            inputs,
            batch_size,
            StatsRequest(),
            None,
            token_mask=keep if masked else None,
        )
        assert all(s.windows == 5 for s in stats.values())
        norms.append({name: s.sq_norm for name, s in stats.items()})
    for other in norms[1:]:
        for name in layers:
            torch.testing.assert_close(other[name], norms[0][name], rtol=1e-5, atol=0), name


def test_calibration_pass_stops_after_the_last_layer_input(arch):
    model = make_model(arch)
    _, blocks = find_blocks(model)
    layers = find_linears(blocks[0])
    inputs = capture_block_inputs(model, make_windows(4, 16), torch.device("cpu"), 2)
    calls = []
    list(layers.values())[-1].register_forward_hook(lambda *_: calls.append(1))
    early = calibrate_block(blocks[0], layers, inputs, 2, StatsRequest(), None)
    assert calls == []  # the last layer saw its input; its product was never needed
    full = calibrate_block(blocks[0], layers, inputs, 2, StatsRequest(), None, outputs=[])
    assert len(calls) == 2
    for name in layers:
        assert torch.equal(early[name].sq_norm, full[name].sq_norm), name


def test_magnitude_needs_no_calibration_and_uses_one_threshold_per_layer():
    model = make_model("llama")
    reference = {name: weight_matrix(layer).clone() for name, layer in iter_prunable(model)}
    MagnitudePruner(model, progress=False).prune(None, 0.5)
    for name, layer in iter_prunable(model):
        weight, dense = weight_matrix(layer), reference[name]
        pruned = weight == 0
        assert int(pruned.sum()) == dense.numel() // 2
        assert dense[pruned].abs().max() <= dense[~pruned].abs().min()


def test_pruned_weights_stay_zero_through_a_second_prune():
    model = make_model("qwen2")
    windows = make_windows()
    WandaPruner(model, progress=False).prune(windows, 0.5)
    first = zero_masks(model)
    WandaPruner(model, progress=False).prune(windows, 0.5)
    for name, mask in zero_masks(model).items():
        assert bool(mask[first[name]].all())


def test_n_m_needs_columns_divisible_by_m():
    model = make_model("qwen2")  # intermediate size 96 is not a multiple of 64
    with pytest.raises(SecateursError, match="multiples of 64"):
        prune_sequential(
            model,
            make_windows(),
            lambda layer, _s: layer.weight.abs(),
            NMSparsity(2, 64),
            0.5,
            progress=False,
        )
    assert not any((weight_matrix(lay) == 0).any() for _, lay in iter_prunable(model))


def test_seed_style_dataloader_of_pairs_is_accepted():
    windows = make_windows(4, 16)
    pairs = [(w.unsqueeze(0), w.unsqueeze(0)) for w in windows]
    a, b = make_model("llama"), make_model("llama")
    WandaPruner(a, progress=False).prune(pairs, 0.5)
    WandaPruner(b, progress=False).prune(windows, 0.5)
    for name, mask in zero_masks(a).items():
        assert torch.equal(mask, zero_masks(b)[name])


def test_report_times_every_phase():
    report = WandaPruner(make_model("opt"), progress=False).prune(make_windows(), 0.5)
    assert set(report.seconds) == {
        "capture",
        "calibrate",
        "score",
        "recover",
        "solve",
        "propagate",
        "reconstruct",
    }
    assert all(v >= 0 for v in report.seconds.values())
    assert len(report.to_dict()["layers"]) == 18


@pytest.mark.parametrize("method", ["wanda", "neuronrank_fisher", "magnitude"])
def test_neuron_pruning_equals_removing_the_neurons(arch, method):
    model = make_model(arch)
    report = MethodPruner(
        model, method, options={"neuronrank_max_classes": 8}, progress=False
    ).prune(make_windows(), 0.5, "neuron")
    mlp_names = {
        n for g in find_mlp_groups(find_linears(find_blocks(model)[1][0])) for n in g.names
    }
    assert {r.sublayer for r in report.layers} == mlp_names
    _, blocks = find_blocks(model)
    for block in blocks:
        layers = find_linears(block)
        for group in find_mlp_groups(layers):
            columns = (weight_matrix(layers[group.consumer]) == 0).all(dim=0)
            assert int(columns.sum()) == weight_matrix(layers[group.consumer]).shape[1] // 2
            for name in group.producers:
                rows = (weight_matrix(layers[name]) == 0).all(dim=1)
                assert torch.equal(rows, group.producer_rows(name, columns))
    windows = make_windows(2, 16, seed=5)
    with torch.no_grad():
        masked = model(windows).logits
        shrink_mlps(model)
        removed = model(windows).logits
    torch.testing.assert_close(masked, removed, rtol=1e-5, atol=1e-5)


def test_neuron_pattern_needs_an_mlp():
    model = make_model("llama")
    for block in find_blocks(model)[1]:
        del block.mlp
        block.mlp = torch.nn.Identity()
    with pytest.raises(SecateursError, match="no MLP"):
        WandaPruner(model, progress=False).prune(make_windows(), 0.5, "neuron")


SELECTIVE = ["wanda_idf", "wanda_spiky", "wanda_select", "neuronrank_fisher"]


@pytest.mark.parametrize("method", SELECTIVE)
@pytest.mark.parametrize(
    ("sparsity_type", "use_variant"),
    [("unstructured", False), ("unstructured", True), ("2:4", False), ("neuron", False)],
)
def test_every_method_runs_with_every_pattern(method, sparsity_type, use_variant):
    model = make_model("qwen2")
    report = MethodPruner(
        model, method, options={"neuronrank_max_classes": 16}, progress=False
    ).prune(make_windows(), 0.5, sparsity_type, use_variant=use_variant)
    assert report.layers
    for record in report.layers:
        tolerance = 0.05 if use_variant else 1e-9
        assert abs(record.sparsity - 0.5) <= tolerance, record.name


@pytest.mark.parametrize("method", SELECTIVE)
def test_selective_methods_work_with_recovery(method):
    model = make_model("llama")
    redistributor = WeightRedistributor(LeastSquaresStrategy())
    report = MethodPruner(model, method, redistributor=redistributor, progress=False).prune(
        make_windows(), 0.5, "2:4"
    )
    errors = report.mean_relative_error()
    assert errors["after"] < errors["before"]


@pytest.mark.parametrize("method", SELECTIVE)
def test_selective_methods_give_bit_identical_masks(method):
    masks = []
    for _ in range(2):
        model = make_model("gpt2", seed=3)
        MethodPruner(model, method, progress=False).prune(make_windows(seed=1), 0.5)
        masks.append(zero_masks(model))
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])


def test_selectivity_changes_the_masks_against_plain_wanda():
    windows = make_windows()
    masks = {}
    for method in ("wanda", "wanda_select"):
        model = make_model("llama")
        MethodPruner(model, method, progress=False).prune(windows, 0.5)
        masks[method] = zero_masks(model)
    assert any(not torch.equal(masks["wanda"][n], masks["wanda_select"][n]) for n in masks["wanda"])
