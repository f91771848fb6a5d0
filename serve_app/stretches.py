"""A piece of a recording as runs of one language: the stretches of speech between pauses, the
language of each, and neighbours of one language joined (mixed-language meetings).

Whisper decides one language per call: a Mandarin meeting with English questions, sent whole to
BELLE-2, came back with the English glued together or looping. So the ingress hears each stretch
of speech on its own (Silero VAD, `deployments/vad.py`), identifies its language (batched,
`LanguageDetector.detect_many`), and `language_runs` joins neighbouring stretches of one language
into runs that cover the piece, cut in the middle of the pause between two languages. Each run is
then transcribed by the model its language routes to (`serve_app/transcription.py`).

Short stretches say little: Whisper's language token on a second of speech drifts. A stretch
shorter than `min_sure_samples`, or heard below the routing threshold, takes the language of
the sure stretch before it (after it, at the start), so a cough or a "yes" does not split a run.
A stretch is sure from `stretch_threshold` (0.8), above the routing threshold: on single-language
recordings a few stretches were heard as another language at 0.53-0.82 (bench/mixed_languages.py).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import numpy as np

from deployments.vad import VadOptions, speech_timestamps


@dataclasses.dataclass(frozen=True)
class Stretch:
    """Speech between two pauses, in samples of its piece, and the language heard in it."""

    start: int
    end: int
    language: Optional[str] = None
    probability: float = 0.0


@dataclasses.dataclass(frozen=True)
class LanguageRun:
    """Neighbouring stretches of one language; the runs of a piece cover it from end to end."""

    start: int
    end: int
    """Sample offsets in the piece (the cuts fall in the middle of pauses)."""
    language: Optional[str]
    """None when no speech in the piece was heard with confidence (it goes on as the speech before it)."""
    probability: float
    """The stretches' confidence, weighted by their length."""
    speech_samples: int
    """Samples of speech in the run (its stretches' lengths)."""
    speech: Tuple[Tuple[int, int], ...] = ()
    """Its stretches, (start, end) samples of the piece: where cues without word times go."""


@dataclasses.dataclass(frozen=True)
class LanguagePlan:
    """A piece's runs, worked out in the piece feed's thread while the model transcribes the piece
    before (`feed_pieces(prepare=...)`), so that a long recording does not wait for them."""

    runs: List[LanguageRun]
    seconds: float
    """Time it took (VAD and language ID)."""


def stretch_vad(min_silence_ms: int) -> VadOptions:
    """What separates two stretches: a pause of `min_silence_ms` (the speech gate's threshold)."""
    return VadOptions(threshold=0.5, min_speech_duration_ms=250, min_silence_duration_ms=min_silence_ms, speech_pad_ms=100)


def speech_stretches(audio: np.ndarray, min_silence_ms: int) -> List[Tuple[int, int]]:
    """(start, end) samples of each stretch of speech in `audio`."""
    return [(span["start"], span["end"]) for span in speech_timestamps(audio, stretch_vad(min_silence_ms))]


def excerpt(audio: np.ndarray, start: int, end: int, samples: int) -> np.ndarray:
    """The first `samples` of a stretch, padded with silence to exactly `samples` (one batch shape)."""
    clip = audio[start : min(end, start + samples)]
    return np.pad(clip, (0, samples - clip.size)) if clip.size < samples else clip


def language_runs(stretches: List[Stretch], total_samples: int, *, threshold: float, min_sure_samples: int) -> List[LanguageRun]:
    """Joins stretches into runs of one language that cover `total_samples`.

    Neighbouring stretches heard as one language are judged together: "one, two, three" is three
    short stretches but one sure run of English.

    Args:
        stretches: In time order, each with the language heard in it.
        threshold: Confidence (length-weighted over a group) from which a language is taken as heard.
        min_sure_samples: A group with less speech than this takes its neighbour's language.

    Returns:
        At least one run (a piece without speech is one run of language None).
    """
    if not stretches:
        return [LanguageRun(0, total_samples, None, 0.0, 0)]
    groups = _grouped(stretches, [s.language for s in stretches])
    sure = [g[0].language is not None and _speech(g) >= min_sure_samples and _confidence(g, g[0].language) >= threshold for g in groups]
    if not any(sure):
        return [LanguageRun(0, total_samples, None, round(_weighted_vote(stretches)[1], 3), _speech(stretches), _spans(stretches))]
    first_sure = groups[sure.index(True)][0].language
    labels: List[Optional[str]] = []
    for group, is_sure in zip(groups, sure):
        label = group[0].language if is_sure else (labels[-1] if labels else first_sure)
        labels += [label] * len(group)
    runs: List[LanguageRun] = []
    after = 0
    for group in _grouped(stretches, labels):
        label = labels[after]
        after += len(group)
        start = runs[-1].end if runs else 0
        end = (group[-1].end + stretches[after].start) // 2 if after < len(stretches) else total_samples
        runs.append(LanguageRun(start, end, label, round(_confidence(group, label), 3), _speech(group), _spans(group)))
    return runs


def _grouped(stretches: List[Stretch], labels: List[Optional[str]]) -> List[List[Stretch]]:
    """Stretches in groups of neighbours with one label."""
    groups: List[List[Stretch]] = []
    for i, stretch in enumerate(stretches):
        if i and labels[i] == labels[i - 1]:
            groups[-1].append(stretch)
        else:
            groups.append([stretch])
    return groups


def _spans(stretches: List[Stretch]) -> Tuple[Tuple[int, int], ...]:
    return tuple((s.start, s.end) for s in stretches)


def _speech(stretches: List[Stretch]) -> int:
    return sum(s.end - s.start for s in stretches)


def _confidence(stretches: List[Stretch], language: Optional[str]) -> float:
    """The length-weighted confidence of the stretches heard as `language` (0 if none)."""
    heard = [s for s in stretches if s.language == language]
    weight = _speech(heard)
    return sum(s.probability * (s.end - s.start) for s in heard) / weight if weight else 0.0


def _weighted_vote(stretches: List[Stretch]) -> Tuple[Optional[str], float]:
    weights: Dict[str, float] = {}
    for s in stretches:
        if s.language is not None:
            weights[s.language] = weights.get(s.language, 0.0) + s.probability * (s.end - s.start)
    if not weights:
        return None, 0.0
    winner = max(weights, key=weights.get)
    length = sum(s.end - s.start for s in stretches if s.language == winner)
    return winner, round(weights[winner] / length, 3) if length else 0.0
