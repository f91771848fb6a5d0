"""Cross-request batching: windows of concurrent requests decoded in one model call.

Each request decodes in its own worker thread (VAD, features, alignment stay there, in
parallel); only the model call is shared. A request's thread hands its windows to the
`CrossRequestBatcher` and blocks; one runner thread per model takes the oldest waiting windows
and those of other requests with the same decoding settings (`key`), up to `max_batch_size`,
and runs them through the model at once. Windows whose settings differ (beam size, prompt,
temperature: what one library call cannot vary per item) wait for a batch of their own.

Serve's `@serve.batch` would do the gathering in the replica's event loop, but needs a replica
(and async code), while the model cores run without Ray (bench/, the GPU check) and decode in
threads. So this is the same idea as a thread-side queue: max batch size and max wait, per-item
arguments, results split back per request, and a failure confined to the request that caused it.

Standard library only.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Deque, Dict, Hashable, Iterator, List, Optional, Sequence

logger = logging.getLogger(__name__)

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("klipnote_request_id", default="")
"""The request the calling thread decodes for (set by the replica; batches list these ids)."""

RECENT_BATCHES = 64


class BatchWithdrawn(Exception):
    """A request's windows left the queue before a batch took them (its caller was cancelled)."""


@dataclasses.dataclass(eq=False)
class _Entry:
    """One request's windows waiting in the queue, and what came back for them."""

    key: Hashable
    group: Hashable
    """`key` and whatever else must match to share a batch (the request itself, for one that
    shares with nobody)."""
    items: Sequence[Any]
    request_id: str
    enqueued: float
    taken: int = 0
    """Items already handed to a batch (an entry larger than a batch spans several)."""
    results: List[Any] = dataclasses.field(default_factory=list)
    error: Optional[BaseException] = None
    finished: int = 0
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)


class CrossRequestBatcher:
    """Runs `run(key, items) -> outputs` on batches gathered from concurrent callers.

    Args:
        run: Decodes a list of items that share `key`; returns one output per item, in order.
            Called in the runner thread only, one batch at a time.
        max_batch_size: Most items in one call (bounds the model's memory per call).
        max_wait_ms: How long the oldest waiting item may wait for others to join its batch,
            counted from its arrival or from the end of the previous batch, whichever is later.
            The runner waits only while a request that has joined (`joined()`) has nothing
            queued yet, so a lone request never waits.
        name: For log lines and the runner thread's name.
        thread_setup: Called once in the runner thread before its first batch (CPU threads).
        on_batch: Called with the number of items after each successful model call (metrics).
    """

    def __init__(
        self,
        run: Callable[[Hashable, List[Any]], Sequence[Any]],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        name: str = "model",
        thread_setup: Optional[Callable[[], None]] = None,
        on_batch: Optional[Callable[[int], None]] = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"Got max_batch_size={max_batch_size}; expected >= 1.")
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max(0.0, max_wait_ms) / 1000
        self._name = name
        self._thread_setup = thread_setup
        self._on_batch = on_batch
        self._lock = threading.Condition()
        self._queue: Deque[_Entry] = collections.deque()
        self._joined: Dict[int, int] = {}  # id of a joined request's marker -> queued entries
        self._runner: Optional[threading.Thread] = None
        self._free_since = 0.0
        """When the runner finished its last batch (monotonic seconds)."""
        self.busy_since: Optional[float] = None
        """When the model call running now started (monotonic seconds); None between calls."""
        self.stats = BatchStats()

    # -- callers' side ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def joined(self) -> Iterator[None]:
        """Marks the calling request as decoding: the runner may wait (`max_wait_ms`) for its
        windows while it prepares them. Wrap a request's whole decode in it."""
        marker = object()
        with self._lock:
            self._joined[id(marker)] = 0
            token = _MARKER.set(id(marker))
        try:
            yield
        finally:
            _MARKER.reset(token)
            with self._lock:
                del self._joined[id(marker)]
                self._lock.notify_all()  # the runner may be waiting for this request

    def submit(
        self, key: Hashable, items: Sequence[Any], *, should_stop: Optional[Callable[[], bool]] = None, alone: bool = False
    ) -> List[Any]:
        """Decodes `items` in one or more batches, shared with other requests' items of the same
        key, and returns their outputs in order. Blocks the calling thread.

        Args:
            should_stop: Polled while waiting: once true, items no batch has taken yet are
                withdrawn and `BatchWithdrawn` is raised (items already in a batch finish first).
            alone: Share batches with no other request (this request's own items still batch).

        Raises:
            BatchWithdrawn: `should_stop` turned true.
            Exception: What `run` raised for these items (run again without other requests').
        """
        if not items:
            return []
        marker = _MARKER.get()
        group = (key, marker if marker is not None else threading.get_ident()) if alone else key
        entry = _Entry(key=key, group=group, items=list(items), request_id=REQUEST_ID.get(), enqueued=time.monotonic())
        with self._lock:
            self._queue.append(entry)
            if marker in self._joined:
                self._joined[marker] += 1
            self._start_runner()
            self._lock.notify_all()
        try:
            while not entry.done.wait(0.05):
                if should_stop is not None and should_stop() and self._withdraw(entry):
                    raise BatchWithdrawn()
        finally:
            with self._lock:
                if marker in self._joined:
                    self._joined[marker] -= 1
        if entry.error is not None:
            raise entry.error
        return entry.results

    def _withdraw(self, entry: _Entry) -> bool:
        with self._lock:
            if entry.taken == 0 and entry in self._queue:
                self._queue.remove(entry)
                return True
            return False

    # -- the runner ------------------------------------------------------------------------------

    def _start_runner(self) -> None:
        if self._runner is None or not self._runner.is_alive():
            self._runner = threading.Thread(target=self._serve, name=f"{self._name}-batcher", daemon=True)
            self._runner.start()

    def _serve(self) -> None:
        if self._thread_setup is not None:
            try:
                self._thread_setup()
            except Exception:  # the runner must live: every waiting request depends on it
                logger.exception("The batch runner's thread setup failed; running batches without it.")
        while True:
            with self._lock:
                while not self._queue:
                    self._lock.wait()
                batch = self._gather()
            try:
                self._run_batch(batch)
            finally:
                self.busy_since = None
            self._free_since = time.monotonic()

    def _gather(self) -> List[tuple]:
        """(entry, first, stop) slices of queued entries for the next batch; the lock is held."""
        # The wait counts from when the oldest arrived or the model became free, whichever is
        # later: windows that queued during a batch would otherwise leave at once, and two
        # requests would take turns in batches of their own.
        oldest = self._queue[0]
        deadline = max(oldest.enqueued, self._free_since) + self.max_wait_s
        while self._waiting_items(oldest.group) < self.max_batch_size and self._someone_preparing():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._lock.wait(left)
            if not self._queue:  # the oldest was withdrawn meanwhile
                return []
            if self._queue[0] is not oldest:
                oldest = self._queue[0]
                deadline = max(oldest.enqueued, self._free_since) + self.max_wait_s
        group, room, batch = self._queue[0].group, self.max_batch_size, []
        for entry in list(self._queue):
            if room == 0:
                break
            if entry.group != group:
                continue
            count = min(room, len(entry.items) - entry.taken)
            batch.append((entry, entry.taken, entry.taken + count))
            entry.taken += count
            room -= count
            if entry.taken == len(entry.items):
                self._queue.remove(entry)
        return batch

    def _waiting_items(self, group: Hashable) -> int:
        return sum(len(e.items) - e.taken for e in self._queue if e.group == group)

    def _someone_preparing(self) -> bool:
        """A joined request has nothing queued: its windows may be moments away."""
        return any(queued == 0 for queued in self._joined.values())

    def _run_batch(self, batch: List[tuple]) -> None:
        if not batch:
            return
        key = batch[0][0].key
        items = [item for entry, first, stop in batch for item in entry.items[first:stop]]
        requests = sorted({entry.request_id for entry, _, _ in batch})
        waited_ms = (time.monotonic() - min(entry.enqueued for entry, _, _ in batch)) * 1000
        started = self.busy_since = time.monotonic()
        try:
            outputs = list(self._run(key, items))
            if len(outputs) != len(items):
                raise RuntimeError(f"A batch of {len(items)} windows gave {len(outputs)} outputs.")
        except Exception as e:
            if len({id(entry) for entry, _, _ in batch}) == 1:
                self._finish(batch[0], error=e)
            else:
                # One request's window may be what failed: each runs again on its own, so the
                # others still get their results.
                logger.warning("A batch of %d windows (requests %s) failed (%s: %s); decoding each request's windows apart.",
                               len(items), requests, type(e).__name__, e)
                self.stats.isolated += 1
                for part in batch:
                    self._run_batch([part])
            return
        run_ms = (time.monotonic() - started) * 1000
        self.stats.record(len(items), requests, waited_ms, run_ms)
        if self._on_batch is not None:
            try:
                self._on_batch(len(items))
            except Exception:  # a metric must not fail the batch
                logger.exception("on_batch failed.")
        if len(requests) > 1:
            logger.info("Decoded %d windows of %d requests in one batch (%s) in %.0f ms.", len(items), len(requests), requests, run_ms)
        position = 0
        for part in batch:
            entry, first, stop = part
            self._finish(part, outputs=outputs[position : position + stop - first])
            position += stop - first

    def _finish(self, part: tuple, outputs: Optional[List[Any]] = None, error: Optional[BaseException] = None) -> None:
        entry, first, stop = part
        with self._lock:
            if error is not None:
                entry.error = entry.error or error
            else:
                entry.results[first:stop] = outputs
            entry.finished += stop - first
            if entry.finished == len(entry.items) or (error is not None and entry.taken == entry.finished):
                if error is not None and entry in self._queue:
                    self._queue.remove(entry)  # the rest of a failed request is not decoded
                entry.done.set()


_MARKER: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("klipnote_batch_marker", default=None)


@dataclasses.dataclass
class BatchStats:
    """What the batcher did since start: the app's `batches()` handle method returns it."""

    batches: int = 0
    windows: int = 0
    shared: int = 0
    """Batches that held windows of two or more requests."""
    isolated: int = 0
    """Batches that failed with several requests in them and were decoded again request by request."""
    sizes: Dict[int, int] = dataclasses.field(default_factory=dict)
    recent: Deque[dict] = dataclasses.field(default_factory=lambda: collections.deque(maxlen=RECENT_BATCHES))

    def record(self, size: int, requests: List[str], waited_ms: float, run_ms: float) -> None:
        self.batches += 1
        self.windows += size
        self.shared += len(requests) > 1
        self.sizes[size] = self.sizes.get(size, 0) + 1
        self.recent.append({"size": size, "requests": requests, "waited_ms": round(waited_ms, 1), "run_ms": round(run_ms, 1)})

    def to_dict(self) -> dict:
        return {
            "batches": self.batches,
            "windows": self.windows,
            "shared": self.shared,
            "isolated": self.isolated,
            "sizes": {str(k): v for k, v in sorted(self.sizes.items())},
            "recent": list(self.recent),
        }
