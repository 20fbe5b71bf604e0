"""The ``secateurs`` command: a thin layer over :mod:`secateurs.jobs.prune`."""

from __future__ import annotations

import time
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from secateurs.errors import SecateursError
from secateurs.evaluate.zeroshot import DEFAULT_TASKS
from secateurs.jobs.compare import DEFAULT_METHODS
from secateurs.jobs.prune import (
    DTYPES,
    PruneConfig,
    check_device,
    check_dtype,
    check_eval_args,
    load_eval_windows,
    run_prune,
)
from secateurs.methods.idf import DEFAULT_IDF_FORM, IDF_FORMS
from secateurs.methods.registry import METHODS

_ZERO_SHOT_FLAGS = ("--eval_zero_shot", "--eval-zero-shot")


def default_zero_shot(args: list[str]) -> list[str]:
    """A bare --eval_zero_shot (last, or before another option) means the paper's tasks."""
    out = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg in _ZERO_SHOT_FLAGS and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append(",".join(DEFAULT_TASKS))
    return out


class _Commands(TyperGroup):
    """The command group; lets --eval_zero_shot stand without a value."""

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, default_zero_shot(args))


app = typer.Typer(
    cls=_Commands,
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
    str,
    _flag("model", "Hub id, local folder, or built-in name (smollm2-135m, gemma3-270m: offline)."),
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
DatasetOpt = Annotated[
    str,
    _flag("dataset", "Calibration text: wiki-sample (built in), wikitext2, c4, ptb, a path."),
]
NsamplesOpt = Annotated[int, _flag("nsamples", "Calibration windows.")]
SeedOpt = Annotated[int, _flag("seed", "Seed for drawing calibration windows.")]
BatchOpt = Annotated[
    int | None,
    _flag(
        "batch_size",
        "Calibration windows per forward pass through a block (default 8; 1 when streaming "
        "from disk, where it holds less at the same speed).",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]
DebugOpt = Annotated[
    bool, typer.Option("--debug", help="Show the full traceback of an unexpected error.")
]
VariantOpt = Annotated[
    bool,
    _flag(
        "use_variant",
        "Wanda variant: per-row counts from a cumulative-score threshold (unstructured only).",
    ),
]
ClassesOpt = Annotated[
    int,
    _flag(
        "neuronrank_max_classes",
        "neuronrank_fisher: the K most frequent calibration tokens are the classes (K > 0).",
    ),
]
TauOpt = Annotated[
    float, _flag("tau_percentile", "Selectivity: |x| percentile that counts as active.")
]
TopOpt = Annotated[
    float, _flag("top_quantile", "Spikiness: mean of |x| above this quantile over the mean.")
]
IdfClipOpt = Annotated[float, _flag("idf_clip", "IDF is clipped to [0, this].")]
SpikyClipOpt = Annotated[float, _flag("spiky_clip", "Spikiness is clipped to [1, this].")]
WindowBosOpt = Annotated[
    str,
    _flag(
        "window_bos",
        "Start every calibration and evaluation window with BOS: auto (for families that need "
        "it, such as Gemma; LLaMA/OPT-style models keep the reference windows), always, never. "
        "A window stays --seqlen tokens, BOS included.",
    ),
]
IdfFormOpt = Annotated[
    str,
    _flag(
        "idf_form",
        f"IDF formula for wanda_idf and wanda_select (default {DEFAULT_IDF_FORM}): "
        "smooth = 1 + log(1/p); tempered = smooth ** idf_power; normalized = IDF / mean IDF, "
        "floored at idf_floor; relative = 1 + log(1/r), r the share of tokens above the "
        "channel's own mean |x|; seed = log(1/p) as written, which zeroes the always-active "
        "outlier channels and collapses the model.",
    ),
]
IdfPowerOpt = Annotated[float, _flag("idf_power", "Exponent of --idf_form tempered, > 0.")]
IdfFloorOpt = Annotated[float, _flag("idf_floor", "Floor of --idf_form normalized, > 0.")]
ExactOpt = Annotated[
    bool,
    _flag(
        "exact_selectivity",
        "Exact quantiles (keeps every activation: small runs only); default streams a histogram.",
    ),
]

ZeroShotOpt = Annotated[
    str | None,
    _flag(
        "eval_zero_shot",
        "Zero-shot accuracy through lm-evaluation-harness, comma-separated tasks: wiki-cloze "
        "(built in, offline) or lm-eval task names (their data come from the hub). Without a "
        f"value: {','.join(DEFAULT_TASKS)} (the Wanda paper's seven).",
    ),
]
ZeroShotLimitOpt = Annotated[
    int | None, _flag("zero_shot_limit", "Zero-shot: only the first N examples of each task.")
]
ZeroShotBatchOpt = Annotated[
    int, _flag("zero_shot_batch_size", "Zero-shot: requests per forward pass.")
]

SaveFormatOpt = Annotated[
    str,
    _flag(
        "save_format",
        "How --save_model stores weights: dense (plain safetensors, loads anywhere) or "
        "compressed (lossless: each sparse weight as a bitmask plus its nonzeros, every value "
        "byte-coded; a 50% SmolLM2 in fp16 is 0.54x the dense fp16 file; loads with "
        "transformers' from_pretrained after `import secateurs`, and in secateurs eval).",
    ),
]

RiaAlphaOpt = Annotated[
    float, _flag("ria_alpha", "ria: exponent of the activation norm (0.5 as in the paper).")
]


def _config(values: dict[str, Any]) -> PruneConfig:
    """A configuration from a command's parameters: those named as its fields, and --quiet."""
    known = {f.name for f in fields(PruneConfig)}
    chosen = {k: v for k, v in values.items() if k in known}
    return PruneConfig(**chosen, progress=not values["quiet"])


_PACKAGE = Path(__file__).resolve().parent
_PYTHON_SHOW_WARNING = warnings.showwarning


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings as one yellow line; anybody else's in Python's usual form."""
    if Path(filename).resolve().is_relative_to(_PACKAGE):
        typer.secho(f"warning: {message}", err=True, fg=typer.colors.YELLOW)
    else:
        _PYTHON_SHOW_WARNING(message, category, filename, lineno, file, line)


def _guarded(action, quiet: bool = False, debug: bool = False) -> None:
    """Run a command: bad input is one red line and exit 2; a bug is exit 1, its traceback
    shown only with --debug."""
    if quiet:
        from transformers.utils import logging

        logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = _show_warning
            action()
    except SecateursError as exc:
        if debug:
            raise
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was left half-written", code=130)
    except OSError as exc:
        if debug:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        _fail(
            f"{exc.strerror or exc}{where}: check the paths, their permissions and the free "
            "disk space"
        )
    except Exception as exc:
        if debug:
            raise
        detail = str(exc).splitlines()[0] if str(exc) else "no message"
        _fail(
            f"unexpected {type(exc).__name__}: {detail}\nThis is a bug in secateurs or a "
            "library it uses; rerun with --debug for the traceback and report it",
            code=1,
        )


@app.command()
def prune(
    model: ModelOpt = _DEFAULTS["model"],
    prune_method: Annotated[str, _flag("prune_method", _METHODS_HELP)] = _DEFAULTS["prune_method"],
    sparsity_ratio: Annotated[
        float, _flag("sparsity_ratio", "Fraction of weights to remove, in [0, 1).")
    ] = _DEFAULTS["sparsity_ratio"],
    sparsity_type: Annotated[
        str,
        _flag(
            "sparsity_type",
            "unstructured; N:M such as 2:4 or 4:8 (ratio = N/M); neuron (whole MLP neurons).",
        ),
    ] = _DEFAULTS["sparsity_type"],
    scope: Annotated[
        str | None,
        _flag("scope", "Unstructured comparison group: row or layer (default: the method's)."),
    ] = None,
    dataset: DatasetOpt = _DEFAULTS["dataset"],
    eval_dataset: Annotated[
        str | None, _flag("eval_dataset", "Evaluation text (default: the test split of --dataset).")
    ] = None,
    nsamples: NsamplesOpt = _DEFAULTS["nsamples"],
    seqlen: SeqlenOpt = None,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = _DEFAULTS["batch_size"],
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
    save_format: SaveFormatOpt = _DEFAULTS["save_format"],
    save_json: Annotated[str | None, _flag("save_json", "Write the run's result as JSON.")] = None,
    save_log: Annotated[str | None, _flag("save_log", "Write a readable summary here.")] = None,
    keep_shape: Annotated[
        bool,
        _flag(
            "keep_shape",
            "With --sparsity_type neuron, save pruned neurons as zeros instead of cutting them "
            "out (by default the saved MLPs are narrower: a smaller, faster model).",
        ),
    ] = False,
    use_recovery: Annotated[
        bool,
        _flag("use_recovery", "After pruning each layer, give the lost signal to its survivors."),
    ] = False,
    recovery: Annotated[
        str,
        _flag(
            "recovery",
            "inverse_wanda: the seed's first-moment rule, cheap; "
            "least_squares: minimise the layer's output error (ridge, conjugate gradients), "
            "stronger.",
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
    use_variant: VariantOpt = False,
    neuronrank_max_classes: ClassesOpt = _DEFAULTS["neuronrank_max_classes"],
    tau_percentile: TauOpt = _DEFAULTS["tau_percentile"],
    top_quantile: TopOpt = _DEFAULTS["top_quantile"],
    idf_clip: IdfClipOpt = _DEFAULTS["idf_clip"],
    spiky_clip: SpikyClipOpt = _DEFAULTS["spiky_clip"],
    exact_selectivity: ExactOpt = False,
    idf_form: IdfFormOpt = _DEFAULTS["idf_form"],
    idf_power: IdfPowerOpt = _DEFAULTS["idf_power"],
    idf_floor: IdfFloorOpt = _DEFAULTS["idf_floor"],
    ria_alpha: RiaAlphaOpt = _DEFAULTS["ria_alpha"],
    sparsity_allocation: Annotated[
        str,
        _flag(
            "sparsity_allocation",
            "Sparsity per decoder block: uniform; owl (blocks with more outlier scores keep "
            "more weights; one extra pass over the dense model; unstructured only); or a file "
            "with one ratio per block (JSON list or one number per line).",
        ),
    ] = _DEFAULTS["sparsity_allocation"],
    owl_threshold: Annotated[
        float, _flag("owl_threshold", "OWL: a score above this x its block's mean is an outlier.")
    ] = _DEFAULTS["owl_threshold"],
    owl_lambda: Annotated[
        float, _flag("owl_lambda", "OWL: block ratios span target +- this, in [0, 0.5).")
    ] = _DEFAULTS["owl_lambda"],
    window_bos: WindowBosOpt = _DEFAULTS["window_bos"],
    prune_data: Annotated[
        str | None,
        _flag(
            "prune_data",
            "Prompt/response scoring data instead of --dataset: align (HarmBench prompts with "
            "refusals, scoring half), utility (wiki-sample pairs), or a .jsonl/.csv file.",
        ),
    ] = None,
    utility_data: Annotated[
        str, _flag("utility_data", "wandg_set_difference: the utility prompt/response data.")
    ] = _DEFAULTS["utility_data"],
    entangle_prompt_feat: Annotated[
        bool,
        _flag("entangle_prompt_feat", "Count prompt tokens too (default: response tokens only)."),
    ] = False,
    save: Annotated[
        str | None, _flag("save", "Folder for score files and attack responses.")
    ] = None,
    dump_wanda_score: Annotated[
        bool,
        _flag("dump_wanda_score", "Write the raw scores under --save and stop without pruning."),
    ] = False,
    load_wanda_score: Annotated[
        bool, _flag("load_wanda_score", "Prune from scores dumped under --save (no calibration).")
    ] = False,
    neg_prune: Annotated[
        bool, _flag("neg_prune", "Prune the highest scores instead of the lowest.")
    ] = False,
    p: Annotated[
        float, _flag("p", "wandg_set_difference: top fraction by utility score that is kept.")
    ] = _DEFAULTS["p"],
    q: Annotated[
        float, _flag("q", "wandg_set_difference: top fraction by safety score considered.")
    ] = _DEFAULTS["q"],
    eval_attack: Annotated[
        bool, _flag("eval_attack", "ASR on the held-out half of align after pruning.")
    ] = False,
    save_attack_res: Annotated[
        bool, _flag("save_attack_res", "Save the attack responses as JSONL under --save.")
    ] = False,
    attack_max_new_tokens: Annotated[
        int, _flag("attack_max_new_tokens", "Tokens generated per attack prompt.")
    ] = _DEFAULTS["attack_max_new_tokens"],
    attack_batch_size: Annotated[
        int, _flag("attack_batch_size", "Prompts per generation batch.")
    ] = _DEFAULTS["attack_batch_size"],
    attack_limit: Annotated[
        int | None, _flag("attack_limit", "Attack only the first N held-out prompts.")
    ] = None,
    offload: Annotated[
        str,
        _flag(
            "offload",
            "Where the weights wait: none (all in memory); disk (a skeleton in memory, each "
            "block read from the safetensors shards when reached, written to --save_model when "
            "pruned, then freed; needs --save_model); auto (disk when the weights exceed "
            "--max_memory).",
        ),
    ] = _DEFAULTS["offload"],
    max_memory: Annotated[
        str | None,
        _flag("max_memory", "Memory the weights may take, e.g. 8GB; more streams from disk."),
    ] = None,
    eval_zero_shot: ZeroShotOpt = None,
    zero_shot_limit: ZeroShotLimitOpt = None,
    zero_shot_batch_size: ZeroShotBatchOpt = _DEFAULTS["zero_shot_batch_size"],
    save_plot: Annotated[
        str | None,
        _flag(
            "save_plot",
            "Write a PNG of per-layer sparsity (and recovery error) by block and sublayer.",
        ),
    ] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Prune a model, then print dense and pruned perplexity and the sparsity check."""
    cfg = _config(locals())

    def action() -> None:
        from secateurs.jobs.report import summary_lines

        log = (lambda _m: None) if quiet else (lambda m: typer.echo(m, err=True))
        result = run_prune(cfg, log=log)
        if "rank" not in result:  # the other ranks of a torchrun launch report nothing
            typer.echo("\n".join(summary_lines(result)))

    _guarded(action, quiet, debug)


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
    window_bos: WindowBosOpt = _DEFAULTS["window_bos"],
    eval_zero_shot: ZeroShotOpt = None,
    zero_shot_limit: ZeroShotLimitOpt = None,
    zero_shot_batch_size: ZeroShotBatchOpt = _DEFAULTS["zero_shot_batch_size"],
    save_json: Annotated[
        str | None, _flag("save_json", "Write perplexity, sparsity and zero-shot as JSON.")
    ] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Perplexity and sparsity of any model: a hub id, a built-in name, or a saved folder."""

    def action() -> None:
        from secateurs.core.model import choose_seqlen, load_config, load_model, load_tokenizer
        from secateurs.data.text import check_window_bos, resolve_source, window_bos_token
        from secateurs.evaluate.perplexity import check_sparsity, perplexity
        from secateurs.evaluate.zeroshot import evaluate_zero_shot
        from secateurs.evaluate.zeroshot import summary_lines as zero_shot_lines
        from secateurs.io import ensure_free
        from secateurs.jobs.prune import zero_shot_planned
        from secateurs.jobs.report import versions, write_json

        check_eval_args(
            PruneConfig(eval_limit=eval_limit, eval_batch_size=eval_batch_size, dtype=dtype)
        )
        target = check_device(device)
        check_window_bos(window_bos)
        resolve_source(dataset)
        ensure_free(save_json, "--save_json")
        plan = zero_shot_planned(
            PruneConfig(
                eval_zero_shot=eval_zero_shot,
                zero_shot_limit=zero_shot_limit,
                zero_shot_batch_size=zero_shot_batch_size,
            )
        )
        config = load_config(model, cache_dir, trust_remote_code)
        length = choose_seqlen(config, seqlen)
        tokenizer = load_tokenizer(model, cache_dir, trust_remote_code)
        bos = window_bos_token(window_bos, config, tokenizer)
        windows = load_eval_windows(tokenizer, dataset, length, eval_limit, bos)
        loaded, _ = load_model(model, cache_dir, DTYPES[dtype], trust_remote_code, tokenizer)
        start = time.perf_counter()
        value = perplexity(loaded, windows, target, eval_batch_size, not quiet)
        check = check_sparsity(loaded)
        typer.echo(f"model        {model}")
        typer.echo(
            f"evaluation   {dataset}: {windows.shape[0]} windows of {length}"
            + (f" (each starts with BOS, token {bos})" if bos is not None else "")
        )
        typer.echo(f"perplexity   {value:.3f}  ({time.perf_counter() - start:.1f} s)")
        typer.echo(f"sparsity     {check.overall:.4f} over {len(check.layers)} linear layers")
        zero_shot = None
        if plan is not None:
            zero_shot = {"tasks": plan.tasks, "limit": plan.limit}
            zero_shot["model"] = evaluate_zero_shot(loaded, tokenizer, plan, not quiet)
            for line in zero_shot_lines({"pruned": zero_shot["model"]}, "zero-shot    "):
                typer.echo(line)
        if save_json:
            result = {
                "model": model,
                "evaluation": {
                    "dataset": dataset,
                    "windows": int(windows.shape[0]),
                    "seqlen": length,
                },
                "perplexity": value,
                "sparsity": check.to_dict(),
                "zero_shot": zero_shot,
                "versions": versions(),
            }
            write_json(save_json, result)

    _guarded(action, quiet, debug)


def _split(text: str, convert=str) -> list:
    try:
        return [convert(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise SecateursError(f"could not read the list '{text}': {exc}") from exc


@app.command()
def compare(
    model: ModelOpt = _DEFAULTS["model"],
    methods: Annotated[
        str, _flag("methods", f"Comma-separated methods; any of {', '.join(METHODS)}.")
    ] = ",".join(DEFAULT_METHODS),
    sparsity_ratios: Annotated[
        str, _flag("sparsity_ratios", "Comma-separated ratios for unstructured and neuron runs.")
    ] = "0.5",
    sparsity_types: Annotated[
        str, _flag("sparsity_types", "Comma-separated: unstructured, N:M (run at N/M), neuron.")
    ] = "unstructured,2:4",
    dataset: DatasetOpt = _DEFAULTS["dataset"],
    nsamples: NsamplesOpt = _DEFAULTS["nsamples"],
    seqlen: SeqlenOpt = None,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = _DEFAULTS["batch_size"],
    eval_batch_size: EvalBatchOpt = _DEFAULTS["eval_batch_size"],
    eval_limit: LimitOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    cache_dir: CacheOpt = None,
    trust_remote_code: RemoteOpt = False,
    out: Annotated[
        str, _flag("out", "Folder for the table, CSV, JSON, plot and the per-run cache.")
    ] = "compare-out",
    use_variant: VariantOpt = False,
    neuronrank_max_classes: ClassesOpt = _DEFAULTS["neuronrank_max_classes"],
    tau_percentile: TauOpt = _DEFAULTS["tau_percentile"],
    top_quantile: TopOpt = _DEFAULTS["top_quantile"],
    idf_clip: IdfClipOpt = _DEFAULTS["idf_clip"],
    spiky_clip: SpikyClipOpt = _DEFAULTS["spiky_clip"],
    exact_selectivity: ExactOpt = False,
    idf_forms: Annotated[
        str,
        _flag(
            "idf_forms",
            f"Comma-separated IDF forms to compare ({', '.join(IDF_FORMS)}); each runs "
            "wanda_idf and wanda_select once.",
        ),
    ] = DEFAULT_IDF_FORM,
    idf_power: IdfPowerOpt = _DEFAULTS["idf_power"],
    idf_floor: IdfFloorOpt = _DEFAULTS["idf_floor"],
    ria_alpha: RiaAlphaOpt = _DEFAULTS["ria_alpha"],
    window_bos: WindowBosOpt = _DEFAULTS["window_bos"],
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run several methods on one model with one calibration set; table, CSV, JSON and plot.

    Finished runs are cached in OUT/runs by their whole configuration: rerun the same
    command to continue a sweep that stopped, or add methods and ratios to extend it.
    """
    base = _config(locals())

    def action() -> None:
        from secateurs.jobs.compare import run_compare
        from secateurs.jobs.report import comparison_table

        log = (lambda _m: None) if quiet else (lambda m: typer.echo(m, err=True))
        result = run_compare(
            base,
            _split(methods),
            _split(sparsity_types),
            _split(sparsity_ratios, float),
            out,
            log=log,
            idf_forms=_split(idf_forms),
        )
        typer.echo(comparison_table(result.rows, result.dense_ppl))
        for name, path in result.files.items():
            typer.echo(f"{name:<6} {path}")

    _guarded(action, quiet, debug)


@app.command("attack")
def attack_command(
    model: ModelOpt = _DEFAULTS["model"],
    prompts: Annotated[
        str,
        _flag(
            "prompts",
            "align: the held-out half of the HarmBench prompts (ASR); utility: harmless "
            "wiki-sample test prompts (the share answered = 1 - over-refusal); or a .jsonl/.csv.",
        ),
    ] = "align",
    limit: Annotated[int | None, _flag("limit", "Only the first N prompts.")] = None,
    max_new_tokens: Annotated[int, _flag("max_new_tokens", "Tokens generated per prompt.")] = 64,
    batch_size: Annotated[int, _flag("batch_size", "Prompts per generation batch.")] = 8,
    out: Annotated[str | None, _flag("out", "Write every response and verdict as JSONL.")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    cache_dir: CacheOpt = None,
    trust_remote_code: RemoteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Greedy answers to harmful (or harmless) prompts, with and without a system prompt; ASR."""

    def action() -> None:
        from secateurs.core.model import load_model
        from secateurs.evaluate.attack import attack, attack_prompts, save_responses
        from secateurs.io import ensure_free

        for value, flag in ((limit, "--limit"), (max_new_tokens, "--max_new_tokens")):
            if value is not None and value <= 0:
                raise SecateursError(f"{flag} must be at least 1, got {value}")
        if batch_size <= 0:
            raise SecateursError(f"--batch_size must be at least 1, got {batch_size}")
        torch_dtype = check_dtype(dtype)
        ensure_free(out, "--out")
        target = check_device(device)
        chosen = attack_prompts(prompts)[:limit]
        loaded, tokenizer = load_model(model, cache_dir, torch_dtype, trust_remote_code)
        start = time.perf_counter()
        result = attack(
            loaded,
            tokenizer,
            chosen,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            device=target,
            progress=not quiet,
        )
        if out:
            save_responses(out, result.rows)
        typer.echo(f"model        {model}")
        typer.echo(f"prompts      {prompts}: {len(chosen)}, {max_new_tokens} new tokens, greedy")
        for setting, asr in result.asr.items():
            blank = result.blank[setting]
            typer.echo(
                f"{setting:<12} answered (ASR) {asr:.3f}, refused {1 - asr - blank:.3f}, "
                f"blank {blank:.3f}"
            )
        typer.echo(f"time         {time.perf_counter() - start:.1f} s")

    _guarded(action, quiet)


@app.command()
def finetune(
    model: ModelOpt = _DEFAULTS["model"],
    save_model: Annotated[str, _flag("save_model", "Write the merged model here.")] = ...,
    save_format: SaveFormatOpt = _DEFAULTS["save_format"],
    data: Annotated[
        str | None,
        _flag(
            "data",
            "Comma-separated prompt/response data (align, utility, .jsonl/.csv); "
            "default: plain text windows of --dataset.",
        ),
    ] = None,
    dataset: DatasetOpt = _DEFAULTS["dataset"],
    nsamples: Annotated[
        int, _flag("nsamples", "Samples (pairs or windows) per data source.")
    ] = 128,
    seqlen: Annotated[int, _flag("seqlen", "Tokens per sample (longer ones are cut).")] = 256,
    steps: Annotated[int, _flag("steps", "Optimiser steps.")] = 100,
    batch_size: Annotated[int, _flag("batch_size", "Samples per step.")] = 8,
    lr: Annotated[float, _flag("lr", "AdamW learning rate of the LoRA weights.")] = 2e-4,
    rank: Annotated[int, _flag("rank", "LoRA rank.")] = 8,
    alpha: Annotated[float, _flag("alpha", "LoRA alpha (scale = alpha / rank).")] = 16.0,
    seed: SeedOpt = 0,
    eval_limit: Annotated[
        int | None, _flag("eval_limit", "Perplexity on N test windows of --dataset before/after.")
    ] = None,
    device: DeviceOpt = "cpu",
    cache_dir: CacheOpt = None,
    trust_remote_code: RemoteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """LoRA fine-tuning merged into the weights; weights that were exactly zero stay zero."""

    def action() -> None:
        from secateurs.core.model import load_model
        from secateurs.data.prompts import check_prompt_data
        from secateurs.data.text import resolve_source
        from secateurs.evaluate.perplexity import check_sparsity, perplexity
        from secateurs.formats.checkpoint import check_save_format
        from secateurs.io import ensure_free
        from secateurs.jobs.finetune import LoraOptions, finetune, training_batch
        from secateurs.jobs.prune import load_eval_windows, save_pruned_model

        options = LoraOptions(rank, alpha, lr, steps, batch_size, seed)
        names = _split(data) if data else []
        for name in names:
            check_prompt_data(name)
        resolve_source(dataset)
        ensure_free(save_model, "--save_model")
        check_save_format(save_format)
        if eval_limit is not None and eval_limit <= 0:
            raise SecateursError(f"--eval_limit must be at least 1, got {eval_limit}")
        target = check_device(device)
        loaded, tokenizer = load_model(model, cache_dir, trust_remote_code=trust_remote_code)
        batch = training_batch(tokenizer, names, dataset, nsamples, seqlen, seed)
        windows = load_eval_windows(tokenizer, dataset, seqlen, eval_limit) if eval_limit else None
        before = perplexity(loaded, windows, target, 1, not quiet) if eval_limit else None
        merged, report = finetune(loaded, batch, options, target, not quiet)
        after = perplexity(merged, windows, target, 1, not quiet) if eval_limit else None
        result = {"finetune": report.to_dict(), "perplexity": {"before": before, "after": after}}
        save_pruned_model(merged, tokenizer, save_model, result, save_format)
        typer.echo(
            f"trained      {names or dataset}: {batch.input_ids.shape[0]} samples, "
            f"{steps} steps, {report.seconds:.1f} s"
        )
        typer.echo(f"loss         {report.first_loss:.3f} -> {report.last_loss:.3f}")
        if eval_limit:
            typer.echo(f"perplexity   {before:.3f} -> {after:.3f} ({eval_limit} windows)")
        typer.echo(
            f"sparsity     {check_sparsity(merged).overall:.4f} "
            f"({report.kept_zeros:,} zero weights kept)"
        )
        typer.echo(f"saved        {save_model}")

    _guarded(action, quiet)


@app.command()
def convert(
    model: ModelOpt = ...,
    save_model: Annotated[str, _flag("save_model", "Write the converted folder here.")] = ...,
    save_format: SaveFormatOpt = "compressed",
    dtype: Annotated[
        str | None,
        _flag("dtype", f"Cast floating-point weights first: {', '.join(DTYPES)} (default: keep)."),
    ] = None,
    cache_dir: CacheOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Rewrite a saved model folder as a compressed or dense checkpoint, one shard at a time."""

    def action() -> None:
        from secateurs.formats.checkpoint import convert_folder
        from secateurs.formats.streaming import model_folder
        from secateurs.jobs.report import fmt_bytes

        cast = check_dtype(dtype) if dtype is not None else None
        source = model_folder(model, cache_dir)
        summary = convert_folder(source, save_model, save_format, cast)
        typer.echo(
            f"converted    {source} -> {save_model} ({save_format}"
            + (f", {dtype}" if dtype else "")
            + ")"
        )
        typer.echo(
            f"tensors      {summary.compressed} compressed, {summary.dense} dense; "
            f"{fmt_bytes(summary.bytes_before)} -> {fmt_bytes(summary.bytes_after)} "
            f"({summary.bytes_after / max(summary.bytes_before, 1):.3f}x)"
        )

    _guarded(action, quiet)
