import pytest
import torch
from chat_helpers import chat_tokenizer, write_pairs
from conftest import invoke, make_model, make_windows
from transformers import AutoModelForCausalLM

from secateurs.api import MagnitudePruner
from secateurs.core.model import iter_prunable, weight_matrix
from secateurs.data.prompts import text_batch
from secateurs.errors import SecateursError
from secateurs.jobs.finetune import LoraOptions, finetune, target_modules


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_lora_keeps_pruned_weights_exactly_zero(arch):
    model = make_model(arch)
    MagnitudePruner(model, progress=False).prune(None, 0.5)
    before = {name: weight_matrix(layer).clone() for name, layer in iter_prunable(model)}
    options = LoraOptions(rank=4, alpha=8, lr=1e-2, steps=3, batch_size=2)
    merged, report = finetune(model, text_batch(make_windows(4, 12)), options, progress=False)
    changed = 0
    for name, layer in iter_prunable(merged):
        weight = weight_matrix(layer)
        assert bool((weight[before[name] == 0] == 0).all()), name
        changed += int((weight != before[name]).sum())
    assert changed > 0  # training did move the surviving weights
    assert report.kept_zeros == sum(int((w == 0).sum()) for w in before.values())
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_target_modules_are_the_block_linears():
    assert target_modules(make_model("llama")) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]


def test_bad_options_are_refused():
    with pytest.raises(SecateursError, match="--rank"):
        LoraOptions(rank=0)
    with pytest.raises(SecateursError, match="--lr"):
        LoraOptions(lr=float("nan"))


def test_finetune_command_saves_an_ordinary_folder(tmp_path):
    model_dir, pairs = tmp_path / "tiny", tmp_path / "pairs.jsonl"
    pruned = make_model("llama")
    MagnitudePruner(pruned, progress=False).prune(None, 0.5)
    pruned.save_pretrained(model_dir)
    chat_tokenizer().save_pretrained(model_dir)
    write_pairs(pairs, count=6)
    out = tmp_path / "tuned"
    result = invoke(
        "finetune",
        "--model",
        model_dir,
        "--data",
        pairs,
        "--steps",
        "2",
        "--seqlen",
        "32",
        "--batch_size",
        "2",
        "--save_model",
        out,
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    sparsity = [float((weight_matrix(m) == 0).float().mean()) for _, m in iter_prunable(reloaded)]
    assert min(sparsity) >= 0.5
    again = invoke("finetune", "--model", model_dir, "--data", pairs, "--save_model", out)
    assert again.exit_code == 2 and "already exists" in again.output


def test_attack_command_writes_responses(tmp_path):
    model_dir, pairs = tmp_path / "tiny", tmp_path / "pairs.jsonl"
    make_model("llama").save_pretrained(model_dir)
    chat_tokenizer().save_pretrained(model_dir)
    write_pairs(pairs, count=3)
    out = tmp_path / "answers.jsonl"
    result = invoke(
        "attack",
        "--model",
        model_dir,
        "--prompts",
        pairs,
        "--max_new_tokens",
        "3",
        "--out",
        out,
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert "no_system" in result.output and len(out.read_text().splitlines()) == 6


def test_samples_without_a_response_token_are_dropped():
    from secateurs.data.prompts import PromptBatch
    from secateurs.jobs.finetune import trainable_rows

    ids = torch.ones(3, 4, dtype=torch.long)
    mask = torch.tensor([[0, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    kept = trainable_rows(PromptBatch(ids, mask, torch.tensor([4, 4, 4])))
    assert kept.token_mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    with pytest.raises(SecateursError, match="raise --seqlen"):
        trainable_rows(PromptBatch(ids[1:2], mask[1:2], torch.tensor([4])))
