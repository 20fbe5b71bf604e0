import pytest
import torch
from conftest import make_tokenizer, random_text
from safetensors.torch import load_file

from secateurs.data import text as data
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
    # a single file is evaluated on its held-out last tenth only (here 30 of its 300 words)
    assert data.evaluation_tokens(tokenizer, data.resolve_source(str(single))).numel() == 30


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


def _configs_by_arch():
    from conftest import ARCHS, make_model

    return {arch: make_model(arch).config for arch in ARCHS}


def test_auto_bos_only_for_families_that_need_it():
    tokenizer = make_tokenizer()
    chosen = {
        arch: data.window_bos_token("auto", config, tokenizer)
        for arch, config in _configs_by_arch().items()
    }
    assert chosen.pop("gemma3") == 2  # the tiny tokenizer has none: the config's BOS id
    assert set(chosen.values()) == {None}
    llama = _configs_by_arch()["llama"]
    assert data.window_bos_token("never", llama, tokenizer) is None
    assert data.window_bos_token("always", llama, tokenizer) == llama.bos_token_id
    llama.bos_token_id = None
    with pytest.raises(SecateursError, match="--window_bos never"):
        data.window_bos_token("always", llama, tokenizer)
    with pytest.raises(SecateursError, match="auto, always, never"):
        data.window_bos_token("sometimes", llama, tokenizer)


def test_auto_keeps_llama_calibration_bit_identical(text_dir):
    """LLaMA-style models get exactly the reference windows under the default rule."""
    source = data.resolve_source(str(text_dir))
    tokenizer = make_tokenizer()
    bos = data.window_bos_token("auto", _configs_by_arch()["llama"], tokenizer)
    for seed in (0, 3):
        reference = data.calibration_windows(tokenizer, source, 8, 32, seed=seed)
        assert torch.equal(data.calibration_windows(tokenizer, source, 8, 32, seed, bos), reference)


def test_bos_windows_keep_seqlen_and_the_reference_draws(text_dir):
    import random

    source = data.resolve_source(str(text_dir))
    tokenizer = make_tokenizer()
    ids = data.tokenize(tokenizer, (text_dir / "train.txt").read_text())
    rng = random.Random(0)
    starts = [rng.randint(0, ids.numel() - 15 - 1) for _ in range(3)]
    windows = data.calibration_windows(tokenizer, source, 3, 16, seed=0, bos=1)
    assert windows.shape == (3, 16) and bool((windows[:, 0] == 1).all())
    assert torch.equal(windows[:, 1:], torch.stack([ids[s : s + 15] for s in starts]))
    again = data.calibration_windows(tokenizer, source, 3, 16, seed=0, bos=1)
    assert torch.equal(windows, again)


def test_bos_evaluation_windows_never_double_the_texts_own_bos():
    ids = torch.cat([torch.tensor([0]), torch.arange(1, 101)])  # the text starts with BOS 0
    windows = data.evaluation_windows(ids, 30, bos=0)
    assert windows.shape == (3, 30)
    assert torch.equal(windows[0], torch.cat([torch.tensor([0]), torch.arange(1, 30)]))
    assert torch.equal(windows[1], torch.cat([torch.tensor([0]), torch.arange(30, 59)]))
    assert data.evaluation_windows(ids, 30, limit=1, bos=0).shape == (1, 30)
    assert torch.equal(data.evaluation_windows(ids, 30)[0], ids[:30])  # no rule: as before


def test_text_with_no_room_for_one_window_is_refused(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text(random_text(32))
    source = data.resolve_source(str(short))
    # exactly seqlen tokens: the reference draw would need randint(0, -1)
    with pytest.raises(SecateursError, match="too few for one window of 32"):
        data.calibration_windows(make_tokenizer(), source, 1, 32)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe\x00binary\x9c", "not UTF-8 text"),
        (b"w1 w2\x00w3", "NUL bytes"),
        (b"  \n\n ", "holds no text"),
    ],
)
def test_non_text_files_are_refused(tmp_path, content, message):
    path = tmp_path / "data.bin"
    path.write_bytes(content)
    with pytest.raises(SecateursError, match=message):
        data.resolve_source(str(path)).load("train")


def test_unreadable_file_is_refused(tmp_path, monkeypatch):
    from pathlib import Path

    path = tmp_path / "locked.txt"
    path.write_text("w1 w2")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(SecateursError, match=r"cannot read .*Permission denied"):
        data.resolve_source(str(path)).load("train")


def test_token_ids_are_cached_per_tokenizer_and_text(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path))
    tokenizer = make_tokenizer()
    text = random_text(300, seed=5)
    fresh = tokenizer(text, return_tensors="pt").input_ids[0]
    first = data.tokenize(tokenizer, text)
    files = list((tmp_path / "tokens").glob("*.safetensors"))
    assert len(files) == 1 and torch.equal(first, fresh)
    # the second call reads the file: damage it and the ids are tokenized and written again
    assert torch.equal(data.tokenize(tokenizer, text), fresh)
    files[0].write_bytes(b"not a safetensors file")
    assert torch.equal(data.tokenize(tokenizer, text), fresh)
    assert torch.equal(load_file(files[0])["ids"].long(), fresh)
    # another text, or a tokenizer that splits differently, gets its own entry
    data.tokenize(tokenizer, text + " w1")
    other = make_tokenizer()
    other.backend_tokenizer.pre_tokenizer = None
    data.tokenize(other, text)
    assert len(list((tmp_path / "tokens").glob("*.safetensors"))) == 3


def test_token_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path))
    monkeypatch.setenv("SECATEURS_TOKEN_CACHE", "0")
    data.tokenize(make_tokenizer(), random_text(50))
    assert not (tmp_path / "tokens").exists()
