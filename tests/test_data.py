import pytest
import torch
from conftest import make_tokenizer, random_text

from secateurs import data
from secateurs.errors import SecateursError


def test_calibration_windows_are_seeded_and_shaped(text_dir):
    source = data.resolve_source(str(text_dir))
    tokenizer = make_tokenizer()
    a = data.calibration_windows(tokenizer, source, 8, 32, seed=0)
    b = data.calibration_windows(tokenizer, source, 8, 32, seed=0)
    c = data.calibration_windows(tokenizer, source, 8, 32, seed=1)
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_calibration_uses_the_reference_random_draws(text_dir):
    import random

    source = data.resolve_source(str(text_dir))
    tokenizer = make_tokenizer()
    ids = data.tokenize(tokenizer, (text_dir / "train.txt").read_text())
    rng = random.Random(0)
    starts = [rng.randint(0, ids.numel() - 16 - 1) for _ in range(3)]
    expected = torch.stack([ids[s : s + 16] for s in starts])
    assert torch.equal(data.calibration_windows(tokenizer, source, 3, 16, seed=0), expected)


def test_too_many_windows_is_refused(text_dir):
    source = data.resolve_source(str(text_dir))
    with pytest.raises(SecateursError, match="lower --nsamples to at most 125"):
        data.calibration_windows(make_tokenizer(), source, 500, 32)


def test_zero_samples_is_refused(text_dir):
    with pytest.raises(SecateursError, match="at least 1"):
        data.calibration_windows(make_tokenizer(), data.resolve_source(str(text_dir)), 0, 32)


def test_folder_splits_and_single_file(tmp_path, text_dir):
    tokenizer = make_tokenizer()
    folder = data.resolve_source(str(text_dir))
    assert data.evaluation_tokens(tokenizer, folder).numel() == 1200
    single = tmp_path / "one.txt"
    single.write_text(random_text(300))
    assert data.evaluation_tokens(tokenizer, data.resolve_source(str(single))).numel() == 300


def test_evaluation_windows_drop_the_remainder_and_honour_the_limit():
    ids = torch.arange(100)
    windows = data.evaluation_windows(ids, 30)
    assert windows.shape == (3, 30) and torch.equal(windows[1], torch.arange(30, 60))
    assert data.evaluation_windows(ids, 30, limit=2).shape == (2, 30)
    with pytest.raises(SecateursError, match="fewer than one window"):
        data.evaluation_windows(ids, 200)


def test_unknown_dataset_names_the_builtin():
    with pytest.raises(SecateursError, match="wiki-sample"):
        data.resolve_source("no-such-dataset")


def test_hub_dataset_offline_error_names_the_builtin(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for name in ("wikitext2", "c4", "ptb"):
        with pytest.raises(SecateursError, match="--dataset wiki-sample"):
            data.resolve_source(name).load("test")


def test_c4_protocol_caps_evaluation_windows():
    source = data.resolve_source("c4")
    assert data.evaluation_windows(torch.arange(300 * 4), 4, source=source).shape == (256, 4)
