"""A chat template for the tiny word-level tokenizer, and prompt/response files in its words."""

from __future__ import annotations

import json

from conftest import make_tokenizer, random_text

TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}w0 {% elif m['role'] == 'user' %}"
    "w1 {% else %}w2 {% endif %}{{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}w2 {% endif %}"
)


def chat_tokenizer():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def write_pairs(path, count: int = 12, seed: int = 0) -> None:
    """A JSONL file of prompt/response pairs in the tiny vocabulary."""
    rows = [
        {"prompt": random_text(6, seed=seed + i), "response": random_text(5, seed=seed + 100 + i)}
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


__all__ = ["TEMPLATE", "chat_tokenizer", "write_pairs"]
