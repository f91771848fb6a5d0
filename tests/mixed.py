"""Mixed-language recordings built from real clips: Mandarin and English joined with short pauses,
as a meeting that switches language (tests and bench/mixed_languages.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from deployments.contract import SAMPLE_RATE

MANDARIN_ENGLISH = (
    "zh_aishell1_BAC009S0724W0121.flac",
    "en_jfk.flac",
    "zh_funasr_asr_example.flac",
    "en_librispeech_1995-1837-0001.flac",
    "zh_paddlespeech_zh.flac",
    "zh_aishell3_SSB00050015.flac",
)
"""Clips in tests/data, in order: 41 s with 0.8 s pauses, switching five times."""


@dataclasses.dataclass(frozen=True)
class Clip:
    file: str
    language: str
    start_s: float
    end_s: float


def mixed_recording(paths: Sequence[Path], languages: Sequence[str], pause_s: float = 0.8) -> Tuple[np.ndarray, List[Clip]]:
    """The clips joined with `pause_s` of silence between them, and where each one lies."""
    from serve_app.audio import decode_audio

    pause = np.zeros(int(pause_s * SAMPLE_RATE), dtype=np.float32)
    parts: List[np.ndarray] = []
    clips: List[Clip] = []
    at = 0
    for path, language in zip(paths, languages):
        audio = decode_audio(Path(path).read_bytes(), max_seconds=3600)
        clips.append(Clip(Path(path).name, language, at / SAMPLE_RATE, (at + audio.size) / SAMPLE_RATE))
        parts += [audio, pause]
        at += audio.size + pause.size
    return np.concatenate(parts[:-1]), clips


def clip_at(clips: Sequence[Clip], start_s: float, end_s: float, margin_s: float = 0.5):
    """The clip whose span (plus `margin_s`) holds [start_s, end_s], or None."""
    for clip in clips:
        if clip.start_s - margin_s <= start_s and end_s <= clip.end_s + margin_s:
            return clip
    return None
