"""Spoken-language identification with Whisper's language ID (faster-whisper, CPU)."""

from __future__ import annotations

import logging
import time
from typing import Dict, List, NamedTuple, Optional

import numpy as np

from deployments.contract import SAMPLE_RATE
from serve_app import metrics
from serve_app.config import LanguageIdSettings
from serve_app.stretches import LanguageRun, Stretch, excerpt, language_runs, speech_stretches

logger = logging.getLogger(__name__)

_VAD_CHUNK_S = 30.0
"""VAD scans the recording this much at a time and stops once it has heard enough speech."""


class DetectedLanguage(NamedTuple):
    language: Optional[str]
    """ISO 639-1 code; None when there is no speech to listen to."""
    probability: float


class LanguageDetector:
    """Whisper's language ID on the first speech of a recording (VAD-trimmed).

    Whisper pads every window to 30 s; the encoder costs grow with that length (750 ms for a
    padded window against 100 ms for 8 s of speech with base int8 on one core here), while the
    language token's answer needs only a few seconds of speech. So the detector encodes just
    the speech it collected (`max_seconds`, padded with silence to `min_seconds`), which
    CTranslate2's encoder accepts for any length up to 30 s. `bench/langid_latency.py` measures
    latency and accuracy on every clip in tests/data.
    """

    def __init__(self, settings: LanguageIdSettings):
        from faster_whisper import WhisperModel

        started = time.perf_counter()
        self._settings = settings
        self._model = WhisperModel(
            settings.model,
            device=settings.device,
            compute_type=settings.compute_type,
            cpu_threads=settings.cpu_threads,
            download_root=settings.model_cache,
            local_files_only=settings.local_files_only,
        )
        logger.info("Loaded language-ID model %s in %.1f s.", settings.model, time.perf_counter() - started)

    def detect(self, audio: np.ndarray) -> DetectedLanguage:
        """Detects the language of `audio` (16 kHz mono float32).

        Returns:
            The most likely language and its probability; language None when the VAD finds no
            speech in the first `scan_seconds`.
        """
        speech = first_speech(
            audio,
            speech_seconds=self._settings.max_seconds,
            scan_seconds=self._settings.scan_seconds,
        )
        if speech.size == 0:
            return DetectedLanguage(None, 0.0)
        min_samples = int(self._settings.min_seconds * SAMPLE_RATE)
        if speech.size < min_samples:
            # Whisper was trained on zero-padded windows; on a second or two of speech without
            # padding its language token drifts (2.2 s of English read as zh at 0.45 here).
            speech = np.pad(speech, (0, min_samples - speech.size))
        return self._identify([speech])[0]

    def _identify(self, clips: List[np.ndarray]) -> List[DetectedLanguage]:
        """The language of each clip (all of one length), in one encoder pass."""
        started = time.perf_counter()
        extractor = self._model.feature_extractor
        features = np.stack([extractor(clip)[:, : extractor.nb_max_frames] for clip in clips])
        encoded = self._model.encode(features)
        detected = [DetectedLanguage(ranked[0][0][2:-2], float(ranked[0][1])) for ranked in self._model.model.detect_language(encoded)]
        metrics.language_id(time.perf_counter() - started, [d.probability for d in detected])
        return detected

    def runs(self, audio: np.ndarray) -> List[LanguageRun]:
        """`audio` (a piece) as runs of one language (`serve_app/stretches.py`)."""
        settings = self._settings
        spans = speech_stretches(audio, settings.stretch_min_silence_ms)
        samples = int(settings.stretch_seconds * SAMPLE_RATE)
        stretches: List[Stretch] = []
        for first in range(0, len(spans), settings.batch_size):
            batch = spans[first : first + settings.batch_size]
            heard = self._identify([excerpt(audio, start, end, samples) for start, end in batch])
            stretches += [Stretch(start, end, d.language, d.probability) for (start, end), d in zip(batch, heard)]
        return language_runs(
            stretches,
            audio.size,
            threshold=settings.stretch_threshold,
            min_sure_samples=int(settings.stretch_min_sure_seconds * SAMPLE_RATE),
        )


class LanguageVote(NamedTuple):
    language: Optional[str]
    probability: float
    """The winner's confidence summed over the points heard, divided by their number."""
    heard: Dict[str, int]
    """How many points heard each language (points without speech left out)."""


def vote(detections: List[DetectedLanguage]) -> LanguageVote:
    """The language most points heard, each point weighted by its confidence."""
    heard = [d for d in detections if d.language is not None]
    if not heard:
        return LanguageVote(None, 0.0, {})
    weights: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    for d in heard:
        weights[d.language] = weights.get(d.language, 0.0) + d.probability
        counts[d.language] = counts.get(d.language, 0) + 1
    winner = max(weights, key=weights.get)
    return LanguageVote(winner, weights[winner] / len(heard), dict(sorted(counts.items(), key=lambda kv: -kv[1])))


def listen_points(duration_s: float, points: int, excerpt_s: float) -> List[float]:
    """Start times of `points` excerpts spread evenly over a recording (centred in equal parts)."""
    part = duration_s / points
    return [max(0.0, min(duration_s - excerpt_s, part * (i + 0.5) - excerpt_s / 2)) for i in range(points)]


def first_speech(audio: np.ndarray, *, speech_seconds: float, scan_seconds: float) -> np.ndarray:
    """The first `speech_seconds` of speech in the first `scan_seconds` of `audio`, joined.

    Silero VAD (shipped inside faster-whisper) runs chunk by chunk, so an hour-long upload
    costs no more VAD time than its first speech needs.
    """
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    options = VadOptions(min_silence_duration_ms=500, speech_pad_ms=200)
    wanted = int(speech_seconds * SAMPLE_RATE)
    chunk = int(_VAD_CHUNK_S * SAMPLE_RATE)
    end = min(audio.size, int(scan_seconds * SAMPLE_RATE))
    pieces: List[np.ndarray] = []
    collected = 0
    for offset in range(0, end, chunk):
        window = audio[offset : min(offset + chunk, end)]
        for span in get_speech_timestamps(window, options):
            piece = window[span["start"] : span["end"]]
            pieces.append(piece)
            collected += piece.size
            if collected >= wanted:
                return np.concatenate(pieces)[:wanted]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
