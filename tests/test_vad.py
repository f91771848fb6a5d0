"""deployments/vad.py (Silero through onnxruntime, no faster-whisper import) gives faster-whisper's
speech spans on real clips, with the BELLE-2 app's settings and faster-whisper's defaults."""

from __future__ import annotations

import numpy as np
import pytest
from faster_whisper.audio import decode_audio
from faster_whisper.vad import VadOptions as FasterWhisperVadOptions
from faster_whisper.vad import get_speech_timestamps

from deployments import vad

CLIPS = ["zh_funasr_vad_example_70s.flac", "en_jfk.flac", "de_librivox_simplicissimus.flac", "noise_picovoice_empty.flac", "zh_speechrecognition_chinese.flac"]
SETTINGS = [{}, {"threshold": 0.35, "min_silence_duration_ms": 500, "max_speech_duration_s": 29, "speech_pad_ms": 0}]


@pytest.mark.parametrize("clip", CLIPS)
def test_speech_spans_are_faster_whispers(data_dir, clip):
    audio = decode_audio(str(data_dir / clip))
    for settings in SETTINGS:
        ours = vad.speech_timestamps(audio.copy(), vad.VadOptions(**settings))
        theirs = get_speech_timestamps(audio.copy(), FasterWhisperVadOptions(**settings))
        assert ours == theirs, settings
    if clip.startswith("noise"):
        assert ours == []
    else:
        assert ours and all(0 <= s["start"] < s["end"] <= audio.size for s in ours)


def test_the_model_file_is_checked(tmp_path):
    changed = tmp_path / "vad.onnx"
    changed.write_bytes(vad.MODEL_PATH.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="not the Silero VAD v6 model"):
        vad.SileroVad(changed)


@pytest.mark.parametrize("samples", [16000, 32 * 512])
def test_the_callers_audio_is_left_as_it_was(samples):
    # The scorer zeroes samples of the padded copy it is given (as faster-whisper's does).
    audio = np.random.default_rng(0).standard_normal(samples).astype(np.float32)
    before = audio.copy()
    vad.speech_timestamps(audio)
    assert np.array_equal(audio, before)
