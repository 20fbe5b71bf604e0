"""The ``secateurs`` command: a thin layer over :mod:`secateurs.runner`."""

from __future__ import annotations

import time
from dataclasses import fields
from typing import Annotated

import typer

from secateurs.errors import SecateursError
from secateurs.runner import (
    DTYPES,
    PruneConfig,
    check_device,
    check_eval_args,
    load_eval_windows,
    run_prune,
)
from secateurs.scores import METHODS

app = typer.Typer(
    help=(
        "Prune large language models by weights and activations (Wanda and its family), "
        "measure what they lost, and save the result.\n\n"
        "Try it offline on the built-in model and text:\n\n"
        "  secateurs prune --model smollm2-135m --dataset wiki-sample "
        "--nsamples 32 --seqlen 512 --eval_limit 32"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_DEFAULTS = {f.name: f.default for f in fields(PruneConfig)}
_METHODS_HELP = "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())


def _flag(name: str, help_text: str):
    """An option spelled as the reference scripts do (--sparsity_ratio), dashes accepted too."""
    dashed = name.replace("_", "-")
    names = [f"--{name}"] + ([f"--{dashed}"] if dashed != name else [])
    return typer.Option(*names, help=help_text)


ModelOpt = Annotated[
    str, _flag("model", "Hub id, local folder, or built-in name (smollm2-135m, offline).")
]
SeqlenOpt = Annotated[
    int | None, _flag("seqlen", "Tokens per window; default 2048 capped by the model's context.")
]
DeviceOpt = Annotated[str, _flag("device", "Compute device; the model stays on the CPU.")]
DtypeOpt = Annotated[str, _flag("dtype", f"Weights dtype: {', '.join(DTYPES)}.")]
CacheOpt = Annotated[str | None, _flag("cache_dir", "Hugging Face download cache folder.")]
LimitOpt = Annotated[
    int | None, _flag("eval_limit", "Evaluate only the first N windows (quick runs).")
]
EvalBatchOpt = Annotated[int, _flag("eval_batch_size", "Windows per evaluation forward pass.")]
RemoteOpt = Annotated[
    bool, _flag("trust_remote_code", "Run model code from the hub (off unless you trust it).")
]


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _guarded(action, quiet: bool = False) -> None:
    if quiet:
        from transformers.utils import logging

        logging.disable_progress_bar()
    try:
        action()
    except SecateursError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was left half-written", code=130)


@app.command()
def prune(
    model: ModelOpt = _DEFAULTS["model"],
    prune_method: Annotated[str, _flag("prune_method", _METHODS_HELP)] = _DEFAULTS["prune_method"],
    sparsity_ratio: Annotated[
        float, _flag("sparsity_ratio", "Fraction of weights to remove, in [0, 1).")
    ] = _DEFAULTS["sparsity_ratio"],
    sparsity_type: Annotated[
        str, _flag("sparsity_type", "unstructured, or N:M such as 2:4 or 4:8 (ratio = N/M).")
    ] = _DEFAULTS["sparsity_type"],
    scope: Annotated[
        str | None,
        _flag("scope", "Unstructured comparison group: row or layer (default: the method's)."),
    ] = None,
    dataset: Annotated[
        str,
        _flag("dataset", "Calibration text: wiki-sample (built in), wikitext2, c4, ptb, a path."),
    ] = _DEFAULTS["dataset"],
    eval_dataset: Annotated[
        str | None, _flag("eval_dataset", "Evaluation text (default: the test split of --dataset).")
    ] = None,
    nsamples: Annotated[int, _flag("nsamples", "Calibration windows.")] = _DEFAULTS["nsamples"],
    seqlen: SeqlenOpt = None,
    seed: Annotated[int, _flag("seed", "Seed for drawing calibration windows.")] = 0,
    batch_size: Annotated[
        int, _flag("batch_size", "Calibration windows per forward pass through a block.")
    ] = _DEFAULTS["batch_size"],
    eval_batch_size: EvalBatchOpt = _DEFAULTS["eval_batch_size"],
    eval_limit: LimitOpt = None,
    eval_dense: Annotated[
        bool, typer.Option("--eval_dense/--no_eval_dense", help="Also evaluate the dense model.")
    ] = True,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    cache_dir: CacheOpt = None,
    trust_remote_code: RemoteOpt = False,
    save_model: Annotated[
        str | None, _flag("save_model", "Write the pruned model here (Hugging Face folder).")
    ] = None,
    save_json: Annotated[str | None, _flag("save_json", "Write the run's result as JSON.")] = None,
    save_log: Annotated[str | None, _flag("save_log", "Write a readable summary here.")] = None,
    use_recovery: Annotated[
        bool,
        _flag("use_recovery", "After pruning each layer, give the lost signal to its survivors."),
    ] = False,
    recovery: Annotated[
        str,
        _flag(
            "recovery",
            "inverse_wanda: the seed's first-moment rule, cheap; "
            "least_squares: minimise the layer's output error (OBS updates), stronger.",
        ),
    ] = _DEFAULTS["recovery"],
    inverse_wanda_update_fraction: Annotated[
        float,
        _flag("inverse_wanda_update_fraction", "Fraction of survivors per row updated, (0, 1]."),
    ] = _DEFAULTS["inverse_wanda_update_fraction"],
    inverse_wanda_max_relative_update: Annotated[
        float,
        _flag("inverse_wanda_max_relative_update", "Cap: |dW| <= this x |W|; must be > 0."),
    ] = _DEFAULTS["inverse_wanda_max_relative_update"],
    least_squares_damp: Annotated[
        float, _flag("least_squares_damp", "Ridge damping, relative to the mean Hessian diagonal.")
    ] = _DEFAULTS["least_squares_damp"],
    recovery_report_fraction: Annotated[
        float,
        _flag(
            "recovery_report_fraction",
            "Share of calibration tokens the error report samples, (0, 1]; 1 = exact "
            "(least_squares always reports exactly).",
        ),
    ] = _DEFAULTS["recovery_report_fraction"],
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Prune a model, then print dense and pruned perplexity and the sparsity check."""
    cfg = PruneConfig(
        model=model,
        prune_method=prune_method,
        sparsity_ratio=sparsity_ratio,
        sparsity_type=sparsity_type,
        scope=scope,
        dataset=dataset,
        eval_dataset=eval_dataset,
        nsamples=nsamples,
        seqlen=seqlen,
        seed=seed,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        eval_limit=eval_limit,
        eval_dense=eval_dense,
        device=device,
        dtype=dtype,
        cache_dir=cache_dir,
        trust_remote_code=trust_remote_code,
        save_model=save_model,
        save_json=save_json,
        save_log=save_log,
        progress=not quiet,
        use_recovery=use_recovery,
        recovery=recovery,
        inverse_wanda_update_fraction=inverse_wanda_update_fraction,
        inverse_wanda_max_relative_update=inverse_wanda_max_relative_update,
        least_squares_damp=least_squares_damp,
        recovery_report_fraction=recovery_report_fraction,
    )

    def action() -> None:
        from secateurs.report import summary_lines

        log = (lambda _m: None) if quiet else (lambda m: typer.echo(m, err=True))
        result = run_prune(cfg, log=log)
        typer.echo("\n".join(summary_lines(result)))

    _guarded(action, quiet)


@app.command("eval")
def evaluate(
    model: ModelOpt = _DEFAULTS["model"],
    dataset: Annotated[
        str, _flag("dataset", "Test split to score: wiki-sample, wikitext2, c4, ptb, or a path.")
    ] = _DEFAULTS["dataset"],
    seqlen: SeqlenOpt = None,
    eval_limit: LimitOpt = None,
    eval_batch_size: EvalBatchOpt = _DEFAULTS["eval_batch_size"],
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    cache_dir: CacheOpt = None,
    trust_remote_code: RemoteOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Perplexity and sparsity of any model: a hub id, a built-in name, or a saved folder."""

    def action() -> None:
        from secateurs.data import resolve_source
        from secateurs.evaluate import check_sparsity, perplexity
        from secateurs.model import choose_seqlen, load_config, load_model

        check_eval_args(
            PruneConfig(eval_limit=eval_limit, eval_batch_size=eval_batch_size, dtype=dtype)
        )
        target = check_device(device)
        resolve_source(dataset)
        length = choose_seqlen(load_config(model, cache_dir, trust_remote_code), seqlen)
        loaded, tokenizer = load_model(model, cache_dir, DTYPES[dtype], trust_remote_code)
        windows = load_eval_windows(tokenizer, dataset, length, eval_limit)
        start = time.perf_counter()
        value = perplexity(loaded, windows, target, eval_batch_size, not quiet)
        check = check_sparsity(loaded)
        typer.echo(f"model        {model}")
        typer.echo(f"evaluation   {dataset}: {windows.shape[0]} windows of {length}")
        typer.echo(f"perplexity   {value:.3f}  ({time.perf_counter() - start:.1f} s)")
        typer.echo(f"sparsity     {check.overall:.4f} over {len(check.layers)} linear layers")

    _guarded(action, quiet)
