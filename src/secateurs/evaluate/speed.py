"""Speed where users feel it: prefill and greedy decode tokens per second, in plain transformers.

Prefill is one forward pass over ``1 x prefill`` tokens; decode is ``generate`` with a KV cache,
greedy, exactly ``new_tokens`` new tokens after a short prompt (end-of-text is ignored, so every
model decodes the same count). Each figure is the median of ``repeats`` timed runs after one
warm-up run. The token ids are a seeded random draw: speed does not depend on the text.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

PROMPT_TOKENS = 16


@dataclass(frozen=True)
class Speed:
    """Median prefill and decode throughput of one model, in tokens per second."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_tokens: int
    new_tokens: int
    repeats: int
    threads: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def median_seconds(action, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``repeats`` calls of ``action``, after ``warmup`` untimed ones
    (allocator, kernels, lazy initialisation)."""
    for _ in range(warmup):
        action()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_speed(
    model: nn.Module,
    prefill: int = 512,
    new_tokens: int = 128,
    repeats: int = 3,
    seed: int = 0,
) -> Speed:
    """Prefill (``1 x prefill``) and greedy decode (``new_tokens`` with a KV cache) speed."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, prefill), generator=generator).to(device)
    prompt = ids[:, :PROMPT_TOKENS]

    def prefill_once() -> None:
        model(input_ids=ids, use_cache=False)

    def decode_once() -> None:
        model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )

    with torch.inference_mode():
        prefill_s = median_seconds(prefill_once, repeats)
        decode_s = median_seconds(decode_once, repeats)
    return Speed(
        prefill / prefill_s,
        new_tokens / decode_s,
        prefill,
        new_tokens,
        repeats,
        torch.get_num_threads(),
    )
