"""Non-finite weights, scores and statistics stop a run before anything is pruned or saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import invoke_prune, make_model, make_tokenizer, make_windows

from secateurs.api import MethodPruner
from secateurs.core.engine import prune_sequential
from secateurs.core.model import find_blocks, iter_prunable, load_model, weight_matrix
from secateurs.core.patterns import Unstructured
from secateurs.errors import SecateursError
from secateurs.formats import streaming
from secateurs.formats.streaming import DiskBlocks, build_skeleton

BAD = "model.layers.1.mlp.up_proj.weight"


def _broken_model(path: Path, values: dict[str, tuple[float, int]]) -> Path:
    """A saved tiny LLaMA whose tensors ``name`` hold ``count`` copies of ``value``."""
    model = make_model("llama")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, (value, count) in values.items():
            params[name].view(-1)[:count] = value
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def test_load_model_names_the_tensors_that_are_not_finite(tmp_path):
    path = _broken_model(
        tmp_path / "m",
        {
            BAD: (float("nan"), 12),
            "model.layers.0.self_attn.q_proj.weight": (float("inf"), 3),
            "model.norm.weight": (float("-inf"), 1),
        },
    )
    with pytest.raises(SecateursError) as info:
        load_model(str(path))
    message = str(info.value)
    assert f"the weights of model '{path}' are not finite" in message
    assert "3 tensors" in message
    assert f"{BAD} (12 NaN)" in message
    assert "model.layers.0.self_attn.q_proj.weight (3 Inf)" in message
    assert "model.norm.weight (1 Inf)" in message
    assert "corrupt or was saved after a failed run" in message


def test_load_model_shows_a_few_tensors_and_counts_the_rest(tmp_path):
    names = [n for n, _ in make_model("llama").named_parameters() if n.endswith("proj.weight")]
    path = _broken_model(tmp_path / "m", {name: (float("nan"), 1) for name in names})
    with pytest.raises(SecateursError, match=f"{len(names)} tensors") as info:
        load_model(str(path))
    assert "and 18 more" in str(info.value)
    assert str(info.value).count("(1 NaN)") == 3


def test_finite_weights_load_as_before(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "extra", [(), ("--offload", "disk"), ("--offload", "disk", "--no_eval_dense")]
)
def test_a_run_on_nan_weights_is_refused_and_saves_nothing(tmp_path, text_dir, extra):
    model_dir = _broken_model(tmp_path / "broken", {BAD: (float("nan"), 1)})
    out = tmp_path / "out"
    result = invoke_prune(
        model_dir, text_dir, "--nsamples", "8", "--eval_limit", "2", "--save_model", out, *extra
    )
    assert result.exit_code == 2, result.output
    assert "are not finite" in result.output
    assert f"{BAD} (1 NaN)" in result.output
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*"))  # no half-written temporary folder either


def test_streamed_blocks_are_checked_as_they_are_read(tmp_path):
    folder = _broken_model(tmp_path / "m", {BAD: (float("inf"), 2)})
    model = build_skeleton(folder, torch.float32)
    store = DiskBlocks(model, folder, torch.float32)
    _, blocks = find_blocks(model)
    store.load(0, blocks[0])
    message = (
        r"not finite \(1 tensor in model\.layers\.1\): "
        r"model\.layers\.1\.mlp\.up_proj\.weight \(2 Inf\)"
    )
    with pytest.raises(SecateursError, match=message):
        store.load(1, blocks[1])


@pytest.mark.parametrize("row", [0, 5])
def test_a_large_mapped_embedding_is_checked_by_rows_read_and_whole_when_copied(
    tmp_path, monkeypatch, row
):
    """Checking a large mapped tensor when read would make it resident: the rows the windows
    use are checked as they are read, the rest as the tensor is copied to the output."""
    monkeypatch.setattr(streaming, "_CHECK_MAPPED_BYTES", 0)  # every mapped tensor is large
    model = make_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[row, 3] = float("nan")
    model.save_pretrained(tmp_path / "m")
    store = DiskBlocks(build_skeleton(tmp_path / "m", torch.float32), tmp_path / "m", torch.float32)
    windows = torch.zeros((1, 4), dtype=torch.long)  # token 0 only
    name = r"model\.embed_tokens\.weight \(1 NaN\)"
    if row == 0:
        with pytest.raises(SecateursError, match=name):
            store.load_outer(windows)
        return
    store.load_outer(windows)  # the NaN row is not one the windows read
    store.free_outer()
    store.out = tmp_path / "out"
    store.out.mkdir()
    with pytest.raises(SecateursError, match=name):
        store.write_outer()


def _nan_metric(model, layer_name: str):
    """A magnitude score that is NaN in one entry of one layer."""
    target = dict(iter_prunable(model))[layer_name]

    def metric(layer, _stats):
        score = weight_matrix(layer).abs()
        if layer is target:
            score = score.clone()
            score[0, 0] = float("nan")
        return score

    return metric


def test_non_finite_scores_stop_the_run_naming_the_layer():
    model = make_model("llama")
    name = "model.layers.1.mlp.up_proj"
    before = weight_matrix(dict(iter_prunable(model))[name]).clone()
    metric = _nan_metric(model, name)
    with pytest.raises(SecateursError, match=r"model\.layers\.1\.mlp\.up_proj.*not finite"):
        prune_sequential(model, None, metric, Unstructured(), 0.5, calibrated=False, progress=False)
    # the check comes before the layer's mask: its weights are untouched
    assert torch.equal(weight_matrix(dict(iter_prunable(model))[name]), before)


def test_non_finite_activations_stop_wanda_at_the_first_layer():
    model = make_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("nan"))
    with pytest.raises(SecateursError, match=r"model\.layers\.0\.self_attn\.q_proj.*not finite"):
        MethodPruner(model, "wanda", progress=False).prune(make_windows(), 0.5)


def test_a_solver_that_returns_non_finite_weights_is_stopped():
    model = make_model("llama")

    def solver(weight, _stats, _pattern, _ratio, _name):
        new = weight.clone()
        new[0, 0] = float("inf")
        return new, torch.zeros_like(weight, dtype=torch.bool)

    first = weight_matrix(dict(iter_prunable(model))["model.layers.0.self_attn.q_proj"]).clone()
    with pytest.raises(SecateursError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        prune_sequential(
            model,
            make_windows(),
            lambda layer, _s: weight_matrix(layer).abs(),
            Unstructured(),
            0.5,
            solver=solver,
            progress=False,
        )
    now = weight_matrix(dict(iter_prunable(model))["model.layers.0.self_attn.q_proj"])
    assert torch.equal(now, first)


def test_non_finite_activations_stop_a_solver_run_at_the_statistics():
    model = make_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("nan"))
    with pytest.raises(SecateursError, match=r"model\.layers\.0\..*statistics.*not finite"):
        prune_sequential(
            model,
            make_windows(),
            lambda layer, _s: weight_matrix(layer).abs(),
            Unstructured(),
            0.5,
            solver=lambda w, _s, _p, _r, _n: (w, torch.zeros_like(w, dtype=torch.bool)),
            progress=False,
        )
