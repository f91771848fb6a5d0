"""Mapping exceptions to OpenAI-style HTTP errors, in one place."""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any, Dict, Optional

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from deployments.contract import (
    InvalidAudioError,
    InvalidOptionsError,
    ModelFailedError,
    ModelUnavailableError,
    UnsupportedLanguageError,
    UnsupportedOptionError,
)
from serve_app.audio import TruncatedAudioError, UnsupportedMediaError

# A refused option's form field, where it differs from the `TranscribeOptions` field.
_FORM_FIELDS = {"initial_prompt": "prompt", "word_timestamps": "timestamp_granularities[]", "task": "model"}

logger = logging.getLogger(__name__)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorInfo


class APIError(Exception):
    """An error the ingress answers with a given status, type and param."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[Dict[str, str]] = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers


class UploadTooLargeError(APIError):
    def __init__(self, size: Optional[int], limit: int):
        what = f"The file is {size} bytes" if size is not None else "The request body is too large"
        super().__init__(413, f"{what}; the limit is {limit} bytes.", param="file", code="file_too_large")


class RetryLaterError(APIError):
    """The service cannot take this now, for a while (a server_error with Retry-After)."""

    def __init__(self, status: int, message: str, *, code: str, retry_after_s: int):
        super().__init__(status, message, type="server_error", code=code, headers={"Retry-After": str(retry_after_s)})


class IngressOverloadedError(RetryLaterError):
    """The ingress replica already serves as many transcriptions as it admits (HTTP 503)."""

    def __init__(self, in_flight: int, limit: int, retry_after_s: int):
        super().__init__(503, f"The service is at capacity ({in_flight} transcriptions in progress on this replica, limit {limit}); retry in {retry_after_s} s.", code="ingress_overloaded", retry_after_s=retry_after_s)


class JobNotFoundError(APIError):
    def __init__(self, job_id: str):
        super().__init__(404, f"No job {job_id!r}: it never existed, was deleted, or its result expired.", param="job_id", code="job_not_found")


class JobNotFinishedError(APIError):
    def __init__(self, job_id: str, status: str):
        super().__init__(409, f"Job {job_id!r} is {status}; its result can be rendered once it has succeeded.", param="format", code="job_not_finished")


class JobsQueueFullError(RetryLaterError):
    def __init__(self, queued: int, retry_after_s: int):
        super().__init__(429, f"{queued} jobs are queued, as many as the service keeps; retry in {retry_after_s} s.", code="jobs_queue_full", retry_after_s=retry_after_s)


class JobsMediaFullError(RetryLaterError):
    def __init__(self, retry_after_s: int):
        super().__init__(429, f"The uploads of jobs not yet done fill the space the service keeps for them; retry in {retry_after_s} s, or send a smaller file.", code="jobs_media_full", retry_after_s=retry_after_s)


class JobsUnavailableError(RetryLaterError):
    def __init__(self, retry_after_s: int):
        super().__init__(503, f"The job database cannot be reached; retry in {retry_after_s} s. Transcriptions that do not go through a job are not affected.", code="jobs_unavailable", retry_after_s=retry_after_s)


class JobsDisabledError(APIError):
    def __init__(self):
        super().__init__(404, "Transcription jobs are turned off on this service (jobs.enabled).", code="jobs_disabled")


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.@+-]+/)*([\w.@+-]+)")
_IP_PORT = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b")
_HEX_ID = re.compile(r"\b[0-9a-f]{24,}\b")
_INTERNALS = ("Traceback (most recent call last)", "ray::", "RayTaskError", "File \"", "pid=", "actor_id")


def _cut_paths(text: str) -> str:
    """Absolute paths in `text` cut to their last part."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group(1), text)


def redact(text: str) -> str:
    """`text` without what a client must not see: absolute paths (their last part is kept),
    IP addresses, long hexadecimal ids and terminal colours."""
    text = _cut_paths(_ANSI.sub("", text))
    text = _IP_PORT.sub("<address>", text)
    return _HEX_ID.sub("<id>", text)


def client_message(text: str, fallback: str) -> str:
    """What a client is told: `text` redacted, or `fallback` where `text` is a traceback or
    carries Ray's internals (the full text goes to the log)."""
    if any(marker in text for marker in _INTERNALS):
        logger.warning("Replaced an error message with internals in it: %s", text)
        return fallback
    return redact(text)


def redact_paths(value: Any) -> Any:
    """A copy of a JSON-like value with absolute paths cut to their last part (model info;
    versions like 1.2.3.4 must survive, so addresses are left to `client_message`)."""
    if isinstance(value, str):
        return _cut_paths(value)
    if isinstance(value, dict):
        return {k: redact_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_paths(v) for v in value]
    return value


def create_error_response(status: int, message: str, *, type: str, param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None) -> JSONResponse:
    message = client_message(message, _GENERIC.get(status, "The request could not be served."))
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(status_code=status, content=body.model_dump(), headers=headers)


_GENERIC = {
    400: "The request is invalid.",
    500: "The service failed on this request.",
    503: "The service cannot take this request now; retry later.",
}


def error_response_for(exc: BaseException) -> JSONResponse:
    """The one place where an exception becomes an HTTP status and an OpenAI error body."""
    from ray.serve.exceptions import BackPressureError

    from serve_app.routing import UnknownModelError

    exc = _cause(exc)
    if isinstance(exc, APIError):
        return create_error_response(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code, headers=exc.headers)
    if isinstance(exc, UnsupportedMediaError):
        return create_error_response(415, str(exc), type="invalid_request_error", param="file", code="unsupported_media")
    if isinstance(exc, UnsupportedOptionError):
        return create_error_response(400, str(exc), type="invalid_request_error", param=_FORM_FIELDS.get(exc.option, exc.option), code="unsupported_option")
    if isinstance(exc, UnsupportedLanguageError):
        return create_error_response(400, str(exc), type="invalid_request_error", param="language", code="unsupported_language")
    if isinstance(exc, UnknownModelError):
        return create_error_response(400, str(exc), type="invalid_request_error", param="model", code="model_not_found")
    if isinstance(exc, TruncatedAudioError):
        return create_error_response(400, str(exc), type="invalid_request_error", param="file", code="truncated_audio")
    if isinstance(exc, InvalidAudioError):
        return create_error_response(400, str(exc), type="invalid_request_error", param="file", code="invalid_audio")
    if isinstance(exc, (InvalidOptionsError, ValueError)):
        return create_error_response(400, str(exc), type="invalid_request_error")
    if isinstance(exc, BackPressureError):
        # A model app's queue is full and no fallback could take the request.
        retry_after = max(1, math.ceil(getattr(exc, "retry_after_s", None) or 5))
        return create_error_response(
            503,
            f"The model is at capacity ({exc}); retry in {retry_after} s.",
            type="server_error",
            code="model_overloaded",
            headers={"Retry-After": str(retry_after)},
        )
    if isinstance(exc, ModelUnavailableError):
        return create_error_response(503, str(exc), type="server_error", code="model_unavailable", headers={"Retry-After": "30"})
    if isinstance(exc, TimeoutError):
        return create_error_response(504, "The model did not answer in time.", type="server_error", code="timeout")
    if isinstance(exc, ModelFailedError):
        return create_error_response(500, f"The model failed on this request ({str(exc).split(':')[0]}).", type="server_error", code="model_failed")
    if isinstance(exc, NotImplementedError):
        return create_error_response(501, str(exc) or "Not implemented.", type="invalid_request_error")
    if _replica_lost(exc):
        logger.warning("A model replica was lost mid-request: %s", exc)
        return create_error_response(
            503,
            "The model replica serving this request stopped before it answered (it is being restarted); retry in 10 s.",
            type="server_error",
            code="model_replica_lost",
            headers={"Retry-After": "10"},
        )
    logger.exception("Unhandled error", exc_info=exc)
    return create_error_response(500, f"Internal error: {type(exc).__name__}", type="server_error")


def error_body(exc: BaseException) -> dict:
    """The `error` object a client would get for `exc` (message, type, param, code), for an answer
    that is not an HTTP error: an event of a stream that has started, a job's stored error."""
    return json.loads(error_response_for(exc).body)["error"]


def error_code(exc: BaseException) -> str:
    """The stable `code` a client would get for `exc` ("error" where the answer has none)."""
    return error_body(exc)["code"] or "error"


def _replica_lost(exc: BaseException) -> bool:
    """A Ray actor, worker or node died, or a Serve replica became unreachable."""
    from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    return isinstance(exc, (RayActorError, WorkerCrashedError, NodeDiedError, ReplicaUnavailableError, DeploymentUnavailableError))


def _cause(exc: BaseException) -> BaseException:
    """The model app's own exception inside Ray's wrapper (whose text is a traceback)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc
