"""Choosing the model app for a request, calling it, and falling back visibly."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from deployments.contract import InvalidAudioError, InvalidOptionsError, ModelUnavailableError
from serve_app.config import IngressSettings, ModelName

logger = logging.getLogger(__name__)

MODEL_ALIASES = {"auto": "auto", "whisper-1": "auto", "belle2": "belle2", "whisperx": "whisperx"}


class RoutedResult(NamedTuple):
    result: dict
    model: ModelName
    """The model that served the request."""
    warnings: List[str]
    """Routing warnings (fallback); empty when the routed model served."""


class ModelRouter:
    """Finds model apps by name, knows whether they can serve, and calls them with fallback."""

    _STATUS_TTL_S = 2.0

    def __init__(self, settings: IngressSettings):
        self._settings = settings
        self._status: Dict[str, bool] = {}
        self._status_at = 0.0
        self._status_lock = asyncio.Lock()

    @staticmethod
    def resolve_alias(model: str) -> str:
        """Maps the request's `model` to "auto", "belle2" or "whisperx".

        Raises:
            InvalidOptionsError: Unknown model name.
        """
        try:
            return MODEL_ALIASES[model]
        except KeyError:
            raise InvalidOptionsError(
                f"Got {model!r} for model; expected one of {sorted(MODEL_ALIASES)}."
            ) from None

    async def available(self, model: ModelName) -> bool:
        """Whether the model's app exists and has at least one running replica."""
        async with self._status_lock:
            if time.monotonic() - self._status_at > self._STATUS_TTL_S:
                self._status = await asyncio.to_thread(self._read_status)
                self._status_at = time.monotonic()
        return self._status.get(self._settings.model_apps[model], False)

    @staticmethod
    def _read_status() -> Dict[str, bool]:
        from ray import serve

        apps = serve.status().applications
        return {
            name: any(d.replica_states.get("RUNNING", 0) > 0 for d in app.deployments.values())
            for name, app in apps.items()
        }

    async def call(self, model: ModelName, method: str, *args) -> dict:
        """Calls `method` on the model app's ingress deployment, bounded by the request timeout.

        Raises:
            ModelUnavailableError: The app is missing or has no running replica.
            TimeoutError: It did not answer in time.
        """
        from ray import serve
        from ray.serve.exceptions import RayServeException

        if not await self.available(model):
            raise ModelUnavailableError(f"The {model} application is not running.")
        try:
            handle = await asyncio.to_thread(serve.get_app_handle, self._settings.model_apps[model])
        except RayServeException as e:
            raise ModelUnavailableError(f"The {model} application is not running ({e}).") from e
        response = getattr(handle, method).remote(*args)
        try:
            return await asyncio.wait_for(response, timeout=self._settings.request_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise TimeoutError(f"{model} did not answer within {self._settings.request_timeout_s} s.") from None

    async def transcribe(self, model: ModelName, audio: np.ndarray, options: dict) -> RoutedResult:
        """Transcribes with `model`, falling back to the configured fallback model on failure.

        Errors in the request itself (bad audio, bad options) are not retried elsewhere.
        """
        try:
            return RoutedResult(await self.call(model, "transcribe", audio, options), model, [])
        except (InvalidAudioError, InvalidOptionsError):
            raise
        except Exception as e:
            fallback = self._settings.fallback_model
            if fallback is None or fallback == model:
                raise
            reason = _describe(e)
            logger.warning("Falling back from %s to %s: %s", model, fallback, reason)
            warning = f"{model} could not serve this request ({reason}); it was served by {fallback} instead."
            result = await self.call(fallback, "transcribe", audio, options)
            return RoutedResult(result, fallback, [warning])


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}".rstrip(": ")


def choose_model(settings: IngressSettings, requested: str, language: Optional[str], probability: Optional[float]) -> Tuple[ModelName, str]:
    """The model for a request and why.

    Args:
        requested: "auto", "belle2" or "whisperx" (after `resolve_alias`).
        language: The client's language, or the detected one.
        probability: Detection confidence; None when the client named the language.
    """
    if requested != "auto":
        return requested, "requested"
    if language is None:
        return settings.default_model, "no speech detected"
    if probability is not None and probability < settings.language_id.threshold:
        return settings.default_model, f"language {language} detected with low confidence {probability:.2f}"
    return settings.route(language), f"language {language}"
