"""Long recordings in pieces: the decoded audio cut at quiet moments into pieces of bounded length.

A three-hour meeting is 0.7 GB as 16 kHz float32. Sent whole, it sat in the ingress, the object
store and the model replica at once, and no answer could come before the end. Cut into pieces of
a few minutes, each replica holds one piece at a time, and every piece's segments can be
returned as soon as it is done.

A cut falls at the quietest stretch the VAD finds near the target length, so no word is split
and no word is sent twice; segment times are shifted by the piece's exact sample offset.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterable, Iterator, List, Optional

import numpy as np

from deployments.contract import SAMPLE_RATE
from deployments.vad import WINDOW_SAMPLES, silero_vad
from serve_app.stretches import LanguagePlan

QUIET_PROBABILITY = 0.35
"""Silero's speech probability below which a 32 ms window counts as quiet (its default
threshold 0.5 less 0.15, as faster-whisper's VAD ends speech)."""


@dataclass(frozen=True)
class Piece:
    index: int
    start_sample: int
    audio: np.ndarray
    languages: Optional[LanguagePlan] = None
    """Its runs of one language, when worked out ahead (`feed_pieces`'s `prepare`)."""

    @property
    def start_s(self) -> float:
        return self.start_sample / SAMPLE_RATE

    @property
    def duration_s(self) -> float:
        return self.audio.size / SAMPLE_RATE


def cut_pieces(blocks: Iterable[np.ndarray], *, piece_seconds: float, first_piece_seconds: float, search_seconds: float) -> Iterator[Piece]:
    """Joins decoded blocks and cuts them into pieces of at most `piece_seconds`.

    Args:
        blocks: The recording in order (`AudioReader.blocks`).
        piece_seconds: Longest piece. A recording no longer than this is one piece.
        first_piece_seconds: Longest first piece (shorter gives a first answer sooner).
        search_seconds: The cut falls in the last this-many seconds before a piece's limit.
    """
    pending: List[np.ndarray] = []
    pending_size = 0
    start = 0
    index = 0
    limit = int(min(first_piece_seconds, piece_seconds) * SAMPLE_RATE)
    search = int(search_seconds * SAMPLE_RATE)
    for block in blocks:
        pending.append(block)
        pending_size += block.size
        # Cut only once audio beyond the limit has arrived: a recording that ends within the
        # limit stays one piece.
        while pending_size > limit:
            audio = np.concatenate(pending)
            cut = quiet_cut(audio, max(0, limit - search), limit)
            yield Piece(index, start, audio[:cut])
            index += 1
            start += cut
            pending, pending_size = [audio[cut:]], audio.size - cut
            limit = int(piece_seconds * SAMPLE_RATE)
    if pending_size:
        yield Piece(index, start, np.concatenate(pending))


def quiet_cut(audio: np.ndarray, lo: int, hi: int) -> int:
    """A sample offset in [lo, hi) in the middle of the longest quiet run of `audio[lo:hi]`.

    Without any quiet window (music, crosstalk), the least speech-like window.
    """
    region = audio[lo:hi]
    probabilities = silero_vad()(np.pad(region, (0, -region.size % WINDOW_SAMPLES)))[: max(1, region.size // WINDOW_SAMPLES)]
    quiet = np.concatenate(([False], probabilities < QUIET_PROBABILITY, [False]))
    edges = np.flatnonzero(np.diff(quiet.astype(np.int8)))
    starts, ends = edges[::2], edges[1::2]
    if starts.size == 0:
        window = int(np.argmin(probabilities))
        return lo + window * WINDOW_SAMPLES + WINDOW_SAMPLES // 2
    longest = int(np.argmax(ends - starts))
    middle = (starts[longest] + ends[longest]) * WINDOW_SAMPLES // 2
    return lo + min(int(middle), region.size - 1)


_END = object()


async def feed_pieces(pieces: Iterator[Piece], *, ahead: int = 1, prepare: Optional[Callable[[Piece], Piece]] = None) -> AsyncIterator[Piece]:
    """The pieces of `pieces`, decoded and cut in a worker thread up to `ahead` pieces in advance,
    each passed through `prepare` there too (language ID per stretch), if given.

    The next piece is decoded while the model transcribes this one. At most `ahead` + 2 pieces
    exist at a time. Closing the generator (use `contextlib.aclosing`) tells the thread to stop
    after the block it is decoding and waits for it while the closing task is not cancelled;
    the reader behind `pieces` may be closed at any time (`AudioReader.close` waits for the
    block). A streamed answer whose client left is cancelled at every await (anyio cancels a
    scope until it exits), so no await here may be needed for the thread to stop.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(maxsize=ahead)
    stop = threading.Event()

    def put(item) -> bool:
        """Hands `item` over; False once the consumer has gone (the loop may be gone too)."""
        try:
            handed = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
        except RuntimeError:  # the loop is closed
            return False
        while True:
            try:
                handed.result(timeout=0.5)
                return True
            except concurrent.futures.TimeoutError:
                if stop.is_set() or loop.is_closed():
                    handed.cancel()
                    return False

    def produce() -> None:
        try:
            for piece in pieces:
                if stop.is_set() or not put(prepare(piece) if prepare is not None else piece):
                    return
            item = _END
        except BaseException as e:  # handed to the consumer, which raises it
            item = e
        put(item)

    finished = loop.create_future()

    def run() -> None:
        try:
            produce()
        finally:
            try:
                loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))
            except RuntimeError:  # the loop is closed
                pass

    # A thread of its own, not the loop's default executor: it lives as long as the transcription,
    # and a few long ones would otherwise take every executor thread the short steps need.
    threading.Thread(target=run, name="klipnote-pieces", daemon=True).start()
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # Pieces left in the queue stay there: taking them would let a waiting `put` through,
        # and the thread would cut one more piece before it looked at `stop`.
        stop.set()
        await asyncio.wait([finished], timeout=60)  # cancelled: the thread stops all the same
