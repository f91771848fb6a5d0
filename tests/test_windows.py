"""`plan_windows`: cutting VAD speech spans into <= 30 s decoding windows (pure logic, no model)."""

from __future__ import annotations

import random

import pytest

from deployments.belle2.windows import Window, plan_windows

SR = 16_000
MAX = 30 * SR
PAD = SR // 5  # the app's default window_pad_ms=200


def spans(*pairs_s):
    return [{"start": int(a * SR), "end": int(b * SR)} for a, b in pairs_s]


def check_invariants(speech, windows, total, max_samples=MAX):
    """What every plan must satisfy, whatever the input."""
    for w in windows:
        assert 0 <= w.start < w.end <= total, w
        assert w.end - w.start <= max_samples, w
    for a, b in zip(windows, windows[1:]):
        assert a.end <= b.start, f"windows overlap: {a} {b}"
    # Every speech sample is in exactly one window.
    for s in speech:
        covered = sum(max(0, min(w.end, s["end"]) - max(w.start, s["start"])) for w in windows)
        assert covered == s["end"] - s["start"], s


def test_no_speech_gives_no_windows():
    assert plan_windows([], total_samples=60 * SR, max_samples=MAX, pad_samples=PAD) == []


def test_short_spans_share_one_window_with_padding():
    speech = spans((1.0, 3.0), (4.0, 6.0))
    windows = plan_windows(speech, total_samples=10 * SR, max_samples=MAX, pad_samples=PAD)
    assert windows == [Window(int(0.8 * SR), int(6.2 * SR))]


def test_padding_stops_at_audio_bounds():
    speech = spans((0.05, 2.0))
    total = int(2.1 * SR)
    windows = plan_windows(speech, total_samples=total, max_samples=MAX, pad_samples=PAD)
    assert windows == [Window(0, total)]


def test_windows_are_cut_only_between_spans():
    # 12 spans of 4 s with 1 s pauses: 59 s of audio cannot fit one window.
    speech = spans(*[(i * 5.0, i * 5.0 + 4.0) for i in range(12)])
    total = 60 * SR
    windows = plan_windows(speech, total_samples=total, max_samples=MAX, pad_samples=PAD)
    assert len(windows) == 2
    check_invariants(speech, windows, total)
    for s in speech:  # no span is split between two windows
        assert any(w.start <= s["start"] and s["end"] <= w.end for w in windows), s


def test_padding_never_crosses_into_a_neighbour():
    # Two groups separated by a 0.1 s pause, narrower than two paddings: they split the pause.
    speech = spans((0.0, 29.0), (29.1, 40.0))
    total = 41 * SR
    windows = plan_windows(speech, total_samples=total, max_samples=MAX, pad_samples=PAD)
    assert len(windows) == 2
    check_invariants(speech, windows, total)
    assert windows[0].end <= speech[1]["start"] and windows[1].start >= speech[0]["end"]
    assert windows[0].end == windows[1].start == int(29.05 * SR)


def test_padding_never_grows_a_window_past_the_limit():
    speech = spans((5.0, 34.95))  # 29.95 s: only 0.05 s of room for padding
    total = 60 * SR
    (window,) = plan_windows(speech, total_samples=total, max_samples=MAX, pad_samples=PAD)
    assert window.end - window.start == MAX
    assert window.start <= speech[0]["start"] and window.end >= speech[0]["end"]


def test_a_single_overlong_span_is_cut_hard():
    speech = spans((2.0, 77.0))  # 75 s the VAD could not split
    total = 80 * SR
    windows = plan_windows(speech, total_samples=total, max_samples=MAX, pad_samples=PAD)
    check_invariants(speech, windows, total)
    assert [w.end - w.start for w in windows[:2]] == [MAX, MAX]
    assert windows[0].start == speech[0]["start"]
    assert windows[1].start == windows[0].end  # back to back: nothing lost, nothing repeated
    assert windows[-1].end >= speech[0]["end"]


def test_an_overlong_span_between_others():
    speech = spans((0.0, 3.0), (4.0, 70.0), (71.0, 73.0))
    total = 75 * SR
    windows = plan_windows(speech, total_samples=total, max_samples=MAX, pad_samples=PAD)
    check_invariants(speech, windows, total)


@pytest.mark.parametrize("seed", range(30))
def test_random_plans_keep_the_invariants(seed):
    rng = random.Random(seed)
    t, speech = rng.randint(0, SR), []
    for _ in range(rng.randint(1, 40)):
        length = rng.choice([rng.randint(SR // 10, 8 * SR), rng.randint(25 * SR, 70 * SR)])
        speech.append({"start": t, "end": t + length})
        t += length + rng.randint(1, 3 * SR)
    total = t + rng.randint(0, SR)
    windows = plan_windows(speech, total_samples=total, max_samples=MAX, pad_samples=rng.choice([0, PAD, SR]))
    check_invariants(speech, windows, total)
    # A window boundary falls inside a span only when that span alone exceeds the limit.
    for w in windows:
        for s in speech:
            if s["start"] < w.start < s["end"] or s["start"] < w.end < s["end"]:
                assert s["end"] - s["start"] > MAX, (w, s)


# -- remaining_window: speech the decoder never reached in a window -------------------------------

from deployments.belle2.windows import remaining_window  # noqa: E402


def test_speech_left_after_an_early_end_is_decoded_again():
    speech = spans((1.0, 5.0), (6.0, 20.0), (22.0, 28.0))
    window = Window(int(0.8 * SR), int(28.2 * SR))
    rest = remaining_window(window, int(7.5 * SR), speech, min_speech_samples=SR // 2)
    assert rest == Window(int(7.5 * SR), window.end)  # from where decoding stopped, inside a span


def test_remainder_starts_where_decoding_stopped_not_at_the_next_span():
    # What the VAD calls a pause may be quiet speech: the decoder gets it all again.
    speech = spans((1.0, 5.0), (22.0, 28.0))
    window = Window(int(0.8 * SR), int(28.2 * SR))
    rest = remaining_window(window, int(5.0 * SR), speech, min_speech_samples=SR // 2)
    assert rest == Window(int(5.0 * SR), window.end)


def test_little_or_no_speech_left_needs_no_second_decode():
    speech = spans((1.0, 5.0), (6.0, 6.3))
    window = Window(int(0.8 * SR), int(6.5 * SR))
    assert remaining_window(window, int(5.0 * SR), speech, min_speech_samples=SR // 2) is None
    assert remaining_window(window, int(6.5 * SR), speech, min_speech_samples=SR // 2) is None


def test_remainders_always_shrink():
    speech = spans((0.0, 29.0))
    window = Window(0, 29 * SR)
    assert remaining_window(window, 0, speech, min_speech_samples=SR // 2) is None  # nothing decoded yet
    rest = remaining_window(window, 3 * SR, speech, min_speech_samples=SR // 2)
    assert rest.start > window.start and rest.end == window.end
