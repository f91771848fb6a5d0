"""One transcription, piece by piece: language ID, routing, a model call per piece, fallback, cues.

The ingress opens the upload, then `Transcription.start` reads up to the first piece with speech,
identifies its language and picks the model, so that a bad upload, an unknown language or an
unavailable model is still answered with an HTTP status. `events()` then transcribes piece after
piece and yields each piece's segments as they become final, and a `Finished` at the end; a
plain HTTP answer collects them (`collect`), a streamed one sends each as it comes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from deployments.contract import TranscribeOptions
from serve_app.config import IngressSettings
from serve_app.formats import join_text, text_separator
from serve_app.errors import redact_paths
from serve_app.langid import DetectedLanguage, LanguageDetector, vote
from serve_app.pieces import Piece
from serve_app.routing import AUTO, ModelRouter
from serve_app.speech import contains_speech, no_speech_warning
from serve_app.subtitles import compliant_share, subtitle_segments

logger = logging.getLogger(__name__)


@dataclass
class PieceDone:
    """A piece transcribed: its final segments (absolute times) and the text they add."""

    segments: List[dict]
    delta: str
    done_s: float
    """Seconds of the recording transcribed so far."""
    total_s: Optional[float]
    """The recording's length when the container states it; None if unknown."""
    model: Optional[str]


@dataclass
class Finished:
    """The whole result, as verbose_json's fields and the output segments."""

    body: dict
    segments: List[dict]
    fallback: Optional[str]
    """"belle2->whisperx" when a fallback model served any piece."""


Event = Union[PieceDone, Finished]


@dataclass
class _Route:
    model: str
    reason: str
    explicit: bool
    language: Optional[str]
    probability: Optional[float]
    opts: TranscribeOptions


@dataclass
class _Done:
    """What the pieces transcribed so far add up to."""

    warnings: List[str]
    duration_s: float
    text_language: Optional[str]
    segments: List[dict] = field(default_factory=list)
    text: str = ""
    served_by: Optional[str] = None
    first_result: Optional[dict] = None

    def warn(self, warning: str) -> None:
        if warning not in self.warnings:
            self.warnings.append(warning)


@dataclass
class Transcription:
    router: ModelRouter
    detector: LanguageDetector
    settings: IngressSettings
    pieces: AsyncIterator[Piece]
    requested: str
    opts: TranscribeOptions
    as_subtitles: bool
    total_s: Optional[float] = None
    timings: Dict[str, float] = field(default_factory=dict)
    late_warnings: Callable[[], List[str]] = list
    """Warnings known only once the recording was read to its end (a truncated upload)."""
    excerpts: Optional[Callable[[], List[np.ndarray]]] = None
    """For a long recording: excerpts from points spread over it, for language ID to listen to
    before the pieces are read (`LanguageIdSettings.listen_points`)."""

    _route: Optional[_Route] = None
    _first: Optional[Piece] = None
    _silent_s: float = 0.0
    _no_speech_model: Optional[str] = None
    _early_warnings: List[str] = field(default_factory=list)

    async def start(self) -> None:
        """Reads up to the first piece with speech and picks the model that serves it.

        Raises what the upload, the options or the routing are refused with (before any answer).
        """
        requested = await self.router.resolve(self.requested)
        self.requested = requested
        opts = self.opts
        language, probability = opts.language, None
        needs_language_id = language is None and await self.router.needs_language_id(requested, opts.task)
        if needs_language_id and self.excerpts is not None:
            language, probability = await self._listen_at_points()
            needs_language_id = language is None
        async for piece in self.pieces:
            if await asyncio.to_thread(contains_speech, piece.audio):
                self._first = piece
                break
            self._silent_s = piece.start_s + piece.duration_s
        else:
            model, _ = await self.router.choose(requested, self.opts.task, self.opts.language, None)
            self._no_speech_model = model
            return
        if needs_language_id:
            started = time.perf_counter()
            detected = await asyncio.to_thread(self.detector.detect, self._first.audio)
            self.timings["langid"] = time.perf_counter() - started
            language, probability = detected.language, detected.probability
        model, reason = await self.router.choose(requested, opts.task, language, probability)
        logger.info("Routing to %s (%s).", model, reason)
        trusted = probability is None or probability >= self.settings.language_id.threshold
        if language is not None and trusted:  # an unsure guess is not forced on the model
            opts = TranscribeOptions.from_dict({**opts.to_dict(), "language": language})
        self._route = _Route(model, reason, requested != AUTO, language, probability, opts)
        spec = await self.router.spec(model)
        if self._route.explicit:
            self.router.check_explicit(model, spec, opts)

    async def _listen_at_points(self) -> Tuple[Optional[str], Optional[float]]:
        """Language ID at points spread over the recording; the language most of them hear."""
        started = time.perf_counter()

        def listen() -> List[DetectedLanguage]:
            return [self.detector.detect(excerpt) for excerpt in self.excerpts()]

        result = vote(await asyncio.to_thread(listen))
        self.timings["langid"] = time.perf_counter() - started
        if len(result.heard) > 1:
            heard = ", ".join(f"{language} at {n}" for language, n in result.heard.items())
            self._early_warnings.append(
                f"Language ID heard {heard} of {sum(result.heard.values())} points spread over the recording; "
                f"all of it is served as {result.language}, the language most of it is in."
            )
        logger.info("Language ID at %d points: %s.", sum(result.heard.values()), result.heard)
        return result.language, (result.probability if result.language else None)

    async def events(self) -> AsyncIterator[Event]:
        """Each piece's segments as it is done, then `Finished`. Call `start` first."""
        async with aclosing(self.pieces):
            if self._route is None:
                yield self._no_speech()
                return
            route = self._route
            done = _Done(warnings=list(self._early_warnings), duration_s=self._silent_s,
                         text_language="en" if route.opts.task == "translate" else None)
            started = time.perf_counter()
            piece: Optional[Piece] = self._first
            while piece is not None:
                done.duration_s = piece.start_s + piece.duration_s
                if piece is self._first or await asyncio.to_thread(contains_speech, piece.audio):
                    route, event = await self._transcribe_piece(piece, route, done)
                    yield event
                else:
                    yield PieceDone([], "", done.duration_s, self.total_s, None)
                piece = await anext(self.pieces, None)
            self.timings["model"] = time.perf_counter() - started
        yield self._finished(route, done)

    async def _transcribe_piece(self, piece: Piece, route: _Route, done: "_Done") -> Tuple[_Route, PieceDone]:
        """`piece` through `route`'s model (or the fallback, which then serves the rest)."""
        routed = await self.router.transcribe(route.model, piece.audio, route.opts, explicit=route.explicit, why=route.reason)
        warnings = routed.warnings
        if routed.fell_back:
            # The rest of the recording goes to the fallback directly; what is done stays done.
            done.warn(_from_time(warnings[0], piece.start_s))
            warnings = warnings[1:]
            route = _Route(routed.model, f"fallback from {route.model}", False, route.language, route.probability, route.opts)
        result = routed.result
        done.served_by = done.served_by or routed.model
        done.first_result = done.first_result or result
        done.text_language = done.text_language or result.get("language") or route.language
        for warning in [*warnings, *result.get("warnings", ())]:
            done.warn(warning)
        raw = _shifted(result["segments"], piece.start_s)
        segments = raw
        if self.as_subtitles:
            segments = _shifted(subtitle_segments(result["segments"], self.settings.subtitles, duration=piece.duration_s), piece.start_s)
        done.segments += segments
        piece_text = join_text(raw, done.text_language)
        delta = (text_separator(done.text_language) if done.text and piece_text else "") + piece_text
        done.text += delta
        return route, PieceDone(segments, delta, done.duration_s, self.total_s, routed.model)

    def _finished(self, route: _Route, done: "_Done") -> Finished:
        warnings = done.warnings + self.late_warnings()
        first_model = self._route.model
        fallback = f"{first_model}->{route.model}" if route.model != first_model else None
        first_result = done.first_result or {}
        model_info = first_result.get("model", {})
        body = {
            "task": route.opts.task,
            "language": first_result.get("language") or route.language,
            "language_probability": route.probability if route.probability is not None else first_result.get("language_probability"),
            "duration": done.duration_s,
            "text": done.text,
            "model": done.served_by or route.model,
            "model_info": model_info if self.settings.expose_paths else redact_paths(model_info),
            "warnings": warnings,
            "segmentation": "subtitle" if self.as_subtitles else "raw",
            "subtitle_compliant_share": compliant_share(done.segments, self.settings.subtitles),
        }
        return Finished(body, done.segments, fallback)

    def _no_speech(self) -> Finished:
        """The answer for audio without speech: empty, with a warning; no model is called."""
        duration = self._silent_s
        body = {
            "task": self.opts.task,
            "language": self.opts.language,
            "language_probability": None,
            "duration": duration,
            "text": "",
            "model": self._no_speech_model,
            "model_info": {},
            "warnings": [no_speech_warning(duration), *self.late_warnings()],
            "segmentation": "subtitle" if self.as_subtitles else "raw",
            "subtitle_compliant_share": compliant_share([], self.settings.subtitles),
        }
        return Finished(body, [], None)

    async def collect(self) -> Finished:
        """The whole result (for a plain HTTP answer or a handle call)."""
        async for event in self.events():
            if isinstance(event, Finished):
                return event
        raise RuntimeError("A transcription ended without a result.")


def _shifted(segments: List[dict], offset_s: float) -> List[dict]:
    """Segments (and their words) moved from piece time to recording time."""
    if not offset_s:
        return list(segments)
    out = []
    for seg in segments:
        moved = {**seg, "start": round(seg["start"] + offset_s, 3), "end": round(seg["end"] + offset_s, 3)}
        if seg.get("words"):
            moved["words"] = [{**w, "start": round(w["start"] + offset_s, 3), "end": round(w["end"] + offset_s, 3)} for w in seg["words"]]
        out.append(moved)
    return out


def _from_time(warning: str, start_s: float) -> str:
    if start_s <= 0:
        return warning
    minutes, seconds = divmod(int(start_s), 60)
    hours, minutes = divmod(minutes, 60)
    return f"From {hours:d}:{minutes:02d}:{seconds:02d} on: {warning}"
