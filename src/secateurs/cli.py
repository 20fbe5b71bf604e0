"""The ``secateurs`` command: a thin layer over :mod:`secateurs.jobs`.

``prune`` and ``compare`` are generated from the run configuration's fields
(:mod:`secateurs.config` and each method's options class), so every flag, default and help
line is written once, beside the code that reads it, and lands in its help panel. The
command line reads those fields from ``flags.json`` (:func:`secateurs.config.flag_schema`,
kept equal to the code by a test), and everything heavy is imported when a command runs,
so ``--help`` answers at once.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.rich_utils
from rich.table import Table
from typer.core import TyperGroup

from secateurs import __version__
from secateurs.errors import SecateursError

SCHEMA = json.loads(Path(__file__).with_name("flags.json").read_text())
FLAGS: dict[str, dict[str, Any]] = SCHEMA["flags"]
DTYPES = SCHEMA["dtypes"]
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}

_ZERO_SHOT_FLAGS = ("--eval_zero_shot",)
_DASHED = re.compile(r"^--[a-z0-9]+(?:-[a-z0-9]+)+(?==|$)")


def default_zero_shot(args: list[str]) -> list[str]:
    """A bare --eval_zero_shot (last, or before another option) means the paper's tasks."""
    out = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg in _ZERO_SHOT_FLAGS and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append(",".join(SCHEMA["default_tasks"]))
    return out


def underscored(args: list[str]) -> list[str]:
    """Flags spelled with dashes (--sparsity-ratio) as the reference spells them
    (--sparsity_ratio), so both work while help lists one name per flag."""
    return [_DASHED.sub(lambda m: "--" + m.group(0)[2:].replace("-", "_"), arg) for arg in args]


class _HelpTable(Table):
    """Typer's help tables with flag names that never shrink: only the help text wraps, so no
    flag name is cut at 80 columns (rich would shrink the widest columns alike)."""

    def add_row(self, *renderables, **kwargs) -> None:
        super().add_row(*renderables, **kwargs)
        for column in self.columns[:-1]:
            column.no_wrap = True


typer.rich_utils.Table = _HelpTable


class _Commands(TyperGroup):
    """The command group; takes dashed flag spellings and a bare --eval_zero_shot."""

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, default_zero_shot(underscored(args)))


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"secateurs {__version__}")
        raise typer.Exit()


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


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", callback=_show_version, is_eager=True
        ),
    ] = False,
) -> None:
    """Prune large language models by weights and activations."""


def _flag(name: str, help_text: str, panel: str | None = None):
    """An option spelled as the reference scripts do (--sparsity_ratio); dashes work too."""
    return typer.Option(f"--{name}", help=help_text, rich_help_panel=panel)


def _option(name: str, annotation: Any, default: Any, help_text: str, panel: str):
    """One generated command parameter (a bool that defaults to True gets --no_NAME)."""
    if annotation is bool and default is True:
        info = typer.Option(f"--{name}/--no_{name}", help=help_text, rich_help_panel=panel)
    else:
        info = _flag(name, help_text, panel)
    kind = inspect.Parameter.KEYWORD_ONLY
    return inspect.Parameter(name, kind, default=default, annotation=Annotated[annotation, info])


def _annotation(name: str) -> Any:
    """The Python type of a flag, from its schema entry (``int?``: an int or None)."""
    kind = FLAGS[name]["type"]
    base = _TYPES[kind.rstrip("?")]
    return base | None if kind.endswith("?") else base


def spec_parameters(skip: Iterable[str] = ()) -> list[inspect.Parameter]:
    """A parameter for every flag of the run configuration, once each, in panel order."""
    skipped = set(skip)
    return [
        _option(name, _annotation(name), entry["default"], entry["help"], entry["panel"])
        for name, entry in FLAGS.items()
        if name not in skipped
    ]


def spec_option(name: str) -> Any:
    """The annotated type of one configuration flag, for hand-written commands."""
    return Annotated[_annotation(name), _flag(name, FLAGS[name]["help"])]


QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]
DebugOpt = Annotated[
    bool, typer.Option("--debug", help="Show the full traceback of an unexpected error.")
]


def _common(panel: str = "Execution") -> list[inspect.Parameter]:
    quiet = typer.Option("--quiet", help="No progress bars.", rich_help_panel=panel)
    debug = typer.Option(
        "--debug", help="Show the full traceback of an unexpected error.", rich_help_panel=panel
    )
    return [
        inspect.Parameter(
            "quiet",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[bool, quiet],
        ),
        inspect.Parameter(
            "debug",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[bool, debug],
        ),
    ]


def generated(params: list[inspect.Parameter]) -> Callable:
    """Give ``fn(values)`` the signature ``params``: typer reads its options from them."""

    def wrap(fn: Callable[[dict[str, Any]], None]) -> Callable[..., None]:
        def command(**values: Any) -> None:
            fn(values)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__doc__ = fn.__doc__
        command.__name__ = fn.__name__
        return command

    return wrap


def config_from(values: dict[str, Any], **overrides: Any):
    """A run configuration from a generated command's values (--quiet turns progress off)."""
    from secateurs.config import RunConfig

    flags = {k: v for k, v in values.items() if k not in ("quiet", "debug")}
    return RunConfig.from_flags(**(flags | overrides), progress=not values["quiet"])


ModelOpt = spec_option("model")
SeqlenOpt = spec_option("seqlen")
DeviceOpt = spec_option("device")
DtypeOpt = spec_option("dtype")
CacheOpt = spec_option("cache_dir")
LimitOpt = spec_option("eval_limit")
EvalBatchOpt = spec_option("eval_batch_size")
RemoteOpt = spec_option("trust_remote_code")
DatasetOpt = spec_option("dataset")
SeedOpt = spec_option("seed")
WindowBosOpt = spec_option("window_bos")
ZeroShotOpt = spec_option("eval_zero_shot")
ZeroShotLimitOpt = spec_option("zero_shot_limit")
ZeroShotBatchOpt = spec_option("zero_shot_batch_size")
SaveFormatOpt = spec_option("save_format")
_DEFAULTS = {name: entry["default"] for name, entry in FLAGS.items()}

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


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread as Python raises Ctrl-C's
    KeyboardInterrupt: a signal's default action ends the process without unwinding it, so the
    atomic writers' cleanup never ran and a killed job left its temporary folder behind."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def _stop_signals_unwind() -> Iterator[None]:
    """While a command runs, SIGTERM and SIGHUP raise :class:`Stopped`; the handlers that
    were there before come back afterwards (the command may run inside a longer program)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; elsewhere the defaults stay
        return
    received: int | None = None

    def stop(signum: int, _frame: object) -> None:
        nonlocal received
        if received is None:  # a second signal must not cut short the cleanup the first started
            received = signum
            raise Stopped(signum)

    previous = {
        sig: signal.signal(sig, stop)
        for sig in _STOP_SIGNALS
        if signal.getsignal(sig) is not signal.SIG_IGN  # nohup asked to ignore hangups
    }
    try:
        yield
    except Exception as exc:
        if received is None:
            raise
        # C code that calls back into Python may turn the Stopped it met into its own error
        # (torch makes it a ValueError); the cleanup ran all the same, and the cause was the stop
        raise Stopped(received) from exc
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else "no message"


def _environment_error(exc: Exception) -> str | None:
    """The message for an error the machine or a damaged input caused rather than the code,
    else None. Libraries report these in their own types (safetensors, torch), so they are
    told apart by type name and message, without importing those libraries here."""
    kinds = {cls.__name__ for cls in type(exc).__mro__}
    detail = _first_line(exc)
    if "SafetensorError" in kinds and "while serializing" in detail:
        return (
            f"could not write a safetensors file ({detail}); check that its folder is writable "
            "and the disk has room"
        )
    if "SafetensorError" in kinds or "PytorchStreamReader" in detail:
        return (
            f"a weights or score file is truncated or corrupt ({detail}); download or save the "
            "model (or dump the scores) again; --debug shows which file was being read"
        )
    if "JSONDecodeError" in kinds:
        return (
            f"a JSON file is truncated or corrupt ({detail}); replace it with a whole copy; "
            "--debug shows which file was being read"
        )
    if kinds & {"MemoryError", "OutOfMemoryError"}:
        return (
            f"out of memory ({detail}); use smaller batches or fewer samples, a smaller --dtype, "
            "or (for prune) --offload disk"
        )
    return None


def _guarded(action, quiet: bool = False, debug: bool = False) -> None:
    """Run a command: bad input or a failing machine is one red line and exit 2; SIGINT,
    SIGTERM and SIGHUP unwind (removing every temporary) and exit 128 + the signal's number;
    a bug is exit 1, its traceback shown only with --debug."""
    if quiet:
        from transformers.utils import logging

        logging.disable_progress_bar()
    try:
        with _stop_signals_unwind(), warnings.catch_warnings():
            if not debug:
                warnings.showwarning = _show_warning
            action()
    except SecateursError as exc:
        if debug:
            raise
        _fail(str(exc))
    except Stopped as exc:
        name = signal.Signals(exc.signum).name
        _fail(f"stopped by {name}; nothing was left half-written", code=128 + exc.signum)
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
        message = _environment_error(exc)
        if message is not None:
            _fail(message)
        _fail(
            f"unexpected {type(exc).__name__}: {_first_line(exc)}\nThis is a bug in secateurs "
            "or a library it uses; rerun with --debug for the traceback and report it",
            code=1,
        )


@app.command()
@generated(spec_parameters() + _common())
def prune(values: dict[str, Any]) -> None:
    """Prune a model, then print dense and pruned perplexity and the sparsity check.

    The options come in the stages of a run; `secateurs methods` lists the methods.
    """

    def action() -> None:
        from secateurs.jobs.prune import run_prune
        from secateurs.jobs.report import summary_lines

        cfg = config_from(values)
        log = (lambda _m: None) if values["quiet"] else (lambda m: typer.echo(m, err=True))
        result = run_prune(cfg, log=log)
        if "rank" not in result:  # the other ranks of a torchrun launch report nothing
            typer.echo("\n".join(summary_lines(result)))

    _guarded(action, values["quiet"], values["debug"])


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
        from secateurs.config import DTYPES, EvaluationSpec, RunConfig, check_dtype
        from secateurs.core.model import choose_seqlen, load_config, load_model, load_tokenizer
        from secateurs.data.text import check_window_bos, resolve_source, window_bos_token
        from secateurs.evaluate.perplexity import check_sparsity, perplexity
        from secateurs.evaluate.zeroshot import evaluate_zero_shot
        from secateurs.evaluate.zeroshot import summary_lines as zero_shot_lines
        from secateurs.io import check_folder_files, ensure_free
        from secateurs.jobs.plan import check_device, zero_shot_planned
        from secateurs.jobs.report import plural, versions, write_json
        from secateurs.jobs.session import load_eval_windows

        spec = EvaluationSpec(
            eval_batch_size=eval_batch_size,
            eval_limit=eval_limit,
            eval_zero_shot=eval_zero_shot,
            zero_shot_limit=zero_shot_limit,
            zero_shot_batch_size=zero_shot_batch_size,
        )
        check_dtype(dtype)
        target = check_device(device)
        check_window_bos(window_bos)
        resolve_source(dataset)
        ensure_free(save_json, "--save_json")
        plan = zero_shot_planned(RunConfig(evaluation=spec))
        check_folder_files(model)
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
            f"evaluation   {dataset}: {plural(windows.shape[0], 'window')} of {length}"
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


# What a comparison sweeps (its own list flags) or does not do (save, stream, attack).
_NOT_COMPARED = (
    "prune_method",
    "sparsity_ratio",
    "sparsity_type",
    "idf_form",
    "eval_dense",
    "eval_zero_shot",
    "zero_shot_limit",
    "zero_shot_batch_size",
    *(name for name, entry in FLAGS.items() if entry["panel"] == "Output"),
    "offload",
    "max_memory",
    "save",
    "dump_wanda_score",
    "load_wanda_score",
    "eval_attack",
    "save_attack_res",
    "attack_max_new_tokens",
    "attack_batch_size",
    "attack_limit",
)


def _compare_parameters() -> list[inspect.Parameter]:
    own = [
        (
            "methods",
            ", ".join(SCHEMA["compare_methods"]),
            f"Comma-separated; any of {', '.join(SCHEMA['methods'])}.",
        ),
        (
            "sparsity_types",
            "unstructured,2:4",
            "Comma-separated: unstructured, N:M (run at N/M), neuron.",
        ),
        ("sparsity_ratios", "0.5", "Comma-separated ratios for unstructured and neuron runs."),
        (
            "idf_forms",
            SCHEMA["default_idf_form"],
            f"Comma-separated IDF forms to compare ({', '.join(SCHEMA['idf_forms'])}); each runs "
            "wanda_idf and wanda_select once.",
        ),
        ("out", "compare-out", "Folder for the table, CSV, JSON, plot and the per-run cache."),
    ]
    sweep = [_option(name, str, default, text, "Comparison") for name, default, text in own]
    return sweep + spec_parameters(_NOT_COMPARED) + _common()


@app.command()
@generated(_compare_parameters())
def compare(values: dict[str, Any]) -> None:
    """Run several methods on one model with one calibration set; table, CSV, JSON and plot.

    Finished runs are cached in OUT/runs by their whole configuration: rerun the same
    command to continue a sweep that stopped, or add methods and ratios to extend it.
    """

    def action() -> None:
        from secateurs.jobs.compare import run_compare
        from secateurs.jobs.report import comparison_table

        own = ("methods", "sparsity_types", "sparsity_ratios", "idf_forms", "out")
        base = {k: v for k, v in values.items() if k not in (*own, "quiet", "debug")}
        log = (lambda _m: None) if values["quiet"] else (lambda m: typer.echo(m, err=True))
        result = run_compare(
            base | {"progress": not values["quiet"]},
            _split(values["methods"]),
            _split(values["sparsity_types"]),
            _split(values["sparsity_ratios"], float),
            values["out"],
            log=log,
            idf_forms=_split(values["idf_forms"]),
        )
        typer.echo(comparison_table(result.rows, result.dense_ppl))
        for name, path in result.files.items():
            typer.echo(f"{name:<6} {path}")

    _guarded(action, values["quiet"], values["debug"])


_UNITS = "Units to remove"
_UNIT_METHODS = "Methods"


@app.command()
def shrink(
    model: ModelOpt = _DEFAULTS["model"],
    neurons: Annotated[
        float, _flag("neurons", "Share of MLP neurons to remove in every block (0.25).", _UNITS)
    ] = 0.0,
    heads: Annotated[
        float,
        _flag("heads", "Share of attention heads to remove in every block (0.33).", _UNITS),
    ] = 0.0,
    blocks: Annotated[
        int, _flag("blocks", "Whole decoder blocks to remove (a count).", _UNITS)
    ] = 0,
    params: Annotated[
        float | None,
        _flag(
            "params",
            "Budget: share of all parameters to remove (0.2); sets --neurons, after --heads "
            "and --blocks take their part.",
            _UNITS,
        ),
    ] = None,
    head_mode: Annotated[
        str,
        _flag(
            "head_mode",
            "GQA: 'query' removes the same number of query heads from every key/value group; "
            "'group' removes whole key/value groups with their query heads.",
            _UNITS,
        ),
    ] = "query",
    score: Annotated[
        str,
        _flag(
            "score",
            "Width method for heads and neurons: ziplm, flap, wanda, fisher, magnitude "
            "(`secateurs methods`).",
            _UNIT_METHODS,
        ),
    ] = "ziplm",
    depth_score: Annotated[
        str, _flag("depth_score", "Depth method for --blocks: angular, shortgpt.", _UNIT_METHODS)
    ] = "angular",
    compensation: Annotated[
        str,
        _flag(
            "compensation",
            "least_squares: refit o_proj/down_proj on the kept units' activations; mean: add "
            "the removed units' mean output to the bias (layers with one); none.",
            _UNIT_METHODS,
        ),
    ] = "least_squares",
    damp: Annotated[
        float, _flag("damp", "Ridge of the refit, times the mean input energy.", _UNIT_METHODS)
    ] = 0.01,
    target: Annotated[
        str,
        _flag(
            "target",
            "What the refit matches: layer (the layer's own output on the pruned model's "
            "inputs), dense (the dense model's block output, which also makes up for earlier "
            "blocks and removed ones, but fits the calibration text more than new text) or "
            "auto (dense right after removed blocks, layer elsewhere, weighted as a norm "
            "after the layer passes errors on, as Gemma-3's post-FFN norm).",
            _UNIT_METHODS,
        ),
    ] = "auto",
    dataset: DatasetOpt = _DEFAULTS["dataset"],
    nsamples: Annotated[int, _flag("nsamples", "Calibration windows.", "Data")] = 32,
    seqlen: Annotated[int, _flag("seqlen", "Tokens per window.", "Data")] = 512,
    seed: SeedOpt = 0,
    window_bos: WindowBosOpt = _DEFAULTS["window_bos"],
    eval_limit: LimitOpt = None,
    eval_batch_size: EvalBatchOpt = _DEFAULTS["eval_batch_size"],
    eval_dense: Annotated[
        bool,
        typer.Option(
            "--eval_dense/--no_eval_dense",
            help="Also measure the dense model's perplexity.",
            rich_help_panel="Evaluation",
        ),
    ] = True,
    speed: Annotated[
        bool,
        _flag(
            "speed",
            "Measure prefill (1 x 512) and greedy decode (128 tokens) tokens/s, dense and "
            "pruned, in plain transformers.",
            "Evaluation",
        ),
    ] = False,
    save_model: Annotated[
        str | None, _flag("save_model", "Write the smaller model here (HF folder).", "Output")
    ] = None,
    save_json: Annotated[
        str | None, _flag("save_json", "Write the result as JSON.", "Output")
    ] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    batch_size: Annotated[
        int, _flag("batch_size", "Calibration windows per forward pass.", "Execution")
    ] = 1,
    cache_dir: CacheOpt = None,
    trust_remote_code: RemoteOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Remove whole heads, neurons and blocks: a smaller dense model of the same class.

    Faster anywhere, without sparse kernels; o_proj and down_proj are refit on what is kept.
    """

    def action() -> None:
        from secateurs.core.structure import StructureSpec
        from secateurs.jobs.shrink import ShrinkJob, run_shrink

        job = ShrinkJob(
            model=model,
            structure=StructureSpec(neurons, heads, blocks, head_mode, compensation, damp, target),
            params=params,
            score=score,
            depth_score=depth_score,
            dataset=dataset,
            nsamples=nsamples,
            seqlen=seqlen,
            seed=seed,
            window_bos=window_bos,
            eval_limit=eval_limit,
            eval_batch_size=eval_batch_size,
            eval_dense=eval_dense,
            speed=speed,
            save_model=save_model,
            save_json=save_json,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            cache_dir=cache_dir,
            trust_remote_code=trust_remote_code,
            progress=not quiet,
        )
        run_shrink(job, log=typer.echo)

    _guarded(action, quiet, debug)


@app.command("methods")
def methods_command() -> None:
    """The pruning methods, what each scores, and what each of them supports."""
    from secateurs.core.spec import flagged_fields
    from secateurs.methods import METHODS
    from secateurs.methods.units import UNIT_METHODS

    for method in METHODS.values():
        typer.echo(f"{method.name}")
        typer.echo(f"  {method.summary}")
        kinds = ", ".join(sorted(method.patterns))
        notes = [
            f"patterns: {kinds}",
            f"compares per {method.scope}",
            "calibrated" if method.calibrated else "no calibration",
        ]
        if method.whole_model is not None:
            notes.append(f"scores from a whole-model pass ({method.whole_model.__name__})")
        if method.updates_weights:
            notes.append("updates surviving weights")
        if not method.streamable:
            notes.append("not streamable")
        if not method.parallel_safe:
            notes.append("one process only")
        typer.echo("  " + "; ".join(notes))
        if method.options is not None:
            flags = ", ".join(f"--{flag.name}" for _, flag in flagged_fields(method.options))
            typer.echo(f"  options: {flags}")
    typer.echo(
        "\nstructured (secateurs shrink: --score for heads and neurons, --depth_score for blocks)"
    )
    for unit in UNIT_METHODS.values():
        paper = f" [{unit.paper}]" if unit.paper else ""
        typer.echo(f"{unit.name} ({unit.kind})\n  {unit.summary}{paper}")


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
    samples: Annotated[
        int,
        _flag(
            "samples",
            "Also N sampled answers per prompt without a system prompt (the paper uses 5); "
            "a prompt counts as answered if any is.",
        ),
    ] = 0,
    seed: SeedOpt = 0,
    fluency_model: Annotated[
        str | None,
        _flag(
            "fluency_model",
            "Reference model (the tuned dense one): an answer counts as a fluent attack only "
            "if its perplexity under this model is at most --fluency_max_ppl.",
        ),
    ] = None,
    fluency_max_ppl: Annotated[
        float, _flag("fluency_max_ppl", "Highest perplexity of a fluent answer.")
    ] = 50.0,
    out: Annotated[str | None, _flag("out", "Write every response and verdict as JSONL.")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    cache_dir: CacheOpt = None,
    trust_remote_code: RemoteOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Greedy answers to harmful (or harmless) prompts, with and without a system prompt; ASR."""

    def action() -> None:
        from secateurs.config import check_dtype
        from secateurs.core.model import load_model
        from secateurs.evaluate.attack import attack, attack_prompts, save_responses
        from secateurs.io import ensure_free
        from secateurs.jobs.plan import check_device

        for value, flag in ((limit, "--limit"), (max_new_tokens, "--max_new_tokens")):
            if value is not None and value <= 0:
                raise SecateursError(f"{flag} must be at least 1, got {value}")
        if batch_size <= 0:
            raise SecateursError(f"--batch_size must be at least 1, got {batch_size}")
        if samples < 0:
            raise SecateursError(f"--samples must be 0 or more, got {samples}")
        torch_dtype = check_dtype(dtype)
        ensure_free(out, "--out")
        target = check_device(device)
        if not fluency_max_ppl > 0:
            raise SecateursError(f"--fluency_max_ppl must be positive, got {fluency_max_ppl}")
        chosen = attack_prompts(prompts)[:limit]
        loaded, tokenizer = load_model(model, cache_dir, torch_dtype, trust_remote_code)
        reference = None
        if fluency_model is not None:
            reference, _ = load_model(
                fluency_model, cache_dir, torch_dtype, trust_remote_code, tokenizer
            )
        start = time.perf_counter()
        result = attack(
            loaded,
            tokenizer,
            chosen,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            device=target,
            progress=not quiet,
            samples=samples,
            seed=seed,
            fluency_model=reference,
            fluency_max_ppl=fluency_max_ppl,
        )
        typer.echo(f"model        {model}")
        how = f"greedy, and {samples} sampled (seed {seed})" if samples else "greedy"
        typer.echo(f"prompts      {prompts}: {len(chosen)}, {max_new_tokens} new tokens, {how}")
        for setting, asr in result.asr.items():
            blank = result.blank[setting]
            if setting == "sampled":
                typer.echo(
                    f"{setting:<12} answered by any of {samples} (ASR) {asr:.3f}, blank answers "
                    f"{blank:.3f}"
                )
                continue
            typer.echo(
                f"{setting:<12} answered (ASR) {asr:.3f}, refused {1 - asr - blank:.3f}, "
                f"blank {blank:.3f}"
            )
        for setting, asr in result.asr_fluent.items():
            typer.echo(f"{setting:<12} fluent answers (ppl <= {fluency_max_ppl:g}) {asr:.3f}")
        typer.echo(f"time         {time.perf_counter() - start:.1f} s")
        if out:  # after the numbers are shown, so that a failed write does not cost them
            save_responses(out, result.rows)

    _guarded(action, quiet, debug)


@app.command()
def finetune(
    model: ModelOpt = _DEFAULTS["model"],
    save_model: Annotated[str, _flag("save_model", "Write the merged model here.")] = ...,
    save_format: SaveFormatOpt = _DEFAULTS["save_format"],
    data: Annotated[
        str | None,
        _flag(
            "data",
            "Comma-separated prompt/response data (align, utility, .jsonl/.csv), and text "
            "for plain windows of --dataset beside them (keeps perplexity while tuning on "
            "pairs); default: text alone.",
        ),
    ] = None,
    dataset: DatasetOpt = _DEFAULTS["dataset"],
    nsamples: Annotated[
        int, _flag("nsamples", "Samples (pairs or windows) per data source.")
    ] = 128,
    seqlen: Annotated[int, _flag("seqlen", "Tokens per sample (longer ones are cut).")] = 256,
    steps: Annotated[int, _flag("steps", "Optimiser steps (at most, with --minutes).")] = 100,
    minutes: Annotated[
        float | None,
        _flag("minutes", "Stop training after this many minutes (the step under way ends)."),
    ] = None,
    batch_size: Annotated[int, _flag("batch_size", "Samples per step.")] = 8,
    lr: Annotated[float, _flag("lr", "AdamW learning rate of the LoRA weights.")] = 2e-4,
    rank: Annotated[int, _flag("rank", "LoRA rank.")] = 8,
    alpha: Annotated[float, _flag("alpha", "LoRA alpha (scale = alpha / rank).")] = 16.0,
    train: Annotated[
        str,
        _flag(
            "train",
            "lora: adapters merged back; full: every weight (best after `secateurs shrink`).",
        ),
    ] = "lora",
    distill: Annotated[
        str | None,
        _flag(
            "distill",
            "Teacher model (the dense one this was pruned from): learn its next-token "
            "distribution instead of the labels alone.",
        ),
    ] = None,
    kd_weight: Annotated[
        float, _flag("kd_weight", "Weight of the KL to the teacher (with --distill).")
    ] = 1.0,
    lm_weight: Annotated[
        float, _flag("lm_weight", "Weight of the label loss with --distill (0: KL only).")
    ] = 0.0,
    temperature: Annotated[
        float, _flag("temperature", "Softmax temperature of the distillation.")
    ] = 1.0,
    seed: SeedOpt = 0,
    eval_limit: Annotated[
        int | None, _flag("eval_limit", "Perplexity on N test windows of --dataset before/after.")
    ] = None,
    device: DeviceOpt = "cpu",
    cache_dir: CacheOpt = None,
    trust_remote_code: RemoteOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Recovery training: LoRA or every weight, from labels or distilled from the dense model.

    Weights that were exactly zero stay zero.
    """

    def action() -> None:
        from secateurs.core.model import load_model
        from secateurs.data.prompts import check_prompt_data
        from secateurs.data.text import resolve_source
        from secateurs.evaluate.perplexity import check_sparsity, perplexity
        from secateurs.formats.checkpoint import check_save_format
        from secateurs.io import check_folder_files, ensure_free
        from secateurs.jobs.finetune import (
            TEXT_DATA,
            LoraOptions,
            check_teacher,
            finetune,
            training_batch,
        )
        from secateurs.jobs.plan import check_device
        from secateurs.jobs.report import plural
        from secateurs.jobs.result import save_pruned_model
        from secateurs.jobs.session import load_eval_windows

        options = LoraOptions(
            rank,
            alpha,
            lr,
            steps,
            batch_size,
            seed,
            train,
            kd_weight,
            lm_weight,
            temperature,
            minutes,
        )
        names = _split(data) if data else []
        for name in names:
            if name != TEXT_DATA:
                check_prompt_data(name)
        resolve_source(dataset)
        ensure_free(save_model, "--save_model")
        check_save_format(save_format)
        if eval_limit is not None and eval_limit <= 0:
            raise SecateursError(f"--eval_limit must be at least 1, got {eval_limit}")
        target = check_device(device)
        check_folder_files(model)
        if distill:
            check_folder_files(distill)
        loaded, tokenizer = load_model(model, cache_dir, trust_remote_code=trust_remote_code)
        teacher = None
        if distill:
            teacher, _ = load_model(distill, cache_dir, trust_remote_code=trust_remote_code)
            check_teacher(loaded, teacher)
        batch = training_batch(tokenizer, names, dataset, nsamples, seqlen, seed)
        windows = load_eval_windows(tokenizer, dataset, seqlen, eval_limit) if eval_limit else None
        before = perplexity(loaded, windows, target, 1, not quiet) if eval_limit else None
        merged, report = finetune(loaded, batch, options, target, not quiet, teacher)
        after = perplexity(merged, windows, target, 1, not quiet) if eval_limit else None
        result = {
            "finetune": report.to_dict() | {"train": train, "teacher": distill},
            "perplexity": {"before": before, "after": after},
        }
        typer.echo(
            f"trained      {names or dataset}: {batch.input_ids.shape[0]} samples, "
            f"{steps} steps, {report.seconds:.1f} s"
        )
        typer.echo(f"loss         {report.first_loss:.3f} -> {report.last_loss:.3f}")
        if eval_limit:
            windows_text = plural(eval_limit, "window")
            typer.echo(f"perplexity   {before:.3f} -> {after:.3f} ({windows_text})")
        typer.echo(
            f"sparsity     {check_sparsity(merged).overall:.4f} "
            f"({report.kept_zeros:,} zero weights kept)"
        )
        # the training's numbers are shown first: a full disk must not cost them as well
        save_pruned_model(merged, tokenizer, save_model, result, save_format)
        typer.echo(f"saved        {save_model}")

    _guarded(action, quiet, debug)


@app.command()
def lowrank(
    model: ModelOpt = _DEFAULTS["model"],
    safety_data: Annotated[
        str, _flag("safety_data", "Prompt/response data whose ranks are removed (align, file).")
    ] = "align",
    utility_data: Annotated[
        str, _flag("utility_data", "Prompt/response data whose ranks are kept (utility, file).")
    ] = "utility",
    utility_ranks: Annotated[
        float,
        _flag(
            "utility_ranks",
            "Share of each layer's rank kept for utility: its top output directions on "
            "--utility_data (the reference's total - rank_pos). 0: remove safety's alone.",
        ),
    ] = 0.75,
    safety_ranks: Annotated[
        float,
        _flag(
            "safety_ranks",
            "Share of each layer's rank considered for safety: its top output directions on "
            "--safety_data (the reference's total - rank_neg).",
        ),
    ] = 0.75,
    nsamples: Annotated[int, _flag("nsamples", "Pairs drawn from each data set.")] = 128,
    seqlen: Annotated[int, _flag("seqlen", "Tokens per pair (longer ones are cut).")] = 256,
    entangle_prompt_feat: Annotated[
        bool, _flag("entangle_prompt_feat", "Count prompt tokens too, not only responses.")
    ] = False,
    dataset: DatasetOpt = _DEFAULTS["dataset"],
    eval_limit: LimitOpt = None,
    eval_attack: Annotated[
        bool, _flag("eval_attack", "ASR on the held-out half of align after the edit.")
    ] = False,
    attack_limit: Annotated[
        int | None, _flag("attack_limit", "Attack only the first N held-out prompts.")
    ] = None,
    attack_max_new_tokens: Annotated[
        int, _flag("attack_max_new_tokens", "Tokens generated per attack prompt.")
    ] = 64,
    save_model: Annotated[str | None, _flag("save_model", "Write the edited model here.")] = None,
    save_json: Annotated[str | None, _flag("save_json", "Write the result as JSON.")] = None,
    batch_size: Annotated[int, _flag("batch_size", "Pairs per forward pass.")] = 8,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    cache_dir: CacheOpt = None,
    trust_remote_code: RemoteOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Low-rank attribution (ActSVD, Wei et al. ICML 2024): remove from every linear layer the
    output directions safety data needs and utility data does not.

    Each layer's weight W becomes W - (I - P_u) P_s W, where P_u projects on the top
    --utility_ranks of the directions of W's outputs on --utility_data and P_s on the top
    --safety_ranks on --safety_data; blocks go in order, each seeing the edits before it.
    Reports the ranks removed per layer and in all, perplexity before and after, and ASR.
    """

    def action() -> None:
        from secateurs.jobs.lowrank import LowRankJob, run_lowrank

        job = LowRankJob(
            model, safety_data, utility_data, utility_ranks, safety_ranks, nsamples, seqlen,
            seed, entangle_prompt_feat, dataset, eval_limit, eval_attack, attack_limit,
            attack_max_new_tokens, save_model, save_json, device, dtype, batch_size, cache_dir,
            trust_remote_code, not quiet,
        )  # fmt: skip
        run_lowrank(job, typer.echo)

    _guarded(action, quiet, debug)


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
    debug: DebugOpt = False,
) -> None:
    """Rewrite a saved model folder as a compressed or dense checkpoint, one shard at a time."""

    def action() -> None:
        from secateurs.config import check_dtype
        from secateurs.formats.checkpoint import convert_folder
        from secateurs.formats.streaming import model_folder
        from secateurs.io import check_folder_files
        from secateurs.jobs.report import fmt_bytes

        cast = check_dtype(dtype) if dtype is not None else None
        source = model_folder(model, cache_dir)
        check_folder_files(source)
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

    _guarded(action, quiet, debug)
