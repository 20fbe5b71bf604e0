"""Calibration and evaluation text: the built-in sample, Hugging Face datasets, local files.

A text source yields documents for a split. Calibration draws ``nsamples`` random windows of
``seqlen`` tokens with ``random.seed(seed)`` as the reference code does; evaluation joins the
split with ``"\\n\\n"`` and tokenizes it once.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from secateurs import assets
from secateurs.errors import SecateursError

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


def _local(path: Path) -> Callable[[str], list[str]]:
    """A file is used for every split; a folder uses ``<split>.txt`` if present, else all .txt."""

    def load(split: str) -> list[str]:
        if path.is_file():
            return [path.read_text(encoding="utf-8")]
        named = path / f"{split}.txt"
        files = [named] if named.is_file() else sorted(path.rglob("*.txt"))
        if not files:
            raise SecateursError(f"the folder '{path}' holds no .txt files to read text from")
        return [f.read_text(encoding="utf-8") for f in files]

    return load


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
        return TextSource(str(path), _local(path))
    raise SecateursError(
        f"unknown dataset '{name}': use one of {', '.join(BUILTIN_SOURCES)} "
        "(wiki-sample is built in and works offline) or the path of a text file or folder"
    )


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise SecateursError(f"split must be 'train' or 'test', not '{split}'")
    return split


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of one long text as a 1-D tensor (no length warning: we window it ourselves)."""
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
    return ids[0]


def evaluation_tokens(tokenizer, source: TextSource, split: str = "test") -> torch.Tensor:
    """The split joined with ``"\\n\\n"`` and tokenized once, as the reference evaluates."""
    docs = source.load(_check_split(split))
    return tokenize(tokenizer, source.test_joiner.join(docs))


def calibration_windows(
    tokenizer, source: TextSource, nsamples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens from the train split, shape (n, seqlen)."""
    if nsamples <= 0:
        raise SecateursError(f"--nsamples must be at least 1, got {nsamples}")
    docs = source.load("train")
    rng = random.Random(seed)
    if source.per_document_calibration:
        return _windows_from_documents(tokenizer, docs, nsamples, seqlen, rng)
    ids = tokenize(tokenizer, source.train_joiner.join(docs))
    available = ids.numel() // seqlen
    if available < nsamples:
        raise SecateursError(
            f"the train split of '{source.name}' has {ids.numel()} tokens, room for {available} "
            f"windows of {seqlen}; lower --nsamples to at most {available} or --seqlen"
        )
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def _windows_from_documents(
    tokenizer, docs: list[str], nsamples: int, seqlen: int, rng: random.Random
) -> torch.Tensor:
    """Reference C4 sampling: a random document longer than seqlen, a random window inside."""
    windows = []
    for _ in range(nsamples):
        for _attempt in range(10_000):
            ids = tokenize(tokenizer, docs[rng.randint(0, len(docs) - 1)])
            if ids.numel() > seqlen:
                break
        else:
            raise SecateursError(f"no document is longer than --seqlen {seqlen}; lower --seqlen")
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)


def evaluation_windows(
    ids: torch.Tensor, seqlen: int, limit: int | None = None, source: TextSource | None = None
) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens (the remainder dropped), shape (n, seqlen)."""
    count = ids.numel() // seqlen
    if count == 0:
        raise SecateursError(
            f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}; "
            "lower --seqlen or use a longer text"
        )
    for cap in (limit, source.max_eval_windows if source else None):
        if cap is not None:
            count = min(count, cap)
    return ids[: count * seqlen].view(count, seqlen)
