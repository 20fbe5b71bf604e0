"""The safety workflow on the built-in SmolLM2, at small settings."""

import pytest
import torch

from secateurs.api import MethodPruner
from secateurs.core.model import load_model, load_tokenizer
from secateurs.data.prompts import encode_pairs, load_pairs

pytestmark = pytest.mark.integration


def test_response_mask_starts_after_the_assistant_header():
    tokenizer = load_tokenizer("smollm2-135m")
    pair = load_pairs("align")[0]
    batch = encode_pairs(tokenizer, [pair], 512)
    first = int(batch.token_mask[0].nonzero()[0])
    before = tokenizer.decode(batch.input_ids[0, :first])
    counted = tokenizer.decode(batch.input_ids[0, batch.token_mask[0]])
    assert before.endswith("<|im_start|>assistant\n")
    assert counted == pair.response + tokenizer.eos_token


def test_wandg_on_align_scores_every_layer():
    model, tokenizer = load_model("smollm2-135m")
    batch = encode_pairs(tokenizer, load_pairs("align")[:2], 512)
    scores = MethodPruner(model, "wandg", progress=False).scores(batch)
    assert len(scores) == 210
    assert all(bool(torch.isfinite(s).all()) and float(s.max()) > 0 for s in scores.values())
