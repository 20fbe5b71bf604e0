"""Calibration and evaluation text: the built-in sample, Hugging Face datasets, local files.

A text source yields documents for a split; a local text without its own ``train.txt`` and
``test.txt`` is cut so that its last tenth is the test split (:func:`hold_out`). Calibration
draws ``nsamples`` random windows of ``seqlen`` tokens with ``random.seed(seed)`` as the
reference code does; evaluation joins the split with ``"\\n\\n"`` and tokenizes it once.

Windows may start with a beginning-of-sequence token (see :func:`window_bos_token`): a window
is then BOS followed by ``seqlen - 1`` tokens of text, so its length stays ``seqlen``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from secateurs.data import assets
from secateurs.errors import SecateursError
from secateurs.io import atomic_file

WINDOW_BOS_RULES = ("auto", "always", "never")
# Families trained to see BOS first: without it their first positions, which every later token
# attends to, are out of distribution and perplexity is several times too high (Gemma-3-270M on
# wiki-sample: 167 without, about 23 with). LLaMA, Mistral, Qwen2, Phi-3, OPT and GPT-2 keep
# the reference protocol (only the text's own first token, if any, is BOS).
_BOS_FAMILIES = ("gemma", "gemma2", "gemma3", "gemma3_text", "recurrent_gemma")

# Reference C4 protocol: the first shard of each split, 1100 validation documents,
# evaluation truncated to 256 windows.
_C4_TRAIN = "en/c4-train.00000-of-01024.json.gz"
_C4_VALIDATION = "en/c4-validation.00000-of-00008.json.gz"
_C4_EVAL_DOCUMENTS = 1100
_C4_EVAL_WINDOWS = 256


@dataclass(frozen=True)
class TextSource:
    """Where documents of a split come from, and how the reference joins them."""

    name: str
    load: Callable[[str], list[str]]
    train_joiner: str = "\n\n"
    test_joiner: str = "\n\n"
    # C4 calibration samples one document at a time instead of windows of the joined text.
    per_document_calibration: bool = False
    max_eval_windows: int | None = None
    # The test split is the held-out last tenth of a local text (see ``_local``).
    held_out: bool = False


def _hub_dataset(path: str, config: str | None, split: str, field: str, **kwargs) -> list[str]:
    try:
        from datasets import load_dataset

        data = load_dataset(path, config, split=split, **kwargs)
    except Exception as exc:  # datasets raises many types for offline / missing hub data
        raise SecateursError(
            f"could not load the '{path}' dataset ({type(exc).__name__}: {exc}). It needs the "
            "Hugging Face hub or a local datasets cache; offline, use the built-in text with "
            "--dataset wiki-sample, or a local text file or folder"
        ) from exc
    return list(data[field])


def _wikitext2(split: str) -> list[str]:
    return _hub_dataset("wikitext", "wikitext-2-raw-v1", split, "text")


def _ptb(split: str) -> list[str]:
    return _hub_dataset("ptb_text_only", "penn_treebank", split, "sentence")


def _c4(split: str) -> list[str]:
    if split == "train":
        return _hub_dataset("allenai/c4", None, "train", "text", data_files={"train": _C4_TRAIN})
    # The reference evaluates C4 on the first validation shard.
    docs = _hub_dataset(
        "allenai/c4", None, "validation", "text", data_files={"validation": _C4_VALIDATION}
    )
    return docs[:_C4_EVAL_DOCUMENTS]


def read_text_file(path: Path) -> str:
    """A UTF-8 text file's contents; a clear error for binary, unreadable or empty files."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SecateursError(
            f"'{path}' is not UTF-8 text (byte {exc.start} cannot be decoded); give a plain "
            "text file, or convert it with: iconv -t UTF-8"
        ) from exc
    except OSError as exc:
        raise SecateursError(
            f"cannot read '{path}' ({exc.strerror or exc}); check the path and its permissions"
        ) from exc
    if "\x00" in text:
        raise SecateursError(
            f"'{path}' holds NUL bytes, so it is binary, not text; give a text file"
        )
    if not text.strip():
        raise SecateursError(f"'{path}' holds no text; give a file with text to calibrate on")
    return text


# A local text without its own train.txt and test.txt holds out its last tenth for evaluation.
HELD_OUT_SHARE = 10
# Where a local text may be cut, coarsest first: a blank line (between paragraphs), a line
# break, whitespace (between words). The coarsest with at least HELD_OUT_SHARE units is used,
# so the held-out tenth is at least one whole unit. A cut starts at its newline (a pattern
# that starts with a literal is scanned for over ten times faster): the spaces before it stay
# at the end of the train part, which is stripped.
_CUTS = (
    re.compile(r"\n[^\S\n]*\n\s*"),
    re.compile(r"\n\s*"),
    re.compile(r"\s+"),
)


def hold_out(text: str) -> tuple[str, str]:
    """``text`` cut into (train, test): the test part is its last tenth of whole units.

    A unit is a paragraph (text between blank lines) when there are at least ten, else a line
    when there are at least ten, else a word; the test part is the last ``ceil(units / 10)``
    units, the train part all before them. The cut is a slice of ``text`` (only the whitespace
    around it and at the ends is dropped), so no unit is in both parts. A single word cannot
    be cut: its test part is empty.
    """
    start, end = len(text) - len(text.lstrip()), len(text.rstrip())
    pattern, count = _coarsest_cuts(text, start, end)
    if count == 0:
        return text[start:end], ""
    units = count + 1
    held_out = -(-units // HELD_OUT_SHARE)
    # the cut before the first held-out unit
    cut = next(itertools.islice(pattern.finditer(text, start, end), units - held_out - 1, None))
    return text[start : cut.start()].rstrip(), text[cut.end() : end]


def _coarsest_cuts(text: str, start: int, end: int) -> tuple[re.Pattern[str], int]:
    """The coarsest kind of cut that gives ``text[start:end]`` ten units, and how many cuts it
    has there (word cuts, however few, where none does)."""
    count = 0
    for pattern in _CUTS:
        # counted, not listed: a long one-line text has millions of word cuts
        count = sum(1 for _ in pattern.finditer(text, start, end))
        if count + 1 >= HELD_OUT_SHARE:
            return pattern, count
    return _CUTS[-1], count


def _local_text(path: Path) -> str:
    """A file's text, or a folder's .txt files (sorted by path) joined as paragraphs."""
    if path.is_file():
        return read_text_file(path)
    if not path.is_dir():
        raise SecateursError(f"'{path}' is neither a text file nor a folder of .txt files")
    try:
        files = sorted(path.rglob("*.txt"))
    except OSError as exc:
        raise SecateursError(f"cannot list the folder '{path}' ({exc.strerror or exc})") from exc
    if not files:
        raise SecateursError(f"the folder '{path}' holds no .txt files to read text from")
    return "\n\n".join(read_text_file(f) for f in files)


def _local(path: Path) -> TextSource:
    """A local text file or folder, read now so that bad text stops a run at its plan.

    A folder holding both ``train.txt`` and ``test.txt`` uses them as its splits, unchanged.
    Any other file or folder (its .txt files in path order, each starting a paragraph) is one
    text cut by :func:`hold_out`: evaluation reads only its last tenth of paragraphs (of lines
    or of words where there are fewer than ten paragraphs), calibration only the text before,
    so perplexity is never measured on calibration text. The cut is the same in every run and
    for every flag that names the text (``--dataset``, ``--eval_dataset``, ``eval --dataset``).
    """
    if all((path / f"{split}.txt").is_file() for split in ("train", "test")):
        parts = {split: [read_text_file(path / f"{split}.txt")] for split in ("train", "test")}
        return TextSource(str(path), lambda split: list(parts[_check_split(split)]))
    train, test = hold_out(_local_text(path))

    def load(split: str) -> list[str]:
        if _check_split(split) == "train":
            return [train]
        if not test:
            raise SecateursError(
                f"'{path}' is a single word, too short to hold out evaluation text (a local text "
                "keeps its last tenth from calibration for evaluation); give a longer text, or "
                "evaluation text of its own with --eval_dataset"
            )
        return [test]

    return TextSource(str(path), load, held_out=True)


BUILTIN_SOURCES: dict[str, TextSource] = {
    "wiki-sample": TextSource("wiki-sample", assets.wiki_sample_split),
    "wikitext2": TextSource("wikitext2", _wikitext2, train_joiner=" "),
    "ptb": TextSource("ptb", _ptb, train_joiner=" "),
    "c4": TextSource(
        "c4",
        _c4,
        train_joiner=" ",
        test_joiner=" ",
        per_document_calibration=True,
        max_eval_windows=_C4_EVAL_WINDOWS,
    ),
}


def resolve_source(name: str) -> TextSource:
    """A text source by built-in name or local path; a clear error for anything else."""
    if name in BUILTIN_SOURCES:
        return BUILTIN_SOURCES[name]
    path = Path(name).expanduser()
    if path.exists():
        return _local(path)
    raise SecateursError(
        f"unknown dataset '{name}': use one of {', '.join(BUILTIN_SOURCES)} "
        "(wiki-sample is built in and works offline) or the path of a text file or folder"
    )


def check_window_bos(rule: str) -> str:
    if rule not in WINDOW_BOS_RULES:
        raise SecateursError(
            f"--window_bos must be one of {', '.join(WINDOW_BOS_RULES)}, got '{rule}'"
        )
    return rule


def needs_window_bos(config) -> bool:
    """Whether a model family expects BOS at the start of every sequence it sees."""
    text_config = getattr(config, "get_text_config", lambda: config)()
    return getattr(text_config, "model_type", None) in _BOS_FAMILIES


def window_bos_token(rule: str, config, tokenizer) -> int | None:
    """The token every window starts with under ``rule``, or None for the reference windows."""
    if check_window_bos(rule) == "never" or (rule == "auto" and not needs_window_bos(config)):
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(config, "bos_token_id", None)
    if not isinstance(bos, int):
        raise SecateursError(
            "the tokenizer has no beginning-of-sequence token to start windows with; "
            "use --window_bos never"
        )
    return bos


def _strip_bos(ids: torch.Tensor, bos: int | None) -> torch.Tensor:
    """The text's own leading BOS is dropped when every window gets one (never two in a row)."""
    if bos is not None and ids.numel() and int(ids[0]) == bos:
        return ids[1:]
    return ids


def _with_bos(body: torch.Tensor, bos: int | None) -> torch.Tensor:
    """Prefix every row of ``body`` (n, length) with ``bos``; unchanged when it is None."""
    if bos is None:
        return body
    return torch.cat([torch.full((body.shape[0], 1), bos, dtype=body.dtype), body], dim=1)


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise SecateursError(f"split must be 'train' or 'test', not '{split}'")
    return split


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of one long text as a 1-D tensor (no length warning: we window it ourselves).

    Fast tokenizers' results are cached on disk under the tokenizer's fingerprint and the
    text's hash: tokenizing a long split holds several hundred bytes per token at its peak
    (600k tokens of wiki-sample: 350 MB), more than a streamed prune of SmolLM2 needs.
    """
    path = _token_cache_path(tokenizer, text)
    if path is not None and path.is_file():
        with contextlib.suppress(Exception):  # a damaged entry is tokenized and written again
            return load_file(path)["ids"].long()
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    if path is not None:
        # a read-only cache is no failure: the ids are simply not kept
        with contextlib.suppress(OSError, SecateursError), atomic_file(path) as tmp:
            save_file({"ids": ids.to(torch.int32).contiguous()}, tmp)
    return ids


def _token_cache_path(tokenizer, text: str) -> Path | None:
    """Where the ids of ``text`` under ``tokenizer`` are cached; None to not cache."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or os.environ.get("SECATEURS_TOKEN_CACHE", "1") == "0":
        return None
    digest = hashlib.sha256()
    for part in (type(tokenizer).__name__, backend.to_str(), repr(_special_settings(tokenizer))):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(text.encode("utf-8", errors="surrogatepass"))
    return assets.cache_root() / "tokens" / f"{digest.hexdigest()}.safetensors"


def _special_settings(tokenizer) -> dict:
    """What decides special tokens around a text besides the backend's own post-processor."""
    names = ("add_bos_token", "add_eos_token", "bos_token_id", "eos_token_id")
    return {name: getattr(tokenizer, name, None) for name in names}


def evaluation_tokens(tokenizer, source: TextSource, split: str = "test") -> torch.Tensor:
    """The split joined with ``"\\n\\n"`` and tokenized once, as the reference evaluates."""
    docs = source.load(_check_split(split))
    return tokenize(tokenizer, source.test_joiner.join(docs))


def calibration_windows(
    tokenizer,
    source: TextSource,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    bos: int | None = None,
) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens from the train split, shape (n, seqlen).

    With ``bos``, each window is ``bos`` and ``seqlen - 1`` tokens drawn as the reference draws.
    """
    if nsamples <= 0:
        raise SecateursError(f"--nsamples must be at least 1, got {nsamples}")
    docs = source.load("train")
    if not docs:
        raise SecateursError(f"{_train_label(source)} holds no text")
    rng = random.Random(seed)
    length = seqlen - (bos is not None)
    if source.per_document_calibration:
        return _with_bos(_windows_from_documents(tokenizer, docs, nsamples, length, rng, bos), bos)
    ids = _strip_bos(tokenize(tokenizer, source.train_joiner.join(docs)), bos)
    # the reference draws a start in [0, tokens - length - 1]: it needs one token to spare
    available = ids.numel() // length if ids.numel() > length else 0
    if available == 0:
        raise SecateursError(
            f"{_train_label(source)} has {ids.numel()} tokens, too few for one "
            f"window of {seqlen}; lower --seqlen or use a longer text"
        )
    if available < nsamples:
        raise SecateursError(
            f"{_train_label(source)} has {ids.numel()} tokens, room for {available} "
            f"windows of {seqlen}; lower --nsamples to at most {max(available, 1)} or --seqlen, "
            "or use a longer text"
        )
    starts = [rng.randint(0, ids.numel() - length - 1) for _ in range(nsamples)]
    return _with_bos(torch.stack([ids[s : s + length] for s in starts]), bos)


def _train_label(source: TextSource) -> str:
    """How messages name a source's calibration text: a local text's is not all of it."""
    label = f"the train split of '{source.name}'"
    return f"{label} (its last tenth is held out for evaluation)" if source.held_out else label


def _evaluation_too_short(tokens: int, seqlen: int, source: TextSource | None) -> str:
    """The refusal of an evaluation text shorter than one window, with the fixes that apply."""
    if source is None or not source.held_out:
        return (
            f"the evaluation text has {tokens} tokens, fewer than one window of {seqlen}; "
            "lower --seqlen or use a longer text"
        )
    return (
        f"the evaluation text (the last tenth of '{source.name}', held out from calibration) "
        f"has {tokens} tokens, fewer than one window of {seqlen}; lower --seqlen, use a longer "
        "text, or evaluate on other text with --eval_dataset"
    )


def _windows_from_documents(
    tokenizer,
    docs: list[str],
    nsamples: int,
    seqlen: int,
    rng: random.Random,
    bos: int | None = None,
) -> torch.Tensor:
    """Reference C4 sampling: a random document longer than seqlen, a random window inside."""
    windows = []
    for _ in range(nsamples):
        for _attempt in range(10_000):
            ids = _strip_bos(tokenize(tokenizer, docs[rng.randint(0, len(docs) - 1)]), bos)
            if ids.numel() > seqlen:
                break
        else:
            raise SecateursError(f"no document is longer than --seqlen {seqlen}; lower --seqlen")
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)


def evaluation_windows(
    ids: torch.Tensor,
    seqlen: int,
    limit: int | None = None,
    source: TextSource | None = None,
    bos: int | None = None,
) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens (the remainder dropped), shape (n, seqlen).

    With ``bos``, each window is ``bos`` and the next ``seqlen - 1`` tokens of the text.
    """
    ids = _strip_bos(ids, bos)
    length = seqlen - (bos is not None)
    count = ids.numel() // length
    if count == 0:
        raise SecateursError(_evaluation_too_short(ids.numel(), seqlen, source))
    for cap in (limit, source.max_eval_windows if source else None):
        if cap is not None:
            count = min(count, cap)
    return _with_bos(ids[: count * length].view(count, length), bos)
