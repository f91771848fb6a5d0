"""Mixed Mandarin and English in one recording, over the service: each language's stretches go to
the model its language routes to, with their times; named models and languages are checked.

The recording is built from real clips in tests/data joined with 0.8 s pauses (tests/mixed.py),
so each clip's span is known; every output segment must fall inside the span of a clip of its
language (plus 0.5 s).
"""

from __future__ import annotations

import httpx
import pytest

from tests.mixed import MANDARIN_ENGLISH, clip_at, mixed_recording
from tests.media import wav_bytes

pytestmark = pytest.mark.slow

MODEL_FOR = {"zh": "belle2", "en": "whisperx"}


@pytest.fixture(scope="module")
def meeting(data_dir):
    audio, clips = mixed_recording([data_dir / f for f in MANDARIN_ENGLISH], [f[:2] for f in MANDARIN_ENGLISH])
    return wav_bytes(audio), clips


def transcribe(base_url: str, upload: bytes, **form) -> dict:
    r = httpx.post(f"{base_url}/v1/audio/transcriptions", files={"file": ("meeting.wav", upload)},
                   data={"response_format": "verbose_json", **form}, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("segmentation", ["subtitle", "raw"])
def test_mandarin_stretches_go_to_belle2_and_english_ones_to_whisperx_with_their_times(base_url, meeting, segmentation):
    upload, clips = meeting
    body = transcribe(base_url, upload, segmentation=segmentation)
    covered = set()
    for seg in body["segments"]:
        clip = clip_at(clips, seg["start"], seg["end"])
        assert clip is not None, (seg, clips)
        assert (seg["language"], seg["model"]) == (clip.language, MODEL_FOR[clip.language]), seg
        covered.add(clip.file)
    assert covered == {c.file for c in clips}
    assert [s["start"] for s in body["segments"]] == sorted(s["start"] for s in body["segments"])
    shares = {entry["language"]: entry["share"] for entry in body["languages"]}
    assert set(shares) == {"zh", "en"} and abs(sum(shares.values()) - 1) < 0.01
    assert body["language"] == max(shares, key=shares.get)
    assert "广州" in body["text"] and "Americans" in body["text"]
    assert not any("glued" in w for w in body["warnings"]), body["warnings"]


def test_a_named_model_serves_everything_and_the_other_language_is_warned_about(base_url, meeting, data_dir):
    upload, _ = meeting
    body = transcribe(base_url, upload, model="belle2")
    assert {s["model"] for s in body["segments"]} == {"belle2"}
    assert any(w.startswith("Language ID heard en in ") and "model=belle2 decodes zh only" in w for w in body["warnings"]), body["warnings"]
    # a short clip is heard once, at its start
    body = transcribe(base_url, (data_dir / "en_jfk.flac").read_bytes(), model="belle2")
    assert any(w.startswith("Language ID heard en (probability") for w in body["warnings"]), body["warnings"]
    body = transcribe(base_url, (data_dir / "zh_aishell1_BAC009S0724W0121.flac").read_bytes(), language="en")
    assert any(w.startswith("Language ID heard zh") and "language=en was requested" in w for w in body["warnings"]), body["warnings"]
    # what fits draws no warning
    body = transcribe(base_url, (data_dir / "zh_aishell1_BAC009S0724W0121.flac").read_bytes(), model="belle2")
    assert not any(w.startswith("Language ID heard") for w in body["warnings"]), body["warnings"]


def test_a_stream_names_each_segments_language(base_url, meeting):
    import json

    upload, clips = meeting
    languages = []
    with httpx.stream("POST", f"{base_url}/v1/audio/transcriptions", files={"file": ("meeting.wav", upload)},
                      data={"stream": "true"}, timeout=600) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["type"] == "transcript.text.segment":
                    clip = clip_at(clips, event["start"], event["end"])
                    assert clip is not None, event
                    languages.append((event["language"], clip.language))
                elif event["type"] == "transcript.text.done":
                    assert {e["language"] for e in event["languages"]} == {"zh", "en"}
    assert languages and all(heard == spoken for heard, spoken in languages), languages


def test_word_times_offline_for_mandarin_and_english_and_cues_follow_them(base_url, meeting):
    upload, clips = meeting
    body = transcribe(base_url, upload, **{"timestamp_granularities[]": "word"})
    assert {(w["model"], w["language"], w["source"]) for w in body["word_times"]} == {
        ("belle2", "zh", "whisper-cross-attention"), ("whisperx", "en", "whisper-cross-attention")}
    languages_with_words = set()
    for seg in body["segments"]:
        clip = clip_at(clips, seg["start"], seg["end"])
        assert clip is not None and clip.language == seg["language"], seg
        assert seg["words"], seg
        # a cue spans its words, which lie inside their clip
        assert (seg["start"], seg["end"]) == (seg["words"][0]["start"], seg["words"][-1]["end"]) or len(seg["words"]) and seg["end"] - seg["start"] >= 1.0
        for word in seg["words"]:
            assert clip.start_s - 0.5 <= word["start"] <= word["end"] <= clip.end_s + 0.5, (word, clip)
        languages_with_words.add(seg["language"])
    assert languages_with_words == {"zh", "en"}
