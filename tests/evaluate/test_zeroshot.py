"""Zero-shot glue: task checks before any work, lm-eval on a tiny model, its numbers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import invoke, invoke_prune, make_model, make_tokenizer
from test_cloze import synthetic_articles

from secateurs.cli import default_zero_shot, underscored
from secateurs.errors import SecateursError
from secateurs.evaluate import zeroshot
from secateurs.evaluate.cloze import write_task
from secateurs.evaluate.zeroshot import (
    ZeroShotPlan,
    evaluate_zero_shot,
    parse_tasks,
    prepare_zero_shot,
)
from secateurs.jobs import prune as runner


def _forbidden(*_args, **_kwargs):
    raise AssertionError("data or model work started before the input was checked")


@pytest.fixture
def cloze_plan(tmp_path):
    """wiki-cloze built from synthetic articles, known to lm-eval through its include path."""
    from lm_eval.tasks import TaskManager

    folder = write_task(tmp_path / "task", synthetic_articles())
    manager = TaskManager(include_path=[str(folder)], include_defaults=False)
    return ZeroShotPlan(["wiki-cloze"], 6, 4, manager)


def _choice_loglikelihoods(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """Sum of log p(ending tokens | passage), as lm-eval's multiple_choice scores an ending."""
    scores = []
    for choice in choices:
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        ids = tokenizer(f"{context} {choice}", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        scores.append(sum(float(logits[t - 1, ids[t]]) for t in range(len(context_ids), len(ids))))
    return scores


def test_parse_tasks_keeps_order_and_drops_repeats():
    assert parse_tasks("wiki-cloze, boolq,wiki-cloze") == ["wiki-cloze", "boolq"]
    with pytest.raises(SecateursError, match="wiki-cloze"):
        parse_tasks(" , ")


def test_unreachable_hub_fails_up_front_naming_the_builtin(monkeypatch):
    monkeypatch.setattr(zeroshot, "hub_offline", lambda: False)
    monkeypatch.setattr(zeroshot, "hub_reachable", lambda: False)
    with pytest.raises(SecateursError, match="--eval_zero_shot wiki-cloze") as info:
        prepare_zero_shot(",".join(zeroshot.DEFAULT_TASKS), None)
    assert "\n" not in str(info.value)
    assert "boolq" in str(info.value)


def test_hub_data_that_fails_during_evaluation_is_one_clear_error(cloze_plan, monkeypatch):
    import lm_eval

    def offline(**_kwargs):
        raise ConnectionError("Couldn't reach 'aps/super_glue' on the Hub")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    cloze_plan.tasks = ["boolq"]
    with pytest.raises(SecateursError, match="built-in offline task"):
        evaluate_zero_shot(make_model("llama"), make_tokenizer(), cloze_plan)


def test_bad_limits_are_refused():
    with pytest.raises(SecateursError, match="--zero_shot_limit"):
        prepare_zero_shot("wiki-cloze", 0)
    with pytest.raises(SecateursError, match="--zero_shot_batch_size"):
        prepare_zero_shot("wiki-cloze", None, 0)


def test_wiki_cloze_runs_through_lm_eval_and_matches_a_direct_count(cloze_plan, tmp_path):
    model, tokenizer = make_model("llama"), make_tokenizer()
    metrics = evaluate_zero_shot(model, tokenizer, cloze_plan)
    entry = metrics["wiki-cloze"]
    assert entry["examples"] == 6
    assert set(entry) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "examples"}
    lines = (tmp_path / "task" / "test.jsonl").read_text().splitlines()[:6]
    hits = []
    for item in map(json.loads, lines):
        scores = _choice_loglikelihoods(model, tokenizer, item["context"], item["choices"])
        hits.append(scores.index(max(scores)) == item["label"])
    assert entry["acc"] == pytest.approx(sum(hits) / len(hits))
    assert evaluate_zero_shot(model, tokenizer, cloze_plan) == metrics  # deterministic


@pytest.fixture
def builtin_cloze(tmp_path, monkeypatch):
    """The built-in task, made from synthetic articles in a private asset cache."""
    from secateurs.data import assets

    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "wiki_sample_split", lambda _split: synthetic_articles())


def test_prune_reports_dense_and_pruned_accuracy(tmp_path, tiny_model_dir, text_dir, builtin_cloze):
    out = tmp_path / "run.json"
    result = invoke_prune(
        tiny_model_dir, text_dir, "--eval_zero_shot", "wiki-cloze", "--zero_shot_limit", "5",
        "--eval_limit", "2", "--nsamples", "4", "--save_json", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    zero_shot = json.loads(out.read_text())["zero_shot"]
    assert zero_shot["tasks"] == ["wiki-cloze"] and zero_shot["limit"] == 5
    for side in ("dense", "pruned"):
        assert zero_shot[side]["wiki-cloze"]["examples"] == 5
        assert 0 <= zero_shot[side]["wiki-cloze"]["acc"] <= 1
    line = next(x for x in result.output.splitlines() if x.startswith("zero-shot"))
    assert "wiki-cloze (5 examples): acc " in line and " -> " in line and "acc_norm" in line


def test_eval_command_reports_accuracy(tmp_path, tiny_model_dir, text_dir, builtin_cloze):
    out = tmp_path / "eval.json"
    result = invoke(
        "eval", "--model", tiny_model_dir, "--dataset", text_dir, "--seqlen", "32",
        "--eval_limit", "2", "--eval_zero_shot", "wiki-cloze", "--zero_shot_limit", "3",
        "--save_json", out, "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["zero_shot"]["model"]["wiki-cloze"]["examples"] == 3
    assert "zero-shot    wiki-cloze (3 examples): acc " in result.output


def test_bare_flag_means_the_paper_tasks():
    args = ["prune", "--eval_zero_shot", "--seqlen", "8"]
    assert default_zero_shot(args)[2] == ",".join(zeroshot.DEFAULT_TASKS)
    # the command line rewrites dashed spellings to underscores before this step
    dashed = default_zero_shot(underscored(["eval", "--eval-zero-shot"]))
    assert dashed[-1] == ",".join(zeroshot.DEFAULT_TASKS)
    assert default_zero_shot(["prune", "--eval_zero_shot", "rte"]) == [
        "prune",
        "--eval_zero_shot",
        "rte",
    ]


def test_offline_paper_tasks_fail_before_pruning(tmp_path, tiny_model_dir, text_dir, monkeypatch):
    monkeypatch.setattr(zeroshot, "hub_offline", lambda: False)
    monkeypatch.setattr(zeroshot, "hub_reachable", lambda: False)
    monkeypatch.setattr(runner, "prepare", _forbidden)
    out = tmp_path / "run.json"
    result = invoke_prune(tiny_model_dir, text_dir, "--eval_zero_shot", "--save_json", out)
    assert result.exit_code == 2  # a call to prepare would be an unexpected error, exit 1
    assert result.output.count("\n") == 1 and "--eval_zero_shot wiki-cloze" in result.output
    assert not out.exists()


def test_the_callers_tokenizer_is_left_as_it_was(cloze_plan):
    tokenizer = make_tokenizer()
    assert tokenizer.pad_token is None
    evaluate_zero_shot(make_model("llama"), tokenizer, cloze_plan, progress=False)
    assert tokenizer.pad_token is None


def test_score_dump_cannot_be_scored_or_plotted(tmp_path, tiny_model_dir, text_dir, monkeypatch):
    monkeypatch.setattr(runner, "prepare", _forbidden)
    for extra in (["--eval_zero_shot", "wiki-cloze"], ["--save_plot", tmp_path / "p.png"]):
        result = invoke_prune(
            tiny_model_dir, text_dir, "--dump_wanda_score", "--save", tmp_path / "s", *extra
        )
        assert result.exit_code == 2 and "--dump_wanda_score stops before pruning" in result.output


def test_unknown_task_is_named(monkeypatch):
    monkeypatch.setattr(zeroshot, "hub_reachable", _forbidden)
    with pytest.raises(SecateursError, match=r"unknown zero-shot task.*nonesuch"):
        prepare_zero_shot("wiki-cloze,nonesuch", None)
