import csv
import json

import pytest
from conftest import VOCAB
from test_cli import invoke

from secateurs.config import RunConfig
from secateurs.errors import SecateursError
from secateurs.jobs import compare, session
from secateurs.jobs.compare import plan_runs, run_compare, run_key


def base_config(model_dir, text_dir, **overrides) -> dict:
    """The base flags of a comparison (each run adds its method, pattern and ratio)."""
    settings = {
        "model": str(model_dir),
        "dataset": str(text_dir),
        "nsamples": 4,
        "seqlen": 32,
        "eval_limit": 4,
        "progress": False,
        "neuronrank_max_classes": VOCAB // 4,
    }
    return settings | overrides


def key(flags: dict) -> str:
    return run_key(RunConfig.from_flags(**flags))


def compare_cli(model_dir, text_dir, tmp_path, *args):
    common = ["--model", str(model_dir), "--dataset", str(text_dir), "--quiet"]
    return invoke("compare", *common, "--out", str(tmp_path / "cmp"), *args)


def test_plan_runs_n_m_once_at_its_ratio_and_checks_everything(tiny_model_dir, text_dir):
    base = base_config(tiny_model_dir, text_dir)
    runs = plan_runs(base, ["wanda", "magnitude"], ["unstructured", "2:4"], [0.3, 0.6])
    assert all(isinstance(r, RunConfig) for r in runs)
    assert [
        (r.method.prune_method, r.sparsity.sparsity_type, r.sparsity.sparsity_ratio) for r in runs
    ] == [
        ("wanda", "unstructured", 0.3),
        ("magnitude", "unstructured", 0.3),
        ("wanda", "unstructured", 0.6),
        ("magnitude", "unstructured", 0.6),
        ("wanda", "2:4", 0.5),
        ("magnitude", "2:4", 0.5),
    ]
    with pytest.raises(SecateursError, match="unknown pruning method"):
        plan_runs(base, ["wanda", "nope"], ["unstructured"], [0.5])
    with pytest.raises(SecateursError, match="sparsity_ratio"):
        plan_runs(base, ["wanda"], ["unstructured"], [1.5])


def test_run_key_ignores_only_what_cannot_change_results(tiny_model_dir, text_dir):
    base = base_config(tiny_model_dir, text_dir)
    assert key(base) == key(base | {"progress": True})
    assert key(base) != key(base | {"seed": 1})
    idf = base | {"prune_method": "wanda_idf"}
    assert key(idf) != key(idf | {"idf_clip": 5.0})
    assert key(base) == key(base | {"idf_clip": 5.0})  # wanda reads no IDF
    fisher = base | {"prune_method": "neuronrank_fisher"}
    assert key(fisher) != key(fisher | {"neuronrank_max_classes": 8})


def test_compare_writes_table_csv_json_plot_and_resumes(
    tiny_model_dir, text_dir, tmp_path, monkeypatch
):
    base = base_config(tiny_model_dir, text_dir)
    out = tmp_path / "cmp"
    methods = ["wanda", "wanda_select", "neuronrank_fisher", "magnitude"]
    first = run_compare(base, methods, ["unstructured", "2:4"], [0.5], out, log=lambda _m: None)
    assert len(first.rows) == 8
    assert all(r["pattern_met"] for r in first.rows)
    wanda = [r for r in first.rows if r["method"] == "wanda"]
    assert all(r["change_vs_wanda"] == 0 for r in wanda)
    table = (out / "comparison.md").read_text()
    assert "| wanda_select | 2:4 | 0.5000 |" in table and "| dense |" in table
    with open(out / "comparison.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 8
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["dense_ppl"] == first.dense_ppl and len(saved["rows"]) == 8
    assert (out / "ppl_vs_sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def forbidden(*_args, **_kwargs):
        raise AssertionError("a cached run was run again")

    monkeypatch.setattr(compare, "_one_run", forbidden)
    monkeypatch.setattr(compare, "load", forbidden)
    again = run_compare(base, methods, ["unstructured", "2:4"], [0.5], out, log=lambda _m: None)
    assert again.rows == first.rows and again.dense_ppl == first.dense_ppl

    # a sweep that stopped part-way continues with only the missing runs
    monkeypatch.undo()
    (out / "runs" / f"{run_key(plan_runs(base, ['magnitude'], ['2:4'], [0.5])[0])}.json").unlink()
    ran = []
    original = compare._one_run
    monkeypatch.setattr(
        compare, "_one_run", lambda plan, p: ran.append(plan.config) or original(plan, p)
    )
    resumed = run_compare(base, methods, ["unstructured", "2:4"], [0.5], out, log=lambda _m: None)
    assert [(c.method.prune_method, c.sparsity.sparsity_type) for c in ran] == [
        ("magnitude", "2:4")
    ]
    assert [r["ppl_test"] for r in resumed.rows] == pytest.approx(
        [r["ppl_test"] for r in first.rows]
    )


def test_compare_command_fails_before_loading_anything(
    tiny_model_dir, text_dir, tmp_path, monkeypatch
):
    def forbidden(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(session, "load_model", forbidden)
    result = compare_cli(
        tiny_model_dir,
        text_dir,
        tmp_path,
        "--methods",
        "wanda,neuronrank_fisher",
        "--neuronrank_max_classes",
        "0",
    )
    assert result.exit_code == 2 and "neuronrank_max_classes must be > 0" in result.output


def test_compare_command_prints_the_table(tiny_model_dir, text_dir, tmp_path):
    result = compare_cli(
        tiny_model_dir,
        text_dir,
        tmp_path,
        "--methods",
        "wanda,wanda_idf",
        "--sparsity_types",
        "unstructured",
        "--sparsity_ratios",
        "0.3,0.6",
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--eval_limit",
        "2",
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("| wanda_idf | unstructured |") == 2
    assert "ppl_vs_sparsity.png" in result.output


def test_idf_forms_multiply_only_the_methods_that_read_the_idf(tiny_model_dir, text_dir):
    base = base_config(tiny_model_dir, text_dir)
    forms = ["seed", "relative"]
    runs = plan_runs(base, ["wanda", "wanda_idf", "wanda_spiky"], ["2:4"], [0.5], forms)
    assert [(r.method.prune_method, getattr(r.method.options, "idf_form", None)) for r in runs] == [
        ("wanda", None),  # wanda and wanda_spiky read no IDF, so they run once
        ("wanda_idf", "seed"),
        ("wanda_idf", "relative"),
        ("wanda_spiky", None),
    ]
    assert [compare.run_label(r, forms) for r in runs] == [
        "wanda",
        "wanda_idf[seed]",
        "wanda_idf[relative]",
        "wanda_spiky",
    ]
    with pytest.raises(SecateursError, match="unknown --idf_form"):
        plan_runs(base, ["wanda_idf"], ["2:4"], [0.5], ["bm25"])


def test_run_key_holds_the_idf_form_only_where_it_is_read(tiny_model_dir, text_dir):
    for method, matters in (("wanda", False), ("wanda_spiky", False), ("wanda_select", True)):
        base = base_config(tiny_model_dir, text_dir, prune_method=method)
        seed = base | {"idf_form": "seed"}
        assert (key(base) != key(seed)) == matters, method


def test_compare_runs_sparsegpt_and_ria(tiny_model_dir, text_dir, tmp_path):
    base = base_config(tiny_model_dir, text_dir)
    result = run_compare(base, ["wanda", "sparsegpt", "ria"], ["2:4"], [0.5], tmp_path / "c")
    rows = {row["method"]: row for row in result.rows}
    assert set(rows) == {"wanda", "sparsegpt", "ria"}
    assert all(row["pattern_met"] for row in rows.values())
    assert rows["sparsegpt"]["phases_s"]["solve"] > 0
