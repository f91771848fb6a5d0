"""Admission control in the ingress: a full replica answers at once instead of queueing.

Serve queues what a replica cannot take (`max_ongoing_requests`) and rejects beyond
`max_queued_requests` with a plain-text body. The ingress admits at most `max_in_flight` HTTP
transcriptions per replica and answers the rest with 503, OpenAI's error body and Retry-After,
so an overloaded service is never a hang. The deployment's `max_ongoing_requests` must exceed
`max_in_flight`, so the requests over the limit reach the replica to be told.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from serve_app.errors import IngressOverloadedError

logger = logging.getLogger(__name__)


class Admission:
    """Counts the transcriptions in flight on this replica and refuses those over the limit."""

    def __init__(self, max_in_flight: int, retry_after_s: int):
        self._limit = max_in_flight
        self._retry_after_s = retry_after_s
        self._in_flight = 0

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
