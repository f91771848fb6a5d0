"""The job store (serve_app/jobs/store.py) on both of its databases: SQLite and a real PostgreSQL.

Fast: no Ray. The PostgreSQL server (tests/postgres.py) starts once per session. Time is passed
in as `now`, so leases expire without sleeping.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List

import pytest
from sqlalchemy import create_engine, delete, text

from serve_app.jobs.store import FINISHED, JOBS, STATUSES, Job, JobStore
from tests.postgres import postgres_url  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_760_000_000.123456
"""A timestamp with microseconds, to see them survive the database."""
LEASE_S = 30.0
RETENTION_S = 3600.0
CHINESE_REQUEST = {"model": "belle2", "options": {"language": "zh", "prompt": "会议记录：人工智能"},
                   "segmentation": "subtitles", "filename": "第一次会议.wav"}
CHINESE_SEGMENTS = [{"id": 0, "start": 0.0, "end": 2.5, "text": "大家好，欢迎参加会议。"},
                    {"id": 1, "start": 2.5, "end": 4.0, "text": "今天讨论语音识别。"}]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """The URL of an empty job table: a SQLite file in tmp_path, or the session's PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs' / 'jobs.db'}"
    url = request.getfixturevalue("postgres_url")
    cleaner = JobStore(url)
    with cleaner.engine.begin() as conn:
        conn.execute(delete(JOBS))
    cleaner.close()
    return url


@pytest.fixture
def store(store_url):
    job_store = JobStore(store_url)
    yield job_store
    job_store.close()


def add(store: JobStore, job_id: str, now: float, callback_url: str = None) -> Job:
    return store.create(job_id, request={"model": "belle2", "filename": f"{job_id}.wav"}, media_name=f"{job_id}.wav",
                        media_bytes=1000, total_seconds=60.0, callback_url=callback_url, now=now)


def progress(store: JobStore, job: Job, now: float, text: str) -> bool:
    return store.progress(job.id, job.lease_token, now=now, stage="Transcribing with belle2", done_seconds=10.0,
                          total_seconds=60.0, model="belle2", warnings=[], segments=[{"text": text}], text=text)


def claim_all(store: JobStore, now: float) -> List[Job]:
    claimed = []
    while (job := store.claim(now=now, lease_s=LEASE_S)) is not None:
        claimed.append(job)
    return claimed


# Records


def test_create_and_get_round_trip(store):
    created = store.create("job_1", request=CHINESE_REQUEST, media_name="job_1.wav", media_bytes=123456,
                           total_seconds=4.25, callback_url="https://example.com/hook", now=T0)
    assert created == store.get("job_1")
    assert created.status == "queued" and created.stage == "Queued" and not created.finished
    assert created.created_at == T0 and created.updated_at == T0
    assert created.request == CHINESE_REQUEST
    assert (created.media_name, created.media_bytes, created.total_seconds) == ("job_1.wav", 123456, 4.25)
    assert created.attempt == 0 and created.lease_token is None and not created.cancel_requested
    assert created.webhook_state == "none" and created.webhook_attempts == 0
    assert (created.segments, created.text, created.warnings, created.result, created.error) == ([], "", [], None, None)
    assert store.get("no_such_job") is None


def test_chinese_and_microseconds_round_trip(store):
    add(store, "job_1", T0)
    job = store.claim(now=T0 + 0.000001, lease_s=LEASE_S)
    assert job.started_at == T0 + 0.000001 and job.lease_expires_at == T0 + 0.000001 + LEASE_S
    assert store.progress("job_1", job.lease_token, now=T0 + 1.5, stage="用 belle2 转写", done_seconds=2.5,
                          total_seconds=4.0, model="belle2", warnings=["语言：中文"], segments=CHINESE_SEGMENTS[:1],
                          text=CHINESE_SEGMENTS[0]["text"])
    running = store.get("job_1")
    assert (running.stage, running.warnings) == ("用 belle2 转写", ["语言：中文"])
    assert running.segments == CHINESE_SEGMENTS[:1]
    result = {"text": "大家好，欢迎参加会议。今天讨论语音识别。", "language": "zh", "segments": CHINESE_SEGMENTS}
    finished = store.finish("job_1", job.lease_token, status="succeeded", now=T0 + 2.000007, retention_s=RETENTION_S,
                            result=result, stage="完成")
    assert finished == store.get("job_1")
    assert finished.result == result and finished.segments == CHINESE_SEGMENTS and finished.text == result["text"]
    assert finished.finished_at == T0 + 2.000007 and finished.expires_at == T0 + 2.000007 + RETENTION_S


def test_unknown_status_is_refused(store):
    add(store, "job_1", T0)
    with pytest.raises(ValueError):
        store.count("done")
    job = store.claim(now=T0, lease_s=LEASE_S)
    with pytest.raises(ValueError):
        store.finish("job_1", job.lease_token, status="running", now=T0, retention_s=RETENTION_S, stage="Done")
    assert sorted(FINISHED) == sorted(set(STATUSES) - {"queued", "running"})


def test_list_newest_first_with_cursor_paging(store):
    for i in range(5):
        add(store, f"job_{i}", T0 + i)
    add(store, "job_5b", T0 + 4)  # same created_at as job_4: the id breaks the tie
    page, more = store.list(limit=2)
    assert [j.id for j in page] == ["job_5b", "job_4"] and more
    page, more = store.list(limit=2, after="job_4")
    assert [j.id for j in page] == ["job_3", "job_2"] and more
    page, more = store.list(limit=2, after="job_2")
    assert [j.id for j in page] == ["job_1", "job_0"] and not more
    page, more = store.list(limit=10, after="job_0")
    assert page == [] and not more
    assert [j.id for j in store.list(limit=6)[0]] == ["job_5b", "job_4", "job_3", "job_2", "job_1", "job_0"]
    assert store.list(limit=6)[1] is False
    with pytest.raises(KeyError):
        store.list(limit=2, after="no_such_job")


def test_queue_position_and_count(store):
    for i in range(3):
        add(store, f"job_{i}", T0 + i)
    assert [store.queue_position(f"job_{i}") for i in range(3)] == [1, 2, 3]
    assert store.count("queued") == 3 and store.count("running") == 0
    store.claim(now=T0 + 10, lease_s=LEASE_S)
    assert [store.queue_position(f"job_{i}") for i in range(3)] == [None, 1, 2]
    assert store.count("queued") == 2 and store.count("running") == 1
    assert store.queue_position("no_such_job") is None


# Claims and leases


def test_claim_takes_the_oldest_first(store):
    assert store.claim(now=T0, lease_s=LEASE_S) is None
    for job_id, created in (("b", T0 + 2), ("a", T0 + 1), ("c", T0 + 3)):
        add(store, job_id, created)
    claimed = claim_all(store, now=T0 + 10)
    assert [j.id for j in claimed] == ["a", "b", "c"]
    assert all(j.status == "running" and j.attempt == 1 and j.stage == "Starting" for j in claimed)
    assert all(j.lease_expires_at == T0 + 10 + LEASE_S for j in claimed)
    assert len({j.lease_token for j in claimed}) == 3
    assert store.claim(now=T0 + 10 + LEASE_S - 1, lease_s=LEASE_S) is None


def test_an_expired_lease_is_claimed_again(store):
    add(store, "job_1", T0)
    first = store.claim(now=T0, lease_s=LEASE_S)
    assert store.claim(now=T0 + LEASE_S - 0.5, lease_s=LEASE_S) is None
    assert store.renew("job_1", first.lease_token, now=T0 + 20, lease_s=LEASE_S) is False
    assert store.claim(now=T0 + 20 + LEASE_S - 0.5, lease_s=LEASE_S) is None  # the renewal counted
    second = store.claim(now=T0 + 20 + LEASE_S, lease_s=LEASE_S)
    assert second.id == "job_1" and second.attempt == 2 and second.lease_token != first.lease_token
    assert second.started_at == T0  # the first run's start stands
    assert store.restart("job_1", second.lease_token, now=T0 + 51)
    restarted = store.get("job_1")
    assert (restarted.done_seconds, restarted.segments, restarted.text, restarted.warnings) == (0.0, [], "", [])


def test_a_released_job_is_queued_again_at_once_without_counting_the_run(store):
    add(store, "job_1", T0)
    add(store, "job_2", T0 + 1)
    first = store.claim(now=T0, lease_s=LEASE_S)
    assert progress(store, first, T0 + 2, "half")
    assert store.release("job_1", first.lease_token, now=T0 + 3)
    released = store.get("job_1")
    assert (released.status, released.attempt, released.lease_token, released.text, released.done_seconds) == ("queued", 0, None, "", 0.0)
    assert store.queue_position("job_1") == 1  # still first in line: it was submitted first
    again = store.claim(now=T0 + 4, lease_s=LEASE_S)
    assert again.id == "job_1" and again.attempt == 1
    assert store.release("job_1", first.lease_token, now=T0 + 5) is False  # the old lease holds nothing


def test_a_stale_runner_is_fenced(store):
    add(store, "job_1", T0, callback_url="https://example.com/hook")
    a = store.claim(now=T0, lease_s=LEASE_S)
    assert progress(store, a, T0 + 5, "A before")
    b = store.claim(now=T0 + LEASE_S + 1, lease_s=LEASE_S)
    assert b.lease_token != a.lease_token and b.text == "A before"
    assert store.restart("job_1", b.lease_token, now=T0 + LEASE_S + 2)

    assert store.renew("job_1", a.lease_token, now=T0 + LEASE_S + 3, lease_s=LEASE_S) is None
    assert progress(store, a, T0 + LEASE_S + 3, "A after") is False
    assert store.restart("job_1", a.lease_token, now=T0 + LEASE_S + 3) is False
    assert store.finish("job_1", a.lease_token, status="failed", now=T0 + LEASE_S + 3, retention_s=RETENTION_S,
                        error={"message": "A", "type": "server_error", "code": None}, stage="Failed") is None
    job = store.get("job_1")
    assert job.status == "running" and job.lease_token == b.lease_token and job.text == ""
    assert job.lease_expires_at == T0 + LEASE_S + 1 + LEASE_S and job.error is None

    assert store.renew("job_1", b.lease_token, now=T0 + LEASE_S + 4, lease_s=LEASE_S) is False
    assert progress(store, b, T0 + LEASE_S + 5, "B")
    assert store.get("job_1").text == "B"
    done = store.finish("job_1", b.lease_token, status="succeeded", now=T0 + LEASE_S + 6, retention_s=RETENTION_S,
                        result={"text": "B final", "segments": [{"text": "B final"}]}, stage="Done")
    assert done.status == "succeeded" and done.text == "B final" and done.lease_token is None
    # A finished job has no lease to renew, even for the runner that finished it.
    assert store.renew("job_1", b.lease_token, now=T0 + LEASE_S + 7, lease_s=LEASE_S) is None
    assert store.claim(now=T0 + 10 * LEASE_S, lease_s=LEASE_S) is None


def test_racing_runners_claim_each_job_exactly_once(store_url, store):
    jobs = 20
    for i in range(jobs):
        add(store, f"job_{i:02d}", T0 + i)
    start = threading.Barrier(4)

    def runner(_: int) -> List[str]:
        own = JobStore(store_url)
        try:
            start.wait()
            return [job.id for job in claim_all(own, now=T0 + 100)]
        finally:
            own.close()

    with ThreadPoolExecutor(max_workers=4) as pool:
        claims = [job_id for ids in pool.map(runner, range(4)) for job_id in ids]
    assert sorted(claims) == [f"job_{i:02d}" for i in range(jobs)]
    assert store.count("running") == jobs and store.count("queued") == 0
    assert all(j.attempt == 1 for j in store.list(limit=jobs)[0])


def test_stores_on_one_database_start_together(tmp_path, store_url):
    if store_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'fresh' / 'jobs.db'}"
    else:
        # A database without the table, so that the stores race to create it.
        name = f"klipnote_jobs_{uuid.uuid4().hex}"
        admin = create_engine(store_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        url = store_url.rsplit("/", 1)[0] + "/" + name
    start = threading.Barrier(4)

    def open_store(_: int) -> int:
        start.wait()
        own = JobStore(url)
        try:
            return own.count("queued")
        finally:
            own.close()

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(open_store, range(4))) == [0, 0, 0, 0]


# Cancelling


def test_cancel_a_queued_job(store):
    add(store, "job_1", T0)
    cancelled = store.finish("job_1", None, status="cancelled", now=T0 + 1, retention_s=RETENTION_S, stage="Cancelled")
    assert cancelled.status == "cancelled" and cancelled.finished and cancelled.stage == "Cancelled"
    assert cancelled.finished_at == T0 + 1 and cancelled.webhook_state == "none"
    assert store.claim(now=T0 + 2, lease_s=LEASE_S) is None
    assert store.finish("job_1", None, status="cancelled", now=T0 + 3, retention_s=RETENTION_S,
                        stage="Cancelled") is None  # once only


def test_cancel_a_running_job(store):
    add(store, "job_1", T0)
    job = store.claim(now=T0, lease_s=LEASE_S)
    assert store.finish("job_1", None, status="cancelled", now=T0 + 1, retention_s=RETENTION_S,
                        stage="Cancelled") is None
    assert store.renew("job_1", job.lease_token, now=T0 + 2, lease_s=LEASE_S) is False
    asked = store.request_cancel("job_1", now=T0 + 3)
    assert asked.cancel_requested and asked.status == "running"
    assert store.renew("job_1", job.lease_token, now=T0 + 4, lease_s=LEASE_S) is True
    cancelled = store.finish("job_1", job.lease_token, status="cancelled", now=T0 + 5, retention_s=RETENTION_S,
                             stage="Cancelled")
    assert cancelled.status == "cancelled"
    assert store.request_cancel("no_such_job", now=T0 + 6) is None


# Retention


def test_finished_jobs_expire_after_retention(store):
    add(store, "job_1", T0)
    add(store, "job_2", T0 + 1)
    job = store.claim(now=T0 + 2, lease_s=LEASE_S)
    failed = store.finish(job.id, job.lease_token, status="failed", now=T0 + 10, retention_s=RETENTION_S,
                          error={"message": "音频无法解码", "type": "invalid_request_error", "code": "bad_audio"},
                          stage="Failed")
    assert failed.expires_at == T0 + 10 + RETENTION_S
    assert failed.error["message"] == "音频无法解码" and failed.result is None
    assert store.expired(now=T0 + 10 + RETENTION_S - 0.001) == []
    assert [j.id for j in store.expired(now=T0 + 10 + RETENTION_S)] == ["job_1"]
    assert [j.id for j in store.expired(now=T0 + 10 * RETENTION_S)] == ["job_1"]  # never the queued one

    store.media_removed("job_1")
    assert store.get("job_1").media_name is None
    removed = store.delete("job_1")
    assert removed.id == "job_1" and removed.status == "failed"
    assert store.get("job_1") is None and store.delete("job_1") is None
    assert store.expired(now=T0 + 10 * RETENTION_S) == []
    assert store.get("job_2").status == "queued"


# Webhooks


def test_webhook_becomes_due_when_the_job_finishes(store):
    add(store, "hooked", T0, callback_url="https://example.com/hook")
    add(store, "silent", T0 + 1)
    assert store.due_webhooks(now=T0 + 100) == []
    for job in claim_all(store, now=T0 + 2):
        store.finish(job.id, job.lease_token, status="succeeded", now=T0 + 3, retention_s=RETENTION_S,
                     result={"text": "", "segments": []}, stage="Done")
    hooked, silent = store.get("hooked"), store.get("silent")
    assert (hooked.webhook_state, hooked.webhook_next_at) == ("pending", T0 + 3)
    assert (silent.webhook_state, silent.webhook_next_at) == ("none", None)
    assert store.due_webhooks(now=T0 + 2.5) == []
    assert [j.id for j in store.due_webhooks(now=T0 + 3)] == ["hooked"]


def test_webhook_retries_then_delivers(store):
    add(store, "job_1", T0, callback_url="https://example.com/hook")
    store.finish("job_1", None, status="cancelled", now=T0 + 1, retention_s=RETENTION_S, stage="Cancelled")
    store.webhook_result("job_1", delivered=False, now=T0 + 2, next_at=T0 + 12, error="HTTP 503")
    job = store.get("job_1")
    assert (job.webhook_state, job.webhook_attempts, job.webhook_next_at, job.webhook_error) == \
        ("pending", 1, T0 + 12, "HTTP 503")
    assert store.due_webhooks(now=T0 + 11) == [] and len(store.due_webhooks(now=T0 + 12)) == 1
    store.webhook_result("job_1", delivered=True, now=T0 + 13, next_at=None, error=None)
    job = store.get("job_1")
    assert (job.webhook_state, job.webhook_attempts, job.webhook_next_at) == ("delivered", 2, None)
    assert store.due_webhooks(now=T0 + 1000) == []
    # A late report from another sender does not undo the delivery.
    store.webhook_result("job_1", delivered=False, now=T0 + 14, next_at=None, error="timeout")
    assert store.get("job_1").webhook_state == "delivered"


def test_webhook_fails_when_retries_run_out(store):
    add(store, "job_1", T0, callback_url="https://example.com/hook")
    store.finish("job_1", None, status="cancelled", now=T0 + 1, retention_s=RETENTION_S, stage="Cancelled")
    store.webhook_result("job_1", delivered=False, now=T0 + 2, next_at=None, error="connection refused")
    job = store.get("job_1")
    assert (job.webhook_state, job.webhook_attempts, job.webhook_error) == ("failed", 1, "connection refused")
    assert store.due_webhooks(now=T0 + 1000) == []
