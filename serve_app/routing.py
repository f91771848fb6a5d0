"""Choosing the model app for a request, calling it, and falling back visibly.

The ingress knows models only from its settings (`model_apps`, `routes`, `default_model`,
`fallback_model`) and from the spec each deployed model app publishes (`ModelSpec`): names and
aliases, translation, whether language ID can be skipped, and which options a model honours.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

import numpy as np

from deployments.contract import (
    InvalidAudioError,
    InvalidOptionsError,
    ModelSpec,
    ModelUnavailableError,
    TranscribeOptions,
    UnsupportedOptionError,
    describe_unhonoured,
    unhonoured_options,
    without_options,
)
from serve_app import metrics
from serve_app.config import AUTO_NAMES, IngressSettings, ModelName
from serve_app.errors import error_code

logger = logging.getLogger(__name__)

AUTO = "auto"


class UnknownModelError(InvalidOptionsError):
    """A request named a model that is neither configured nor an alias of one (HTTP 400)."""


class RoutedResult(NamedTuple):
    result: dict
    model: ModelName
    """The model that served the request."""
    warnings: List[str]
    """Routing warnings (options not applied, fallback)."""
    fell_back: bool
    """A fallback model served instead of the chosen one."""


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
    """Finds model apps by name, knows whether they can serve and what they honour, calls them."""

    _STATUS_TTL_S = 2.0
    _LIVENESS_CHECK_S = 1.0

    def __init__(self, settings: IngressSettings):
        self._settings = settings
        self._status: Dict[str, AppState] = {}
        self._specs: Dict[ModelName, ModelSpec] = {}
        self._status_at = 0.0
        self._status_lock = asyncio.Lock()

    # -- what is deployed ------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Reads Serve's status and the model apps' specs, at most every couple of seconds."""
        async with self._status_lock:
            if time.monotonic() - self._status_at > self._STATUS_TTL_S:
                status, specs = await asyncio.to_thread(self._read_status)
                self._status = status
                self._specs.update(specs)  # a spec outlives its app's outage: /v1/models keeps listing it
                self._status_at = time.monotonic()

    def _read_status(self) -> Tuple[Dict[str, AppState], Dict[ModelName, ModelSpec]]:
        from deployments.runtime import read_spec

        from serve_app.admission import serve_details

        status = {name: _app_state(app) for name, app in serve_details().get("applications", {}).items()}
        specs = {}
        for model, app in self._settings.model_apps.items():
            raw = read_spec(app) if app in status else None
            if raw:
                try:
                    specs[model] = ModelSpec.from_dict(raw)
                except (KeyError, TypeError, ValueError):
                    logger.warning("Ignoring the malformed spec of app %s: %r", app, raw)
        return status, specs

    async def state(self, model: ModelName) -> AppState:
        """Serve's view of the model's app (cached for a couple of seconds)."""
        await self.refresh()
        return self._status.get(self._settings.model_apps[model], NOT_DEPLOYED)

    async def available(self, model: ModelName) -> bool:
        """Whether the model's app exists and has at least one running replica."""
        return (await self.state(model)).running

    async def spec(self, model: ModelName) -> Optional[ModelSpec]:
        """The spec the model's app published, or None while none has been seen."""
        await self.refresh()
        return self._specs.get(model)

    async def specs(self) -> Dict[ModelName, ModelSpec]:
        """Every configured model's spec seen so far, in `model_apps` order."""
        await self.refresh()
        return self._specs_now()

    async def resolve(self, requested: str) -> str:
        """Maps a request's `model` to "auto" or a configured model name (names, then aliases).

        Raises:
            UnknownModelError: Neither a model nor an alias of one.
        """
        if requested in AUTO_NAMES:
            return AUTO
        if requested in self._settings.model_apps:
            return requested
        specs = await self.specs()
        for model, spec in specs.items():
            if requested.lower() in (alias.lower() for alias in spec.aliases):
                return model
        names = [*AUTO_NAMES, *self._settings.model_apps, *(a for s in specs.values() for a in s.aliases)]
        raise UnknownModelError(f"Got {requested!r} for model; expected one of {names}.")

    # -- choosing --------------------------------------------------------------------------------

    async def choose(self, requested: str, task: str, language: Optional[str], probability: Optional[float]) -> Tuple[ModelName, str]:
        """The model for a request and why (see `choose_model`)."""
        return choose_model(self._settings, await self.specs(), requested, task, language, probability)

    async def needs_language_id(self, requested: str, task: str) -> bool:
        """Whether the ingress must identify the language before routing.

        Not when every way this request could be routed ends at one model that identifies the
        language itself (an explicit choice of such a model, or the only model that translates).
        """
        specs = await self.specs()
        if requested != AUTO:
            outcomes = {requested}
        else:
            settings = self._settings
            outcomes = set()
            for language, probability in [(None, None), *((lang, 1.0) for lang in settings.routes)]:
                try:
                    outcomes.add(choose_model(settings, specs, AUTO, task, language, probability)[0])
                except ModelUnavailableError:
                    pass
        return not (len(outcomes) == 1 and (spec := specs.get(next(iter(outcomes)))) is not None and spec.detects_language)

    def check_explicit(self, model: ModelName, spec: Optional[ModelSpec], opts: TranscribeOptions) -> None:
        """Refuses options the explicitly chosen model does not honour (unknown spec: the app judges).

        Raises:
            UnsupportedOptionError: Naming the option and the model.
        """
        refused = unhonoured_options(spec, opts) if spec is not None else []
        if refused:
            raise UnsupportedOptionError(
                f"{describe_unhonoured(refused, opts)} {_honoured_by(refused[0].option, self._specs_now(), model)}".strip(),
                option=refused[0].option,
            )

    # -- calling ---------------------------------------------------------------------------------

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
        waiting = asyncio.ensure_future(response)
        deadline = time.monotonic() + self._settings.request_timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{model} did not answer within {self._settings.request_timeout_s} s.")
                done, _ = await asyncio.wait({waiting}, timeout=min(left, self._LIVENESS_CHECK_S))
                if done:
                    return waiting.result()
                # A request queued on a replica that died would wait for its restart (a minute for
                # BELLE-2): once the app has no running replica, it is handed back (the caller
                # falls back) rather than left waiting.
                state = await self.state(model)
                if not state.running:
                    raise ModelUnavailableError(f"{model} has no running replica while this request waited ({state.reason()})")
        except BaseException:
            if not waiting.done():
                response.cancel()
                waiting.cancel()
                # it may still end with RequestCancelledError rather than be cancelled: read it
                waiting.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise

    async def transcribe(self, model: ModelName, audio: np.ndarray, opts: TranscribeOptions, *, explicit: bool, why: str) -> RoutedResult:
        """Transcribes with `model`, falling back to the configured fallback model on failure.

        Options the serving model does not honour are refused when the client chose it
        (`explicit`), and otherwise left out with a warning. Errors in the request itself (bad
        audio, bad options) are not retried elsewhere.
        """
        spec = await self.spec(model)
        if explicit:
            self.check_explicit(model, spec, opts)
        try:
            return await self._transcribe_with(model, spec, audio, opts, why=why, fell_back=False)
        except (InvalidAudioError, InvalidOptionsError):
            raise
        except Exception as e:
            fallback = self._settings.fallback_model
            if fallback is None or fallback == model:
                raise
            fallback_spec = await self.spec(fallback)
            if fallback_spec is not None and opts.task not in fallback_spec.tasks:
                raise
            reason = _describe(e)
            logger.warning("Falling back from %s to %s: %s", model, fallback, reason)
            metrics.fallback(model, fallback, error_code(e))
            warning = f"{model} could not serve this request ({reason}); it was served by {fallback} instead."
            routed = await self._transcribe_with(fallback, fallback_spec, audio, opts, why=f"fallback from {model}", fell_back=True)
            return routed._replace(warnings=[warning, *routed.warnings])

    async def _transcribe_with(self, model: ModelName, spec: Optional[ModelSpec], audio: np.ndarray, opts: TranscribeOptions, *, why: str, fell_back: bool) -> RoutedResult:
        warnings = []
        left_out = unhonoured_options(spec, opts) if spec is not None else []
        for item in left_out:
            value = getattr(opts, item.option)
            warnings.append(
                f"Option {item.option}={value!r} was not applied: {item.reason} ({model} serves this request: {why}). "
                + _honoured_by(item.option, self._specs_now(), model)
            )
        opts = without_options(opts, [item.option for item in left_out])
        result = await self.call(model, "transcribe", audio, opts.to_dict())
        return RoutedResult(result, model, [w.strip() for w in warnings], fell_back)

    def _specs_now(self) -> Dict[ModelName, ModelSpec]:
        return {m: self._specs[m] for m in self._settings.model_apps if m in self._specs}


def choose_model(
    settings: IngressSettings,
    specs: Dict[ModelName, ModelSpec],
    requested: str,
    task: str,
    language: Optional[str],
    probability: Optional[float],
) -> Tuple[ModelName, str]:
    """The model for a request and why.

    Args:
        specs: The deployed models' specs (`ModelRouter.specs`).
        requested: "auto" or a model name (after `ModelRouter.resolve`).
        task: "transcribe" or "translate": auto routing only picks a model whose spec has it.
        language: The client's language, or the detected one.
        probability: Detection confidence; None when the client named the language.

    Raises:
        ModelUnavailableError: Auto routing found no deployed model for the task.
    """
    if requested != AUTO:
        return requested, "requested"
    if language is None:
        model, reason = settings.default_model, "no speech detected"
    elif probability is not None and probability < settings.language_id.threshold:
        model, reason = settings.default_model, f"language {language} detected with low confidence {probability:.2f}"
    else:
        model, reason = settings.route(language), f"language {language}"
    if task == "transcribe" or task in _tasks(specs, model):
        return model, reason
    for candidate in _ordered(settings, (settings.default_model, settings.fallback_model, *settings.model_apps)):
        if task in _tasks(specs, candidate):
            return candidate, f"{reason}; {model} does not {task}, {candidate} does"
    raise ModelUnavailableError(f"No deployed model can {task}; deployed: {sorted(specs)}.")


def _tasks(specs: Dict[ModelName, ModelSpec], model: ModelName) -> Tuple[str, ...]:
    spec = specs.get(model)
    return spec.tasks if spec is not None else ()


def _ordered(settings: IngressSettings, models: Iterable[Optional[ModelName]]) -> List[ModelName]:
    return list(dict.fromkeys(m for m in models if m is not None and m in settings.model_apps))


def _honoured_by(option: str, specs: Dict[ModelName, ModelSpec], model: ModelName) -> str:
    """A hint for a refused or left-out option: which deployed models honour it."""
    if option == "language":  # a language is for routing to choose, not a model option
        return ""
    probe = {"task": "translate"}.get(option)
    others = [m for m, s in specs.items() if m != model and (probe in s.tasks if probe else option in s.options)]
    if not others:
        return ""
    return f"{' and '.join(others)} {'honours' if len(others) == 1 else 'honour'} it: ask for it with model={others[0]}."


def _app_state(app: dict) -> AppState:
    """An `AppState` from one application of Serve's details dict (`serve_details`; not
    `serve.status()`: see `serve_details`)."""
    deployments = (app.get("deployments") or {}).values()
    running = any(replica.get("state") == "RUNNING" for d in deployments for replica in d.get("replicas") or ())
    # A failing deployment's message holds the replica's traceback; the app's only names it.
    messages = [d.get("message") for d in deployments if d.get("status") != "HEALTHY"] + [app.get("message")]
    message = next((_last_line(m) for m in messages if m and m.strip()), "")
    return AppState(running, _enum_value(app.get("status", "UNKNOWN")), message)


def _enum_value(value) -> str:
    # the details dict holds Serve's str enums (ApplicationStatus.RUNNING), not their names
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
