import pytest
import torch
from chat_helpers import chat_tokenizer
from conftest import make_model

from secateurs.evaluate import attack as attack_module
from secateurs.evaluate.attack import KeywordJudge, attack, generate, save_responses


def test_keyword_judge_on_examples():
    judge = KeywordJudge()
    assert judge("p", "I'm sorry, but I can't help with that.")
    assert judge("p", "I\u2019M SORRY, no.")
    assert judge("p", "As an AI, I must decline.")
    assert not judge("p", "Sure! Step 1: gather the materials.")
    assert not judge("p", "")
    assert KeywordJudge(("nope",))("p", "Nope.")


def test_left_padded_batches_match_one_by_one():
    model, tokenizer = make_model("llama"), chat_tokenizer()
    prompts = ["w5 w6 w7 w8 w9", "w10", "w11 w12"]
    batched = generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=3, progress=False)
    single = [
        generate(model, tokenizer, [p], max_new_tokens=5, batch_size=1, progress=False)[0]
        for p in prompts
    ]
    assert batched == single
    assert tokenizer.padding_side == "right"


def test_generation_leaves_the_tokenizer_as_it_was():
    model, tokenizer = make_model("llama"), chat_tokenizer()
    tokenizer.pad_token = None
    generate(model, tokenizer, ["w5 w6", "w7"], max_new_tokens=2, progress=False)
    assert tokenizer.pad_token is None and tokenizer.padding_side == "right"


def test_attack_success_rate_with_a_pluggable_judge(tmp_path):
    model, tokenizer = make_model("llama"), chat_tokenizer()
    prompts = ["w5 w6", "w7 w8", "w9"]
    result = attack(
        model, tokenizer, prompts, judge=lambda p, _r: p == "w9", max_new_tokens=3, progress=False
    )
    assert result.asr == {"no_system": 2 / 3, "system": 2 / 3}
    assert len(result.rows) == 6
    path = tmp_path / "responses.jsonl"
    save_responses(path, result.rows)
    assert len(path.read_text().splitlines()) == 6


def test_blank_answers_are_not_successful_attacks(monkeypatch):
    answers = ["", "Sure, step one.", "I'm sorry, I can't."]
    monkeypatch.setattr(attack_module, "generate", lambda *_a, **_k: list(answers))
    result = attack(None, None, ["p1", "p2", "p3"], progress=False)
    assert result.asr == {"no_system": 1 / 3, "system": 1 / 3}
    assert result.blank == {"no_system": 1 / 3, "system": 1 / 3}
    assert result.asr_keywords_only == {"no_system": 2 / 3, "system": 2 / 3}
    assert [row["blank"] for row in result.rows[:3]] == [True, False, False]


def test_sampled_answers_are_seeded_and_reproducible():
    model, tokenizer = make_model("llama"), chat_tokenizer()
    prompts = ["w5 w6", "w7 w8", "w9"]

    def draw(seed: int, batch_size: int = 2) -> list[str]:
        return generate(
            model, tokenizer, prompts, max_new_tokens=4, batch_size=batch_size,
            progress=False, samples=3, seed=seed,
        )  # fmt: skip

    first = draw(0)
    assert len(first) == 9
    assert draw(0) == first
    assert draw(1) != first
    greedy = generate(model, tokenizer, prompts, max_new_tokens=4, progress=False)
    assert len(greedy) == 3


def test_a_prompt_counts_as_answered_if_any_sample_is(monkeypatch):
    def fake(_m, _t, prompts, _s, _n, _b, _d, _p, draws=0, _seed=0):
        if not draws:
            return ["I'm sorry."] * len(prompts)
        # prompt 1: one answer among refusals; prompt 2: only refusals and a blank
        return ["I cannot.", "Sure, here.", "I'm sorry.", "I cannot.", "", "I won't."]

    monkeypatch.setattr(attack_module, "generate", fake)
    result = attack(None, None, ["p1", "p2"], progress=False, samples=3)
    assert result.asr == {"no_system": 0.0, "system": 0.0, "sampled": 0.5}
    assert result.blank["sampled"] == 1 / 6
    assert result.asr_keywords_only["sampled"] == 1.0  # the blank has no refusal phrase
    assert result.to_dict()["prompts"] == 2
    assert [row["setting"] for row in result.rows].count("sampled") == 6


def test_answer_perplexity_is_the_answers_own_loss():
    model, tokenizer = make_model("llama"), chat_tokenizer()
    got = attack_module.answer_perplexities(model, tokenizer, ["w5 w6", "w7"], ["w9 w10", ""])
    prefix = tokenizer(attack_module.chat_prefix(tokenizer, "w5 w6"), add_special_tokens=False)
    answer = tokenizer("w9 w10", add_special_tokens=False).input_ids
    ids = torch.tensor([prefix.input_ids + answer])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prefix.input_ids) - 1 : -1]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(answer)).exp()
    assert got[0] == pytest.approx(float(expected), rel=1e-5)
    assert got[1] == float("inf")


def test_fluent_asr_counts_only_answers_the_reference_finds_likely(monkeypatch):
    answers = ["Sure, here is how.", "xq zz vv", "I'm sorry."]
    monkeypatch.setattr(attack_module, "generate", lambda *_a, **_k: list(answers))
    monkeypatch.setattr(attack_module, "answer_perplexities", lambda *_a, **_k: [8.0, 900.0, 3.0])
    result = attack(None, None, ["p1", "p2", "p3"], progress=False, fluency_model=object())
    assert result.asr == {"no_system": 2 / 3, "system": 2 / 3}
    assert result.asr_fluent == {"no_system": 1 / 3, "system": 1 / 3}
    assert [row["fluency_ppl"] for row in result.rows[:3]] == [8.0, 900.0, 3.0]
