"""The README's Python snippets run as written, in order, against the current API.

The built-in model is swapped for a tiny random LLaMA (with a chat template) so that every
line runs in seconds; everything else (data, prompts, pruners, formats) is the real thing.
"""

import re
from pathlib import Path

import pytest
import torch
from chat_helpers import chat_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from secateurs import api
from secateurs.core import model as model_module
from secateurs.jobs.result import save_pruned_model

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def tiny_model(name: str, *args, **kwargs):
    """A tiny LLaMA long enough for the snippets' 512-token windows, and a chat tokenizer."""
    assert name == "smollm2-135m", name
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), chat_tokenizer()


def snippets() -> list[str]:
    return BLOCK.findall(README.read_text())


def test_the_readme_has_snippets():
    assert len(snippets()) >= 5


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    monkeypatch.setattr(model_module, "load_model", tiny_model)
    monkeypatch.setattr(api, "load_model", tiny_model)
    monkeypatch.chdir(tmp_path)
    model, tokenizer = tiny_model("smollm2-135m")
    save_pruned_model(model, tokenizer, "out/smol-2-4-packed", {}, "compressed")
    namespace: dict = {}
    for index, code in enumerate(snippets()):
        try:
            exec(compile(code, f"README.md python block {index + 1}", "exec"), namespace)
        except Exception as exc:  # name the block in the failure
            pytest.fail(f"README python block {index + 1} failed: {type(exc).__name__}: {exc}")
    assert Path("out/narrow/config.json").exists()
