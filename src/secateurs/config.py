"""One typed run configuration: nested, frozen specs, each checking its own fields.

Every setting is a :func:`secateurs.core.spec.setting` field that names its command-line flag
(the reference scripts' spelling), its help line, and through its spec its help panel; the
``prune`` and ``compare`` commands are generated from these fields, so a default is written
once. A method's own settings (RIA's alpha, SparseGPT's block size, the selectivity options)
live in its options class beside its code (:mod:`secateurs.methods`), and ``MethodSpec``
holds an instance for the chosen method.

Checks here need nothing but the values; what needs the machine, the files or the method's
capabilities is checked once, when :func:`secateurs.jobs.plan.resolve` turns a configuration
into a plan.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from secateurs.core.patterns import DEFAULT_RATIO, SCOPES
from secateurs.core.spec import (
    flagged_fields,
    from_flags,
    require_positive,
    setting,
    to_flags,
)
from secateurs.data.text import check_window_bos
from secateurs.errors import SecateursError
from secateurs.evaluate.zeroshot import DEFAULT_TASKS
from secateurs.formats.checkpoint import check_save_format
from secateurs.methods import METHODS, get_method
from secateurs.methods.dsnot import REFINES, DSnoTOptions
from secateurs.methods.registry import option_classes
from secateurs.methods.selectivity import DEFAULT_IDF_FORM, IDF_FORMS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OFFLOAD_MODES = ("auto", "none", "disk")
RECOVERIES = ("inverse_wanda", "least_squares")
RECONSTRUCTIONS = ("none", "pruned", "dense")
# The scores wandg_set_difference can take the difference of (methods with a whole-model pass).
SET_DIFFERENCE_SCORES = ("wandg", "wanda_v2")
# What `secateurs compare` runs without --methods.
COMPARE_METHODS = ("wanda", "wanda_idf", "wanda_spiky", "wanda_select", "magnitude")
# The command line's view of the flags, written by `make flags` (see flag_schema).
FLAGS_FILE = Path(__file__).with_name("flags.json")


def check_dtype(name: str) -> torch.dtype:
    """The torch dtype that ``--dtype name`` asks for, or a clear error."""
    if name not in DTYPES:
        raise SecateursError(f"--dtype must be one of {', '.join(DTYPES)}, got '{name}'")
    return DTYPES[name]


def _one_of(value: str | None, choices: tuple[str, ...], flag: str) -> None:
    if value is not None and value not in choices:
        raise SecateursError(f"--{flag} must be one of {', '.join(choices)}, got '{value}'")


@dataclass(frozen=True)
class ModelSpec:
    """Which model, in which dtype, from where."""

    PANEL: ClassVar[str] = "Model"

    model: str = setting(
        "smollm2-135m",
        "Hub id, local folder, or built-in name (smollm2-135m, gemma3-270m: offline).",
    )
    dtype: str = setting("float32", f"Weights dtype: {', '.join(DTYPES)}.")
    cache_dir: str | None = setting(None, "Hugging Face download cache folder.")
    trust_remote_code: bool = setting(
        False, "Run model code from the hub (off unless you trust it)."
    )

    def __post_init__(self) -> None:
        check_dtype(self.dtype)


@dataclass(frozen=True)
class DataSpec:
    """The calibration (or scoring) data and how it is cut into windows."""

    PANEL: ClassVar[str] = "Data"

    dataset: str = setting(
        "wiki-sample", "Calibration text: wiki-sample (built in), wikitext2, c4, ptb, a path."
    )
    nsamples: int = setting(128, "Calibration windows.")
    seqlen: int | None = setting(
        None, "Tokens per window; default 2048 capped by the model's context."
    )
    seed: int = setting(0, "Seed for drawing calibration windows.")
    batch_size: int | None = setting(
        None,
        "Calibration windows per forward pass through a block (default 8; 1 when streaming "
        "from disk, where it holds less at the same speed).",
    )
    window_bos: str = setting(
        "auto",
        "Start every calibration and evaluation window with BOS: auto (for families that need "
        "it, such as Gemma; LLaMA/OPT-style models keep the reference windows), always, never. "
        "A window stays --seqlen tokens, BOS included.",
    )
    prune_data: str | None = setting(
        None,
        "Prompt/response scoring data instead of --dataset: align (HarmBench prompts with "
        "refusals, scoring half), utility (wiki-sample pairs), or a .jsonl/.csv file.",
    )
    entangle_prompt_feat: bool = setting(
        False, "Count prompt tokens too (default: response tokens only)."
    )

    def __post_init__(self) -> None:
        require_positive(self.nsamples, "nsamples")
        require_positive(self.batch_size, "batch_size")
        check_window_bos(self.window_bos)


def _method_help() -> str:
    return ", ".join(sorted(METHODS)) + " (`secateurs methods` says what each does)."


@dataclass(frozen=True)
class MethodSpec:
    """The pruning method and its own options (an instance of the method's options class)."""

    PANEL: ClassVar[str] = "Method"

    prune_method: str = setting("wanda", "Pruning method: " + _method_help())
    options: Any = None

    def __post_init__(self) -> None:
        method = get_method(self.prune_method)
        if self.options is None:
            object.__setattr__(self, "options", method.make_options())
        elif method.options is None or not isinstance(self.options, method.options):
            raise TypeError(
                f"{method.name} takes options of type "
                f"{method.options.__name__ if method.options else 'None'}, "
                f"not {type(self.options).__name__}"
            )


@dataclass(frozen=True)
class SparsitySpec:
    """How much to prune, in which pattern, and how the budget spreads over the blocks."""

    PANEL: ClassVar[str] = "Sparsity"

    sparsity_ratio: float = setting(DEFAULT_RATIO, "Fraction of weights to remove, in [0, 1).")
    sparsity_type: str = setting(
        "unstructured",
        "unstructured; N:M such as 2:4 or 4:8 (ratio = N/M); neuron (whole MLP neurons).",
    )
    scope: str | None = setting(
        None, "Unstructured comparison group: row or layer (default: the method's)."
    )
    use_variant: bool = setting(
        False,
        "Wanda variant: per-row counts from a cumulative-score threshold (unstructured only).",
    )
    sparsity_allocation: str = setting(
        "uniform",
        "Sparsity per decoder block: uniform; owl (blocks with more outlier scores keep more "
        "weights; one extra pass over the dense model; unstructured only); or a file with one "
        "ratio per block (JSON list or one number per line).",
    )
    owl_threshold: float = setting(5.0, "OWL: a score above this x its block's mean is an outlier.")
    owl_lambda: float = setting(0.08, "OWL: block ratios span target +- this, in [0, 0.5).")
    refine: str = setting(
        "none",
        "none; dsnot: prune-and-grow cycles refine each layer's mask towards a zero expected "
        "output shift, at about the method's cost (unstructured and N:M).",
    )
    dsnot_cycles: int = setting(50, "dsnot: most prune-and-grow cycles per layer.")
    dsnot_threshold: float = setting(
        0.1, "dsnot: a row stops once its |expected output shift| is below this."
    )
    dsnot_var_power: float = setting(
        1.0, "dsnot: growing divides by the input variance to this power (0: ignore it)."
    )

    def __post_init__(self) -> None:
        _one_of(self.scope, SCOPES, "scope")
        _one_of(self.refine, REFINES, "refine")
        DSnoTOptions(self.dsnot_cycles, self.dsnot_threshold, self.dsnot_var_power)


@dataclass(frozen=True)
class RecoverySpec:
    """What happens to the surviving weights after each layer is pruned."""

    PANEL: ClassVar[str] = "Recovery"

    use_recovery: bool = setting(
        False, "After pruning each layer, give the lost signal to its survivors."
    )
    recovery: str = setting(
        "inverse_wanda",
        "inverse_wanda: the seed's first-moment rule, cheap; least_squares: minimise the "
        "layer's output error (ridge, conjugate gradients), stronger.",
    )
    inverse_wanda_update_fraction: float = setting(
        0.3, "Fraction of survivors per row updated, (0, 1]."
    )
    inverse_wanda_max_relative_update: float = setting(2.0, "Cap: |dW| <= this x |W|; must be > 0.")
    least_squares_damp: float = setting(
        0.01, "Ridge damping, relative to the mean Hessian diagonal."
    )
    recovery_report_fraction: float = setting(
        0.0625,
        "Share of calibration tokens the error report samples, (0, 1]; 1 = exact "
        "(least_squares always reports exactly).",
    )
    reconstruct: str = setting(
        "none",
        "Block reconstruction after each block is pruned (any method, with or without "
        "--use_recovery): refit o_proj and down_proj on their surviving weights so the "
        "attention and the block outputs match the unpruned ones. pruned: the unpruned block "
        "on the pruned model's stream (the better of the two on SmolLM2, BENCHMARKS.md); "
        "dense: the dense model's block on its own stream (aims to correct earlier blocks' "
        "drift too); none.",
    )
    reconstruct_epochs: int = setting(
        0,
        "--reconstruct: then train every surviving weight of the block (Adam, pruned weights "
        "kept zero) towards the unpruned block's output, this many passes over the "
        "calibration windows; 0 refits only.",
    )
    reconstruct_lr: float = setting(1e-4, "--reconstruct_epochs: Adam's learning rate.")

    def __post_init__(self) -> None:
        if self.recovery not in RECOVERIES:
            raise SecateursError(
                f"unknown --recovery '{self.recovery}'; choose one of: {', '.join(RECOVERIES)}"
            )
        _one_of(self.reconstruct, RECONSTRUCTIONS, "reconstruct")


@dataclass(frozen=True)
class SafetySpec:
    """Score files, the set difference of safety and utility scores, and the attack."""

    PANEL: ClassVar[str] = "Safety"

    utility_data: str = setting(
        "utility", "wandg_set_difference: the utility prompt/response data."
    )
    set_difference_score: str = setting(
        "wandg",
        "wandg_set_difference: the score of both sets, wandg (gradients) or wanda_v2 "
        "(activation norms).",
    )
    use_diff: bool = setting(
        False,
        "Score what fine-tuning changed: |W - W_base| in place of |W| (needs --base_model).",
    )
    base_model: str | None = setting(
        None, "--use_diff: the model --model was fine-tuned from (the same layers)."
    )
    save: str | None = setting(None, "Folder for score files and attack responses.")
    dump_wanda_score: bool = setting(
        False, "Write the raw scores under --save and stop without pruning."
    )
    load_wanda_score: bool = setting(
        False, "Prune from scores dumped under --save (no calibration)."
    )
    neg_prune: bool = setting(False, "Prune the highest scores instead of the lowest.")
    p: float = setting(0.02, "wandg_set_difference: top fraction by utility score that is kept.")
    q: float = setting(0.02, "wandg_set_difference: top fraction by safety score considered.")
    eval_attack: bool = setting(False, "ASR on the held-out half of align after pruning.")
    save_attack_res: bool = setting(False, "Save the attack responses as JSONL under --save.")
    attack_max_new_tokens: int = setting(64, "Tokens generated per attack prompt.")
    attack_batch_size: int = setting(8, "Prompts per generation batch.")
    attack_limit: int | None = setting(None, "Attack only the first N held-out prompts.")
    attack_samples: int = setting(
        0,
        "Also N sampled answers per prompt without a system prompt (the paper uses 5); a "
        "prompt counts as answered if any is. Seeded by --seed.",
    )

    def __post_init__(self) -> None:
        _one_of(self.set_difference_score, SET_DIFFERENCE_SCORES, "set_difference_score")
        if self.use_diff and not self.base_model and not self.load_wanda_score:
            raise SecateursError(
                "--use_diff scores |W - W_base|: name the model --model was fine-tuned from "
                "with --base_model"
            )
        if self.base_model and not self.use_diff:
            raise SecateursError("--base_model is read by --use_diff; add --use_diff")
        require_positive(self.attack_max_new_tokens, "attack_max_new_tokens")
        require_positive(self.attack_batch_size, "attack_batch_size")
        require_positive(self.attack_limit, "attack_limit")
        if self.attack_samples < 0:
            raise SecateursError(f"--attack_samples must be 0 or more, got {self.attack_samples}")


@dataclass(frozen=True)
class EvaluationSpec:
    """What the dense and pruned models are measured on."""

    PANEL: ClassVar[str] = "Evaluation"

    eval_dataset: str | None = setting(
        None, "Evaluation text (default: the test split of --dataset)."
    )
    eval_batch_size: int = setting(1, "Windows per evaluation forward pass.")
    eval_limit: int | None = setting(None, "Evaluate only the first N windows (quick runs).")
    eval_dense: bool = setting(True, "Also evaluate the dense model.")
    eval_zero_shot: str | None = setting(
        None,
        "Zero-shot accuracy through lm-evaluation-harness, comma-separated tasks: wiki-cloze "
        "(built in, offline) or lm-eval task names (their data come from the hub). Without a "
        "value: the Wanda paper's seven tasks.",
    )
    zero_shot_limit: int | None = setting(
        None, "Zero-shot: only the first N examples of each task."
    )
    zero_shot_batch_size: int = setting(8, "Zero-shot: requests per forward pass.")

    def __post_init__(self) -> None:
        require_positive(self.eval_limit, "eval_limit")
        require_positive(self.eval_batch_size, "eval_batch_size")
        if self.eval_zero_shot is None:
            require_positive(self.zero_shot_limit, "zero_shot_limit")


@dataclass(frozen=True)
class OutputSpec:
    """What the run writes."""

    PANEL: ClassVar[str] = "Output"

    save_model: str | None = setting(None, "Write the pruned model here (Hugging Face folder).")
    save_format: str = setting(
        "dense",
        "How --save_model stores weights: dense (plain safetensors, loads anywhere) or "
        "compressed (lossless: each sparse weight as a bitmask plus its nonzeros, every value "
        "byte-coded; a 50% SmolLM2 in fp16 is 0.54x the dense fp16 file; loads with "
        "transformers' from_pretrained after `import secateurs`, and in secateurs eval).",
    )
    save_json: str | None = setting(None, "Write the run's result as JSON.")
    save_log: str | None = setting(None, "Write a readable summary here.")
    save_plot: str | None = setting(
        None, "Write a PNG of per-layer sparsity (and recovery error) by block and sublayer."
    )
    keep_shape: bool = setting(
        False,
        "With --sparsity_type neuron, save pruned neurons as zeros instead of cutting them "
        "out (by default the saved MLPs are narrower: a smaller, faster model).",
    )

    def __post_init__(self) -> None:
        check_save_format(self.save_format)


@dataclass(frozen=True)
class ExecutionSpec:
    """Where and how the work runs."""

    PANEL: ClassVar[str] = "Execution"

    device: str = setting("cpu", "Compute device; the model stays on the CPU.")
    offload: str = setting(
        "auto",
        "Where the weights wait: none (all in memory); disk (a skeleton in memory, each block "
        "read from the safetensors shards when reached, written to --save_model when pruned, "
        "then freed; needs --save_model); auto (disk when the weights exceed --max_memory).",
    )
    max_memory: str | None = setting(
        None, "Memory the weights may take, e.g. 8GB; more streams from disk."
    )
    progress: bool = True

    def __post_init__(self) -> None:
        _one_of(self.offload, OFFLOAD_MODES, "offload")


SPECS: dict[str, type] = {
    "model": ModelSpec,
    "data": DataSpec,
    "method": MethodSpec,
    "sparsity": SparsitySpec,
    "recovery": RecoverySpec,
    "safety": SafetySpec,
    "evaluation": EvaluationSpec,
    "output": OutputSpec,
    "execution": ExecutionSpec,
}
PANELS = tuple(spec.PANEL for spec in SPECS.values())


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a pruning run, by stage."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    method: MethodSpec = field(default_factory=MethodSpec)
    sparsity: SparsitySpec = field(default_factory=SparsitySpec)
    recovery: RecoverySpec = field(default_factory=RecoverySpec)
    safety: SafetySpec = field(default_factory=SafetySpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    execution: ExecutionSpec = field(default_factory=ExecutionSpec)

    @classmethod
    def from_flags(cls, **values: Any) -> RunConfig:
        """A configuration from flag values (as the command line names them); the method's
        options are read from the flags of its options class. Unknown names are an error."""
        unknown = set(values) - set(all_flags()) - {"progress"}
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        sections = {name: from_flags(spec, values) for name, spec in SPECS.items()}
        for options in option_classes():  # a bad value is refused whichever method reads it
            from_flags(options, values)
        method = get_method(sections["method"].prune_method)
        sections["method"] = MethodSpec(method.name, method.make_options(values))
        if "progress" in values:
            sections["execution"] = dataclasses.replace(
                sections["execution"], progress=values["progress"]
            )
        return cls(**sections)

    def flags(self) -> dict[str, Any]:
        """Every setting by flag name, the chosen method's options included (for results)."""
        out: dict[str, Any] = {}
        for name in SPECS:
            out |= to_flags(getattr(self, name))
            if name == "method" and self.method.options is not None:
                out |= to_flags(self.method.options)
        return out | {"progress": self.execution.progress}

    def replace(self, **values: Any) -> RunConfig:
        """This configuration with some flags changed; a new method takes its own options from
        the flags given, else keeps the current values of flags its options share."""
        return RunConfig.from_flags(**(self.flags() | values))


def all_flags() -> dict[str, tuple[type, Any]]:
    """Every flag of a run: its settings class and field, specs first, then method options."""
    out: dict[str, tuple[type, Any]] = {}
    for spec in [*SPECS.values(), *option_classes()]:
        for f, flag in flagged_fields(spec):
            out.setdefault(flag.name, (spec, f))
    return out


def settings_classes() -> list[type]:
    """The run's settings classes in help order: each spec, method options after the method."""
    classes: list[type] = []
    for spec in SPECS.values():
        classes.append(spec)
        if spec.PANEL == "Method":
            classes.extend(option_classes())
    return classes


def _type_name(hint: Any) -> str:
    """``str``, ``int``, ``float`` or ``bool``, with ``?`` where None is allowed."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    return base.__name__ + ("?" if args else "")


def flag_schema() -> dict[str, Any]:
    """What the command line shows of the configuration: every flag's type, default, help and
    panel, in help order, and the lists that help texts name.

    The command line reads it from ``flags.json`` so that ``--help`` needs neither torch nor
    the methods; a test keeps the file equal to this (``make flags`` writes it).
    """
    flags: dict[str, dict[str, Any]] = {}
    for cls in settings_classes():
        hints = typing.get_type_hints(cls)
        panel = getattr(cls, "PANEL", "Method")
        for f, flag in flagged_fields(cls):
            flags.setdefault(
                flag.name,
                {
                    "type": _type_name(hints[f.name]),
                    "default": f.default,
                    "help": flag.help,
                    "panel": panel,
                },
            )
    return {
        "flags": flags,
        "methods": sorted(METHODS),
        "compare_methods": list(COMPARE_METHODS),
        "idf_forms": list(IDF_FORMS),
        "default_idf_form": DEFAULT_IDF_FORM,
        "default_tasks": list(DEFAULT_TASKS),
        "dtypes": list(DTYPES),
    }


def write_flag_schema(path: Path = FLAGS_FILE) -> None:
    """Write :func:`flag_schema` where the command line reads it."""
    path.write_text(json.dumps(flag_schema(), indent=1) + "\n")
