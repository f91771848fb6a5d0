"""The cross-request batcher (deployments/batching.py) on its own: what it gathers, how it splits
results back, how a failure and a cancellation stay with their request. The model apps' use of
it, with real models, is in tests/test_cross_request_batching.py."""

from __future__ import annotations

import threading
from typing import List

import pytest

from deployments.batching import REQUEST_ID, BatchWithdrawn, CrossRequestBatcher


class Recorder:
    """A `run` that records each batch (key, items) and answers item * 10; it raises for
    "poison" and can be held until released, so a test decides what queues meanwhile."""

    def __init__(self, hold: bool = False):
        self.batches: List[tuple] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, key, items):
        self.batches.append((key, list(items)))
        self.started.set()
        assert self.release.wait(30)
        if "poison" in items:
            raise ValueError("this window cannot be decoded")
        return [item * 10 for item in items]


def in_thread(batcher: CrossRequestBatcher, request_id: str, key, items, out: dict, **kwargs) -> threading.Thread:
    def go():
        REQUEST_ID.set(request_id)
        with batcher.joined():
            try:
                out[request_id] = batcher.submit(key, items, **kwargs)
            except Exception as e:
                out[request_id] = e

    thread = threading.Thread(target=go)
    thread.start()
    return thread


def finish(*threads: threading.Thread) -> None:
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), "a submit never returned"


def busy(batcher: CrossRequestBatcher, recorder: Recorder, out: dict) -> threading.Thread:
    """Starts a held batch of one request ("busy"), so what is submitted next queues."""
    thread = in_thread(batcher, "busy", "k", [0], out)
    assert recorder.started.wait(30)
    return thread


def test_windows_of_concurrent_requests_share_a_batch_and_each_gets_its_own_results():
    recorder = Recorder(hold=True)
    batcher = CrossRequestBatcher(recorder, max_batch_size=8, max_wait_ms=0)
    out: dict = {}
    first = busy(batcher, recorder, out)
    a = in_thread(batcher, "a", "k", [1, 2, 3], out)
    b = in_thread(batcher, "b", "k", [4, 5], out)
    while sum(len(e.items) for e in batcher._queue) < 5:
        threading.Event().wait(0.01)
    recorder.release.set()
    finish(first, a, b)
    assert out == {"busy": [0], "a": [10, 20, 30], "b": [40, 50]}
    assert sorted(recorder.batches[1][1]) == [1, 2, 3, 4, 5]
    stats = batcher.stats.to_dict()
    assert stats["shared"] == 1 and stats["sizes"] == {"1": 1, "5": 1}
    assert stats["recent"][-1]["requests"] == ["a", "b"]


def test_max_batch_size_one_never_mixes_requests():
    recorder = Recorder(hold=True)
    batcher = CrossRequestBatcher(recorder, max_batch_size=1, max_wait_ms=0)
    out: dict = {}
    first = busy(batcher, recorder, out)
    a = in_thread(batcher, "a", "k", [1, 2], out)
    b = in_thread(batcher, "b", "k", [3], out)
    while sum(len(e.items) for e in batcher._queue) < 3:
        threading.Event().wait(0.01)
    recorder.release.set()
    finish(first, a, b)
    assert out == {"busy": [0], "a": [10, 20], "b": [30]}
    assert batcher.stats.shared == 0 and all(len(items) == 1 for _, items in recorder.batches)


def test_a_request_larger_than_a_batch_spans_batches_and_keeps_its_order():
    recorder = Recorder()
    batcher = CrossRequestBatcher(recorder, max_batch_size=3, max_wait_ms=0)
    out: dict = {}
    finish(in_thread(batcher, "a", "k", list(range(1, 8)), out))
    assert out["a"] == [10, 20, 30, 40, 50, 60, 70]
    assert [len(items) for _, items in recorder.batches] == [3, 3, 1]


def test_windows_whose_settings_differ_go_in_separate_batches():
    recorder = Recorder(hold=True)
    batcher = CrossRequestBatcher(recorder, max_batch_size=8, max_wait_ms=0)
    out: dict = {}
    first = busy(batcher, recorder, out)
    a = in_thread(batcher, "a", ("beam", 5), [1], out)
    b = in_thread(batcher, "b", ("beam", 1), [2], out)
    c = in_thread(batcher, "c", ("beam", 5), [3], out)
    while len(batcher._queue) < 3:
        threading.Event().wait(0.01)
    recorder.release.set()
    finish(first, a, b, c)
    assert out == {"busy": [0], "a": [10], "b": [20], "c": [30]}
    keys = [(key, sorted(items)) for key, items in recorder.batches[1:]]
    assert keys == [(("beam", 5), [1, 3]), (("beam", 1), [2])]  # the oldest key first


def test_a_failing_window_fails_only_its_own_request():
    recorder = Recorder(hold=True)
    batcher = CrossRequestBatcher(recorder, max_batch_size=8, max_wait_ms=0)
    out: dict = {}
    first = busy(batcher, recorder, out)
    good = in_thread(batcher, "good", "k", [1, 2], out)
    bad = in_thread(batcher, "bad", "k", ["poison"], out)
    while sum(len(e.items) for e in batcher._queue) < 3:
        threading.Event().wait(0.01)
    recorder.release.set()
    finish(first, good, bad)
    assert out["good"] == [10, 20]
    assert isinstance(out["bad"], ValueError) and "cannot be decoded" in str(out["bad"])
    assert batcher.stats.isolated == 1
    # the shared batch failed; then each request's windows ran on their own
    assert [sorted(map(str, items)) for _, items in recorder.batches[1:]] == [["1", "2", "poison"], ["1", "2"], ["poison"]]


def test_a_cancelled_request_leaves_the_queue_and_the_others_are_served():
    recorder = Recorder(hold=True)
    batcher = CrossRequestBatcher(recorder, max_batch_size=8, max_wait_ms=0)
    out: dict = {}
    first = busy(batcher, recorder, out)
    stop = threading.Event()
    gone = in_thread(batcher, "gone", "k", [7, 8], out, should_stop=stop.is_set)
    stays = in_thread(batcher, "stays", "k", [9], out)
    while sum(len(e.items) for e in batcher._queue) < 3:
        threading.Event().wait(0.01)
    stop.set()
    finish(gone)
    assert isinstance(out["gone"], BatchWithdrawn)
    recorder.release.set()
    finish(first, stays)
    assert out["stays"] == [90]
    assert all(7 not in items for _, items in recorder.batches)


def test_the_runner_waits_for_a_request_that_is_still_preparing_but_not_for_a_lone_one():
    recorder = Recorder()
    # A lone request would wait a minute if the runner waited for nobody: the join times out.
    batcher = CrossRequestBatcher(recorder, max_batch_size=8, max_wait_ms=60_000)
    out: dict = {}
    finish(in_thread(batcher, "alone", "k", [1], out))
    assert out["alone"] == [10]

    # Two joined requests: the first to submit waits for the second, which is still preparing.
    late_joined, late_may_submit = threading.Event(), threading.Event()

    def late():
        REQUEST_ID.set("late")
        with batcher.joined():
            late_joined.set()
            assert late_may_submit.wait(30)
            out["late"] = batcher.submit("k", [2])

    late_thread = threading.Thread(target=late)
    late_thread.start()
    assert late_joined.wait(30)
    early = in_thread(batcher, "early", "k", [3], out)
    while sum(len(e.items) for e in batcher._queue) < 1:
        threading.Event().wait(0.01)
    assert len(recorder.batches) == 1  # "early" waits: "late" has joined and queued nothing yet
    late_may_submit.set()
    finish(early, late_thread)
    assert out["early"] == [30] and out["late"] == [20]
    assert sorted(recorder.batches[1][1]) == [2, 3] and batcher.stats.shared == 1


def test_max_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="max_batch_size"):
        CrossRequestBatcher(lambda key, items: items, max_batch_size=0, max_wait_ms=0)


def test_a_largest_batch_over_the_gpu_share_is_named_with_the_settings_to_lower():
    from deployments.core import batch_memory_problem

    gib = 2**30
    assert batch_memory_problem(60 * gib, 140 * gib, 0.5, "batch_size 8 x max_beam_size 8") is None
    problem = batch_memory_problem(80 * gib, 140 * gib, 0.5, "batch_size 8 x max_beam_size 8")
    assert "80.0 GiB" in problem and "0.50 of 140 GiB = 70.0 GiB" in problem
    assert "batch_size 8 x max_beam_size 8" in problem and "lower batch_size or max_beam_size" in problem


def test_a_request_that_batches_alone_keeps_its_windows_together_but_shares_with_nobody():
    recorder = Recorder(hold=True)
    batcher = CrossRequestBatcher(recorder, max_batch_size=8, max_wait_ms=0)
    out: dict = {}
    first = busy(batcher, recorder, out)
    a = in_thread(batcher, "a", "k", [1, 2], out, alone=True)
    b = in_thread(batcher, "b", "k", [3], out, alone=True)
    while len(batcher._queue) < 2:
        threading.Event().wait(0.01)
    recorder.release.set()
    finish(first, a, b)
    assert out == {"busy": [0], "a": [10, 20], "b": [30]}
    assert sorted(sorted(items) for _, items in recorder.batches[1:]) == [[1, 2], [3]]
    assert all(key == "k" for key, _ in recorder.batches)  # `run` still gets the plain key


def test_the_batcher_says_when_its_running_call_began_and_counts_each_call():
    """What the health check reads (a call running, not for long, vouches for the model) and
    what the replica's metrics count (on_batch)."""
    release, started = threading.Event(), threading.Event()
    sizes: List[int] = []

    def run(key, items):
        started.set()
        release.wait(10)
        return items

    batcher = CrossRequestBatcher(run, max_batch_size=4, max_wait_ms=0, on_batch=sizes.append)
    assert batcher.busy_since is None
    caller = threading.Thread(target=batcher.submit, args=("k", [1, 2, 3]))
    caller.start()
    assert started.wait(10)
    assert batcher.busy_since is not None
    release.set()
    caller.join(10)
    # the caller has its results before the runner clears the mark: give it a moment
    for _ in range(100):
        if batcher.busy_since is None:
            break
        threading.Event().wait(0.05)
    assert batcher.busy_since is None and sizes == [3]
