"""Whether a recording holds speech at all, before any model is asked to transcribe it.

Whisper models write text into anything: 0.1 s of audio came back as "Thank you.", a pure tone
as "you.", the noise clip as "Whee!". The ingress answers such uploads with an empty transcript
and a warning instead, using the Silero VAD the models use (`deployments/vad.py`).
"""

from __future__ import annotations

import numpy as np

from deployments.contract import SAMPLE_RATE
from deployments.vad import VadOptions, speech_timestamps

SPEECH_GATE = VadOptions(threshold=0.5, min_speech_duration_ms=250, min_silence_duration_ms=500, speech_pad_ms=0)
"""Any 250 ms the VAD scores as speech. On tests/data and the corpus: every recording of speech
passes (a softly read poem peaks at 0.86), the noise clip peaks at 0.34, tones and white noise
stay under 0.15."""
SCAN_CHUNK_S = 300
"""The VAD runs this much at a time and stops at the first speech: a recording that starts with
speech costs one chunk, an hour of silence about 7 s on one core."""


def contains_speech(audio: np.ndarray) -> bool:
    chunk = SCAN_CHUNK_S * SAMPLE_RATE
    for offset in range(0, audio.size, chunk):
        if speech_timestamps(audio[offset : offset + chunk], SPEECH_GATE):
            return True
    return False


def no_speech_warning(duration_s: float) -> str:
    return f"No speech was found in the audio ({duration_s:.2f} s): nothing was transcribed."
