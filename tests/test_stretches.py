"""Joining stretches of speech into runs of one language (serve_app/stretches.py), without a model."""

from __future__ import annotations

from serve_app.stretches import LanguageRun, Stretch, language_runs

SR = 16_000


def s(start_s: float, end_s: float, language, probability: float = 0.99) -> Stretch:
    return Stretch(int(start_s * SR), int(end_s * SR), language, probability)


def runs(stretches, total_s: float, *, threshold: float = 0.8, min_sure_s: float = 2.5):
    out = language_runs(stretches, int(total_s * SR), threshold=threshold, min_sure_samples=int(min_sure_s * SR))
    return [(r.start / SR, r.end / SR, r.language) for r in out]


def test_runs_cover_the_piece_and_cut_in_the_middle_of_the_pause_between_languages():
    stretches = [s(0.4, 3.8, "zh"), s(5.3, 9.5, "en"), s(10.4, 15.7, "en"), s(17.8, 22.2, "zh")]
    assert runs(stretches, 25.0) == [(0.0, 4.55, "zh"), (4.55, 16.75, "en"), (16.75, 25.0, "zh")]


def test_short_or_unsure_speech_goes_with_the_speech_before_it():
    stretches = [
        s(0.0, 6.0, "zh"),
        s(6.5, 7.2, "en", 0.95),  # a short "OK": too little to switch on
        s(7.5, 12.0, "zh"),
        s(12.5, 16.0, "ja", 0.6),  # long, but heard without confidence
        s(16.5, 20.0, "zh"),
    ]
    assert runs(stretches, 20.0) == [(0.0, 20.0, "zh")]


def test_short_neighbours_heard_alike_are_judged_together():
    # "one, two, three": three short stretches, one sure run of English.
    stretches = [s(0.0, 4.0, "zh"), s(4.6, 5.4, "en", 0.9), s(5.8, 6.6, "en", 0.9), s(7.0, 7.9, "en", 0.9), s(8.5, 12.0, "zh")]
    assert runs(stretches, 12.0) == [(0.0, 4.3, "zh"), (4.3, 8.2, "en"), (8.2, 12.0, "zh")]


def test_unsure_speech_at_the_start_takes_the_language_after_it():
    assert runs([s(0.0, 1.0, "en", 0.9), s(1.5, 6.0, "zh")], 6.0) == [(0.0, 6.0, "zh")]


def test_no_sure_speech_is_one_run_of_no_language_and_no_speech_too():
    assert runs([s(0.0, 1.3, "en", 0.77)], 27.0) == [(0.0, 27.0, None)]
    assert language_runs([], 100, threshold=0.8, min_sure_samples=10) == [LanguageRun(0, 100, None, 0.0, 0)]


def test_a_run_reports_its_speech_and_its_length_weighted_confidence():
    (run,) = language_runs([s(0.0, 3.0, "en", 0.9), s(4.0, 5.0, "en", 0.6)], 6 * SR, threshold=0.5, min_sure_samples=SR)
    assert run.speech_samples == 4 * SR
    assert run.probability == round((0.9 * 3 + 0.6 * 1) / 4, 3)
