"""Block reconstruction: the output layers' refit keeps the masks, never raises its error,
brings the pruned model closer to the dense one, and is deterministic on every family."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import ARCHS, invoke_prune, make_model, make_windows
from safetensors.torch import load_file

from secateurs.api import MethodPruner
from secateurs.core.engine import output_layers
from secateurs.core.model import (
    block_output,
    capture_block_inputs,
    find_blocks,
    iter_prunable,
    weight_matrix,
)
from secateurs.core.recovery import BlockReconstruction
from secateurs.core.targets import paired_target, reference_outputs, target_error, without_bias
from secateurs.core.units import head_layout
from secateurs.errors import SecateursError
from secateurs.methods.recovery import MaskedRefit, output_error


def _prune(
    arch: str,
    stream: str | None,
    sparsity_type: str = "unstructured",
    method: str = "wanda",
    epochs: int = 0,
):
    model = make_model(arch)
    reconstruction = None
    if stream is not None:
        reconstruction = BlockReconstruction(MaskedRefit(), stream, epochs, 1e-4)
    pruner = MethodPruner(model, method, progress=False, reconstruction=reconstruction)
    report = pruner.prune(make_windows(8, 16), 0.5, sparsity_type)
    return model, report


def _zeros(model) -> dict[str, torch.Tensor]:
    return {name: weight_matrix(layer) == 0 for name, layer in iter_prunable(model)}


def _logits_gap(model, dense, windows) -> float:
    with torch.no_grad():
        return float((model(windows).logits - dense(windows).logits).square().mean())


@pytest.mark.parametrize("arch", ARCHS)
def test_reconstruction_keeps_masks_and_lowers_each_refit_error(arch):
    plain, _ = _prune(arch, None)
    rebuilt, report = _prune(arch, "dense")
    # the first block sees the same inputs, so the same masks; later blocks see the refit
    # blocks' outputs, so their masks may differ, but never their counts
    first = find_blocks(plain)[0] + ".0."
    assert _zeros(rebuilt).keys() == _zeros(plain).keys()
    for name, zeros in _zeros(plain).items():
        again = _zeros(rebuilt)[name]
        assert torch.equal(again.sum(dim=1), zeros.sum(dim=1)), name
        if name.startswith(first):
            assert torch.equal(again, zeros), name
    assert report.reconstruction, "nothing was refit"
    for record in report.reconstruction:
        assert record.relative_error_after <= record.relative_error_before + 1e-9, record
    blocks = len(find_blocks(rebuilt)[1])
    per_block = len(report.reconstruction) // blocks
    assert per_block in (1, 2) and len(report.reconstruction) == per_block * blocks
    assert any(
        r.relative_error_after < 0.99 * r.relative_error_before for r in report.reconstruction
    )


@pytest.mark.parametrize("arch", ["llama", "opt", "gemma3"])
@pytest.mark.parametrize("stream", ["pruned", "dense"])
def test_reconstruction_brings_the_outputs_closer_to_the_dense_model(arch, stream):
    dense = make_model(arch)
    windows = make_windows(8, 16)
    plain, _ = _prune(arch, None)
    rebuilt, _ = _prune(arch, stream)
    assert _logits_gap(rebuilt, dense, windows) < _logits_gap(plain, dense, windows)


def test_nm_patterns_survive_and_sparsegpt_takes_it_too():
    rebuilt, _ = _prune("llama", "dense", "2:4")
    for name, layer in iter_prunable(rebuilt):
        groups = (weight_matrix(layer) == 0).reshape(-1, 4).sum(dim=1)
        assert bool((groups >= 2).all()), name
    _, solved_report = _prune("llama", "pruned", "unstructured", "sparsegpt")
    assert solved_report.reconstruction
    assert all(
        r.relative_error_after <= r.relative_error_before + 1e-9
        for r in solved_report.reconstruction
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("stream", ["pruned", "dense"])
def test_training_keeps_zeros_and_lowers_the_block_error(arch, stream):
    refit, _ = _prune(arch, stream)
    trained, report = _prune(arch, stream, epochs=3)
    blocks = find_blocks(trained)[1]
    records = [r for r in report.reconstruction if r.aim == "train"]
    assert len(records) == len(blocks)
    assert all(r.relative_error_after <= r.relative_error_before for r in records)
    assert any(r.relative_error_after < r.relative_error_before for r in records)
    first = find_blocks(trained)[0] + ".0."
    for (name, a), (_, b) in zip(iter_prunable(refit), iter_prunable(trained), strict=True):
        zeros_a, zeros_b = weight_matrix(a) == 0, weight_matrix(b) == 0
        assert torch.equal(zeros_a.sum(dim=1), zeros_b.sum(dim=1)), name
        if name.startswith(first):
            assert torch.equal(zeros_a, zeros_b), name
    assert all(p.grad is None for p in trained.parameters())


@pytest.mark.parametrize("epochs", [0, 2])
def test_reconstruction_is_bit_identical_across_runs(epochs):
    first, _ = _prune("qwen2", "dense", epochs=epochs)
    second, _ = _prune("qwen2", "dense", epochs=epochs)
    for (name, a), (_, b) in zip(iter_prunable(first), iter_prunable(second), strict=True):
        assert torch.equal(weight_matrix(a), weight_matrix(b)), name


def test_masked_refit_solves_each_rows_normal_equations():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=generator, dtype=torch.float64)
    weight = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    target = x @ torch.randn(12, 5, generator=generator, dtype=torch.float64)
    mask = torch.rand(5, 12, generator=generator) < 0.5
    weight = weight.masked_fill(mask, 0)
    gram, cross = x.t() @ x, x.t() @ target
    refit = MaskedRefit(damp=1e-6, max_iter=500, tol=1e-10)
    new = refit(weight, mask, gram, cross).double()
    assert bool((new[mask] == 0).all())
    for row in range(5):
        keep = ~mask[row]
        direct = torch.linalg.lstsq(x[:, keep], target[:, row : row + 1]).solution.squeeze(1)
        assert torch.allclose(new[row, keep], direct, atol=1e-3), row


def test_paired_target_is_the_original_layers_output_and_the_error_formula_holds():
    model = make_model("opt")
    windows = make_windows(4, 16)
    inputs = capture_block_inputs(model, windows, "cpu", 2)
    _, blocks = find_blocks(model)
    block = blocks[0]
    original = copy.deepcopy(block)
    name = output_layers(block, head_layout(model.config))[-1]
    layer = dict(block.named_modules())[name]
    with torch.no_grad():
        layer.weight.mul_(0.5)
    seen = {"x": [], "y0": []}
    handle = layer.register_forward_hook(lambda _m, a, o: seen["x"].append(a[0]))
    twin = dict(original.named_modules())[name]
    twin_handle = twin.register_forward_hook(lambda _m, a, o: seen["y0"].append(o))
    args, kwargs = inputs.call_args(2, 0)
    with torch.no_grad():
        for half in (inputs.hidden[:2], inputs.hidden[2:]):
            block(half, *args, **kwargs)
            original(half, *args, **kwargs)
    handle.remove()
    twin_handle.remove()
    wanted = reference_outputs(original, [name], 0, inputs, 2)
    target = paired_target(block, name, 0, inputs, wanted, 2, "layer", True)
    x = torch.cat(seen["x"]).reshape(-1, seen["x"][0].shape[-1]).double()
    t = torch.cat(seen["y0"]).reshape(-1, seen["y0"][0].shape[-1]).double()
    assert torch.allclose(target.cross, x.t() @ t, atol=1e-6)
    assert torch.allclose(target.gram, x.t() @ x, atol=1e-6)
    assert target.tokens == x.shape[0]
    shifted = without_bias(target, layer.bias.detach())
    w = layer.weight.detach().double()
    direct = float((x @ w.t() - (t - layer.bias.detach().double())).square().sum())
    formula = target_error(output_error(w, target.gram), w, None, shifted)
    assert formula == pytest.approx(direct, rel=1e-6)


def test_bad_stream_is_refused():
    with pytest.raises(SecateursError, match="dense"):
        BlockReconstruction(MaskedRefit(), "teacher")


@pytest.mark.parametrize("extra", [(), ("--offload", "disk")])
def test_the_command_reconstructs_and_reports(tiny_model_dir, text_dir, tmp_path, extra):
    common = ("--nsamples", "8", "--eval_limit", "2", "--reconstruct", "dense")
    out = tmp_path / ("d" if extra else "m")
    result = invoke_prune(tiny_model_dir, text_dir, *common, "--save_model", out, *extra)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "secateurs.json").read_text())
    assert saved["config"]["reconstruct"] == "dense"
    refits = saved["prune"]["reconstruction"]
    assert {r["aim"] for r in refits} == {"layer", "block"}
    assert all(r["relative_error_after"] <= r["relative_error_before"] for r in refits)
    assert "reconstruction   dense stream, mean relative error" in result.output


def test_streamed_reconstruction_saves_what_memory_saves(tiny_model_dir, text_dir, tmp_path):
    common = ("--nsamples", "8", "--eval_limit", "2", "--reconstruct", "dense", "--batch_size", "1")
    for name, extra in (("m", ()), ("d", ("--offload", "disk"))):
        result = invoke_prune(
            tiny_model_dir, text_dir, *common, "--save_model", tmp_path / name, *extra
        )
        assert result.exit_code == 0, result.output
    memory, disk = (
        {
            k: v
            for shard in (tmp_path / n).glob("*.safetensors")
            for k, v in load_file(shard).items()
        }
        for n in ("m", "d")
    )
    assert memory.keys() == disk.keys()
    assert all(torch.equal(memory[k], disk[k]) for k in memory)


def test_the_command_refuses_reconstruction_where_it_cannot_run(tiny_model_dir, text_dir):
    table = invoke_prune(
        tiny_model_dir, text_dir, "--nsamples", "8", "--prune_method", "wandg",
        "--reconstruct", "dense",
    )  # fmt: skip
    assert table.exit_code != 0
    assert "--reconstruct needs the block-by-block calibration" in table.output
    bad = invoke_prune(tiny_model_dir, text_dir, "--reconstruct", "teacher")
    assert bad.exit_code != 0 and "--reconstruct" in bad.output
    alone = invoke_prune(tiny_model_dir, text_dir, "--reconstruct_epochs", "2")
    assert alone.exit_code != 0 and "add --reconstruct dense" in alone.output
    negative = invoke_prune(
        tiny_model_dir, text_dir, "--reconstruct", "dense", "--reconstruct_epochs", "-1"
    )
    assert negative.exit_code != 0 and "--reconstruct_epochs must be 0 or more" in negative.output


def _block_gap(block, original, inputs) -> float:
    """Squared distance between two blocks' outputs on ``inputs`` (batches of 4 windows)."""
    args, kwargs = inputs.call_args(4, 0)
    gap = 0.0
    with torch.no_grad():
        for start in range(0, inputs.hidden.shape[0], 4):
            batch = inputs.hidden[start : start + 4]
            mine = block_output(block(batch, *args, **kwargs))
            theirs = block_output(original(batch, *args, **kwargs))
            gap += float((mine - theirs).square().sum())
    return gap


def test_the_block_aim_reaches_through_gemmas_post_norm_and_its_refit_closes_the_gap():
    model = make_model("gemma3")
    inputs = capture_block_inputs(model, make_windows(8, 16), "cpu", 4)
    block = find_blocks(model)[1][0]
    original = copy.deepcopy(block)
    name = output_layers(block, head_layout(model.config))[-1]
    wanted = reference_outputs(original, [name], 0, inputs, 4)
    layer = dict(block.named_modules())[name]
    # unpruned, the target is the layer's own output: the weighted fit changes nothing
    same = paired_target(block, name, 0, inputs, wanted, 4, "block", True)
    assert same is not None
    w = layer.weight.detach().double()
    assert target_error(output_error(w, same.gram), w, None, same) < 1e-8 * same.energy
    # pruned, the refit towards it brings the block's output nearer the unpruned block's
    up = dict(block.named_modules())[name.replace("down_proj", "up_proj")]
    with torch.no_grad():
        for weight in (layer.weight, up.weight):
            weight.masked_fill_(weight.abs() < weight.abs().median(), 0)
    before = _block_gap(block, original, inputs)
    target = paired_target(block, name, 0, inputs, wanted, 4, "block", True)
    mask = layer.weight == 0
    new = MaskedRefit(damp=1e-4, max_iter=200)(
        layer.weight, mask, target.gram, target.cross.float()
    )
    with torch.no_grad():
        layer.weight.copy_(new)
    assert _block_gap(block, original, inputs) < 0.9 * before
