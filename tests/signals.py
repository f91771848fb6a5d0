"""Audio made from the real recordings to provoke what real speech rarely does on demand
(numpy only: the model envs' probes use it too)."""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16_000


def speech_shaped_hum(speech: np.ndarray, hz: float = 150.0) -> np.ndarray:
    """A steady tone sounding wherever `speech` is voiced: silero VAD takes it for speech, and
    Whisper decodes its windows to no text (a window skipped as no speech)."""
    tone = 0.3 * np.sin(2 * np.pi * hz * np.arange(speech.size) / SAMPLE_RATE)
    return (tone * (np.abs(speech) > 0.02)).astype(np.float32)


def reversed_speech(speech: np.ndarray) -> np.ndarray:
    """Speech played backwards: speech-like to VAD and to language ID, but the greedy decode of it
    fails Whisper's log-probability threshold, so temperature fallback decodes it again."""
    return np.ascontiguousarray(speech[::-1])


def looped_syllable(speech: np.ndarray, start_s: float = 1.0, seconds: float = 0.4, times: int = 24) -> np.ndarray:
    """One syllable of `speech` said `times` times over: decoded at temperature 0, Whisper falls
    into a repetition loop that the text guard collapses (zh_paddlespeech_zh.flac, base weights)."""
    first = int(start_s * SAMPLE_RATE)
    return np.tile(speech[first : first + int(seconds * SAMPLE_RATE)], times).astype(np.float32)
