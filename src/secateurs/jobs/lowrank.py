"""A low-rank attribution job (ActSVD): the ranks safety data needs and utility data does not,
removed from every linear layer; perplexity and ASR around it; the edited model saved.

Data, names and paths are checked before the weights load; the saved folder is written
atomically and is an ordinary Hugging Face folder of the same shapes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from secateurs.config import check_dtype
from secateurs.core.lowrank import edit_by_grams
from secateurs.core.model import choose_seqlen, load_config, load_model, load_tokenizer
from secateurs.data import prompts, text
from secateurs.errors import SecateursError
from secateurs.evaluate.attack import attack
from secateurs.evaluate.perplexity import perplexity
from secateurs.io import check_folder_files, ensure_free
from secateurs.jobs.plan import check_device
from secateurs.jobs.report import versions, write_json
from secateurs.jobs.result import save_pruned_model
from secateurs.jobs.session import load_eval_windows
from secateurs.methods.actsvd import RankEdit, rank_set_difference


@dataclass(frozen=True)
class LowRankJob:
    """Everything a ``secateurs lowrank`` run needs.

    ``utility_ranks`` and ``safety_ranks`` are shares of each layer's total rank: the top
    directions of the layer's outputs kept for utility (the reference code's ``total -
    rank_pos``) and considered for safety (``total - rank_neg``).
    """

    model: str = "smollm2-135m"
    safety_data: str = "align"
    utility_data: str = "utility"
    utility_ranks: float = 0.75
    safety_ranks: float = 0.75
    nsamples: int = 128
    seqlen: int = 256
    seed: int = 0
    entangle_prompt_feat: bool = False
    dataset: str = "wiki-sample"
    eval_limit: int | None = None
    eval_attack: bool = False
    attack_limit: int | None = None
    attack_max_new_tokens: int = 64
    save_model: str | None = None
    save_json: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 8
    cache_dir: str | None = None
    trust_remote_code: bool = False
    progress: bool = True

    def check(self) -> None:
        """Every check that needs no weights: shares, counts, data, paths."""
        for flag, value in (("--utility_ranks", self.utility_ranks),
                            ("--safety_ranks", self.safety_ranks)):  # fmt: skip
            if not 0.0 <= value <= 1.0:
                raise SecateursError(
                    f"{flag} is a share of each layer's rank, in [0, 1]; got {value}"
                )
        if self.safety_ranks == 0.0:
            raise SecateursError(
                "--safety_ranks 0 considers no safety direction: nothing would change"
            )
        for flag, value in (
            ("--nsamples", self.nsamples),
            ("--seqlen", self.seqlen),
            ("--batch_size", self.batch_size),
            ("--eval_limit", self.eval_limit),
            ("--attack_limit", self.attack_limit),
            ("--attack_max_new_tokens", self.attack_max_new_tokens),
        ):
            if value is not None and value <= 0:
                raise SecateursError(f"{flag} must be at least 1, got {value}")
        prompts.check_prompt_data(self.safety_data)
        prompts.check_prompt_data(self.utility_data)
        check_dtype(self.dtype)
        check_device(self.device)
        text.resolve_source(self.dataset)
        ensure_free(self.save_model, "--save_model")
        ensure_free(self.save_json, "--save_json")


def rank_summary(edits: dict[str, RankEdit]) -> dict[str, Any]:
    """Ranks removed per layer and in all, as counts and as a share of the total rank."""
    removed = sum(edit.removed for edit in edits.values())
    total = sum(edit.total for edit in edits.values())
    return {
        "removed": removed,
        "total": total,
        "share": removed / total if total else 0.0,
        "layers": {name: asdict(edit) for name, edit in edits.items()},
    }


def run_lowrank(job: LowRankJob, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ActSVD end to end; its result (also written where asked)."""
    job.check()
    check_folder_files(job.model)
    device = check_device(job.device)
    config = load_config(job.model, job.cache_dir, job.trust_remote_code)
    tokenizer = load_tokenizer(job.model, job.cache_dir, job.trust_remote_code)
    prompts.check_chat_template(tokenizer)
    streams = {
        role: prompts.encode_pairs(
            tokenizer,
            prompts.sample_pairs(prompts.load_pairs(data), job.nsamples, job.seed),
            job.seqlen,
            job.entangle_prompt_feat,
        )
        for role, data in (("utility", job.utility_data), ("safety", job.safety_data))
    }
    bos = text.window_bos_token("auto", config, tokenizer)
    eval_windows = load_eval_windows(
        tokenizer, job.dataset, choose_seqlen(config, None), job.eval_limit, bos
    )
    model, _ = load_model(
        job.model, job.cache_dir, check_dtype(job.dtype), job.trust_remote_code, tokenizer
    )

    def ppl(label: str) -> float:
        value = perplexity(model, eval_windows, device, 1, job.progress, f"{label} perplexity")
        log(f"{label:<12} perplexity {value:.3f}")
        return value

    dense = ppl("dense")
    start = time.perf_counter()
    edits = edit_by_grams(
        model,
        streams,
        lambda _name, weight, grams: rank_set_difference(
            weight, grams["utility"], grams["safety"], job.utility_ranks, job.safety_ranks
        ),
        device,
        job.batch_size,
        job.progress,
    )
    seconds = time.perf_counter() - start
    ranks = rank_summary(edits)
    log(f"ranks        removed {ranks['removed']:,} of {ranks['total']:,} ({ranks['share']:.2%})")
    result: dict[str, Any] = {
        "model": job.model,
        "job": asdict(job),
        "ranks": ranks,
        "perplexity": {"dense": dense, "edited": ppl("edited")},
        "timings": {"edit": seconds},
        "versions": versions(),
    }
    if job.eval_attack:
        held_out = [pair.prompt for pair in prompts.align_split("eval")][: job.attack_limit]
        outcome = attack(
            model, tokenizer, held_out, max_new_tokens=job.attack_max_new_tokens,
            batch_size=job.batch_size, device=device, progress=job.progress,
        )  # fmt: skip
        result["attack"] = outcome.to_dict()
        log(", ".join(f"ASR {k}: {v:.3f}" for k, v in outcome.asr.items()))
    if job.save_json:
        write_json(job.save_json, result)
    if job.save_model:
        save_pruned_model(model, tokenizer, job.save_model, result)
        log(f"saved        {job.save_model}")
    return result
