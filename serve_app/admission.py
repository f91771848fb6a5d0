"""Admission control in the ingress: a full replica answers at once instead of queueing.

Serve queues what a replica cannot take (`max_ongoing_requests`) and rejects beyond
`max_queued_requests` with a fixed plain-text body that cannot be changed. So the ingress
deployment's own queue is unbounded (`max_queued_requests: -1`: Serve never rejects there) and
the ingress admits at most `max_in_flight` transcriptions per replica, answering the rest with
503, OpenAI's error body and Retry-After. For HTTP it decides before the upload is read
(`AdmitTranscriptions`, ASGI middleware), so the answer comes at once whatever the file's size.
The deployment's `max_ongoing_requests` must exceed `max_in_flight`, so the requests over the
limit reach the replica to be told. A full model app's queue is Serve's `BackPressureError` at
the handle, answered as 503 `model_overloaded` (or served by the fallback model).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Optional

from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.errors import IngressOverloadedError, error_response_for

logger = logging.getLogger(__name__)


class Admission:
    """Counts the transcriptions in flight on this replica and refuses those over the limit."""

    def __init__(self, max_in_flight: int, retry_after_s: int, on_idle: Optional[Callable[[], None]] = None):
        self._limit = max_in_flight
        self._retry_after_s = retry_after_s
        self._in_flight = 0
        self._on_idle = on_idle
        """Called (in the event loop) when the last transcription in flight ends."""

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Holds one slot for the duration of the block.

        Raises:
            IngressOverloadedError: All `max_in_flight` slots are taken.
        """
        # One event loop per replica: the check and the increment cannot interleave.
        if self._in_flight >= self._limit:
            logger.warning("Refusing a request: %d transcriptions in flight (limit %d).", self._in_flight, self._limit)
            raise IngressOverloadedError(self._in_flight, self._limit, self._retry_after_s)
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0 and self._on_idle is not None:
                self._on_idle()


ADMITTED_PATHS = ("/v1/audio/",)
"""Routes that transcribe: the only ones that take a slot."""


class AdmitTranscriptions:
    """Takes an admission slot (`app.state.admission`) for each transcription request before
    its body is read, holds it until the response is sent, and answers 503 at once without one."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        admission = getattr(scope["app"].state, "admission", None) if scope["type"] == "http" else None
        if admission is None or scope["method"] != "POST" or not route_path(scope).startswith(ADMITTED_PATHS):
            await self.app(scope, receive, send)
            return
        with contextlib.ExitStack() as slot:
            try:
                slot.enter_context(admission.admit())
            except IngressOverloadedError as refused:
                response = error_response_for(refused)
                response.headers["Connection"] = "close"  # the upload behind it is not read
                await response(scope, receive, send)
                return
            await self.app(scope, receive, send)


def route_path(scope: Scope) -> str:
    """The path within the app (an application's route prefix is the scope's root_path)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path
