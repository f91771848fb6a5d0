"""A faster-whisper application: the shared model replica around `FasterWhisperCore`."""

from __future__ import annotations

from typing import Any, Dict

from ray.serve import Application

from deployments.fasterwhisper.core import FasterWhisperArgs, FasterWhisperCore
from deployments.replica import model_app

__all__ = ["FasterWhisperArgs", "build_app"]


def build_app(args: Dict[str, Any]) -> Application:
    """The faster-whisper application: one `FasterWhisperTranscriber` deployment."""
    return model_app(FasterWhisperCore, args, name="FasterWhisperTranscriber")
