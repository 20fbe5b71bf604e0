"""The built-in zero-shot task ``wiki-cloze``: which sentence comes next in a Wikipedia passage.

Each item is a passage of consecutive sentences from one article of the ``wiki-sample`` test
split, the sentence that really follows it, and three sentences of about the same length
from other articles. A model scores each ending by log-likelihood after the passage
(lm-evaluation-harness ``multiple_choice``: acc, and acc_norm per byte), so chance is 25%.
The items are built deterministically and written, with the task's YAML, into the asset
cache, where lm-evaluation-harness reads them as an ordinary task.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from secateurs.io import atomic_dir

TASK_NAME = "wiki-cloze"
# Bump when the construction changes: the cache folder is named for it.
VERSION = 1
CHOICES = 4
SEED = 0

# A sentence ends at . ! or ? after a lower-case letter, digit or closing bracket/quote, and
# the next one starts with a capital: "U.S. Army" and "c. 1900" stay whole.
_SENTENCE_END = re.compile(r"(?<=[a-z0-9\)\]\"'][.!?])\s+(?=[\"'(]?[A-Z])")


@dataclass(frozen=True)
class ClozeSettings:
    """How items are cut from the text."""

    context_sentences: int = 1  # sentences of passage before the ending (fewer at a start)
    min_words: int = 8  # endings and distractors are whole prose sentences of this many
    max_words: int = 40  # words or more, and at most this many
    length_pool: int = 12  # distractors come from the sentences closest in length


def split_sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(paragraph.strip()) if s.strip()]


def article_paragraphs(text: str) -> list[list[str]]:
    """Paragraphs of prose (two sentences or more) as lists of sentences; headings dropped."""
    paragraphs = []
    for block in re.split(r"\n\s*\n|\n", text):
        sentences = split_sentences(block)
        if len(sentences) >= 2:
            paragraphs.append(sentences)
    return paragraphs


def _is_prose(sentence: str, settings: ClozeSettings) -> bool:
    words = len(sentence.split())
    return settings.min_words <= words <= settings.max_words and sentence[-1] in ".!?\"'"


def _distractors(
    target: str,
    article: int,
    pool: list[tuple[int, str]],
    rng: random.Random,
    settings: ClozeSettings,
) -> list[str]:
    """Sentences of other articles whose length is closest to the true ending's."""
    length = len(target.split())
    others = [s for a, s in pool if a != article and s != target]
    others.sort(key=lambda s: (abs(len(s.split()) - length), s))
    return rng.sample(others[: settings.length_pool], CHOICES - 1)


def build_items(
    articles: list[str], settings: ClozeSettings | None = None, seed: int = SEED
) -> list[dict]:
    """Every item of the task, in a seeded order; the same articles give the same items."""
    settings = settings or ClozeSettings()
    rng = random.Random(seed)
    parsed = [article_paragraphs(text) for text in articles]
    pool = sorted(
        {
            (a, s)
            for a, paragraphs in enumerate(parsed)
            for sentences in paragraphs
            for s in sentences
            if _is_prose(s, settings)
        }
    )
    items = []
    for a, paragraphs in enumerate(parsed):
        for sentences in paragraphs:
            for i in range(1, len(sentences)):
                target = sentences[i]
                if not _is_prose(target, settings):
                    continue
                context = " ".join(sentences[max(0, i - settings.context_sentences) : i])
                choices = [target, *_distractors(target, a, pool, rng, settings)]
                rng.shuffle(choices)
                items.append(
                    {"context": context, "choices": choices, "label": choices.index(target)}
                )
    rng.shuffle(items)  # so that the first N items (--zero_shot_limit) span every article
    return items


def task_yaml(data_file: Path) -> str:
    """The lm-evaluation-harness task definition over a local JSON-lines file."""
    return "\n".join(
        [
            f"task: {TASK_NAME}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str(data_file))}",
            "output_type: multiple_choice",
            "test_split: test",
            'doc_to_text: "{{context}}"',
            'doc_to_choice: "{{choices}}"',
            'doc_to_target: "{{label}}"',
            "metric_list:",
            "  - metric: acc",
            "    aggregation: mean",
            "    higher_is_better: true",
            "  - metric: acc_norm",
            "    aggregation: mean",
            "    higher_is_better: true",
            "metadata:",
            f"  version: {VERSION}.0",
            "",
        ]
    )


def write_task(folder: Path, articles: list[str], settings: ClozeSettings | None = None) -> Path:
    """Write the task (YAML and data) into ``folder`` atomically; returns ``folder``."""
    folder = Path(folder)
    items = build_items(articles, settings)
    with atomic_dir(folder, replace=True) as tmp:
        lines = [json.dumps(item, ensure_ascii=False) for item in items]
        (tmp / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (tmp / f"{TASK_NAME}.yaml").write_text(task_yaml(folder / "test.jsonl"))
    return folder


def builtin_task_dir() -> Path:
    """The task folder built from the ``wiki-sample`` test split, made once in the cache."""
    from secateurs.data.assets import cache_root, wiki_sample_split

    folder = cache_root() / "tasks" / f"{TASK_NAME}-v{VERSION}"
    if not (folder / f"{TASK_NAME}.yaml").is_file():
        write_task(folder, wiki_sample_split("test"))
    return folder
