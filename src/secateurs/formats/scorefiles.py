"""Raw score files: one safetensors file per (method, prune data), one tensor per linear layer.

Scores are stored as computed (never negated; the sign of ``--neg_prune`` is applied when
masks are selected), keyed by the layer's full module name, with the run's metadata and a
fingerprint of the model they were computed on. No pickle is involved anywhere.

The fingerprint, not the ``--model`` string, says whether a file belongs to a model: the same
folder given as ``./out/x`` or ``out/x`` is the same model, and another checkpoint saved at
the same path is not. It needs the loaded model, so it is compared once the model is loaded
and before any weight changes (:func:`load_scores`); files written before fingerprints fall
back to comparing the name, before the model loads (:func:`check_model_name`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from secateurs.core.model import iter_prunable, weight_matrix
from secateurs.errors import SecateursError
from secateurs.io import atomic_file, check_safetensors, ensure_free

SCORE_FOLDER = "wanda_score"
FINGERPRINT_KEY = "fingerprint"
# Values sampled from each prunable weight, evenly spaced over the whole matrix: a few
# thousand reads per model, yet another checkpoint differs in nearly all of them.
SAMPLES_PER_LAYER = 256


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


def model_fingerprint(model: nn.Module) -> dict[str, str | int]:
    """What identifies the model scores are computed on: its architecture, its prunable
    layers' names and shapes, and a hash of a strided sample of every prunable weight.

    ``dtype`` is recorded to explain a difference, never compared: the sample is rounded to
    bfloat16, so one checkpoint loaded in float32 or bfloat16 has one fingerprint.
    """
    layers = list(iter_prunable(model))
    shapes = "".join(f"{name}:{tuple(weight_matrix(layer).shape)}\n" for name, layer in layers)
    weights = hashlib.sha256()
    for _, layer in layers:
        weights.update(_weight_sample(layer.weight).numpy().tobytes())
    return {
        "architecture": _architecture(model),
        "layers": len(layers),
        "layers_sha256": hashlib.sha256(shapes.encode()).hexdigest(),
        "weights_sha256": weights.hexdigest(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def _architecture(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None) or "unknown type"
    return f"{type(model).__name__} ({model_type})"


def _weight_sample(weight: torch.Tensor) -> torch.Tensor:
    """Every ``step``-th value of ``weight`` as stored, from the first, as float32 rounded to
    bfloat16 (exact for float32 and bfloat16 copies of one checkpoint)."""
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLES_PER_LAYER)
    return flat[::step].to(torch.bfloat16).float().cpu()


def dump_scores(
    path: Path, scores: dict[str, torch.Tensor], metadata: dict[str, str], model: nn.Module
) -> None:
    """Write ``scores`` (contiguous fp32 copies), string ``metadata`` and the fingerprint of
    ``model`` (whose unchanged weights the scores were computed on) atomically."""
    check_dumpable(path)
    tensors = {name: score.detach().float().cpu().contiguous() for name, score in scores.items()}
    stored = {k: str(v) for k, v in metadata.items()}
    stored[FINGERPRINT_KEY] = json.dumps(model_fingerprint(model))
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=stored)


def read_metadata(path: Path) -> dict[str, str]:
    check_loadable(path)
    check_safetensors(path)
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def check_model_name(path: Path, model: str) -> None:
    """Refuse, before the model loads, a file without fingerprint dumped under another
    ``--model`` name; a file with one is compared with the loaded model (:func:`load_scores`)."""
    metadata = read_metadata(path)
    if FINGERPRINT_KEY in metadata:
        return
    warnings.warn(
        f"{path} has no fingerprint of the model it was computed on (an older secateurs wrote "
        "it): only the --model name is compared, not the weights; dump the scores again to "
        "have them checked",
        stacklevel=2,
    )
    dumped = metadata.get("model")
    if dumped != model:
        raise SecateursError(
            f"{path} holds scores of model '{dumped}', not '{model}'; dump scores for this model "
            "with --dump_wanda_score, or pass the model they came from"
        )


def load_scores(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Scores for every prunable layer of ``model``, checked against its layer names and
    shapes and, where the file has a fingerprint, against the model itself.

    Call it before any weight of ``model`` changes: the fingerprint samples its weights.
    """
    check_loadable(path)
    check_safetensors(path)
    layers = dict(iter_prunable(model))
    with safe_open(str(path), framework="pt") as handle:
        _check_layers(path, layers, handle)
        stored = (handle.metadata() or {}).get(FINGERPRINT_KEY)
        if stored is not None:
            _check_fingerprint(path, json.loads(stored), model_fingerprint(model))
        return {name: handle.get_tensor(name) for name in layers}


def _check_layers(path: Path, layers: dict[str, nn.Module], handle) -> None:
    """The file holds one score for each of ``layers``, shaped like its weight; read from
    the header alone, before any tensor."""
    stored = set(handle.keys())
    missing = sorted(set(layers) - stored)
    extra = sorted(stored - set(layers))
    if missing or extra:
        raise SecateursError(
            f"{path} does not match this model's linear layers (missing: "
            f"{', '.join(missing[:3]) or 'none'}; unknown: {', '.join(extra[:3]) or 'none'}); "
            "dump the scores again for this model"
        )
    for name, layer in layers.items():
        shape = tuple(handle.get_slice(name).get_shape())
        expected = tuple(weight_matrix(layer).shape)
        if shape != expected:
            raise SecateursError(
                f"{path}: the score of {name} is {shape} but the layer is {expected}; dump the "
                "scores again for this model"
            )


def _check_fingerprint(path: Path, stored: dict, current: dict[str, str | int]) -> None:
    """Refuse scores whose fingerprint names another model, saying what differs."""
    fix = "dump the scores again for this model, or load the model they were computed on"
    if stored.get("architecture") != current["architecture"]:
        raise SecateursError(
            f"{path} holds scores of a {stored.get('architecture')}, not of this "
            f"{current['architecture']}; {fix}"
        )
    if stored.get("layers_sha256") != current["layers_sha256"]:
        raise SecateursError(
            f"{path} holds scores of a model whose {stored.get('layers')} linear layers differ "
            f"in names or shapes from this model's {current['layers']}; {fix}"
        )
    if stored.get("weights_sha256") != current["weights_sha256"]:
        raise SecateursError(
            f"{path} holds scores computed on other weights: this {current['architecture']} "
            "has the same linear layers, but a sample of their weights differs (another "
            f"checkpoint, or a fine-tuned or pruned copy){_dtype_hint(stored, current)}; {fix}"
        )


def _dtype_hint(stored: dict, current: dict[str, str | int]) -> str:
    """Why the weights may differ although the checkpoint is the same: rounding to float16."""
    if stored.get("dtype") in (None, current["dtype"]):
        return ""
    return (
        f"; the scores were computed in {stored['dtype']} and this model is "
        f"{current['dtype']}: load it with --dtype {stored['dtype']} if it is the same checkpoint"
    )
