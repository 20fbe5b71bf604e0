"""Prefill and decode speed through plain transformers (figures, not timings, are tested)."""

from conftest import make_model

from secateurs.evaluate.speed import measure_speed


def test_speed_reports_positive_rates_for_the_asked_token_counts(arch):
    speed = measure_speed(make_model(arch), prefill=32, new_tokens=8, repeats=1)
    assert speed.prefill_tokens_per_s > 0 and speed.decode_tokens_per_s > 0
    assert (speed.prefill_tokens, speed.new_tokens, speed.repeats) == (32, 8, 1)
    assert set(speed.to_dict()) >= {"prefill_tokens_per_s", "decode_tokens_per_s", "threads"}
