"""Starting a `Transcription` of an upload, its bytes or samples: what the ingress does for a
request and the job runner for a job (`serve_app/jobs/runner.py`), in one place."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, BinaryIO, Callable, Dict, List, Optional, Union

import numpy as np

from deployments.contract import SAMPLE_RATE, InvalidOptionsError, TranscribeOptions
from deployments.core import validate_audio
from serve_app.audio import AudioReader
from serve_app.config import AUTO_NAMES, IngressSettings
from serve_app.langid import LanguageDetector, listen_points
from serve_app.pieces import Piece, cut_pieces, feed_pieces
from serve_app.routing import ModelRouter
from serve_app.transcription import Transcription, plan_languages


def check_segmentation(segmentation: Optional[str]) -> None:
    """Raises InvalidOptionsError unless `segmentation` is None, "subtitle" or "raw"."""
    if segmentation not in (None, "subtitle", "raw"):
        raise InvalidOptionsError(f"Got {segmentation!r} for segmentation; expected 'subtitle' or 'raw'.")


@dataclass
class Transcriber:
    """What a transcription is started with: the settings, the model router and language ID."""

    settings: IngressSettings
    router: ModelRouter
    detector: LanguageDetector

    def _excerpts(self, reader: Optional[AudioReader]) -> Optional[Callable[[], List[np.ndarray]]]:
        """Excerpts for language ID at points spread over a long upload (None: a short one)."""
        settings = self.settings.language_id
        length = reader.expected_seconds if reader is not None else None
        if length is None or length < settings.listen_points_min_seconds or settings.listen_points < 2:
            return None
        # Each excerpt is as long as the scan language ID makes of a recording's start, at most 30 s.
        excerpt_s = min(30.0, settings.scan_seconds)
        return functools.partial(reader.excerpts, listen_points(length, settings.listen_points, excerpt_s), excerpt_s)

    def _language_plan(self, requested: str, opts: TranscribeOptions, total_s: Optional[float]) -> Optional[Callable[[Piece], Piece]]:
        """For a request routed by language: each piece's runs of one language, worked out in the
        piece feed's thread while the model transcribes the piece before (`serve_app/stretches.py`)."""
        settings = self.settings.language_id
        if not settings.per_stretch or requested not in AUTO_NAMES or opts.language is not None:
            return None

        def prepare(piece: Piece) -> Piece:
            length = total_s if total_s is not None else piece.start_s + piece.duration_s
            # The first piece goes at once: it is heard while the model starts on it (Transcription).
            if piece.index == 0 or length < settings.per_stretch_min_seconds:
                return piece
            return dataclasses.replace(piece, languages=plan_languages(self.detector, piece))

        return prepare

    @asynccontextmanager
    async def open(
        self,
        audio: Union[bytes, np.ndarray, BinaryIO],
        requested: str,
        opts: TranscribeOptions,
        *,
        segmentation: Optional[str] = None,
        streaming: bool = False,
        quick_first_piece: Optional[bool] = None,
        timings: Optional[Dict[str, float]] = None,
    ) -> AsyncIterator[Transcription]:
        """A started `Transcription` of `audio` (an upload, its bytes or 16 kHz samples), its
        reader and piece feed closed on exit.

        `streaming`: the answer starts before the end is read, so a recording that ends early is
        transcribed with a warning rather than refused. `quick_first_piece` (by default as
        `streaming`): a short first piece (`pieces.first_seconds_streaming`), so that the first
        segments come early, at some cost in throughput (two model calls where one would do).

        `timings` (if given) receives the seconds spent opening the upload, in language ID and
        in the model apps.
        """
        timings = {} if timings is None else timings
        check_segmentation(segmentation)
        settings = self.settings
        pieces = settings.pieces
        reader: Optional[AudioReader] = None
        if not isinstance(audio, (bytes, bytearray, memoryview)) and not hasattr(audio, "read"):
            samples = validate_audio(np.asarray(audio), max_seconds=settings.max_audio_seconds)
            blocks, total_s = [samples], samples.size / SAMPLE_RATE
        else:
            started = time.perf_counter()
            reader = await asyncio.to_thread(AudioReader, audio, max_seconds=settings.max_audio_seconds, truncation_is_warning=streaming)
            timings["open"] = time.perf_counter() - started
            blocks, total_s = reader.blocks(), reader.expected_seconds
        # Speakers are labelled per model call: a diarized recording goes whole, or one
        # speaker would carry different labels in different pieces.
        piece_seconds = settings.max_audio_seconds if opts.diarize else pieces.seconds
        feed = feed_pieces(cut_pieces(
            blocks,
            piece_seconds=piece_seconds,
            first_piece_seconds=pieces.first_seconds_streaming if (streaming if quick_first_piece is None else quick_first_piece) else piece_seconds,
            search_seconds=pieces.cut_search_seconds,
        ), prepare=self._language_plan(requested, opts, total_s))
        subtitles = settings.subtitles
        try:
            transcription = Transcription(
                router=self.router,
                detector=self.detector,
                settings=settings,
                pieces=feed,
                requested=requested,
                opts=opts,
                as_subtitles=subtitles.enabled if segmentation is None else segmentation == "subtitle",
                total_s=total_s,
                timings=timings,
                late_warnings=reader.warnings if reader is not None else list,
                excerpts=self._excerpts(reader),
            )
            await transcription.start()
            yield transcription
        finally:
            try:
                await feed.aclose()
            finally:  # also when the await is cancelled: the reader closes after the block it reads
                if reader is not None:
                    timings["decode"] = reader.decode_seconds
                    reader.close()
