"""Mapping exceptions to OpenAI-style HTTP errors, in one place."""

from __future__ import annotations

import logging
import math
from typing import Dict, Optional

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from deployments.contract import InvalidAudioError, InvalidOptionsError, ModelFailedError, ModelUnavailableError, UnsupportedOptionError
from serve_app.audio import UnsupportedMediaError

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
    def __init__(self, size: int, limit: int):
        super().__init__(413, f"The file is {size} bytes; the limit is {limit} bytes.", param="file", code="file_too_large")


class IngressOverloadedError(APIError):
    """The ingress replica already serves as many transcriptions as it admits (HTTP 503)."""

    def __init__(self, in_flight: int, limit: int, retry_after_s: int):
        super().__init__(
            503,
            f"The service is at capacity ({in_flight} transcriptions in progress on this replica, limit {limit}); retry in {retry_after_s} s.",
            type="server_error",
            code="ingress_overloaded",
            headers={"Retry-After": str(retry_after_s)},
        )


def create_error_response(status: int, message: str, *, type: str, param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(status_code=status, content=body.model_dump(), headers=headers)


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
    if isinstance(exc, UnknownModelError):
        return create_error_response(400, str(exc), type="invalid_request_error", param="model", code="model_not_found")
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
    logger.exception("Unhandled error", exc_info=exc)
    return create_error_response(500, f"Internal error: {type(exc).__name__}", type="server_error")


def _cause(exc: BaseException) -> BaseException:
    """The model app's own exception inside Ray's wrapper (whose text is a traceback)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc
