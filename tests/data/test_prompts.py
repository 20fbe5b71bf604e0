import pytest
from chat_helpers import TEMPLATE, chat_tokenizer, write_pairs

from secateurs.data import prompts
from secateurs.errors import SecateursError


def test_align_halves_are_disjoint_and_cover_harmbench():
    score, held_out = prompts.align_split("score"), prompts.align_split("eval")
    everything = prompts.harmbench_prompts()
    assert len(score) + len(held_out) == len(everything) == 200
    assert not {p.prompt for p in score} & {p.prompt for p in held_out}
    assert len({p.response for p in score}) == len(prompts.REFUSALS)
    assert prompts.load_pairs("align") == score


def test_utility_pairs_come_from_the_train_split():
    pairs = prompts.utility_pairs()
    assert len(pairs) > 500
    assert all(len(p.response.split()) == 20 for p in pairs[:20])


def test_read_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "pairs.jsonl"
    write_pairs(jsonl, count=3)
    assert len(prompts.read_pairs(jsonl)) == 3
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text('prompt,response\n"hello, you",hi\n')
    assert prompts.read_pairs(csv_file) == [prompts.Pair("hello, you", "hi")]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.txt", "x", "must end in .jsonl or .csv"),
        ("bad.jsonl", '{"prompt": 1}\n', "needs the fields"),
        ("bad2.jsonl", "{not json\n", "not valid JSON"),
    ],
)
def test_bad_files_are_refused(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SecateursError, match=message):
        prompts.read_pairs(path)


def test_unknown_prompt_data_names_the_choices():
    with pytest.raises(SecateursError, match="align or utility"):
        prompts.check_prompt_data("nope")


def test_response_mask_marks_only_the_response():
    tokenizer = chat_tokenizer()
    pair = prompts.Pair("w5 w6 w7", "w8 w9")
    batch = prompts.encode_pairs(tokenizer, [pair, prompts.Pair("w5", "w8")], max_length=64)
    ids = tokenizer("w1 w5 w6 w7 w2 w8 w9", add_special_tokens=False).input_ids
    assert batch.input_ids[0, : len(ids)].tolist() == ids
    assert batch.token_mask[0].tolist() == [False] * 5 + [True] * 3  # w8 w9 <eos>
    assert batch.lengths.tolist() == [8, 5]
    assert batch.labels()[1, 5:].tolist() == [-100] * 3  # padding never counts
    entangled = prompts.encode_pairs(tokenizer, [pair], max_length=64, entangle_prompt=True)
    assert bool(entangled.token_mask.all())


def test_responses_end_as_the_template_ends_an_answer():
    tokenizer = chat_tokenizer()
    tokenizer.chat_template = TEMPLATE.replace("{{ m['content'] }} ", "{{ m['content'] }} w3 ")
    batch = prompts.encode_pairs(tokenizer, [prompts.Pair("w5", "w8 w9")], max_length=64)
    ids = tokenizer("w1 w5 w3 w2 w8 w9 w3", add_special_tokens=False).input_ids
    assert batch.input_ids[0].tolist() == ids
    assert batch.token_mask[0].tolist() == [False] * 4 + [True] * 3  # w8 w9 w3, no <eos>


def test_no_chat_template_is_a_clear_error():
    from conftest import make_tokenizer

    with pytest.raises(SecateursError, match="no chat template"):
        prompts.encode_pairs(make_tokenizer(), [prompts.Pair("w1", "w2")], 16)


def test_sampling_is_seeded_and_capped():
    pairs = [prompts.Pair(str(i), "r") for i in range(10)]
    assert prompts.sample_pairs(pairs, 4, seed=1) == prompts.sample_pairs(pairs, 4, seed=1)
    with pytest.warns(UserWarning, match="using all 10"):
        assert len(prompts.sample_pairs(pairs, 20)) == 10
