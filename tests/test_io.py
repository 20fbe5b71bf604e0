import os
import stat
import tempfile
from pathlib import Path

import pytest

from secateurs.errors import SecateursError
from secateurs.io import (
    atomic_dir,
    atomic_file,
    atomic_write_text,
    check_folder_files,
    check_safetensors,
    ensure_free,
)


def test_failed_directory_write_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_directory_appears_whole(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "a"


def test_text_write_is_atomic(tmp_path):
    target = tmp_path / "r.json"
    atomic_write_text(target, "{}")
    assert target.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_existing_output_is_refused(tmp_path):
    with pytest.raises(SecateursError, match="already exists"):
        ensure_free(tmp_path, "--save_model")
    ensure_free(tmp_path / "new", "--save_model")


@pytest.mark.parametrize(
    ("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_outputs_get_the_modes_the_umask_gives_new_files(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "r.json", "{}")
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("a")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == dir_mode


class _Stop(BaseException):
    """Neither an Exception nor a KeyboardInterrupt: what a signal handler may raise."""


def test_a_base_exception_leaves_no_temporary(tmp_path):
    with pytest.raises(_Stop), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise _Stop
    with pytest.raises(_Stop), atomic_file(tmp_path / "r.json") as tmp:
        tmp.write_text("{")
        raise _Stop
    assert list(tmp_path.iterdir()) == []


def _replace_privately(path: Path) -> None:
    """Write ``path`` the way safetensors does: a private temporary renamed over it (0600)."""
    fd, other = tempfile.mkstemp(dir=path.parent)
    os.write(fd, b"data")
    os.close(fd)
    os.replace(other, path)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_every_published_file_gets_the_umask_modes(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        with atomic_file(tmp_path / "scores.safetensors") as tmp:
            _replace_privately(tmp)
        with atomic_dir(tmp_path / "model") as tmp:
            _replace_privately(tmp / "model.safetensors")
            (tmp / "sub").mkdir(mode=0o700)
            _replace_privately(tmp / "sub" / "shard.safetensors")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "scores.safetensors") == file_mode
    model = tmp_path / "model"
    assert _mode(model / "model.safetensors") == file_mode
    assert _mode(model / "sub") == dir_mode
    assert _mode(model / "sub" / "shard.safetensors") == file_mode


def test_publishing_leaves_the_targets_of_links_alone(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    outside.chmod(0o600)
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "link").symlink_to(outside)
    assert _mode(outside) == 0o600


def test_a_failed_safetensors_write_is_a_write_error(tmp_path):
    from safetensors import SafetensorError

    full = "Error while serializing: I/O error: No space left on device (os error 28)"
    with (
        pytest.raises(SecateursError, match="No space left on device"),
        atomic_dir(tmp_path / "out"),
    ):
        raise SafetensorError(full)
    # reading a damaged file is not a write error: it stays what it is for the caller to name
    with pytest.raises(SafetensorError), atomic_dir(tmp_path / "out"):
        raise SafetensorError("Error while deserializing header: HeaderTooLarge")
    assert list(tmp_path.iterdir()) == []


def _safetensors_file(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(16, 16)}, str(path))
    return path


def test_a_whole_safetensors_file_passes_the_check(tmp_path):
    check_safetensors(_safetensors_file(tmp_path / "model.safetensors"))


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # a copy cut short
        lambda data: data[:5],  # not even the header's length
        lambda data: (8).to_bytes(8, "little") + b"not json",
        lambda data: (10**9).to_bytes(8, "little") + data[8:],  # a header longer than the file
        lambda data: data + b"trailing",  # more bytes than the header describes
    ],
)
def test_a_damaged_safetensors_file_is_named(tmp_path, damage):
    path = _safetensors_file(tmp_path / "model.safetensors")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SecateursError, match="truncated or corrupt") as info:
        check_safetensors(path)
    assert str(path) in str(info.value)


def test_folder_check_names_a_damaged_json_or_weights_file(tmp_path):
    check_folder_files(tmp_path / "no-such-folder")  # a hub id or built-in name: not a folder
    _safetensors_file(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"a": 1}')
    check_folder_files(tmp_path)
    (tmp_path / "config.json").write_text('{"a": ')
    with pytest.raises(SecateursError, match=r"config\.json' is truncated or corrupt"):
        check_folder_files(tmp_path)


def test_every_output_file_of_a_run_gets_the_umask_modes(tmp_path, tiny_model_dir, text_dir):
    from conftest import invoke_prune

    runs = {
        "model": ["--save_model", tmp_path / "model", "--save_format", "dense"],
        "compressed": ["--save_model", tmp_path / "compressed"],
        "streamed": ["--offload", "disk", "--save_model", tmp_path / "streamed"],
        "scores": ["--dump_wanda_score", "--save", tmp_path / "scores"],
    }
    old = os.umask(0o022)
    try:
        for args in runs.values():
            result = invoke_prune(tiny_model_dir, text_dir, "--nsamples", "2", *args)
            assert result.exit_code == 0, result.output
    finally:
        os.umask(old)
    for name in runs:
        files = [p for p in (tmp_path / name).rglob("*") if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in files), name
        assert {p.name: oct(_mode(p)) for p in files} == {p.name: "0o644" for p in files}
        folders = [tmp_path / name, *(p for p in (tmp_path / name).rglob("*") if p.is_dir())]
        assert {oct(_mode(p)) for p in folders} == {"0o755"}
