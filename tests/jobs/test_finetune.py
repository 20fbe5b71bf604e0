import pytest
import torch
from chat_helpers import chat_tokenizer, write_pairs
from conftest import invoke, make_model, make_windows, random_text
from transformers import AutoModelForCausalLM

from secateurs.api import MagnitudePruner
from secateurs.core.model import iter_prunable, weight_matrix
from secateurs.data.prompts import pad_id, text_batch
from secateurs.errors import SecateursError
from secateurs.jobs.finetune import LoraOptions, finetune, target_modules, training_batch


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


def test_distillation_loss_is_zero_for_the_teacher_itself_and_skips_unlabelled_tokens():
    from secateurs.jobs.finetune import distillation_loss

    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 11)
    labels = torch.ones(2, 5, dtype=torch.long)
    assert float(distillation_loss(teacher, teacher, labels, 2.0)) == pytest.approx(0, abs=1e-6)
    student = torch.randn(2, 5, 11)
    assert float(distillation_loss(student, teacher, labels, 1.0)) > 0
    # a position whose next token has no label does not count, whatever its logits
    labels[:, 3] = -100
    changed = student.clone()
    changed[:, 2] += 100.0
    assert torch.allclose(
        distillation_loss(student, teacher, labels, 1.0),
        distillation_loss(changed, teacher, labels, 1.0),
    )


def test_full_distillation_of_a_shrunk_model_moves_it_towards_its_teacher():
    from secateurs.core.structure import StructurePruner, StructureSpec
    from secateurs.formats.shrink import cut_structure
    from secateurs.jobs.finetune import distillation_loss
    from secateurs.methods.units import unit_method

    teacher = make_model("llama")
    student = make_model("llama")
    spec = StructureSpec(neurons=0.5, heads=0.5)
    pruner = StructurePruner(student, spec, unit_method("wanda", "width").fn, None, progress=False)
    cut_structure(student, pruner.prune(make_windows()))
    batch = text_batch(make_windows(8, 12, seed=4))

    def gap(model) -> float:
        with torch.no_grad():
            ids = batch.input_ids
            return float(
                distillation_loss(model(ids).logits, teacher(ids).logits, batch.labels(), 1.0)
            )

    before = gap(student)
    options = LoraOptions(lr=3e-4, steps=30, batch_size=4, train="full")
    tuned, report = finetune(student, batch, options, progress=False, teacher=teacher)
    assert gap(tuned) < before
    assert report.last_loss < report.first_loss
    assert not any(p.requires_grad for p in tuned.parameters())


def test_distillation_refuses_a_teacher_of_another_vocabulary():
    from secateurs.jobs.finetune import check_teacher

    other = make_model("llama")
    other.resize_token_embeddings(200)
    with pytest.raises(SecateursError, match="vocabulary"):
        check_teacher(make_model("llama"), other)


def test_finetune_options_check_the_distillation_settings():
    with pytest.raises(SecateursError, match="--train"):
        LoraOptions(train="half")
    with pytest.raises(SecateursError, match="--temperature"):
        LoraOptions(temperature=0.0)
    with pytest.raises(SecateursError, match="--kd_weight"):
        LoraOptions(kd_weight=-1.0)
    with pytest.raises(SecateursError, match="--minutes"):
        LoraOptions(minutes=0.0)


def test_minutes_bound_the_training_time():
    """A budget already spent after the first step stops there; steps still bound it."""
    batch = text_batch(make_windows(4, 12))
    timed = LoraOptions(lr=1e-3, steps=50, batch_size=2, train="full", minutes=1e-9)
    _, report = finetune(make_model("llama"), batch, timed, progress=False)
    assert report.steps == 1
    counted = LoraOptions(lr=1e-3, steps=3, batch_size=2, train="full", minutes=60.0)
    _, report = finetune(make_model("llama"), batch, counted, progress=False)
    assert report.steps == 3


def test_text_in_data_mixes_plain_windows_with_the_pairs(tmp_path):
    pairs, corpus = tmp_path / "pairs.jsonl", tmp_path / "corpus.txt"
    write_pairs(pairs, count=6)
    corpus.write_text("\n\n".join(random_text(80, seed=s) for s in range(6)))
    tokenizer = chat_tokenizer()
    only_pairs = training_batch(tokenizer, [str(pairs)], str(corpus), 3, 16)
    mixed = training_batch(tokenizer, [str(pairs), "text"], str(corpus), 3, 16)
    windows = mixed.input_ids[3:]
    assert mixed.input_ids.shape == (6, 16) and windows.shape == (3, 16)
    assert bool(mixed.token_mask[3:].all()) and mixed.lengths[3:].tolist() == [16, 16, 16]
    width = only_pairs.input_ids.shape[1]
    assert torch.equal(mixed.input_ids[:3, :width], only_pairs.input_ids)
    assert torch.equal(mixed.token_mask[:3, :width], only_pairs.token_mask)
    assert not bool(mixed.token_mask[:3, width:].any())
    assert bool((mixed.input_ids[:3, width:] == pad_id(tokenizer)).all())


def test_finetune_command_takes_text_beside_the_pairs(tmp_path, tiny_model_dir):
    pairs, corpus = tmp_path / "pairs.jsonl", tmp_path / "corpus.txt"
    write_pairs(pairs, count=4)
    corpus.write_text("\n\n".join(random_text(80, seed=s) for s in range(6)))
    chat_tokenizer().save_pretrained(tiny_model_dir)
    result = invoke(
        "finetune",
        "--model",
        tiny_model_dir,
        "--data",
        f"{pairs},text",
        "--dataset",
        corpus,
        "--nsamples",
        "2",
        "--steps",
        "1",
        "--seqlen",
        "16",
        "--save_model",
        tmp_path / "tuned",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
