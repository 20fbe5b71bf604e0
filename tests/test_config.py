"""The typed run configuration and the command line generated from it."""

import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import invoke
from typer.testing import CliRunner

from secateurs import __version__
from secateurs.cli import app
from secateurs.config import FLAGS_FILE, PANELS, SPECS, RunConfig, flag_schema
from secateurs.errors import SecateursError
from secateurs.jobs import prune as prune_job
from secateurs.methods.selectivity import SelectivityOptions

# Every flag of `prune` and `compare` before the redesign: each must still be accepted.
PRUNE_FLAGS = [
    "model",
    "prune_method",
    "sparsity_ratio",
    "sparsity_type",
    "scope",
    "dataset",
    "eval_dataset",
    "nsamples",
    "seqlen",
    "seed",
    "batch_size",
    "eval_batch_size",
    "eval_limit",
    "eval_dense",
    "device",
    "dtype",
    "cache_dir",
    "trust_remote_code",
    "save_model",
    "save_format",
    "save_json",
    "save_log",
    "keep_shape",
    "use_recovery",
    "recovery",
    "inverse_wanda_update_fraction",
    "inverse_wanda_max_relative_update",
    "least_squares_damp",
    "recovery_report_fraction",
    "use_variant",
    "neuronrank_max_classes",
    "tau_percentile",
    "top_quantile",
    "idf_clip",
    "spiky_clip",
    "exact_selectivity",
    "idf_form",
    "idf_power",
    "idf_floor",
    "ria_alpha",
    "sparsity_allocation",
    "owl_threshold",
    "owl_lambda",
    "window_bos",
    "prune_data",
    "utility_data",
    "entangle_prompt_feat",
    "save",
    "dump_wanda_score",
    "load_wanda_score",
    "neg_prune",
    "p",
    "q",
    "eval_attack",
    "save_attack_res",
    "attack_max_new_tokens",
    "attack_batch_size",
    "attack_limit",
    "offload",
    "max_memory",
    "eval_zero_shot",
    "zero_shot_limit",
    "zero_shot_batch_size",
    "save_plot",
    "quiet",
    "debug",
]
COMPARE_FLAGS = [
    "model",
    "methods",
    "sparsity_ratios",
    "sparsity_types",
    "dataset",
    "nsamples",
    "seqlen",
    "seed",
    "batch_size",
    "eval_batch_size",
    "eval_limit",
    "device",
    "dtype",
    "cache_dir",
    "trust_remote_code",
    "out",
    "use_variant",
    "neuronrank_max_classes",
    "tau_percentile",
    "top_quantile",
    "idf_clip",
    "spiky_clip",
    "exact_selectivity",
    "idf_forms",
    "idf_power",
    "idf_floor",
    "ria_alpha",
    "window_bos",
    "quiet",
    "debug",
]


def help_text(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", ["prune", "compare"])
def test_help_reads_at_80_columns(command):
    text = help_text(command)
    assert "…" not in text
    assert all(len(line) <= 80 for line in text.splitlines())


def test_prune_help_groups_options_by_stage():
    text = help_text("prune")
    titles = [line.split("─")[1].strip() for line in text.splitlines() if line.startswith("╭─")]
    assert [t for t in titles if t in PANELS] == list(PANELS)


@pytest.mark.parametrize(("command", "flags"), [("prune", PRUNE_FLAGS), ("compare", COMPARE_FLAGS)])
def test_every_flag_of_before_is_listed(command, flags):
    text = help_text(command)
    missing = [flag for flag in flags if f"--{flag} " not in text and f"--{flag}\n" not in text]
    assert not missing


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"secateurs {__version__}"


@pytest.fixture
def captured(monkeypatch):
    """The configuration `secateurs prune` would run, without running it."""
    seen = []

    def fake(cfg, log=print):
        seen.append(cfg)
        return {"rank": 0}

    monkeypatch.setattr(prune_job, "run_prune", fake)
    return seen


def test_flags_reach_their_sections(captured):
    args = ["prune", "--sparsity_ratio", "0.3", "--nsamples", "7", "--no_eval_dense"]
    args += ["--prune_method", "wanda_idf", "--idf_form", "smooth", "--quiet"]
    assert invoke(*args).exit_code == 0
    cfg = captured[0]
    assert cfg.sparsity.sparsity_ratio == 0.3 and cfg.data.nsamples == 7
    assert cfg.evaluation.eval_dense is False and cfg.execution.progress is False
    assert cfg.method.options == SelectivityOptions(idf_form="smooth")


def test_dashed_spellings_mean_the_same(captured):
    underscored = ["--sparsity_ratio", "0.3", "--use_recovery", "--eval_zero_shot"]
    dashed = ["--sparsity-ratio=0.3", "--use-recovery", "--eval-zero-shot"]
    for args in (underscored, dashed):
        assert invoke("prune", *args, "--quiet").exit_code == 0
    assert captured[0] == captured[1]
    assert captured[0].evaluation.eval_zero_shot  # a bare flag means the paper's tasks


def test_defaults_are_written_once():
    cfg = RunConfig()
    assert cfg.flags()["sparsity_ratio"] == 0.5 and cfg.method.prune_method == "wanda"
    assert RunConfig.from_flags(**cfg.flags()) == cfg


def test_replace_switches_method_and_keeps_shared_options():
    cfg = RunConfig.from_flags(prune_method="wanda_select", tau_percentile=0.7)
    spiky = cfg.replace(prune_method="wanda_spiky")
    assert spiky.method.options.tau_percentile == 0.7
    assert not hasattr(spiky.method.options, "idf_form")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"nsamples": 0}, "--nsamples must be at least 1"),
        ({"dtype": "int8"}, "--dtype must be one of"),
        ({"scope": "column"}, "--scope must be one of"),
        ({"recovery": "magic"}, "unknown --recovery"),
        ({"offload": "tape"}, "--offload must be one of"),
        ({"prune_method": "nope"}, "unknown pruning method"),
        ({"prune_method": "ria", "ria_alpha": -1.0}, "--ria_alpha"),
        ({"prune_method": "sparsegpt", "sparsegpt_damp": 0.0}, "--sparsegpt_damp"),
    ],
)
def test_each_spec_checks_its_own_fields(flags, message):
    with pytest.raises(SecateursError, match=message):
        RunConfig.from_flags(**flags)


def test_unknown_setting_is_refused():
    with pytest.raises(TypeError, match="unknown settings: sparsity"):
        RunConfig.from_flags(sparsity=0.5)


def test_specs_are_frozen():
    cfg = RunConfig()
    for name in SPECS:
        with pytest.raises(dataclasses.FrozenInstanceError):
            getattr(cfg, name).x = 1


def test_the_command_lines_flag_file_matches_the_code():
    stored = json.loads(FLAGS_FILE.read_text())
    assert stored == json.loads(json.dumps(flag_schema())), "flags.json is stale: run `make flags`"


def test_help_imports_neither_torch_nor_the_methods():
    code = (
        "import sys; from secateurs.cli import app; from typer.testing import CliRunner; "
        "CliRunner().invoke(app, ['prune', '--help']); "
        "print(sorted(m for m in ('torch', 'transformers', 'secateurs.methods') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
