"""The WhisperX application: the shared model replica around `WhisperXCore` (deployments/whisperx/core.py).

Runs in the whisperx runtime env; the module's top level imports only what every env has, so the
ingress env can validate its settings.
"""

from __future__ import annotations

from typing import Any, Dict

from ray.serve import Application

from deployments.replica import model_app
from deployments.whisperx.core import WhisperXArgs, WhisperXCore

__all__ = ["WhisperXArgs", "build_app"]


def build_app(args: Dict[str, Any]) -> Application:
    """The WhisperX application: one `WhisperXTranscriber` deployment.

    Args:
        args: The Serve config's `args:` (see `WhisperXArgs`).
    """
    return model_app(WhisperXCore, args, name="WhisperXTranscriber")
