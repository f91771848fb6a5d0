"""How the whisperx app cuts long audio into windows and puts window times back on the file's clock."""

from __future__ import annotations

import numpy as np
import pytest

from deployments.whisperx.core import WhisperXArgs
from deployments.whisperx.stages import audio_windows, shifted as _shifted

SR = 16_000


def _noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * SR)) * 0.1).astype(np.float32)


@pytest.mark.parametrize("seconds", [1.0, 119.9, 120.0])
def test_audio_up_to_one_window_is_one_window(seconds):
    audio = _noise(seconds)
    assert list(audio_windows(audio, 120, 20)) == [(0, audio.size)]


def test_windows_cover_the_audio_and_end_in_the_planted_pauses():
    audio = _noise(400)
    pauses_s = [110.0, 215.5, 330.0]  # each within the last 20 s before a window's limit
    for p in pauses_s:
        audio[int(p * SR) : int(p * SR) + SR // 10] = 0.0
    windows = list(audio_windows(audio, 120, 20))
    assert windows[0][0] == 0 and windows[-1][1] == audio.size
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))  # contiguous, no overlap
    assert all(0 < end - start <= 120 * SR for start, end in windows)
    cuts_s = [end / SR for _, end in windows[:-1]]
    assert cuts_s == pytest.approx([p + 0.05 for p in pauses_s], abs=0.051)


def test_silence_everywhere_still_makes_bounded_windows():
    audio = np.zeros(int(1000 * SR), dtype=np.float32)
    windows = list(audio_windows(audio, 600, 20))
    assert len(windows) == 2 and all(end - start <= 600 * SR for start, end in windows)


def test_shifted_moves_segment_and_words_to_file_time():
    seg = {"start": 1.0, "end": 2.5, "text": "hallo welt", "words": [
        {"word": "hallo", "start": 1.0, "end": 1.4, "score": 0.9},
        {"word": "welt", "start": 1.5, "end": 2.5, "score": 0.8},
    ]}
    moved = _shifted(seg, 600.05)
    assert (moved["start"], moved["end"]) == (601.05, 602.55)
    assert [(w["start"], w["end"], w["score"]) for w in moved["words"]] == [(601.05, 601.45, 0.9), (601.55, 602.55, 0.8)]
    assert seg["start"] == 1.0  # the window's own result is left as it was
    assert _shifted(seg, 0.0) is seg


def test_window_settings_are_validated():
    assert WhisperXArgs().window_s == 600.0
    with pytest.raises(ValueError, match="window_s"):
        WhisperXArgs(window_s=30)
