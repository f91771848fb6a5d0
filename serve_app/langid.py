"""Spoken-language identification with Whisper's language ID (faster-whisper, CPU)."""

from __future__ import annotations

import logging
import time
from typing import NamedTuple, Optional

import numpy as np

from deployments.contract import SAMPLE_RATE
from serve_app.config import LanguageIdSettings

logger = logging.getLogger(__name__)


class DetectedLanguage(NamedTuple):
    language: Optional[str]
    """ISO 639-1 code; None when there is no speech to listen to."""
    probability: float


class LanguageDetector:
    """Whisper's language ID on the first speech of a recording (VAD-trimmed)."""

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
        """Detects the language of `audio` (16 kHz mono float32)."""
        from faster_whisper.vad import VadOptions, get_speech_timestamps

        # Trim silence first: Whisper's language ID on leading silence or music is a coin toss.
        spans = get_speech_timestamps(audio, VadOptions(min_silence_duration_ms=500, speech_pad_ms=200))
        if not spans:
            return DetectedLanguage(None, 0.0)
        speech = np.concatenate([audio[s["start"] : s["end"]] for s in spans])
        speech = speech[: int(self._settings.max_seconds * SAMPLE_RATE)]
        language, probability, _ = self._model.detect_language(speech, language_detection_segments=1)
        return DetectedLanguage(language, float(probability))
