"""What the ingress tells Prometheus, through Ray's metrics agent (`ray.serve.metrics`).

Serve adds the `deployment`, `replica` and `application` labels; Ray prefixes each name with
`ray_` and exports a counter as `<name>_total` (`klipnote_requests` is scraped as
`ray_klipnote_requests_total`). Every label has few values: a route, a model, a language code,
a response format, a status class, an error code; never a request id or a file name.

`RecordRequests` (ASGI middleware, outermost) opens a `RequestRecord` for each transcription
request; the stages fill it in as they learn things (`note_*`), and the middleware records it
once the answer has been sent, so refusals by the middleware in front count too. Without
`install()` (tests and benches outside Serve) every call here does nothing.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import logging
import time
from typing import Dict, List, Optional

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.metrics import KeptGauges
from serve_app.admission import is_transcription, route_path

logger = logging.getLogger(__name__)

ROUTES = ("/v1/audio/transcriptions", "/v1/audio/translations")
REJECTION_CODES = ("ingress_overloaded", "model_overloaded")
"""Error codes of admission control: the service was full, the request itself was fine."""

LATENCY_BOUNDARIES = [0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200]
STAGE_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800]
CONFIDENCE_BOUNDARIES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]


@dataclasses.dataclass
class RequestRecord:
    """One transcription request, as its labels and amounts become known."""

    route: str
    started: float = dataclasses.field(default_factory=time.perf_counter)
    response_format: str = "none"
    model: str = "none"
    language: str = "none"
    code: str = ""
    """The error code of a failed request (a streamed one included); "" when it succeeded."""
    upload_bytes: int = 0
    audio_seconds: float = 0.0
    timings: Dict[str, float] = dataclasses.field(default_factory=dict)


_RECORD: contextvars.ContextVar[Optional[RequestRecord]] = contextvars.ContextVar("klipnote_request_record", default=None)


class IngressMetrics:
    """The ingress's metrics. Created in the replica (Serve's labels come from its context)."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter(
            "klipnote_requests",
            description="Transcription requests answered, by route, model served, language, response format, status class and error code.",
            tag_keys=("route", "model", "language", "response_format", "status_class", "code"),
        )
        self.request_seconds = Histogram(
            "klipnote_request_seconds", description="Seconds from a request's arrival to the end of its answer (a stream's included).",
            boundaries=LATENCY_BOUNDARIES, tag_keys=("route", "status_class"),
        )
        self.stage_seconds = Histogram(
            "klipnote_stage_seconds", description="Seconds per request spent opening the upload (open), decoding it to 16 kHz (decode), in language ID (langid, langid_stretches) and in the model apps (model).",
            boundaries=STAGE_BOUNDARIES, tag_keys=("stage",),
        )
        self.fallbacks = Counter(
            "klipnote_fallbacks", description="Model calls served by the fallback model, by the model that could not serve and why (an error code).",
            tag_keys=("from_model", "to_model", "reason"),
        )
        self.rejections = Counter(
            "klipnote_rejections", description="Requests refused by admission control (503), by error code.", tag_keys=("code",),
        )
        self.language_id_seconds = Histogram(
            "klipnote_language_id_seconds", description="Seconds per language-ID pass.", boundaries=STAGE_BOUNDARIES,
        )
        self.language_id_confidence = Histogram(
            "klipnote_language_id_confidence", description="Probability of the detected language, per language-ID pass.", boundaries=CONFIDENCE_BOUNDARIES,
        )
        self.upload_bytes = Counter("klipnote_upload_bytes", description="Bytes of uploaded media.")
        self.audio_seconds = Counter("klipnote_audio_seconds", description="Seconds of audio in answered requests, by the model that served.", tag_keys=("model",))
        self.streams_open = Gauge("klipnote_streams_open", description="Streamed transcriptions (server-sent events) being answered now.")
        self._streams = 0
        self._gauges = KeptGauges()
        self._gauges.set(self.streams_open, 0)

    def finish(self, record: RequestRecord, status: int) -> None:
        status_class = f"{status // 100}xx"
        self.requests.inc(1, tags={
            "route": record.route, "model": record.model, "language": record.language,
            "response_format": record.response_format, "status_class": status_class, "code": record.code,
        })
        self.request_seconds.observe(time.perf_counter() - record.started, tags={"route": record.route, "status_class": status_class})
        if record.code in REJECTION_CODES:
            self.rejections.inc(1, tags={"code": record.code})
        for stage, seconds in record.timings.items():
            self.stage_seconds.observe(seconds, tags={"stage": stage})
        if record.upload_bytes > 0:
            self.upload_bytes.inc(record.upload_bytes, tags={})
        if record.audio_seconds > 0:
            self.audio_seconds.inc(record.audio_seconds, tags={"model": record.model})

    def stream_opened(self) -> None:
        self._streams += 1
        self._gauges.set(self.streams_open, self._streams)

    def stream_closed(self) -> None:
        self._streams -= 1
        self._gauges.set(self.streams_open, self._streams)


_metrics: Optional[IngressMetrics] = None


def install() -> None:
    """Creates the ingress's metrics in this replica (its `__init__`); the `note_*` calls and
    `RecordRequests` record nothing before."""
    global _metrics
    if _metrics is None:
        _metrics = IngressMetrics()


# -- what the stages learn ------------------------------------------------------------------------


def note_request(*, response_format: str, upload_bytes: Optional[int], timings: Dict[str, float]) -> None:
    record = _RECORD.get()
    if record is not None:
        record.response_format = response_format
        record.upload_bytes = upload_bytes or 0
        record.timings = timings


def note_result(body: dict) -> None:
    """What a finished transcription says (its verbose_json body)."""
    record = _RECORD.get()
    if record is not None:
        record.model = body.get("model") or "none"
        record.language = body.get("language") or "none"
        record.audio_seconds = float(body.get("duration") or 0.0)


def note_error(code: Optional[str]) -> None:
    """The error code a request was answered with (or its stream ended with)."""
    record = _RECORD.get()
    if record is not None:
        record.code = code or "error"


def fallback(from_model: str, to_model: str, reason: str) -> None:
    if _metrics is not None:
        _metrics.fallbacks.inc(1, tags={"from_model": from_model, "to_model": to_model, "reason": reason})


def language_id(seconds: float, probabilities: List[float]) -> None:
    """One language-ID pass (one encoder call) and the probability of each clip's language."""
    if _metrics is not None:
        _metrics.language_id_seconds.observe(seconds, tags={})
        for probability in probabilities:
            _metrics.language_id_confidence.observe(probability, tags={})


# -- the middleware -------------------------------------------------------------------------------


class RecordRequests:
    """Opens a `RequestRecord` for each transcription request and records it once the answer
    is sent. The error code comes from the error body (the middleware in front answers some
    errors without any handler), or from `note_error` for a stream that ended in an error."""

    _ERROR_BODY_LIMIT = 64 * 1024

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _metrics is None or not is_transcription(scope):
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        record = RequestRecord(route=path if path in ROUTES else "other")
        token = _RECORD.set(record)
        status = 500
        stream = False
        error_body = b""

        async def recording_send(message: Message) -> None:
            nonlocal status, stream, error_body
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                stream = headers.get(b"content-type", b"").startswith(b"text/event-stream")
                if stream:
                    _metrics.stream_opened()
            elif message["type"] == "http.response.body" and status >= 400 and len(error_body) < self._ERROR_BODY_LIMIT:
                error_body += message.get("body", b"")
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            _RECORD.reset(token)
            if stream:
                _metrics.stream_closed()
            if status >= 400 and not record.code:
                record.code = _error_code(error_body)
            try:
                _metrics.finish(record, status)
            except Exception:  # a metric must never cost an answer
                logger.exception("Could not record a request's metrics.")


def _error_code(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["code"] or "error"
    except (ValueError, KeyError, TypeError):
        return "error"
