"""Subtitle segmentation against hand-made model segments (fast, no cluster)."""

from __future__ import annotations

import pydantic
import pytest

from serve_app.config import SubtitleSettings
from serve_app.subtitles import compliant_share, subtitle_segments, timed_units

SETTINGS = SubtitleSettings()


def _squash(text: str) -> str:
    return "".join(text.split())


def _assert_well_formed(out, source, settings=SETTINGS):
    assert _squash("".join(s["text"] for s in out)) == _squash("".join(s["text"] for s in source))
    for a, b in zip(out, out[1:]):
        assert a["start"] <= a["end"] <= b["start"] + 1e-6, (a, b)


def test_long_chinese_segment_without_spaces_is_split_at_punctuation_by_character_share():
    text = "欢迎大家来体验达摩院推出的语音识别模型。我认为跑步最重要的就是给我带来了身体健康，经广州日报报道后成为了社会热点。希望你以后能够做的比我还好呦。"
    seg = {"start": 2.0, "end": 22.0, "text": text}  # 69 characters in 20 s
    out = subtitle_segments([seg], SETTINGS)
    _assert_well_formed(out, [seg])
    assert len(out) >= 4
    assert compliant_share(out, SETTINGS) == 1.0
    assert out[0]["start"] == 2.0 and out[-1]["end"] == 22.0
    # every cut is after punctuation, as each sentence and clause fits into 7 s here
    assert all(s["text"][-1] in "。，" for s in out), [s["text"] for s in out]
    # times by character share: the first sentence is 20 of 69 characters of 20 s
    assert out[0]["text"] == "欢迎大家来体验达摩院推出的语音识别模型。"
    assert out[0]["end"] == pytest.approx(2.0 + 20.0 * 20 / len(text), abs=0.01)


def test_chinese_without_any_punctuation_is_cut_by_characters_within_limits():
    text = "我想问我在滨海新区有房" * 8  # 88 characters, 25 s, no punctuation, no spaces
    seg = {"start": 0.0, "end": 25.0, "text": text}
    out = subtitle_segments([seg], SETTINGS)
    _assert_well_formed(out, [seg])
    assert all(1.0 <= s["end"] - s["start"] <= 7.0 for s in out)
    assert len(out) == 4


def test_word_times_drive_the_cuts_when_the_aligner_gave_them():
    words, t = [], 0.0
    sentence = "And so my fellow Americans, ask not what your country can do for you. Ask what you can do for your country."
    for w in sentence.split():
        words.append({"word": w, "start": round(t, 2), "end": round(t + 0.35, 2), "score": 0.9})
        t += 0.5
    seg = {"start": 0.0, "end": t, "text": sentence, "words": words}
    out = subtitle_segments([seg], SETTINGS)
    _assert_well_formed(out, [seg])
    assert [s["text"] for s in out] == [
        "And so my fellow Americans, ask not what your country can do for you.",
        "Ask what you can do for your country.",
    ]
    # cue times are the first and last word's own times, not interpolations
    assert out[0]["start"] == 0.0 and out[0]["end"] == words[13]["end"]
    assert out[1]["start"] == words[14]["start"]
    assert sum(len(s["words"]) for s in out) == len(words)


def test_words_the_aligner_could_not_place_get_times_between_their_neighbours():
    seg = {
        "start": 0.0,
        "end": 4.0,
        "text": "It costs 1995 dollars today.",
        "words": [
            {"word": "It", "start": 0.0, "end": 0.3},
            {"word": "costs", "start": 0.4, "end": 0.9},
            {"word": "1995"},  # whisperx leaves numerals it cannot align without times
            {"word": "dollars", "start": 2.5, "end": 3.0},
            {"word": "today.", "start": 3.1, "end": 3.6},
        ],
    }
    units = timed_units(seg)
    assert units[2].start == pytest.approx(0.9) and units[2].end == pytest.approx(2.5)
    assert "".join(u.text for u in units) == seg["text"]


def test_short_neighbours_merge_when_the_result_complies():
    segs = [
        {"start": 0.0, "end": 0.5, "text": "Yes."},
        {"start": 0.7, "end": 1.1, "text": "Right."},
        {"start": 1.2, "end": 1.6, "text": "Go on."},
        {"start": 5.0, "end": 8.0, "text": "So the plan is simple."},
    ]
    out = subtitle_segments(segs, SETTINGS)
    assert [s["text"] for s in out] == ["Yes. Right. Go on.", "So the plan is simple."]
    assert out[0]["start"] == 0.0 and out[0]["end"] == 1.6
    assert compliant_share(out, SETTINGS) == 1.0


def test_a_short_cue_that_cannot_merge_stays_on_screen_into_the_silence():
    segs = [
        {"start": 0.0, "end": 6.8, "text": "A long first sentence that fills almost all seven seconds."},
        {"start": 7.0, "end": 7.3, "text": "Okay."},
        {"start": 12.0, "end": 15.0, "text": "Later."},
    ]
    out = subtitle_segments(segs, SETTINGS)
    assert [s["text"] for s in out] == [s["text"] for s in segs]
    assert out[1]["start"] == 7.0 and out[1]["end"] == pytest.approx(8.0)
    raw = subtitle_segments(segs, SETTINGS.model_copy(update={"extend_short": False}))
    assert raw[1]["end"] == 7.3 and compliant_share(raw, SETTINGS) == pytest.approx(2 / 3)


def test_speakers_are_never_merged():
    segs = [
        {"start": 0.0, "end": 0.4, "text": "Hi.", "speaker": "SPEAKER_00"},
        {"start": 0.5, "end": 0.9, "text": "Hello.", "speaker": "SPEAKER_01"},
    ]
    out = subtitle_segments(segs, SETTINGS, duration=5.0)
    assert [s["speaker"] for s in out] == ["SPEAKER_00", "SPEAKER_01"]


def test_a_wordy_segment_is_cut_under_max_chars():
    sentence = "word " * 120  # 600 characters spoken in 6 s: within time, far over the characters
    seg = {"start": 0.0, "end": 6.0, "text": sentence.strip()}
    settings = SubtitleSettings(min_seconds=0.5)
    out = subtitle_segments([seg], settings)
    _assert_well_formed(out, [seg])
    assert all(len(s["text"]) <= 200 for s in out) and len(out) >= 3


def test_a_run_without_spaces_longer_than_max_chars_is_cut():
    seg = {"start": 0.0, "end": 5.0, "text": "x" * 450}
    out = subtitle_segments([seg], SubtitleSettings(min_seconds=0.5))
    assert [len(s["text"]) for s in out] == [200, 200, 50]
    assert out[-1]["end"] == 5.0


def test_mixed_chinese_and_english_keeps_the_spaces_between_latin_words():
    seg = {"start": 0.0, "end": 12.0, "text": "我们用 Ray Serve 部署了模型，然后用 OpenAI client 调用它。再测一下长音频的延迟和吞吐量。"}
    out = subtitle_segments([seg], SETTINGS)
    _assert_well_formed(out, [seg])
    assert "Ray Serve" in out[0]["text"] and "OpenAI client" in "".join(s["text"] for s in out)


def test_empty_input_and_blank_segments():
    assert subtitle_segments([], SETTINGS) == []
    assert subtitle_segments([{"start": 0.0, "end": 1.0, "text": "  "}], SETTINGS) == []
    assert compliant_share([], SETTINGS) is None


@pytest.mark.parametrize(
    "kwargs",
    [{"min_seconds": 7, "max_seconds": 7}, {"max_seconds": 0}, {"max_chars": 0}, {"min_seconds": -1}],
)
def test_invalid_settings_name_the_value(kwargs):
    with pytest.raises(pydantic.ValidationError) as e:
        SubtitleSettings(**kwargs)
    assert any(str(v) in str(e.value) for v in kwargs.values())


def test_words_without_times_are_placed_in_the_speech_not_in_the_pauses():
    # A WhisperX segment of 20 s: a sentence, 10 s of silence, a sentence of the same length.
    segment = {"start": 0.0, "end": 20.0, "text": "The first one is here. The other one is here."}
    settings = SubtitleSettings(max_seconds=12, extend_short=False)
    by_time = subtitle_segments([segment], settings)
    by_speech = subtitle_segments([segment], settings, speech=[(0.0, 5.0), (15.0, 20.0)])
    assert [c["text"] for c in by_speech] == [c["text"] for c in by_time] == ["The first one is here.", "The other one is here."]
    assert by_time[1]["start"] == pytest.approx(10.0)  # shared out by time: inside the pause
    assert by_speech[0]["end"] == pytest.approx(5.0) and by_speech[1]["start"] == pytest.approx(15.0)
    # speech the VAD barely heard keeps the time shares
    assert subtitle_segments([segment], settings, speech=[(3.0, 4.0)]) == by_time
