"""The built-in wiki-cloze task: sentence splitting, item construction, the task files."""

from __future__ import annotations

import json

import pytest

from secateurs.data import assets
from secateurs.evaluate import cloze
from secateurs.evaluate.cloze import ClozeSettings, article_paragraphs, build_items, split_sentences

TOPICS = ("river", "castle", "violin", "comet", "harbour")


def synthetic_articles(count: int = 5, paragraphs: int = 3, sentences: int = 5) -> list[str]:
    """Articles of numbered sentences (8-13 words), a topic word in each, paragraphs apart."""
    articles = []
    for a in range(count):
        blocks = []
        for p in range(paragraphs):
            lines = []
            for s in range(sentences):
                filler = " ".join(f"w{(a * 7 + p * 3 + s + k) % 120}" for k in range(5 + s % 6))
                lines.append(f"The {TOPICS[a % len(TOPICS)]} {a} {p} {s} {filler}.")
            blocks.append(" ".join(lines))
        articles.append(f"Heading {a}\n\n" + "\n\n".join(blocks))
    return articles


def test_sentences_split_at_real_ends_only():
    text = "The U.S. Army left in c. 1900 from Fort Knox. It came back! Did it? Yes it did."
    assert split_sentences(text) == [
        "The U.S. Army left in c. 1900 from Fort Knox.",
        "It came back!",
        "Did it?",
        "Yes it did.",
    ]


def test_headings_and_one_sentence_paragraphs_are_not_passages():
    text = (
        "Early life\n\nShe was born in 1900 in a small town. She moved to the city later."
        "\n\nSee also"
    )
    assert article_paragraphs(text) == [
        ["She was born in 1900 in a small town.", "She moved to the city later."]
    ]


def test_items_hold_the_true_next_sentence_and_three_from_other_articles():
    articles = synthetic_articles()
    items = build_items(articles)
    assert items
    for item in items:
        choices, label = item["choices"], item["label"]
        assert len(choices) == cloze.CHOICES == len(set(choices))
        article = next(a for a in articles if item["context"] in a)
        assert f"{item['context']} {choices[label]}" in article  # the passage, then its ending
        others = [c for i, c in enumerate(choices) if i != label]
        assert not any(c in article for c in others)  # distractors come from other articles


def test_context_is_at_most_the_configured_sentences():
    items = build_items(synthetic_articles(), ClozeSettings(context_sentences=2))
    assert max(len(split_sentences(item["context"])) for item in items) == 2
    assert min(len(split_sentences(item["context"])) for item in items) == 1


def test_items_are_deterministic_and_labels_spread():
    articles = synthetic_articles()
    assert build_items(articles) == build_items(articles)
    labels = {item["label"] for item in build_items(articles)}
    assert labels == set(range(cloze.CHOICES))
    assert build_items(articles, seed=1) != build_items(articles)


def test_distractors_are_close_in_length():
    items = build_items(synthetic_articles())
    for item in items:
        lengths = [len(c.split()) for c in item["choices"]]
        assert max(lengths) - min(lengths) <= 5


def test_task_files_are_written_whole(tmp_path):
    folder = cloze.write_task(tmp_path / "task", synthetic_articles())
    lines = (folder / "test.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == build_items(synthetic_articles())
    yaml = (folder / "wiki-cloze.yaml").read_text()
    assert "task: wiki-cloze" in yaml
    assert json.dumps(str(folder / "test.jsonl")) in yaml
    assert "metric: acc_norm" in yaml
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task"]  # no temporary left


def test_builtin_task_is_made_once_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    calls = []

    def split(name):
        calls.append(name)
        return synthetic_articles()

    monkeypatch.setattr(assets, "wiki_sample_split", split)
    folder = cloze.builtin_task_dir()
    assert folder == tmp_path / "tasks" / f"wiki-cloze-v{cloze.VERSION}"
    assert cloze.builtin_task_dir() == folder
    assert calls == ["test"]


@pytest.mark.integration
def test_builtin_task_from_wiki_sample_has_hundreds_of_items():
    items = build_items(assets.wiki_sample_split("test"))
    assert len(items) > 500
    assert build_items(assets.wiki_sample_split("test")) == items


def test_the_first_items_span_the_articles():
    articles = synthetic_articles()
    first = build_items(articles)[:10]
    assert len({next(i for i, a in enumerate(articles) if x["context"] in a) for x in first}) > 2
