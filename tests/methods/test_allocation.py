import json
import warnings

import pytest
import torch
from conftest import make_model, make_windows

from secateurs.api import MethodPruner, prune
from secateurs.core.engine import block_outlier_ratios
from secateurs.core.model import find_blocks, find_linears, weight_matrix
from secateurs.core.patterns import NMSparsity, Unstructured
from secateurs.core.stats import ActivationStats
from secateurs.errors import SecateursError
from secateurs.evaluate.perplexity import check_sparsity
from secateurs.methods.allocation import (
    allocate,
    block_parameters,
    check_allocation,
    owl_ratios,
    read_ratios,
)
from secateurs.methods.wanda import wanda_score


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7, 0.9])
def test_owl_ratios_average_to_the_target_and_stay_in_range(target):
    generator = torch.Generator().manual_seed(0)
    outliers = torch.rand(12, generator=generator).tolist()
    params = torch.randint(100, 1000, (12,), generator=generator).tolist()
    ratios = owl_ratios(outliers, params, target, 0.08)
    mean = sum(r * p for r, p in zip(ratios, params, strict=True)) / sum(params)
    assert mean == pytest.approx(target, abs=1e-12)
    assert all(0 <= r < 1 for r in ratios)
    assert max(ratios) - min(ratios) == pytest.approx(0.16)
    # more outliers, less pruning
    order = sorted(range(12), key=lambda i: outliers[i])
    assert [ratios[i] for i in order] == sorted(ratios, reverse=True)


def test_owl_with_equal_outliers_is_uniform_and_impossible_targets_fail():
    assert owl_ratios([0.1] * 4, [10] * 4, 0.5, 0.08) == [0.5] * 4
    with pytest.raises(SecateursError, match="owl_lambda"):
        owl_ratios([0.0, 1.0], [1, 1], 0.95, 0.08)


def test_outlier_ratios_match_a_direct_count():
    model = make_model("llama")
    windows = make_windows()
    ratios = block_outlier_ratios(model, windows, 2.0, wanda_score, progress=False)
    # block 0 sees the embeddings, so its statistics can be rebuilt by hand
    _, blocks = find_blocks(model)
    layers = find_linears(blocks[0])
    stats = {name: ActivationStats(weight_matrix(layer).shape[1]) for name, layer in layers.items()}
    hooks = [
        layer.register_forward_hook(lambda _m, a, _o, n=name: stats[n].add_batch(a[0]))
        for name, layer in layers.items()
    ]
    with torch.no_grad():
        model(windows)
    for hook in hooks:
        hook.remove()
    scores = torch.cat([wanda_score(weight_matrix(layers[n]), stats[n]).flatten() for n in layers])
    expected = float((scores > 2.0 * scores.double().mean()).float().mean())
    assert len(ratios) == len(blocks)
    assert ratios[0] == pytest.approx(expected, rel=1e-3)
    assert all(0 <= r < 1 for r in ratios)


def test_outlier_ratios_count_only_the_tokens_of_the_token_mask():
    """Prompt/response data: padding after a sample's tokens changes nothing that counts."""
    windows = make_windows(4, 32)
    lengths = torch.tensor([32, 10, 12, 9])
    positions = torch.arange(32)
    counted = (positions >= lengths[:, None] // 2) & (positions < lengths[:, None])
    ratios = []
    for pad in (0, 1):
        padded = torch.where(positions < lengths[:, None], windows, pad)
        plan = allocate(
            make_model("llama"), padded, "owl", 0.5, 2.0, progress=False, token_mask=counted
        )
        ratios.append(plan.outlier_ratios)
    assert ratios[0] == ratios[1]
    unmasked = block_outlier_ratios(make_model("llama"), padded, 2.0, wanda_score, progress=False)
    assert unmasked != ratios[1]


def test_owl_prunes_each_block_at_its_ratio_and_reports_them():
    model = make_model("qwen2")
    windows = make_windows()
    plan = allocate(model, windows, "owl", 0.5, threshold=2.0, lam=0.1, progress=False)
    assert plan.kind == "owl" and len(plan.ratios) == 3 and plan.seconds > 0
    report = MethodPruner(model, "wanda", progress=False).prune(
        windows, 0.5, block_ratios=plan.ratios
    )
    assert report.to_dict()["block_ratios"] == plan.ratios
    assert check_sparsity(model, Unstructured("row"), 0.5, plan.ratios).ok
    for record in report.layers:
        block = int(record.block.rsplit(".", 1)[1])
        cols = record.shape[1]
        assert record.pruned == record.shape[0] * int(cols * plan.ratios[block])
    parameters = block_parameters(model)
    mean = sum(r * p for r, p in zip(plan.ratios, parameters, strict=True)) / sum(parameters)
    assert mean == pytest.approx(0.5)


def test_sparsegpt_takes_per_block_ratios():
    model = make_model("llama")
    ratios = [0.3, 0.5, 0.7]
    MethodPruner(model, "sparsegpt", progress=False).prune(make_windows(), 0.5, block_ratios=ratios)
    assert check_sparsity(model, Unstructured("layer"), 0.5, ratios).ok


def test_allocation_file(tmp_path):
    path = tmp_path / "ratios.json"
    path.write_text(json.dumps([0.4, 0.5, 0.6]))
    assert read_ratios(str(path)) == [0.4, 0.5, 0.6]
    text = tmp_path / "ratios.txt"
    text.write_text("0.4\n0.5, 0.6\n")
    assert read_ratios(str(text)) == [0.4, 0.5, 0.6]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # equal blocks: the file's mean is the target
        plan = allocate(make_model("opt"), None, str(path), 0.5)
    assert plan.ratios == [0.4, 0.5, 0.6] and plan.mean == pytest.approx(0.5)
    with pytest.warns(UserWarning, match=r"prune 0\.5000 .* not --sparsity_ratio 0\.7"):
        assert allocate(make_model("opt"), None, str(path), 0.7).ratios == [0.4, 0.5, 0.6]
    path.write_text("[0.4, 0.5]")
    with pytest.raises(SecateursError, match="3 decoder blocks"):
        allocate(make_model("opt"), None, str(path), 0.5)
    for bad, message in (("[0.4, 1.0]", r"outside \[0, 1\)"), ('{"a": 1}', "JSON list")):
        path.write_text(bad)
        with pytest.raises(SecateursError, match=message):
            read_ratios(str(path))


def test_n_m_is_refused_with_a_varying_allocation():
    with pytest.raises(SecateursError, match="2:4 fixes it"):
        check_allocation("owl", NMSparsity(2, 4), 5.0, 0.08)
    with pytest.raises(SecateursError, match="unstructured"):
        MethodPruner(make_model("opt"), progress=False).prune(
            make_windows(), 0.5, "2:4", block_ratios=[0.5] * 3
        )


def test_api_prune_with_owl_gives_identical_masks_twice(tmp_path):
    from conftest import make_tokenizer, random_text

    text = tmp_path / "text"
    text.mkdir()
    (text / "train.txt").write_text(random_text(2000, seed=1))
    (text / "test.txt").write_text(random_text(500, seed=2))
    masks = []
    for _ in range(2):
        result = prune(
            make_model("llama"),
            make_tokenizer(),
            method="ria",
            dataset=str(text),
            nsamples=4,
            seqlen=32,
            progress=False,
            sparsity_allocation="owl",
            owl_threshold=2.0,
        )
        assert result.report.block_ratios is not None
        masks.append([weight_matrix(m) == 0 for m in find_linears(result.model).values()])
    assert all(torch.equal(a, b) for a, b in zip(masks[0], masks[1], strict=True))
