"""The safety workflow end to end on a tiny LLaMA: score files, wandg, set difference, attack."""

import json

import pytest
import torch
from chat_helpers import chat_tokenizer, write_pairs
from conftest import invoke, make_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from secateurs.api import MethodPruner, TablePruner
from secateurs.config import RunConfig
from secateurs.core.model import base_weights, iter_prunable, weight_matrix
from secateurs.core.stats import ActivationStats
from secateurs.data.prompts import encode_pairs, load_pairs
from secateurs.jobs.scoring import score_files
from secateurs.methods.registry import get_method


@pytest.fixture
def chat_model_dir(tmp_path):
    path = tmp_path / "tiny-chat"
    make_model("llama").save_pretrained(path)
    chat_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def pairs_files(tmp_path, text_dir):
    safety, utility = tmp_path / "safety.jsonl", tmp_path / "utility.jsonl"
    write_pairs(safety, count=8, seed=0)
    write_pairs(utility, count=8, seed=50)
    return safety, utility


def _prune(model_dir, *args):
    return invoke(
        "prune",
        "--model",
        model_dir,
        "--seqlen",
        "32",
        "--quiet",
        "--nsamples",
        "8",
        "--eval_limit",
        "2",
        "--dataset",
        model_dir.parent / "text",
        *args,
    )


def _zeros(folder) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(folder)
    return {name: weight_matrix(layer) == 0 for name, layer in iter_prunable(model)}


def _scores(model):
    generator = torch.Generator().manual_seed(3)
    return {
        n: torch.rand(weight_matrix(m).shape, generator=generator) for n, m in iter_prunable(model)
    }


def test_neg_prune_selects_the_complement():
    plain, flipped = make_model("llama"), make_model("llama")
    table = _scores(plain)
    TablePruner(plain, table, progress=False).prune(None, 0.5)
    TablePruner(flipped, table, progress=False).prune(None, 0.5, negate=True)
    for (_, a), (_, b) in zip(iter_prunable(plain), iter_prunable(flipped), strict=True):
        assert torch.equal(weight_matrix(a) == 0, ~(weight_matrix(b) == 0))


def test_masked_statistics_count_only_marked_tokens():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, generator=generator)
    keep = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    masked = ActivationStats(4)
    masked.add_batch(x, keep=keep)
    expected = (x[0, 2:].square().sum(0) + x[1, 1:3].square().sum(0)) / 2
    torch.testing.assert_close(masked.sq_norm, expected)


def test_dump_then_load_prunes_the_same_as_scoring_directly(chat_model_dir, pairs_files, tmp_path):
    safety, _ = pairs_files
    save = tmp_path / "run"
    dumped = _prune(
        chat_model_dir,
        "--prune_method",
        "wandg",
        "--prune_data",
        safety,
        "--save",
        save,
        "--dump_wanda_score",
    )
    assert dumped.exit_code == 0, dumped.output
    files = list((save / "wanda_score").glob("*.safetensors"))
    assert [f.name for f in files] == ["wandg-safety.safetensors"]
    assert len(load_file(files[0])) == len(list(iter_prunable(make_model("llama"))))
    common = ("--prune_method", "wandg", "--prune_data", safety, "--sparsity_ratio", "0.3")
    loaded = _prune(
        chat_model_dir,
        *common,
        "--save",
        save,
        "--load_wanda_score",
        "--save_model",
        tmp_path / "loaded",
    )
    direct = _prune(chat_model_dir, *common, "--save_model", tmp_path / "direct")
    assert loaded.exit_code == 0 and direct.exit_code == 0, loaded.output + direct.output
    a, b = _zeros(tmp_path / "loaded"), _zeros(tmp_path / "direct")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert 0.29 < float(torch.cat([m.flatten() for m in a.values()]).float().mean()) < 0.31


def test_wanda_scores_dump_and_load_too(chat_model_dir, pairs_files, tmp_path):
    safety, _ = pairs_files
    save = tmp_path / "run"
    args = ("--prune_method", "wanda", "--prune_data", safety, "--save", save)
    assert _prune(chat_model_dir, *args, "--dump_wanda_score").exit_code == 0
    result = _prune(chat_model_dir, *args, "--load_wanda_score", "--save_model", tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert "scores           loaded from" in result.output
    assert "wanda-safety.safetensors" in result.output
    batch = encode_pairs(chat_tokenizer(), load_pairs(str(safety)), 32)
    # dumped scores are the dense model's: equal to scoring without pruning in between
    model = AutoModelForCausalLM.from_pretrained(chat_model_dir)
    table = MethodPruner(model, "wanda", progress=False).scores(batch)
    TablePruner(model, table, progress=False).prune(None, 0.5)
    got = _zeros(tmp_path / "m")
    assert all(torch.equal(weight_matrix(m) == 0, got[n]) for n, m in iter_prunable(model))
    # and the first block, which sees no pruned block before it, matches sequential Wanda
    sequential = AutoModelForCausalLM.from_pretrained(chat_model_dir)
    MethodPruner(sequential, "wanda", progress=False).prune(batch, 0.5)
    first = [(n, m) for n, m in iter_prunable(sequential) if n.startswith("model.layers.0.")]
    assert first and all(torch.equal(weight_matrix(m) == 0, got[n]) for n, m in first)


def test_score_file_errors(chat_model_dir, pairs_files, tmp_path):
    safety, _ = pairs_files
    both = _prune(
        chat_model_dir,
        "--prune_method",
        "wandg",
        "--prune_data",
        safety,
        "--save",
        tmp_path,
        "--dump_wanda_score",
        "--load_wanda_score",
    )
    assert both.exit_code == 2 and "mutually exclusive" in both.output
    missing = _prune(
        chat_model_dir,
        "--prune_method",
        "wandg",
        "--prune_data",
        safety,
        "--save",
        tmp_path / "none",
        "--load_wanda_score",
    )
    assert missing.exit_code == 2
    assert "Please run with --dump_wanda_score first" in missing.output
    no_save = _prune(chat_model_dir, "--prune_method", "wandg", "--dump_wanda_score")
    assert no_save.exit_code == 2 and "--save" in no_save.output


def test_score_files_follow_the_model_not_the_path_it_was_given_by(
    chat_model_dir, pairs_files, tmp_path, monkeypatch
):
    safety, _ = pairs_files
    monkeypatch.chdir(tmp_path)
    name = chat_model_dir.name

    def prune(model: str, *args):
        # a string, not a Path: Path("./x") would print as "x"
        return invoke(
            "prune", "--model", model, "--dataset", tmp_path / "text", "--seqlen", "32",
            "--quiet", "--nsamples", "8", "--eval_limit", "2", "--prune_method", "wanda",
            "--prune_data", safety, "--save", tmp_path / "run", *args,
        )  # fmt: skip

    dumped = prune(name, "--dump_wanda_score")
    assert dumped.exit_code == 0, dumped.output
    same = prune(f"./{name}", "--load_wanda_score")
    assert same.exit_code == 0, same.output
    # another model with the very same layers, saved where the first one was
    make_model("llama", seed=1).save_pretrained(chat_model_dir)
    out = tmp_path / "pruned"
    other = prune(name, "--load_wanda_score", "--save_model", out)
    assert other.exit_code == 2, other.output
    assert "computed on other weights" in other.output
    assert not out.exists()


def test_set_difference_end_to_end_with_attack(chat_model_dir, pairs_files, tmp_path):
    safety, utility = pairs_files
    save = tmp_path / "run"
    for data in (safety, utility):
        out = _prune(
            chat_model_dir,
            "--prune_method",
            "wandg",
            "--prune_data",
            data,
            "--save",
            save,
            "--dump_wanda_score",
        )
        assert out.exit_code == 0, out.output
    result = _prune(
        chat_model_dir,
        "--prune_method",
        "wandg_set_difference",
        "--prune_data",
        safety,
        "--utility_data",
        utility,
        "--p",
        "0.1",
        "--q",
        "0.1",
        "--save",
        save,
        "--load_wanda_score",
        "--eval_attack",
        "--save_attack_res",
        "--attack_limit",
        "3",
        "--attack_max_new_tokens",
        "4",
        "--save_json",
        tmp_path / "r.json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    overall = report["sparsity"]["overall"]
    assert 0.0 < overall <= 0.1
    assert all(0.0 <= v <= 0.1 for v in report["sparsity"]["layers"].values())
    assert set(report["attack"]["asr"]) == {"no_system", "system"}
    rows = (save / "attack" / "wandg_set_difference-responses.jsonl").read_text().splitlines()
    assert len(rows) == 6
    on_the_fly = _prune(
        chat_model_dir,
        "--prune_method",
        "wandg_set_difference",
        "--prune_data",
        safety,
        "--utility_data",
        utility,
        "--p",
        "0.1",
        "--q",
        "0.1",
        "--save_json",
        tmp_path / "f.json",
    )
    assert on_the_fly.exit_code == 0, on_the_fly.output
    again = json.loads((tmp_path / "f.json").read_text())["sparsity"]
    assert again["layers"] == report["sparsity"]["layers"]


def test_a_large_set_difference_warns():
    from secateurs.api import prune_set_difference

    model = make_model("llama")
    safety = _scores(model)
    utility = {name: -score for name, score in safety.items()}
    with pytest.warns(UserWarning, match="Lower --q"):
        prune_set_difference(model, safety, utility, p=0.1, q=0.3, progress=False)


@pytest.mark.parametrize(
    ("method", "prune_data", "expected"),
    [
        ("wandg_set_difference", None, {"safety": "wandg-align", "utility": "wandg-utility"}),
        (
            "wandg_set_difference",
            "harm.jsonl",
            {"safety": "wandg-harm", "utility": "wandg-utility"},
        ),
        ("wandg", None, {"scores": "wandg-wiki-sample"}),
        ("wandg", "align", {"scores": "wandg-align"}),
    ],
)
def test_score_files_follow_the_data_each_method_scores_on(method, prune_data, expected):
    cfg = RunConfig.from_flags(
        prune_method=method,
        prune_data=prune_data,
        dataset="wiki-sample",
        utility_data="utility",
        save="run",
    )
    files = score_files(cfg, get_method(method))
    assert {role: path.stem for role, path in files.items()} == expected


def test_seed_commands_run_with_wanda_v2(chat_model_dir, pairs_files, tmp_path):
    """Seed 004's workflow with wanda_v2: dump, then load with --neg_prune and the attack."""
    safety, _ = pairs_files
    save = tmp_path / "run"
    common = ("--prune_method", "wanda_v2", "--prune_data", safety, "--sparsity_ratio", "0.01")
    dumped = _prune(chat_model_dir, *common, "--save", save, "--dump_wanda_score")
    assert dumped.exit_code == 0, dumped.output
    assert (save / "wanda_score" / "wanda_v2-safety.safetensors").is_file()
    loaded = _prune(
        chat_model_dir, *common, "--save", save, "--load_wanda_score", "--neg_prune",
        "--eval_attack", "--save_attack_res", "--attack_limit", "2",
        "--attack_max_new_tokens", "3", "--save_model", tmp_path / "loaded",
        "--attack_samples", "2",
    )  # fmt: skip
    assert loaded.exit_code == 0, loaded.output
    rows = (save / "attack" / "wanda_v2-responses.jsonl").read_text().splitlines()
    assert [json.loads(row)["setting"] for row in rows].count("sampled") == 4  # 2 prompts x 2
    direct = _prune(chat_model_dir, *common, "--neg_prune", "--save_model", tmp_path / "direct")
    assert direct.exit_code == 0, direct.output
    a, b = _zeros(tmp_path / "loaded"), _zeros(tmp_path / "direct")
    assert all(torch.equal(a[n], b[n]) for n in a)
    # --neg_prune removed the highest scores: recompute them and compare
    batch = encode_pairs(chat_tokenizer(), load_pairs(str(safety)), 32)
    model = AutoModelForCausalLM.from_pretrained(chat_model_dir)
    table = MethodPruner(model, "wanda_v2", progress=False).scores(batch)
    for name, score in table.items():
        top = score.topk(int(score.shape[1] * 0.01), dim=1).indices
        assert bool(a[name].gather(1, top).all()) if top.numel() else True


def test_set_difference_takes_wanda_v2_scores(chat_model_dir, pairs_files, tmp_path):
    safety, utility = pairs_files
    save = tmp_path / "run"
    for data in (safety, utility):
        out = _prune(
            chat_model_dir, "--prune_method", "wanda_v2", "--prune_data", data, "--save", save,
            "--dump_wanda_score",
        )  # fmt: skip
        assert out.exit_code == 0, out.output
    args = (
        "--prune_method", "wandg_set_difference", "--set_difference_score", "wanda_v2",
        "--prune_data", safety, "--utility_data", utility, "--p", "0.1", "--q", "0.1",
    )  # fmt: skip
    loaded = _prune(chat_model_dir, *args, "--save", save, "--load_wanda_score", "--save_json",
                    tmp_path / "l.json")  # fmt: skip
    direct = _prune(chat_model_dir, *args, "--save_json", tmp_path / "d.json")
    assert loaded.exit_code == 0 and direct.exit_code == 0, loaded.output + direct.output
    first = json.loads((tmp_path / "l.json").read_text())["sparsity"]
    second = json.loads((tmp_path / "d.json").read_text())["sparsity"]
    assert first["layers"] == second["layers"] and 0 < first["overall"] <= 0.1
    bad = _prune(chat_model_dir, *args[:2], "--set_difference_score", "wanda")
    assert bad.exit_code == 2 and "--set_difference_score must be one of" in bad.output


def test_use_diff_from_the_command_line(chat_model_dir, pairs_files, tmp_path):
    safety, _ = pairs_files
    base = tmp_path / "base"
    make_model("llama", seed=1).save_pretrained(base)
    args = ("--prune_method", "wanda_v2", "--prune_data", safety, "--sparsity_ratio", "0.2")
    run = _prune(chat_model_dir, *args, "--use_diff", "--base_model", base, "--save_model",
                 tmp_path / "m", "--save", tmp_path / "s")  # fmt: skip
    assert run.exit_code == 0, run.output
    tuned = AutoModelForCausalLM.from_pretrained(chat_model_dir)
    reference = base_weights(tuned, AutoModelForCausalLM.from_pretrained(base), "base")
    batch = encode_pairs(chat_tokenizer(), load_pairs(str(safety)), 32)
    table = MethodPruner(tuned, "wanda_v2", progress=False, base=reference).scores(batch)
    TablePruner(tuned, table, progress=False).prune(None, 0.2)
    got = _zeros(tmp_path / "m")
    assert all(torch.equal(weight_matrix(m) == 0, got[n]) for n, m in iter_prunable(tuned))
    for method in ("wanda", "wandg"):
        out = _prune(chat_model_dir, "--prune_method", method, "--prune_data", safety,
                     "--use_diff", "--base_model", base)  # fmt: skip
        assert out.exit_code == 0, out.output
    itself = _prune(chat_model_dir, *args, "--use_diff", "--base_model", chat_model_dir,
                    "--save_model", tmp_path / "x")  # fmt: skip
    assert itself.exit_code == 2 and "every --use_diff score would be zero" in itself.output
    assert not (tmp_path / "x").exists()
    other = tmp_path / "other"
    make_model("qwen2").save_pretrained(other)
    differs = _prune(chat_model_dir, *args, "--use_diff", "--base_model", other)
    assert differs.exit_code == 2 and "--use_diff needs the model --model was" in differs.output
    alone = _prune(chat_model_dir, *args, "--use_diff")
    assert alone.exit_code == 2 and "--base_model" in alone.output
    solver = _prune(chat_model_dir, "--prune_method", "sparsegpt", "--use_diff", "--base_model",
                    base)  # fmt: skip
    assert solver.exit_code == 2 and "take of a weight change" in solver.output
