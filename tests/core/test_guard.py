import warnings

import pytest
import torch
from conftest import make_model, make_windows

from secateurs.core.engine import prune_sequential
from secateurs.core.guard import ChannelCollapseWarning, alarm_message, check_channels, written_off
from secateurs.core.model import weight_matrix
from secateurs.core.patterns import parse_pattern
from secateurs.core.stats import ActivationStats, StatsRequest
from secateurs.methods.selectivity import SelectivityOptions, channel_idf, wanda_idf_score
from secateurs.methods.wanda import wanda_score


def outlier_layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A (16, 32) weight and (512 tokens, 32) inputs whose channels 3 and 7 are always large,
    as the outlier channels of real models are."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(16, 32, generator=generator)
    x = torch.randn(4, 128, 32, generator=generator)
    x[..., 3] = 40.0 + x[..., 3]
    x[..., 7] = -25.0 + x[..., 7]
    return weight, x


def layer_stats(x: torch.Tensor, form: str) -> tuple[ActivationStats, SelectivityOptions]:
    options = SelectivityOptions(exact=True, idf_form=form)
    stats = ActivationStats(x.shape[-1], request=StatsRequest(selectivity=options.thresholds()))
    stats.add_batch(x)
    return stats, options


def test_a_zeroed_high_energy_channel_raises_the_alarm():
    score = torch.ones(4, 6)
    score[:, 2] = 0.0
    energy = torch.tensor([1.0, 1.0, 8.0, 1.0, 1.0, 1.0])
    alarm = check_channels(score, energy)
    assert alarm is not None
    assert alarm.channels == (2,) and alarm.count == 1
    assert alarm.energy_share == pytest.approx(8 / 13)


def test_a_zeroed_low_energy_channel_is_left_alone():
    score = torch.ones(4, 6)
    score[:, 2] = 1e-6
    assert bool(written_off(score)[2]) and int(written_off(score).sum()) == 1
    assert check_channels(score, torch.tensor([1.0, 1.0, 0.01, 1.0, 1.0, 1.0])) is None


def test_an_all_zero_score_writes_off_every_channel():
    alarm = check_channels(torch.zeros(3, 4), torch.ones(4))
    assert alarm is not None and alarm.count == 4 and alarm.energy_share == 1.0


def test_one_surviving_weight_keeps_a_channel():
    score = torch.ones(4, 6)
    score[:3, 2] = 0.0
    assert check_channels(score, torch.tensor([1.0, 1.0, 8.0, 1.0, 1.0, 1.0])) is None


def test_seed_idf_on_outlier_channels_alarms_and_plain_wanda_does_not():
    weight, x = outlier_layer()
    seed, seed_options = layer_stats(x, "seed")
    idf = channel_idf(seed, seed_options)
    assert float(idf[3]) == 0.0 and float(idf[7]) == 0.0
    alarm = check_channels(wanda_idf_score(weight, seed, seed_options), seed.sq_norm)
    assert alarm is not None and set(alarm.channels) == {3, 7}
    assert alarm.energy_share > 0.9
    assert check_channels(wanda_score(weight, seed), seed.sq_norm) is None
    safe, safe_options = layer_stats(x, "smooth")
    assert check_channels(wanda_idf_score(weight, safe, safe_options), safe.sq_norm) is None


def test_alarm_message_names_the_layers():
    alarm = check_channels(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([9.0, 0.5, 0.5]))
    message = alarm_message({"model.layers.0.self_attn.q_proj": alarm})
    assert "model.layers.0.self_attn.q_proj" in message and "90%" in message
    assert "--save_log" in message and "--idf_form seed" in message


def prune_with(metric, model):
    layers = []

    def scored(layer, stats):
        layers.append(layer)
        return metric(layer, stats)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prune_sequential(
            model,
            make_windows(),
            scored,
            parse_pattern("unstructured", "row"),
            0.5,
            progress=False,
            request=StatsRequest(),
        )
    return report, [w for w in caught if issubclass(w.category, ChannelCollapseWarning)]


def test_engine_stays_silent_on_plain_wanda():
    report, caught = prune_with(
        lambda layer, stats: wanda_score(weight_matrix(layer), stats), make_model("llama")
    )
    assert caught == [] and report.alarms() == {}
    assert report.to_dict()["guard"] == {}


def test_engine_warns_once_with_the_layer_names_when_scores_zero_the_busiest_channels():
    def kill_busiest(layer, stats):
        score = wanda_score(weight_matrix(layer), stats)
        busiest = stats.sq_norm.argsort(descending=True)[: max(1, score.shape[1] // 4)]
        score[:, busiest] = 0.0
        return score

    report, caught = prune_with(kill_busiest, make_model("llama"))
    assert len(caught) == 1
    flagged = report.alarms()
    assert flagged and all(name in report.to_dict()["guard"] for name in flagged)
    assert next(iter(flagged)) in str(caught[0].message)
    assert all(alarm.energy_share >= 0.05 for alarm in flagged.values())
