"""Tiny random decoder models of several architectures, built in code, and a tiny tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from typer.testing import CliRunner

from secateurs.cli import app

VOCAB = 128
WORDS = [f"w{i}" for i in range(VOCAB - 2)]


def _configs():
    common = {"vocab_size": VOCAB, "num_hidden_layers": 3, "num_attention_heads": 4}
    return {
        "llama": (
            LlamaForCausalLM,
            LlamaConfig(
                hidden_size=64,
                intermediate_size=128,
                num_key_value_heads=2,
                max_position_embeddings=256,
                **common,
            ),
        ),
        "qwen2": (
            Qwen2ForCausalLM,
            Qwen2Config(
                hidden_size=64,
                intermediate_size=96,
                num_key_value_heads=2,
                max_position_embeddings=256,
                **common,
            ),
        ),
        "opt": (
            OPTForCausalLM,
            OPTConfig(
                hidden_size=64,
                ffn_dim=128,
                word_embed_proj_dim=64,
                max_position_embeddings=256,
                **common,
            ),
        ),
        "gpt2": (
            GPT2LMHeadModel,
            GPT2Config(
                n_embd=64,
                n_layer=3,
                n_head=4,
                n_positions=256,
                vocab_size=VOCAB,
                bos_token_id=0,
                eos_token_id=0,
            ),
        ),
        # sliding-window and full attention layers, tied embeddings, soft-capped logits
        "gemma3": (
            Gemma3ForCausalLM,
            Gemma3TextConfig(
                hidden_size=64,
                intermediate_size=128,
                num_key_value_heads=2,
                head_dim=16,
                max_position_embeddings=256,
                sliding_window=8,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                final_logit_softcapping=2.0,  # small, so that capping shows in tiny logits
                tie_word_embeddings=True,
                bos_token_id=2,
                **common,
            ),
        ),
        "mistral": (
            MistralForCausalLM,
            MistralConfig(
                hidden_size=64,
                intermediate_size=128,
                num_key_value_heads=2,
                max_position_embeddings=256,
                sliding_window=8,
                **common,
            ),
        ),
        # fused projections: qkv_proj (q, k and v rows) and gate_up_proj (gate rows, up rows)
        "phi3": (
            Phi3ForCausalLM,
            Phi3Config(
                hidden_size=64,
                intermediate_size=128,
                num_key_value_heads=2,
                max_position_embeddings=256,
                original_max_position_embeddings=256,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=1,
                **common,
            ),
        ),
    }


ARCHS = tuple(_configs())


def make_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny randomly initialised causal LM; the same seed gives the same weights."""
    cls, config = _configs()[arch]
    torch.manual_seed(seed)
    return cls(config).eval()


def invoke(*args):
    """Run the ``secateurs`` command in process; arguments may be paths."""
    return CliRunner().invoke(app, [str(a) for a in args])


def invoke_prune(model_dir, text_dir, *args):
    """``secateurs prune`` on a local model and text folder, 32-token windows, no progress."""
    return invoke(
        "prune", "--model", model_dir, "--dataset", text_dir, "--seqlen", "32", "--quiet", *args
    )


def make_windows(count: int = 6, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (count, seqlen), generator=generator)


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words w0..w125, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")


def random_text(words: int, seed: int = 0) -> str:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(WORDS), (words,), generator=generator)
    return " ".join(WORDS[i] for i in ids.tolist())


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny LLaMA with its tokenizer: a local model folder the CLI can load."""
    path = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def text_dir(tmp_path):
    """A local text folder with train.txt and test.txt."""
    path = tmp_path / "text"
    path.mkdir()
    (path / "train.txt").write_text(random_text(4000, seed=1))
    (path / "test.txt").write_text(random_text(1200, seed=2))
    return path
