"""One transcription, piece by piece: language ID, routing, a model call per piece, fallback, cues.

The ingress opens the upload, then `Transcription.start` reads up to the first piece with speech,
identifies its language and picks the model, so that a bad upload, an unknown language or an
unavailable model is still answered with an HTTP status. `events()` then transcribes piece after
piece and yields each piece's segments as they become final, and a `Finished` at the end; a
plain HTTP answer collects them (`collect`), a streamed one sends each as it comes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from deployments.contract import SAMPLE_RATE, TranscribeOptions
from serve_app.config import IngressSettings
from serve_app.formats import join_text, text_separator
from serve_app.errors import redact_paths
from serve_app.langid import DetectedLanguage, LanguageDetector, vote
from serve_app.pieces import Piece
from serve_app.routing import AUTO, ModelRouter, RoutedResult
from serve_app.stretches import LanguagePlan
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
    warnings: List[str] = field(default_factory=list)
    """The result's warnings so far (a fallback's among them)."""


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
class _Run:
    """Part of a piece that one model call serves (the whole piece, or a run of one language)."""

    start: int
    end: int
    """Samples of the piece."""
    route: _Route
    speech_s: Optional[float] = None
    """Seconds of speech language ID heard in it; None when the piece was not split."""
    speech: Tuple[Tuple[float, float], ...] = ()
    """Its stretches of speech, seconds from the run's start (known when the piece was split)."""


@dataclass
class _Heard:
    """Speech of one language over the recording, for `languages` and the checks of explicit choices."""

    seconds: float = 0.0
    weighted_probability: float = 0.0
    stretches: int = 0
    first_s: Optional[float] = None


@dataclass
class _Done:
    """What the pieces transcribed so far add up to."""

    warnings: List[str]
    duration_s: float
    text_language: Optional[str]
    """The language of the text when it is not the spoken one (translation: "en")."""
    segments: List[dict] = field(default_factory=list)
    text: str = ""
    last_language: Optional[str] = None
    """The language of the text's end (what separates the next text from it)."""
    served_by: Optional[str] = None
    """The model that served first (the result's `model`; each segment names its own)."""
    results: Dict[str, dict] = field(default_factory=dict)
    """Each model's first result (its model info, language, probability)."""
    heard: Dict[str, _Heard] = field(default_factory=dict)
    word_times: List[dict] = field(default_factory=list)
    """Where word times came from: {model, language, source} once each."""

    def warn(self, warning: str) -> None:
        if warning not in self.warnings:
            self.warnings.append(warning)

    def hear(self, language: Optional[str], seconds: float, probability: Optional[float], at_s: float, stretches: int = 1) -> None:
        if language is None or seconds <= 0:
            return
        heard = self.heard.setdefault(language, _Heard())
        heard.seconds += seconds
        heard.weighted_probability += (probability if probability is not None else 1.0) * seconds
        heard.stretches += stretches
        heard.first_s = at_s if heard.first_s is None else heard.first_s

    def add_text(self, text: str, language: Optional[str]) -> str:
        """Appends `text` (in `language`); returns what was appended, separator included."""
        if not text:
            return ""
        language = self.text_language or language
        spaced = text_separator(language) or text_separator(self.last_language)
        delta = (spaced if self.text else "") + text
        self.text += delta
        self.last_language = language
        return delta


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
    _expected: Optional[Tuple[str, Tuple[str, ...]]] = None
    """For a request that named a model or a language: (what it asked for, the languages that fit)."""
    _last_route: Optional[_Route] = None
    _fallen: Dict[str, str] = field(default_factory=dict)
    """Model -> the fallback that served instead: later calls go to the fallback directly."""

    async def start(self) -> None:
        """Reads up to the first piece with speech and picks the model that serves it.

        Raises what the upload, the options or the routing are refused with (before any answer).
        """
        requested = await self.router.resolve(self.requested)
        self.requested = requested
        opts = self.opts
        language, probability = opts.language, None
        needs_language_id = language is None and await self.router.needs_language_id(requested, opts.task)
        if needs_language_id and self.excerpts is not None and not self._split_at_all():
            # (split by language, each piece is heard stretch by stretch: points would add nothing)
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
            # The first piece's runs (worked out ahead) already say what its speech is in.
            detected = _most_heard(self._first.languages) or await self._detect(self._first.audio)
            language, probability = detected.language, detected.probability
        self._route = await self._route_for(language, probability)
        logger.info("Routing to %s (%s).", self._route.model, self._route.reason)
        spec = await self.router.spec(self._route.model)
        if self._route.explicit:
            self.router.check_explicit(self._route.model, spec, self._route.opts)
        self._last_route = self._route
        self._expected = _expected_languages(requested, opts.language, spec.languages if spec is not None else ())
        if self._expected is not None and self.settings.language_id.check_requested and not self._splits(self._first):
            # A clip that named its model or language: one decision, heard once to check it.
            detected = await self._detect(self._first.audio) if probability is None else DetectedLanguage(language, probability)
            warning = self._check_heard(detected.language, 0.0, detected.probability, 0.0)
            if warning:
                self._early_warnings.append(warning)

    @property
    def model(self) -> Optional[str]:
        """The model routing picked for the recording's start (after `start`)."""
        return self._route.model if self._route is not None else self._no_speech_model

    async def _detect(self, audio: np.ndarray) -> DetectedLanguage:
        started = time.perf_counter()
        detected = await asyncio.to_thread(self.detector.detect, audio)
        self.timings["langid"] = self.timings.get("langid", 0.0) + time.perf_counter() - started
        return detected

    async def _route_for(self, language: Optional[str], probability: Optional[float]) -> _Route:
        """The model for speech in `language`, and the options it is called with."""
        opts = self.opts
        model, reason = await self.router.choose(self.requested, opts.task, language, probability)
        trusted = probability is None or probability >= self.settings.language_id.threshold
        # Routing forces what it heard on the model it chose (not an unsure guess); a model the
        # client named decodes as it does (a language it does not take would be refused).
        if language is not None and trusted and opts.language is None and self.requested == AUTO:
            opts = dataclasses.replace(opts, language=language)
        return _Route(model, reason, self.requested != AUTO, language, probability, opts)

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

    def _split_at_all(self) -> bool:
        """Whether pieces of this request may be split by language (see `_splits`)."""
        return self.requested == AUTO and self.opts.language is None and self.settings.language_id.per_stretch

    def _splits(self, piece: Piece) -> bool:
        """Whether `piece` is heard stretch by stretch: to route each language (auto requests) or to
        check a named model or language, in recordings long enough to hold more than one."""
        settings = self.settings.language_id
        if not (self._split_at_all() or (self._expected is not None and settings.check_requested and settings.per_stretch)):
            return False
        length = self.total_s if self.total_s is not None else piece.start_s + piece.duration_s
        return length >= settings.per_stretch_min_seconds

    async def events(self) -> AsyncIterator[Event]:
        """Each piece's segments as it is done, then `Finished`. Call `start` first."""
        async with aclosing(self.pieces):
            if self._route is None:
                yield self._no_speech()
                return
            done = _Done(warnings=list(self._early_warnings), duration_s=self._silent_s,
                         text_language="en" if self.opts.task == "translate" else None)
            started = time.perf_counter()
            piece: Optional[Piece] = self._first
            while piece is not None:
                done.duration_s = piece.start_s + piece.duration_s
                if piece is self._first or await asyncio.to_thread(contains_speech, piece.audio):
                    yield await self._transcribe_piece(piece, done)
                else:
                    yield PieceDone([], "", done.duration_s, self.total_s, None, list(done.warnings))
                piece = await anext(self.pieces, None)
            self.timings["model"] = time.perf_counter() - started
        yield self._finished(done)

    async def _runs(self, piece: Piece, done: _Done) -> Tuple[List[_Run], Optional[RoutedResult]]:
        """The model calls `piece` takes: one, or one per run of a language when it is split.

        Returns:
            The runs, and the result of the whole piece when it was already transcribed (a first
            piece, heard while the model worked on it as routed at the start).
        """
        whole = [_Run(0, piece.audio.size, self._last_route)]
        if not self._splits(piece):
            return whole, None
        if piece.languages is None and self._split_at_all():
            return await self._runs_while_transcribing(piece, done, whole)
        plan = piece.languages or await asyncio.to_thread(plan_languages, self.detector, piece)
        runs = await self._routed_runs(plan, piece, done)
        return (runs if self._split_at_all() else whole), None

    async def _runs_while_transcribing(self, piece: Piece, done: _Done, whole: List[_Run]) -> Tuple[List[_Run], Optional[RoutedResult]]:
        """The first piece: the feed hands it over before hearing its stretches, so that the
        model starts at once on the whole piece, as routed at the start; that result stands
        when the piece turns out to be one run of that route (most recordings), and is called
        off when it holds other languages."""
        call = asyncio.ensure_future(self._transcribe_run(piece.audio, self._last_route))
        try:
            plan = await asyncio.to_thread(plan_languages, self.detector, piece)
            runs = await self._routed_runs(plan, piece, done)
            if len(runs) == 1 and _same_call(runs[0].route, whole[0].route):
                return runs, await call
        finally:
            if not call.done():
                call.cancel()  # the model stops at its next batch
            call.add_done_callback(_retrieved)
        return runs, None

    async def _routed_runs(self, plan: LanguagePlan, piece: Piece, done: _Done) -> List[_Run]:
        """Each run of `plan` with the route of its language (heard languages counted in `done`)."""
        self.timings["langid_stretches"] = self.timings.get("langid_stretches", 0.0) + plan.seconds
        for run in plan.runs:
            done.hear(run.language, run.speech_samples / SAMPLE_RATE, run.probability, piece.start_s + run.start / SAMPLE_RATE)
        out: List[_Run] = []
        for run in plan.runs:
            sure = run.language is not None and run.probability >= self.settings.language_id.threshold
            # Speech heard with no confidence goes on as the speech before it.
            route = await self._route_for(run.language, run.probability) if sure and self._split_at_all() else self._last_route
            self._last_route = route
            speech = tuple(((a - run.start) / SAMPLE_RATE, (b - run.start) / SAMPLE_RATE) for a, b in run.speech)
            out.append(_Run(run.start, run.end, route, run.speech_samples / SAMPLE_RATE, speech))
        return out

    async def _transcribe_piece(self, piece: Piece, done: _Done) -> PieceDone:
        """`piece` through the model of each of its runs; the models in parallel, each run in order."""
        runs, whole = await self._runs(piece, done)
        results: List[Optional[RoutedResult]] = [whole] if whole is not None else [None] * len(runs)
        by_model: Dict[str, List[int]] = {}
        for i, run in enumerate(runs):
            if results[i] is None:
                by_model.setdefault(run.route.model, []).append(i)

        async def serve(indices: List[int]) -> None:
            for i in indices:
                results[i] = await self._transcribe_run(piece.audio[runs[i].start : runs[i].end], runs[i].route)

        await _all([serve(indices) for indices in by_model.values()])
        segments: List[dict] = []
        delta = ""
        for run, routed in zip(runs, results):
            segments += self._take(piece, run, routed, done)
            language = _language_of(routed, run)
            delta += done.add_text(join_text(routed.result["segments"], done.text_language or language), language)
        done.segments += segments
        models = list(dict.fromkeys(r.model for r in results))
        return PieceDone(segments, delta, done.duration_s, self.total_s, models[0] if len(models) == 1 else "+".join(models), list(done.warnings))

    async def _transcribe_run(self, audio: np.ndarray, route: _Route) -> RoutedResult:
        """`audio` through `route`'s model, or the fallback that already served instead of it."""
        model = self._fallen.get(route.model, route.model)
        why = route.reason if model == route.model else f"fallback from {route.model}"
        routed = await self.router.transcribe(model, audio, route.opts, explicit=route.explicit and model == route.model, why=why)
        if routed.fell_back:
            self._fallen[route.model] = routed.model
        return routed

    def _take(self, piece: Piece, run: _Run, routed: RoutedResult, done: _Done) -> List[dict]:
        """A run's result into `done` (warnings, models, languages); its output segments in recording time."""
        start_s = piece.start_s + run.start / SAMPLE_RATE
        duration_s = (run.end - run.start) / SAMPLE_RATE
        warnings = routed.warnings
        if routed.fell_back:
            done.warn(_from_time(warnings[0], start_s))
            warnings = warnings[1:]
        result = routed.result
        for warning in [*warnings, *result.get("warnings", ())]:
            done.warn(warning)
        done.served_by = done.served_by or routed.model
        done.results.setdefault(routed.model, result)
        language = _language_of(routed, run)
        source = {"model": routed.model, "language": language, "source": result.get("word_times")}
        if source["source"] and source not in done.word_times:
            done.word_times.append(source)
        if run.speech_s is None:  # not heard stretch by stretch: the piece counts as its language
            probability = run.route.probability if run.route.probability is not None else result.get("language_probability")
            done.hear(language, duration_s, probability, start_s, stretches=0)
        segments = result["segments"]
        if self.as_subtitles:
            segments = subtitle_segments(segments, self.settings.subtitles, duration=duration_s, speech=run.speech or None)
        return [{**seg, "language": language, "model": routed.model} for seg in _shifted(segments, start_s)]

    def _check_heard(self, language: Optional[str], seconds: float, probability: Optional[float], first_s: float, stretches: int = 1) -> Optional[str]:
        """The warning for speech in `language` where the request named another model or language."""
        if self._expected is None or language is None or probability is None:
            return None
        asked, fits = self._expected
        sure = self.settings.language_id.stretch_threshold if stretches > 1 or first_s else self.settings.language_id.threshold
        if _family(language) in {_family(f) for f in fits} or probability < sure:
            return None
        where = "" if not first_s and stretches <= 1 else f" in {stretches} passage(s) of {seconds:.0f} s from {_clock(first_s)} on"
        warning = (
            f"Language ID heard {language}{where} (probability {probability:.2f}), but {asked}: that speech may come out "
            f"wrong (glued words, loops). Leave model=auto and language unset to route each language to its model."
        )
        return warning

    def _finished(self, done: _Done) -> Finished:
        for language, heard in done.heard.items():
            if heard.stretches:
                warning = self._check_heard(language, heard.seconds, heard.weighted_probability / heard.seconds, heard.first_s or 0.0, heard.stretches)
                if warning:
                    done.warn(warning)
        warnings = done.warnings + self.late_warnings()
        model = done.served_by or self._route.model
        result = done.results.get(model, {})
        model_info = result.get("model", {})
        languages = _shares(done.heard)
        route = self._route
        language = languages[0]["language"] if languages else (result.get("language") or route.language)
        if language == route.language and route.probability is not None:
            probability = route.probability
        elif language in done.heard and done.heard[language].stretches:
            probability = round(done.heard[language].weighted_probability / done.heard[language].seconds, 3)
        else:
            probability = result.get("language_probability")
        fallback = ", ".join(f"{a}->{b}" for a, b in self._fallen.items()) or None
        body = {
            "task": self.opts.task,
            "language": language,
            "language_probability": probability,
            "languages": languages,
            "duration": done.duration_s,
            "text": done.text,
            "model": model,
            "model_info": model_info if self.settings.expose_paths else redact_paths(model_info),
            "warnings": warnings,
            "segmentation": "subtitle" if self.as_subtitles else "raw",
            "subtitle_compliant_share": compliant_share(done.segments, self.settings.subtitles),
        }
        if done.word_times:
            body["word_times"] = done.word_times
        return Finished(body, done.segments, fallback)

    def _no_speech(self) -> Finished:
        """The answer for audio without speech: empty, with a warning; no model is called."""
        duration = self._silent_s
        body = {
            "task": self.opts.task,
            "language": self.opts.language,
            "language_probability": None,
            "languages": [],
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


def _same_call(route: _Route, other: _Route) -> bool:
    return route.model == other.model and route.opts == other.opts


def _retrieved(future: asyncio.Future) -> None:
    """Reads a dropped call's outcome, so that asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


async def _all(calls: List) -> None:
    """Awaits `calls` together; the first failure is raised as it is (not as a group, which the
    error mapping would not know) and the others are cancelled."""
    if len(calls) == 1:
        await calls[0]
        return
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
            task.add_done_callback(_retrieved)


def _most_heard(plan: Optional[LanguagePlan]) -> Optional[DetectedLanguage]:
    """The language of most of a piece's speech, among the runs heard with confidence."""
    heard = [run for run in plan.runs if run.language is not None] if plan is not None else []
    if not heard:
        return None
    run = max(heard, key=lambda r: r.speech_samples)
    return DetectedLanguage(run.language, run.probability)


def plan_languages(detector: LanguageDetector, piece: Piece) -> LanguagePlan:
    """`piece`'s runs of one language (in a worker thread: VAD and language ID take a while)."""
    started = time.perf_counter()
    runs = detector.runs(piece.audio)
    return LanguagePlan(runs, time.perf_counter() - started)


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
    return f"From {_clock(start_s)} on: {warning}"


def _clock(seconds_s: float) -> str:
    minutes, seconds = divmod(int(seconds_s), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{seconds:02d}"


def _language_of(routed: RoutedResult, run: _Run) -> Optional[str]:
    """The language a run was decoded in: the model's word, else the route's."""
    return routed.result.get("language") or run.route.language


def _family(language: str) -> str:
    """Cantonese is served wherever Mandarin is (`routes`); a check does not tell them apart."""
    return "zh" if language == "yue" else language


def _expected_languages(requested: str, language: Optional[str], model_languages: Tuple[str, ...]) -> Optional[Tuple[str, Tuple[str, ...]]]:
    """For a request that named its language or a model for some languages: what it asked, and the
    languages that fit it; None for a request that leaves both to routing (or a model for all)."""
    if language is not None:
        return f"language={language} was requested", (language,)
    if requested != AUTO and model_languages:
        return f"model={requested} decodes {'/'.join(model_languages)} only", tuple(model_languages)
    return None


def _shares(heard: Dict[str, _Heard]) -> List[dict]:
    """The languages heard, most speech first, with their share of the speech."""
    total = sum(h.seconds for h in heard.values())
    ranked = sorted(heard.items(), key=lambda kv: -kv[1].seconds)
    return [{"language": language, "share": round(h.seconds / total, 3), "seconds": round(h.seconds, 2)} for language, h in ranked] if total else []
