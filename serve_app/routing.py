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


class AppState(NamedTuple):
    """What Serve says about one model application."""

    running: bool
    """At least one replica is RUNNING."""
    status: str
    """Serve's application status (RUNNING, DEPLOYING, DEPLOY_FAILED, UNHEALTHY, ...)."""
    message: str
    """The last line of Serve's message for the app or its failing deployment ("" if none)."""

    def reason(self) -> str:
        """Why the app cannot serve, in Serve's words, for warnings and logs."""
        detail = f": {self.message}" if self.message else ""
        return f"application status {self.status}{detail}"


NOT_DEPLOYED = AppState(False, "NOT_DEPLOYED", "no application of that name is deployed")
_MESSAGE_CHARS = 300


class ModelRouter:
    """Finds model apps by name, knows whether they can serve, and calls them with fallback."""

    _STATUS_TTL_S = 2.0

    def __init__(self, settings: IngressSettings):
        self._settings = settings
        self._status: Dict[str, AppState] = {}
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
        return (await self.state(model)).running

    async def state(self, model: ModelName) -> AppState:
        """Serve's view of the model's app (cached for a couple of seconds)."""
        async with self._status_lock:
            if time.monotonic() - self._status_at > self._STATUS_TTL_S:
                self._status = await asyncio.to_thread(self._read_status)
                self._status_at = time.monotonic()
        return self._status.get(self._settings.model_apps[model], NOT_DEPLOYED)

    @staticmethod
    def _read_status() -> Dict[str, AppState]:
        from ray import serve

        return {name: _app_state(app) for name, app in serve.status().applications.items()}

    async def call(self, model: ModelName, method: str, *args) -> dict:
        """Calls `method` on the model app's ingress deployment, bounded by the request timeout.

        Raises:
            ModelUnavailableError: The app is missing or has no running replica.
            TimeoutError: It did not answer in time.
        """
        from ray import serve
        from ray.serve.exceptions import RayServeException

        state = await self.state(model)
        if not state.running:
            raise ModelUnavailableError(state.reason())
        try:
            handle = await asyncio.to_thread(serve.get_app_handle, self._settings.model_apps[model])
        except RayServeException as e:
            raise ModelUnavailableError(f"application not found: {_last_line(str(e))}") from e
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


def _app_state(app) -> AppState:
    """An `AppState` from Serve's `ApplicationStatusOverview`."""
    running = any(d.replica_states.get("RUNNING", 0) > 0 for d in app.deployments.values())
    # A failing deployment's message holds the replica's traceback; the app's only names it.
    messages = [d.message for d in app.deployments.values() if _enum_value(d.status) != "HEALTHY"] + [app.message]
    message = next((_last_line(m) for m in messages if m and m.strip()), "")
    return AppState(running, _enum_value(app.status), message)


def _enum_value(value) -> str:
    return str(getattr(value, "value", value))


def _last_line(text: str) -> str:
    """The last non-empty line (a traceback's exception line), trimmed for a warning."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= _MESSAGE_CHARS else line[: _MESSAGE_CHARS - 3] + "..."


def _describe(exc: BaseException) -> str:
    """A failure in one line: Serve's own words for an unavailable app, else the exception."""
    if isinstance(exc, ModelUnavailableError):
        return _last_line(str(exc))
    return f"{type(exc).__name__}: {_last_line(str(exc))}".rstrip(": ")


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
