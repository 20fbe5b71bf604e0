"""Architectures no other test names: Gemma-3 (sliding-window and full attention layers, tied
embeddings, soft-capped logits, BOS-first windows), Mistral, and Phi-3 with fused qkv_proj
and gate_up_proj, pruned with every pattern through the whole job, saved and reloaded."""

import math

import pytest
import torch
from conftest import make_model, make_tokenizer, make_windows
from transformers import AutoModelForCausalLM

from secateurs.api import MethodPruner
from secateurs.config import RunConfig
from secateurs.core.model import find_blocks, find_linears, find_mlp_groups, weight_matrix
from secateurs.core.patterns import parse_pattern
from secateurs.evaluate.perplexity import check_sparsity, perplexity
from secateurs.jobs.prune import run_prune
from secateurs.jobs.session import load_eval_windows

UNSEEN = ("gemma3", "mistral", "phi3")
PATTERNS = [
    ("unstructured", None, False),
    ("unstructured", "layer", False),
    ("unstructured", None, True),
    ("2:4", None, False),
    ("4:8", None, False),
    ("neuron", None, False),
]


@pytest.mark.parametrize("arch", UNSEEN)
@pytest.mark.parametrize(("sparsity_type", "scope", "variant"), PATTERNS)
def test_prune_save_reload(arch, sparsity_type, scope, variant, tmp_path, text_dir):
    folder = tmp_path / arch
    make_model(arch).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    saved = tmp_path / "pruned"
    cfg = RunConfig.from_flags(
        model=str(folder),
        dataset=str(text_dir),
        nsamples=4,
        seqlen=32,
        eval_limit=2,
        eval_dense=False,
        sparsity_type=sparsity_type,
        scope=scope,
        use_variant=variant,
        save_model=str(saved),
        progress=False,
    )
    result = run_prune(cfg, log=lambda _m: None)
    assert result["sparsity"]["violations"] == []
    assert result["window_bos"]["prefixed"] == (arch == "gemma3")
    reloaded = AutoModelForCausalLM.from_pretrained(saved).eval()
    pattern = parse_pattern(sparsity_type, scope or "row", variant)
    ratio = result["config"]["sparsity_ratio"]
    if sparsity_type != "neuron":  # a neuron-pruned model is saved with the neurons cut out
        assert check_sparsity(reloaded, pattern, ratio).ok
    bos = result["window_bos"]["bos_token_id"]
    windows = load_eval_windows(make_tokenizer(), str(text_dir), 32, 2, bos)
    again = perplexity(reloaded, windows, progress=False)
    assert math.isclose(again, result["perplexity"]["pruned"], rel_tol=1e-5)


def test_gemma3_blocks_get_their_own_masks_and_rotary_embeddings():
    """Full-attention blocks must not be run with the sliding-window block's arguments."""
    from secateurs.core.model import capture_block_inputs

    model = make_model("gemma3")
    inputs = capture_block_inputs(model, make_windows(3, 24), torch.device("cpu"), 2)
    assert inputs.kinds == ["sliding_attention", "full_attention", "sliding_attention"]
    sliding, full = inputs.call_args(2, 0)[1], inputs.call_args(2, 1)[1]
    # the sliding window (8) is shorter than the windows (24); full attention may be left to
    # the kernel's causal flag (mask None)
    assert sliding["attention_mask"] is not None
    assert full["attention_mask"] is None or not torch.equal(
        sliding["attention_mask"], full["attention_mask"]
    )
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])
    assert inputs.call_args(1, 2) is inputs.call_args(1, 0)


def test_phi3_fused_gate_up_loses_both_halves_of_each_neuron():
    model = make_model("phi3")
    MethodPruner(model, "wanda", progress=False).prune(make_windows(), 0.25, "neuron")
    layers = find_linears(find_blocks(model)[1][0])
    (group,) = find_mlp_groups(layers)
    assert group.producers == ("mlp.gate_up_proj",) and group.parts == (2,)
    dead = (weight_matrix(layers["mlp.down_proj"]) == 0).all(dim=0)
    rows = (weight_matrix(layers["mlp.gate_up_proj"]) == 0).all(dim=1)
    width = dead.numel()
    assert int(dead.sum()) == width // 4
    assert torch.equal(rows[:width], dead) and torch.equal(rows[width:], dead)


def test_phi3_fused_gate_up_meets_the_neuron_check_at_odd_counts():
    # 128 neurons x 0.35 = 44.8: 44 neurons, so 88 of 256 fused rows (not int(256 x 0.35) = 89)
    model = make_model("phi3")
    MethodPruner(model, "wanda", progress=False).prune(make_windows(), 0.35, "neuron")
    check = check_sparsity(model, parse_pattern("neuron"), 0.35)
    assert check.ok, check.violations


def test_phi3_fused_qkv_is_pruned_row_by_row_like_separate_projections():
    """Wanda compares within a row, so fused q, k and v rows are pruned as they would be apart;
    N:M groups run along the input columns, which fusion does not touch."""
    for sparsity_type in ("unstructured", "2:4"):
        model = make_model("phi3")
        qkv = find_linears(find_blocks(model)[1][0])["self_attn.qkv_proj"]
        dense = weight_matrix(qkv).clone()
        MethodPruner(model, "magnitude", progress=False).prune(None, 0.5, sparsity_type, "row")
        pruned = weight_matrix(qkv)
        pattern = parse_pattern(sparsity_type, "row")
        for part in dense.split([64, 32, 32]):  # q, k, v rows of the tiny Phi-3
            rows = slice(*_rows_of(dense, part))
            expected = part.masked_fill(pattern.create_mask(part.abs(), 0.5), 0)
            assert torch.equal(pruned[rows], expected)


def _rows_of(matrix: torch.Tensor, part: torch.Tensor) -> tuple[int, int]:
    start = (part.data_ptr() - matrix.data_ptr()) // (matrix.shape[1] * matrix.element_size())
    return start, start + part.shape[0]
