import json

import pytest
import torch
from conftest import invoke, invoke_prune
from transformers import AutoModelForCausalLM

from secateurs.core.model import iter_prunable, weight_matrix
from secateurs.jobs import session


@pytest.fixture
def no_model_load(monkeypatch):
    """Bad input must be refused before the weights are loaded."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(session, "load_model", forbidden)


def test_help_teaches_the_flags():
    result = invoke("prune", "--help")
    assert result.exit_code == 0
    for flag in (
        "--sparsity_ratio",
        "--sparsity_type",
        "--nsamples",
        "--save_model",
        "--eval_limit",
        "--prune_method",
        "wiki-sample",
    ):
        assert flag in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sparsity_ratio", "1.0"], "[0, 1)"),
        (["--sparsity_ratio", "-0.2"], "[0, 1)"),
        (["--sparsity_type", "3:2"], "0 < N < M"),
        (["--sparsity_type", "2:0"], "0 < N < M"),
        (["--sparsity_type", "block"], "unknown --sparsity_type"),
        (["--prune_method", "sparsegpt2"], "unknown pruning method"),
        (["--dataset", "nowhere-text"], "unknown dataset"),
        (["--nsamples", "0"], "--nsamples must be at least 1"),
        (["--seqlen", "100000"], "longer than the model's context"),
        (["--nsamples", "5000", "--seqlen", "64"], "lower --nsamples"),
        (["--model", "no/such-model-here"], "could not load model"),
        (["--device", "cuda:0"], "no CUDA GPU"),
        (["--use_recovery", "--recovery_report_fraction", "0"], "report_fraction"),
        (["--use_recovery", "--inverse_wanda_update_fraction", "1.5"], "update_fraction"),
        (["--sparsity_type", "2:4", "--use_variant"], "--use_variant"),
        (
            ["--prune_method", "neuronrank_fisher", "--neuronrank_max_classes", "0"],
            "neuronrank_max_classes must be > 0",
        ),
        (["--prune_method", "wanda_idf", "--tau_percentile", "1.2"], "tau_percentile"),
        (["--prune_method", "wanda_idf", "--idf_form", "bm25"], "unknown --idf_form 'bm25'"),
        (["--prune_method", "sparsegpt", "--use_recovery"], "drop --use_recovery"),
        (["--prune_method", "sparsegpt", "--sparsity_type", "neuron"], "not neuron"),
        (["--prune_method", "sparsegpt", "--use_variant"], "drop --use_variant"),
        (["--prune_method", "ria", "--ria_alpha", "-1"], "--ria_alpha must be"),
        (["--sparsity_allocation", "owl", "--sparsity_type", "2:4"], "2:4 fixes it"),
        (["--sparsity_allocation", "owl", "--owl_lambda", "0.7"], "--owl_lambda must be"),
        (["--sparsity_allocation", "owl", "--owl_threshold", "0"], "--owl_threshold must be"),
        (["--sparsity_allocation", "no/such/file.json"], "neither uniform nor owl"),
    ],
)
def test_bad_input_fails_fast_with_a_fix(args, message, tiny_model_dir, text_dir, no_model_load):
    base = ["prune", "--model", tiny_model_dir, "--dataset", text_dir, "--quiet"]
    if "--model" in args:
        base = ["prune", "--dataset", text_dir, "--quiet"]
    if args[:2] == ["--device", "cuda:0"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = invoke(*base, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_existing_output_is_refused_before_work(tmp_path, tiny_model_dir, text_dir, no_model_load):
    out = tmp_path / "exists"
    out.mkdir()
    result = invoke("prune", "--model", tiny_model_dir, "--dataset", text_dir, "--save_model", out)
    assert result.exit_code == 2 and "already exists" in result.output


def test_n_m_that_does_not_divide_the_columns(tiny_model_dir, text_dir):
    result = invoke_prune(tiny_model_dir, text_dir, "--nsamples", "4", "--sparsity_type", "2:128")
    assert result.exit_code == 2 and "multiples of 128" in result.output


def test_prune_save_and_reload(tmp_path, tiny_model_dir, text_dir):
    saved, report = tmp_path / "pruned", tmp_path / "run.json"
    log = tmp_path / "run.log"
    result = invoke_prune(
        tiny_model_dir,
        text_dir,
        *("--nsamples", "8", "--sparsity_type", "2:4", "--save_model", saved),
        *("--save_json", report, "--save_log", log),
    )
    assert result.exit_code == 0, result.output
    assert "dense ppl" in result.output and "pruned ppl" in result.output
    data = json.loads(report.read_text())
    assert data["sparsity"]["overall"] == pytest.approx(0.5)
    assert data["sparsity"]["violations"] == []
    assert data["config"]["sparsity_type"] == "2:4"
    assert data["perplexity"]["pruned"] > 0 and data["perplexity"]["dense"] > 0
    assert {"torch", "transformers", "secateurs"} <= set(data["versions"])
    assert data["memory"]["peak_rss"] > 0 and data["timings"]["prune"] > 0
    assert "per-layer sparsity" in log.read_text()
    assert (saved / "model.safetensors").is_file() and (saved / "secateurs.json").is_file()

    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    for _, layer in iter_prunable(reloaded):
        weight = weight_matrix(layer)
        assert torch.equal(
            (weight == 0).view(weight.shape[0], -1, 4).sum(-1),
            torch.full((weight.shape[0], weight.shape[1] // 4), 2),
        )
    again = invoke("eval", "--model", saved, "--dataset", text_dir, "--seqlen", "32", "--quiet")
    assert again.exit_code == 0, again.output
    assert f"{data['perplexity']['pruned']:.3f}" in again.output
    assert "sparsity     0.5000" in again.output


def test_interrupted_run_leaves_no_output(tmp_path, tiny_model_dir, text_dir, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("secateurs.jobs.result.write_json", interrupt)
    saved = tmp_path / "pruned"
    result = invoke_prune(
        tiny_model_dir,
        text_dir,
        *("--nsamples", "4", "--save_model", saved, "--save_json", tmp_path / "r.json"),
        "--no_eval_dense",
    )
    assert result.exit_code == 130
    assert "interrupted" in result.output
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("tiny-llama", "text")]
    assert leftovers == ["pruned"]  # the model folder landed whole before the interrupt
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


def test_help_names_the_default_idf_form(monkeypatch):
    from secateurs.methods.selectivity import DEFAULT_IDF_FORM

    monkeypatch.setenv("COLUMNS", "400")  # one line per option, so the phrase is not wrapped
    result = invoke("prune", "--help")
    assert "--idf_form" in result.output and f"default {DEFAULT_IDF_FORM}" in result.output


def test_guard_findings_reach_the_output_json_and_log(
    tmp_path, tiny_model_dir, text_dir, monkeypatch
):
    from secateurs.methods import registry
    from secateurs.methods.wanda import wanda_score

    def kill_busiest(weight, stats):
        score = wanda_score(weight, stats)
        score[:, stats.sq_norm.argsort(descending=True)[: score.shape[1] // 4]] = 0.0
        return score

    broken = registry.Method("wanda", "zeroes the busiest channels", kill_busiest, scope="row")
    monkeypatch.setitem(registry.METHODS, "wanda", broken)
    report, log = tmp_path / "run.json", tmp_path / "run.log"
    result = invoke_prune(
        tiny_model_dir, text_dir, "--nsamples", "4", "--save_json", report, "--save_log", log
    )
    assert result.exit_code == 0, result.output
    assert "WARNING" in result.output
    guard = json.loads(report.read_text())["prune"]["guard"]
    assert guard and all(alarm["energy_share"] >= 0.05 for alarm in guard.values())
    assert "channel guard: layers whose scores are zero" in log.read_text()
    assert next(iter(guard)) in log.read_text()


def _prune_with_outputs(tmp_path, model_dir, text_dir, *args) -> tuple[str, dict, str]:
    """A successful prune's printed output, its JSON result and its log."""
    report, log = tmp_path / "run.json", tmp_path / "run.log"
    result = invoke_prune(
        model_dir, text_dir, "--nsamples", "4", *args, "--save_json", report, "--save_log", log
    )
    assert result.exit_code == 0, result.output
    return result.output, json.loads(report.read_text()), log.read_text()


def test_idf_form_is_named_in_the_result(tmp_path, tiny_model_dir, text_dir):
    output, data, log = _prune_with_outputs(
        tmp_path, tiny_model_dir, text_dir, "--prune_method", "wanda_idf", "--idf_form", "relative"
    )
    assert data["idf_form"] == "relative" and data["prune"]["guard"] == {}
    assert "IDF form relative" in output
    assert "channel guard: no layer" in log


def test_a_run_without_calibration_says_so(tmp_path, tiny_model_dir, text_dir):
    output, data, log = _prune_with_outputs(
        tmp_path, tiny_model_dir, text_dir, "--prune_method", "magnitude"
    )
    assert "calibration      none: magnitude scores the weights alone" in output
    assert data["calibration"] == {} and data["prune"]["guard"] is None
    assert "channel guard" not in log  # it never looked: no activations


def test_our_warnings_are_one_plain_line(tmp_path, tiny_model_dir, text_dir):
    ratios = tmp_path / "ratios.json"
    ratios.write_text("[0.2, 0.2, 0.2]")
    result = invoke_prune(
        tiny_model_dir,
        text_dir,
        *("--nsamples", "4", "--eval_limit", "2", "--sparsity_allocation", ratios),
    )
    assert result.exit_code == 0, result.output
    assert "warning: the ratios in" in result.output
    assert "UserWarning" not in result.output and "allocation.py" not in result.output


def test_owl_run_reports_its_block_ratios(tmp_path, tiny_model_dir, text_dir):
    out = tmp_path / "owl.json"
    result = invoke_prune(
        tiny_model_dir,
        text_dir,
        *("--prune_method", "sparsegpt", "--sparsity_ratio", "0.6", "--nsamples", "4"),
        *("--sparsity_allocation", "owl", "--owl_threshold", "2", "--eval_limit", "2"),
        *("--save_json", out),
    )
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    ratios = saved["prune"]["block_ratios"]
    assert len(ratios) == 3 and all(0 <= r < 1 for r in ratios)
    assert saved["prune"]["allocation"]["kind"] == "owl"
    assert saved["prune"]["allocation"]["outlier_pass_s"] > 0
    assert saved["prune"]["allocation"]["mean_ratio"] == pytest.approx(0.6)
    assert "owl block ratios (mean 0.6000)" in result.output
    assert not saved["sparsity"]["violations"]
