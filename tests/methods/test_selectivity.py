import pytest
import torch

from secateurs.errors import SecateursError
from secateurs.methods.selectivity import (
    DEFAULT_IDF_FORM,
    IDF_FORMS,
    SelectivityOptions,
    check_idf_form,
    idf_values,
)

# active shares from never to always, the relative share independent of them
ACTIVE = torch.tensor([0.0, 1e-6, 0.05, 0.4, 0.9, 1.0], dtype=torch.float64)
RELATIVE = torch.tensor([1e-3, 0.5, 0.3, 0.45, 0.2, 0.35], dtype=torch.float64)


def values(form: str, **options) -> torch.Tensor:
    return idf_values(ACTIVE, RELATIVE, SelectivityOptions(idf_form=form, **options))


def test_seed_form_is_the_literal_log_and_zeroes_always_active_channels():
    expected = torch.log(1.0 / (ACTIVE + 1e-10)).clamp(0.0, 10.0).float()
    assert torch.equal(values("seed"), expected)
    assert float(values("seed")[-1]) == 0.0


@pytest.mark.parametrize("form", [f for f in IDF_FORMS if f != "seed"])
def test_no_other_form_can_zero_a_channel(form):
    # extreme rates: never and always active, on both definitions
    for active in (torch.zeros(4), torch.ones(4)):
        for relative in (torch.zeros(4), torch.ones(4)):
            idf = idf_values(active.double(), relative.double(), SelectivityOptions(idf_form=form))
            assert float(idf.min()) >= 0.5 - 1e-6, (form, active, relative)
    assert bool((values(form) > 0).all())


def test_smooth_is_one_plus_the_seed():
    torch.testing.assert_close(values("smooth"), 1.0 + values("seed"))


def test_tempered_compresses_the_smooth_range():
    torch.testing.assert_close(values("tempered", idf_power=1.0), values("smooth"))
    tempered = values("tempered", idf_power=0.5)
    torch.testing.assert_close(tempered, values("smooth").sqrt())
    assert float(tempered.max() / tempered.min()) < float(values("smooth").max())


def test_normalized_has_mean_one_before_its_floor():
    seed = values("seed")
    normalized = values("normalized", idf_floor=1e-9)
    torch.testing.assert_close(normalized, (seed / seed.mean()).clamp_min(1e-9))
    assert float(values("normalized", idf_floor=0.5).min()) == pytest.approx(0.5)


def test_relative_reads_only_the_per_channel_rate():
    expected = (1.0 + torch.log(1.0 / (RELATIVE + 1e-10)).clamp(0.0, 10.0)).float()
    torch.testing.assert_close(values("relative"), expected)
    other = idf_values(torch.rand(6).double(), RELATIVE, SelectivityOptions(idf_form="relative"))
    assert torch.equal(other, values("relative"))


def test_the_default_is_a_safe_form():
    assert DEFAULT_IDF_FORM in IDF_FORMS and DEFAULT_IDF_FORM != "seed"
    assert SelectivityOptions().idf_form == DEFAULT_IDF_FORM


def test_unknown_form_names_the_choices():
    with pytest.raises(SecateursError, match="choose one of: seed, smooth"):
        check_idf_form("bm25")
