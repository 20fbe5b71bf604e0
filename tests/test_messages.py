"""Messages that point at the right thing (issue 31): each was wrong before."""

import warnings

import huggingface_hub
import pytest
from conftest import invoke

from secateurs.config import RunConfig
from secateurs.core.model import resolve_model_path
from secateurs.core.patterns import effective_ratio, parse_pattern
from secateurs.data.prompts import check_prompt_data
from secateurs.errors import SecateursError
from secateurs.formats.streaming import model_folder
from secateurs.jobs.plan import resolve
from secateurs.jobs.report import plural


def test_a_missing_local_folder_is_named_as_such():
    with pytest.raises(SecateursError, match=r"no such model folder: '\./missing/dir'"):
        resolve_model_path("./missing/dir")
    result = invoke("prune", "--model", "./missing/dir", "--quiet")
    assert result.exit_code == 2 and "no such model folder" in result.output
    assert "Repo id" not in result.output


def test_a_hub_id_that_cannot_be_fetched_does_not_talk_about_offload(monkeypatch):
    def offline(*_args, **_kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(SecateursError) as error:
        model_folder("org/no-such-model")
    assert "--offload" not in str(error.value) and "org/no-such-model" in str(error.value)


def test_unknown_prompt_data_does_not_name_prune_data():
    with pytest.raises(SecateursError) as error:
        check_prompt_data("nosuch")
    assert "--prune_data" not in str(error.value)


def test_odd_n_m_warns_only_about_a_ratio_the_user_chose():
    pattern = parse_pattern("2:5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert effective_ratio(pattern, 0.5) == pytest.approx(0.4)  # the default
    with pytest.warns(UserWarning, match="--sparsity_ratio 0.3 does not match"):
        effective_ratio(pattern, 0.3)


def test_float16_on_a_cpu_gets_a_hint():
    with pytest.warns(UserWarning, match="float16 on a CPU runs about 3x slower"):
        resolve(RunConfig.from_flags(dtype="float16", eval_limit=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve(RunConfig.from_flags(dtype="bfloat16", eval_limit=1))


def test_plurals():
    assert plural(1, "window") == "1 window" and plural(2, "window") == "2 windows"
