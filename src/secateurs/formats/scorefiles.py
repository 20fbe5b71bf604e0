"""Raw score files: one safetensors file per (method, prune data), one tensor per linear layer.

Scores are stored as computed (never negated; the sign of ``--neg_prune`` is applied when
masks are selected), keyed by the layer's full module name, with the run's metadata. No
pickle is involved anywhere.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from secateurs.core.model import iter_prunable, weight_matrix
from secateurs.errors import SecateursError
from secateurs.io import atomic_file, ensure_free

SCORE_FOLDER = "wanda_score"


class ScoreFileMissingError(SecateursError, FileNotFoundError):
    """A score file to load does not exist."""


def score_path(save: str | Path, method: str, data: str) -> Path:
    """Where ``--dump_wanda_score`` writes, and ``--load_wanda_score`` reads, one score set."""
    return Path(save) / SCORE_FOLDER / f"{method}-{data}.safetensors"


def check_dumpable(path: Path) -> None:
    ensure_free(path, "score file")


def check_loadable(path: Path) -> None:
    """The seed's error for a score file that is not there."""
    if not path.is_file():
        raise ScoreFileMissingError(
            f"Pre-computed wanda score not found at {path}. "
            "Please run with --dump_wanda_score first to generate scores."
        )


def dump_scores(path: Path, scores: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``scores`` (contiguous fp32 copies) and string ``metadata`` atomically."""
    check_dumpable(path)
    tensors = {name: score.detach().float().cpu().contiguous() for name, score in scores.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})


def read_metadata(path: Path) -> dict[str, str]:
    check_loadable(path)
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def check_model_name(path: Path, model: str) -> None:
    """Refuse scores dumped from another model, before that model is loaded."""
    dumped = read_metadata(path).get("model")
    if dumped != model:
        raise SecateursError(
            f"{path} holds scores of model '{dumped}', not '{model}'; dump scores for this model "
            "with --dump_wanda_score, or pass the model they came from"
        )


def load_scores(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Scores for every prunable layer of ``model``, checked against its layer names and shapes."""
    check_loadable(path)
    layers = dict(iter_prunable(model))
    with safe_open(str(path), framework="pt") as handle:
        stored = set(handle.keys())
        missing = sorted(set(layers) - stored)
        extra = sorted(stored - set(layers))
        if missing or extra:
            raise SecateursError(
                f"{path} does not match this model's linear layers (missing: "
                f"{', '.join(missing[:3]) or 'none'}; unknown: {', '.join(extra[:3]) or 'none'}); "
                "dump the scores again for this model"
            )
        scores = {}
        for name, layer in layers.items():
            score = handle.get_tensor(name)
            expected = tuple(weight_matrix(layer).shape)
            if tuple(score.shape) != expected:
                raise SecateursError(
                    f"{path}: the score of {name} is {tuple(score.shape)} but the layer is "
                    f"{expected}; dump the scores again for this model"
                )
            scores[name] = score
    return scores
