"""The per-layer plot of a run (--save_plot)."""

from __future__ import annotations

import json

import pytest
from conftest import invoke_prune

from secateurs.errors import SecateursError
from secateurs.jobs import prune as runner
from secateurs.jobs.report import check_plot_path, plot_layers

PNG = b"\x89PNG\r\n\x1a\n"


def _forbidden(*_args, **_kwargs):
    raise AssertionError("data or model work started before the input was checked")


def _result(recovery: bool) -> dict:
    layers = []
    for block in range(3):
        for i, sublayer in enumerate(("self_attn.q_proj", "mlp.down_proj")):
            layer = {"block": f"model.layers.{block}", "sublayer": sublayer, "sparsity": 0.5}
            if recovery:
                before = 0.1 * (block + 1) + 0.01 * i
                layer["recovery"] = {
                    "relative_error_before": before,
                    "relative_error_after": before / 2,
                }
            layers.append(layer)
    return {
        "config": {"model": "tiny", "prune_method": "wanda", "recovery": "least_squares"},
        "pattern": "unstructured 50%",
        "sparsity": {"overall": 0.5},
        "prune": {"layers": layers},
    }


@pytest.mark.parametrize("recovery", [False, True])
def test_plot_is_a_png_written_whole(tmp_path, recovery):
    path = tmp_path / "layers.png"
    plot_layers(_result(recovery), path)
    assert path.read_bytes().startswith(PNG)
    assert [p.name for p in tmp_path.iterdir()] == ["layers.png"]


def test_plot_with_recovery_is_taller(tmp_path):
    from PIL import Image

    plot_layers(_result(False), tmp_path / "a.png")
    plot_layers(_result(True), tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").height > Image.open(tmp_path / "a.png").height


@pytest.mark.parametrize("name", ["layers.jpg", "layers", "layers.png.txt"])
def test_plot_path_must_be_png(tmp_path, name):
    with pytest.raises(SecateursError, match=r"ending in \.png"):
        check_plot_path(str(tmp_path / name))


def test_existing_plot_path_is_refused(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(SecateursError, match="already exists"):
        check_plot_path(str(tmp_path / "a.png"))


def test_prune_writes_the_plot_from_its_json(tmp_path, tiny_model_dir, text_dir):
    plot, out = tmp_path / "layers.png", tmp_path / "run.json"
    result = invoke_prune(
        tiny_model_dir, text_dir, "--nsamples", "4", "--eval_limit", "2", "--use_recovery",
        "--save_plot", plot, "--save_json", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert plot.read_bytes().startswith(PNG)
    assert all(layer["recovery"] for layer in json.loads(out.read_text())["prune"]["layers"])


def test_bad_plot_path_is_one_line_before_work(tmp_path, tiny_model_dir, text_dir, monkeypatch):
    monkeypatch.setattr(runner, "prepare", _forbidden)
    result = invoke_prune(tiny_model_dir, text_dir, "--save_plot", tmp_path / "p.svg")
    assert result.exit_code == 2  # a call to prepare would be an unexpected error, exit 1
    assert result.output.count("\n") == 1 and "--save_plot" in result.output
