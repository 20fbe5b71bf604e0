"""Issue 31, trust under bad data: bad prompt/response files stop a run, with the line and the
fix, before any model loads; a local text file never serves its calibration text for evaluation.
"""

import json

import pytest
import torch
from conftest import invoke, make_tokenizer, random_text

from secateurs.data import prompts
from secateurs.data import text as data
from secateurs.errors import SecateursError

CSV_CASES = [
    ("prompt,response\nhello\n", "line 2: no value for 'response'"),
    ("prompt,response\nhello,\n", "line 2: 'response' is empty"),
    ("prompt,response\n   ,hi\n", "line 2: 'prompt' holds only whitespace"),
    ('prompt,response\n"hello, you,hi\nnext,row\n', "line 2: a quoted value opened here"),
    ("prompt,response\na,b,c\n", "line 2: 3 values, but the header names 2 columns"),
    ('prompt,response\n"a"b,c\n', "line 2: not valid CSV"),
    ("prompt,response\nok,fine\n\nhello\n", "line 4: no value for 'response'"),
    ('prompt,response\na,"two\nlines"\nb,\n', "line 4: 'response' is empty"),
    ("question,answer\na,b\n", "line 1: the header (question, answer) has no 'prompt' column"),
]
JSONL_CASES = [
    ({"prompt": "a", "response": None}, "line 2: 'response' is null"),
    ({"prompt": "a", "response": 5}, "line 2: 'response' is a number (5), not text"),
    ({"prompt": ["a"], "response": "b"}, "line 2: 'prompt' is a list (['a']), not text"),
    ({"prompt": "a", "response": ""}, "line 2: 'response' is empty"),
    ({"prompt": "\t ", "response": "b"}, "line 2: 'prompt' holds only whitespace"),
    ({"prompt": "a"}, "line 2: no 'response' field"),
    (["a", "b"], "line 2: a JSON list where an object with 'prompt' and 'response' is needed"),
]


def _refused(path, expected: str) -> str:
    """The check that runs before any model loads refuses ``path``; its message."""
    with pytest.raises(SecateursError) as caught:
        prompts.check_prompt_data(str(path))
    message = str(caught.value)
    assert f"{path}, {expected}" in message, message
    assert "\n" not in message  # the CLI shows it as one line
    return message


@pytest.mark.parametrize(("content", "expected"), CSV_CASES)
def test_bad_csv_rows_are_refused_by_the_check(tmp_path, content, expected):
    path = tmp_path / "pairs.csv"
    path.write_text(content)
    message = _refused(path, expected)
    assert "; " in message  # what is wrong, then what to do
    with pytest.raises(SecateursError, match="line"):
        prompts.load_pairs(str(path))


@pytest.mark.parametrize(("row", "expected"), JSONL_CASES)
def test_bad_jsonl_records_are_refused_by_the_check(tmp_path, row, expected):
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": "fine", "response": "also fine"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    _refused(path, expected)
    with pytest.raises(SecateursError, match="line 2"):
        prompts.read_pairs(path)


def test_good_files_still_read_exactly(tmp_path):
    path = tmp_path / "pairs.csv"
    # a byte-order mark, extra columns, CRLF endings and a quoted multi-line value are all fine
    path.write_bytes(
        b'\xef\xbb\xbfid,prompt,response\r\n1,"hello, you","two\r\nlines"\r\n2,"say ""hi""",hi\r\n'
    )
    assert prompts.read_pairs(path) == [
        prompts.Pair("hello, you", "two\r\nlines"),
        prompts.Pair('say "hi"', "hi"),
    ]
    assert prompts.check_prompt_data(str(path)) == str(path)
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps({"prompt": "p", "response": "r", "category": "x"}) + "\n\n")
    assert prompts.load_pairs(str(jsonl)) == [prompts.Pair("p", "r")]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.csv", b"", "holds no prompt/response records"),
        ("header.csv", b"prompt,response\n", "holds no prompt/response records"),
        ("latin.csv", b"prompt,response\ncaf\xe9,x\n", "is not UTF-8 text"),
        ("nul.jsonl", b'{"prompt": "a\x00"}\n', "NUL bytes"),
    ],
)
def test_empty_and_binary_prompt_files_are_refused(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SecateursError, match=expected):
        prompts.check_prompt_data(str(path))


def _bad_pairs(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("prompt,response\nok,fine\nhello\n")
    return path


def _never(*args, **kwargs):
    raise AssertionError("the model was loaded before the data was checked")


@pytest.mark.parametrize("command", ["prune", "attack", "finetune"])
def test_every_command_stops_on_bad_prompt_data_before_the_model(
    tmp_path, tiny_model_dir, text_dir, monkeypatch, command
):
    monkeypatch.setattr("secateurs.core.model.load_model", _never)
    monkeypatch.setattr("secateurs.core.model.load_config", _never)
    monkeypatch.setattr("secateurs.jobs.prune.prepare", _never)
    bad = _bad_pairs(tmp_path)
    args = {
        "prune": ["--dataset", text_dir, "--prune_data", bad, "--prune_method", "wanda"],
        "attack": ["--prompts", bad],
        "finetune": ["--data", bad, "--save_model", tmp_path / "out"],
    }[command]
    result = invoke(command, "--model", tiny_model_dir, "--quiet", *args)
    assert result.exit_code == 2, (result.output, result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{bad}, line 3: no value for 'response'" in errors[0]


def _paragraphs(count: int, words: int = 40) -> list[str]:
    return [random_text(words, seed=i) for i in range(count)]


def test_a_local_file_holds_out_its_last_tenth_of_paragraphs(tmp_path):
    paragraphs = _paragraphs(25)
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    source = data.resolve_source(str(path))
    # 25 paragraphs: the last ceil(2.5) = 3 are the test split, the first 22 the train split
    assert source.load("test") == ["\n\n".join(paragraphs[22:])]
    assert source.load("train") == ["\n\n".join(paragraphs[:22])]
    assert data.resolve_source(str(path)).load("test") == source.load("test")  # deterministic


@pytest.mark.parametrize(
    ("content", "test"),
    [
        # no blank line: whole lines are held out
        ("\n".join(f"w{i} w{i + 1}" for i in range(30)), "w27 w28\nw28 w29\nw29 w30"),
        # a single line: whole words are held out
        (random_text(32), " ".join(random_text(32).split()[-4:])),
        # fewer than ten paragraphs but ten lines: the cut falls between lines
        ("w1\nw2\n\nw3\nw4\nw5\nw6\nw7\nw8\nw9\nw10\n", "w10"),
    ],
)
def test_finer_cuts_when_paragraphs_are_too_few(tmp_path, content, test):
    path = tmp_path / "corpus.txt"
    path.write_text(content)
    source = data.resolve_source(str(path))
    assert source.load("test") == [test]
    assert len(source.load("train")[0]) + len(test) < len(content)


def _ngrams(ids: torch.Tensor, n: int = 8) -> set[tuple[int, ...]]:
    flat = ids.tolist()
    return {tuple(flat[i : i + n]) for i in range(len(flat) - n + 1)}


@pytest.mark.parametrize("folder", [False, True])
def test_calibration_and_evaluation_of_a_local_text_share_no_text(tmp_path, folder):
    paragraphs = _paragraphs(30)
    if folder:  # a folder without train.txt and test.txt is split the same way
        path = tmp_path / "texts"
        path.mkdir()
        for i in range(3):
            (path / f"part{i}.txt").write_text("\n\n".join(paragraphs[i * 10 : i * 10 + 10]))
    else:
        path = tmp_path / "corpus.txt"
        path.write_text("\n\n".join(paragraphs))
    tokenizer = make_tokenizer()
    source = data.resolve_source(str(path))
    windows = data.calibration_windows(tokenizer, source, 64, 16, seed=0)
    evaluation = data.evaluation_tokens(tokenizer, source)
    assert evaluation.numel() == 3 * 40  # the last three paragraphs
    calibration = set().union(*(_ngrams(window) for window in windows))
    assert calibration and not calibration & _ngrams(evaluation)


def test_a_folder_with_train_and_test_keeps_its_files(text_dir):
    source = data.resolve_source(str(text_dir))
    assert source.load("train") == [(text_dir / "train.txt").read_text()]
    assert source.load("test") == [(text_dir / "test.txt").read_text()]


def test_a_held_out_part_too_short_for_evaluation_names_the_fix(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(_paragraphs(10, words=20)))
    source = data.resolve_source(str(path))
    ids = data.evaluation_tokens(make_tokenizer(), source)
    assert ids.numel() == 20
    with pytest.raises(SecateursError) as caught:
        data.evaluation_windows(ids, 32, source=source)
    message = str(caught.value)
    assert "held out" in message and "--eval_dataset" in message and str(path) in message


def test_a_single_word_cannot_be_split(tmp_path):
    path = tmp_path / "word.txt"
    path.write_text("  w1\n")
    source = data.resolve_source(str(path))
    assert source.load("train") == ["w1"]
    with pytest.raises(SecateursError, match=r"too short to hold out .*--eval_dataset"):
        source.load("test")


def test_local_files_are_read_when_resolved(tmp_path):
    """Unreadable text stops the plan (which resolves every source) before anything loads."""
    path = tmp_path / "data.bin"
    path.write_bytes(b"\xff\xfe\x00binary\x9c")
    with pytest.raises(SecateursError, match="not UTF-8 text"):
        data.resolve_source(str(path))
