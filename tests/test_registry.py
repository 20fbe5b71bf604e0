"""The contract every registered method keeps: one suite over the registry.

A new method file is picked up here without any edit: it is run through every pattern it
declares on the tiny architectures and must give masks that meet the pattern, bit-identical
when the same inputs are pruned again.
"""

import dataclasses

import pytest
import torch
from conftest import ARCHS, VOCAB, make_model, make_windows

from secateurs import check_sparsity
from secateurs.api import MethodPruner
from secateurs.config import RunConfig, all_flags
from secateurs.core.model import iter_prunable, weight_matrix
from secateurs.core.patterns import SCOPES, parse_pattern
from secateurs.core.spec import flagged_fields
from secateurs.core.stats import StatsRequest
from secateurs.methods import METHODS
from secateurs.methods.registry import ALL_PATTERNS, Method, register

SPARSITY_TYPES = {"unstructured": "unstructured", "nm": "2:4", "neuron": "neuron"}
# Small Fisher class count: the tiny vocabulary has 128 tokens.
OPTIONS = {"neuronrank_max_classes": VOCAB // 8}


def _cases():
    for name, method in METHODS.items():
        if method.set_difference:  # two score tables: a run-level job (tests/jobs/test_scoring.py)
            continue
        for kind in sorted(method.patterns):
            yield name, kind


def _masks(model) -> dict[str, torch.Tensor]:
    return {name: weight_matrix(layer) == 0 for name, layer in iter_prunable(model)}


def _prune(name: str, kind: str, arch: str) -> tuple[torch.nn.Module, object, object]:
    """The pruned model, the engine's report and the pattern it was pruned to."""
    model = make_model(arch)
    pruner = MethodPruner(model, name, options=OPTIONS, progress=False, batch_size=2)
    variant = kind == "variant"
    sparsity_type = SPARSITY_TYPES.get(kind, "unstructured")
    report = pruner.prune(make_windows(4, 16), 0.5, sparsity_type, use_variant=variant)
    return model, report, parse_pattern(sparsity_type, METHODS[name].scope, variant)


@pytest.mark.parametrize("name", list(METHODS))
def test_declarations_are_consistent(name):
    method = METHODS[name]
    assert method.name == name and method.summary
    assert method.scope in SCOPES
    assert method.patterns and method.patterns <= ALL_PATTERNS
    assert isinstance(method.request(method.make_options()), StatsRequest)
    if method.options is not None:
        options = method.make_options()
        assert dataclasses.is_dataclass(options)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(options, dataclasses.fields(options)[0].name, None)
        assert flagged_fields(method.options), "options without flags cannot be set"
    if method.updates_weights:
        assert method.calibrated, "a solver needs the statistics of its layer"
    if method.reads_score_table:
        assert not method.streamable


def test_every_method_option_is_a_flag_of_the_run():
    flags = all_flags()
    for method in METHODS.values():
        if method.options is not None:
            for _, flag in flagged_fields(method.options):
                assert flag.name in flags
    cfg = RunConfig.from_flags(prune_method="ria", ria_alpha=0.25)
    assert cfg.method.options.alpha == 0.25 and cfg.flags()["ria_alpha"] == 0.25


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="registered twice"):
        register(Method("wanda", "again", lambda weight, stats: weight))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("name", "kind"), list(_cases()))
def test_every_method_prunes_every_declared_pattern(name, kind, arch):
    model, report, pattern = _prune(name, kind, arch)
    check = check_sparsity(model, pattern, 0.5, report.block_ratios)
    if kind == "variant":  # per-row counts adapt; the layer's share is bisected to about 0.5
        assert abs(check.overall - 0.5) < 0.02
    else:
        assert check.ok, check.violations
    assert check.overall > 0.2


@pytest.mark.parametrize(("name", "kind"), list(_cases()))
def test_same_inputs_give_bit_identical_masks(name, kind):
    first, _, _ = _prune(name, kind, "llama")
    second, _, _ = _prune(name, kind, "llama")
    masks, again = _masks(first), _masks(second)
    assert masks.keys() == again.keys()
    for layer in masks:
        assert torch.equal(masks[layer], again[layer]), layer
