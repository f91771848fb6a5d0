"""The durable record of transcription jobs: one table, on SQLite or PostgreSQL.

A job's request, its progress (segments and text so far), its result or error and the state of
its webhook all live here, so any process can answer for a job and a job outlives the process
that runs it. Runners claim a job with a lease: a random token and an expiry they renew while
they work. A runner that dies stops renewing, its lease expires and another runner claims the
job with a new token. The token fences the stale runner: every write a runner makes is an
`UPDATE ... WHERE id = :id AND lease_token = :token`, so once another runner holds the job, the
stale one's writes match no row and it learns that it has lost the job.

One SQL layer (SQLAlchemy Core) serves both databases; claims are compare-and-set updates rather
than `SELECT ... FOR UPDATE SKIP LOCKED`, which SQLite lacks. Timestamps are float unix seconds,
passed in as `now` so that callers (and tests) own the clock. The methods block: async callers
run them in a thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, List, Optional, Tuple

from sqlalchemy import (JSON, BigInteger, Boolean, Column, Double, Index, Integer, MetaData, Table, Text, and_, case,
                        create_engine, delete, event, exc, func, insert, literal, null, or_, select, update)
from sqlalchemy.engine import Connection, Engine, make_url

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = frozenset({"succeeded", "failed", "cancelled"})
WEBHOOK_STATES = ("none", "pending", "delivered", "failed")

CLAIM_ROUNDS = 10
"""Candidate lists a claim works through before giving up; each lost race means another runner won."""
CLAIM_CANDIDATES = 8
"""Claimable jobs read per round, so that losing the oldest to another runner moves on to the next."""
SCHEMA_ATTEMPTS = 3
"""Tries at creating the table, for processes that start together and race to create it."""

METADATA = MetaData()
# `Double` keeps a timestamp's microseconds on PostgreSQL, where a plain `Float` may become `real`.
JOBS = Table(
    "klipnote_jobs",
    METADATA,
    Column("id", Text, primary_key=True),
    Column("status", Text, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("started_at", Double),
    Column("finished_at", Double),
    Column("expires_at", Double),
    Column("request", JSON(none_as_null=True), nullable=False),
    Column("media_name", Text),
    Column("media_bytes", BigInteger, nullable=False),
    Column("total_seconds", Double),
    Column("done_seconds", Double, nullable=False),
    Column("stage", Text, nullable=False),
    Column("model", Text),
    Column("warnings", JSON(none_as_null=True), nullable=False),
    Column("segments", JSON(none_as_null=True), nullable=False),
    Column("text", Text, nullable=False),
    Column("result", JSON(none_as_null=True)),
    Column("error", JSON(none_as_null=True)),
    Column("callback_url", Text),
    Column("webhook_state", Text, nullable=False),
    Column("webhook_attempts", Integer, nullable=False),
    Column("webhook_next_at", Double),
    Column("webhook_error", Text),
    Column("attempt", Integer, nullable=False),
    Column("lease_token", Text),
    Column("lease_expires_at", Double),
    Column("cancel_requested", Boolean, nullable=False),
    Index("ix_klipnote_jobs_status_created_at", "status", "created_at"),
)


@dataclass
class Job:
    """One transcription job as stored."""

    id: str
    status: str
    created_at: float
    updated_at: float
    started_at: Optional[float]
    finished_at: Optional[float]
    expires_at: Optional[float]
    """finished_at + retention: the row and its media go then."""
    request: dict
    """What was asked: {"model", "options", "segmentation", "filename", ...}."""
    media_name: Optional[str]
    """File name of the stored upload under the media directory; None once removed."""
    media_bytes: int
    total_seconds: Optional[float]
    """The recording's length when known."""
    done_seconds: float
    """Audio seconds transcribed so far."""
    stage: str
    """In words, e.g. "Queued", "Transcribing with belle2"."""
    model: Optional[str]
    warnings: List[str]
    segments: List[dict]
    """Segments so far (the final ones once succeeded)."""
    text: str
    result: Optional[dict]
    """The verbose_json body (segments included) once succeeded."""
    error: Optional[dict]
    """{"message", "type", "code"} once failed."""
    callback_url: Optional[str]
    webhook_state: str
    """The webhook's state: "none" (no callback_url), "pending", "delivered" or "failed"."""
    webhook_attempts: int
    webhook_next_at: Optional[float]
    webhook_error: Optional[str]
    attempt: int
    """Runs started (claims); 0 while first queued."""
    lease_token: Optional[str]
    lease_expires_at: Optional[float]
    cancel_requested: bool

    @property
    def finished(self) -> bool:
        """Whether the job has ended (succeeded, failed or cancelled)."""
        return self.status in FINISHED


def _job_from_row(row: Any) -> Job:
    values = {f.name: row._mapping[f.name] for f in fields(Job)}
    values["cancel_requested"] = bool(values["cancel_requested"])
    values["request"] = values["request"] or {}
    values["warnings"] = values["warnings"] or []
    values["segments"] = values["segments"] or []
    return Job(**values)


def _check_status(status: str, allowed: Any = STATUSES) -> None:
    if status not in allowed:
        raise ValueError(f"unknown job status {status!r}; expected one of {sorted(allowed)}")


def _enable_wal(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets one process read while another writes, instead of readers and the writer taking turns.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def _make_engine(url: str) -> Engine:
    """An engine for `url`: SQLite (its directory created, WAL, a busy timeout) or PostgreSQL."""
    parsed = make_url(url)
    # Readable UTF-8 in the JSON columns rather than \\u escapes; both round-trip.
    serializer = partial(json.dumps, ensure_ascii=False)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, json_serializer=serializer, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    # The timeout makes a writer wait for another process's write instead of failing at once.
    engine = create_engine(parsed, json_serializer=serializer,
                           connect_args={"timeout": 30, "check_same_thread": False})
    event.listen(engine, "connect", _enable_wal)
    return engine


def _create_schema(engine: Engine) -> None:
    """Creates the table and its index unless they exist, tolerating another process doing the same."""
    for attempt in range(1, SCHEMA_ATTEMPTS + 1):
        try:
            METADATA.create_all(engine, checkfirst=True)
            return
        except exc.DBAPIError:
            # Another process created the table between our check and our CREATE; the next
            # round's check sees it. A persistent failure is raised on the last round.
            if attempt == SCHEMA_ATTEMPTS:
                raise


def _fenced(job_id: str, token: str) -> tuple:
    """The condition of every runner write: the job is still running under this runner's lease."""
    return (JOBS.c.id == job_id, JOBS.c.status == "running", JOBS.c.lease_token == token)


def _claimable(now: float) -> Any:
    """Queued jobs, and running jobs whose runner stopped renewing its lease."""
    return or_(JOBS.c.status == "queued", and_(JOBS.c.status == "running", JOBS.c.lease_expires_at <= now))


class JobStore:
    """Jobs in one database table; see the module docstring for the lease protocol."""

    def __init__(self, url: str):
        """Opens the database at `url` (a SQLAlchemy URL) and creates the table if missing.

        Args:
            url: e.g. "sqlite:////var/lib/klipnote/jobs.db" or
                "postgresql+psycopg://user@host:5432/klipnote_jobs".
        """
        self.engine = _make_engine(url)
        _create_schema(self.engine)

    @property
    def dialect(self) -> str:
        """The database's kind: "sqlite" or "postgresql"."""
        return self.engine.dialect.name

    def close(self) -> None:
        """Closes the pooled connections."""
        self.engine.dispose()

    # Records

    def create(self, job_id: str, *, request: dict, media_name: str, media_bytes: int,
               total_seconds: Optional[float], callback_url: Optional[str], now: float) -> Job:
        """Records a new queued job.

        Raises:
            sqlalchemy.exc.IntegrityError: a job with this id exists.
        """
        values = dict(
            id=job_id, status="queued", created_at=now, updated_at=now, started_at=None, finished_at=None,
            expires_at=None, request=request, media_name=media_name, media_bytes=media_bytes,
            total_seconds=total_seconds, done_seconds=0.0, stage="Queued", model=None, warnings=[], segments=[],
            text="", result=None, error=None, callback_url=callback_url, webhook_state="none", webhook_attempts=0,
            webhook_next_at=None, webhook_error=None, attempt=0, lease_token=None, lease_expires_at=None,
            cancel_requested=False,
        )
        with self.engine.begin() as conn:
            conn.execute(insert(JOBS).values(**values))
            return self._get(conn, job_id)

    def get(self, job_id: str) -> Optional[Job]:
        """The job, or None if there is none with this id."""
        with self.engine.connect() as conn:
            return self._get(conn, job_id)

    def updated_at(self, job_id: str) -> Optional[float]:
        """When the job last changed (progress, status, a cancel, a webhook), or None if there is
        none: a watcher reads the whole job, its segments so far included, only when this moves."""
        with self.engine.connect() as conn:
            return conn.scalar(select(JOBS.c.updated_at).where(JOBS.c.id == job_id))

    def list(self, *, limit: int, after: Optional[str] = None) -> Tuple[List[Job], bool]:
        """A page of jobs, newest first (by created_at, then id), as OpenAI's cursor paging has it.

        Args:
            limit: the most jobs to return.
            after: a job id; the page starts with the job just older than it.

        Returns:
            The jobs, and whether more remain after them.

        Raises:
            KeyError: `after` names no job.
        """
        query = select(JOBS)
        with self.engine.connect() as conn:
            if after is not None:
                anchor = conn.execute(select(JOBS.c.created_at).where(JOBS.c.id == after)).first()
                if anchor is None:
                    raise KeyError(after)
                query = query.where(or_(JOBS.c.created_at < anchor.created_at,
                                        and_(JOBS.c.created_at == anchor.created_at, JOBS.c.id < after)))
            # One row past the page says whether another page follows.
            rows = conn.execute(query.order_by(JOBS.c.created_at.desc(), JOBS.c.id.desc()).limit(limit + 1)).all()
        return [_job_from_row(r) for r in rows[:limit]], len(rows) > limit

    def queue_position(self, job_id: str) -> Optional[int]:
        """1 for the queued job that the next claim takes, 2 for the one after; None unless queued."""
        with self.engine.connect() as conn:
            row = conn.execute(select(JOBS.c.status, JOBS.c.created_at).where(JOBS.c.id == job_id)).first()
            if row is None or row.status != "queued":
                return None
            ahead = conn.scalar(select(func.count()).select_from(JOBS).where(
                JOBS.c.status == "queued",
                or_(JOBS.c.created_at < row.created_at, and_(JOBS.c.created_at == row.created_at, JOBS.c.id < job_id)),
            ))
        return int(ahead) + 1

    def count(self, status: str) -> int:
        """How many jobs have this status.

        Raises:
            ValueError: not one of `STATUSES`.
        """
        _check_status(status)
        with self.engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(JOBS).where(JOBS.c.status == status)))

    def media_bytes_held(self) -> int:
        """Bytes of the uploads still in the media directory (jobs whose media is not yet removed)."""
        with self.engine.connect() as conn:
            return int(conn.scalar(select(func.coalesce(func.sum(JOBS.c.media_bytes), 0)).where(JOBS.c.media_name.is_not(None))))

    def delete(self, job_id: str) -> Optional[Job]:
        """Removes the job's row; returns it as it was (its media are the caller's to remove)."""
        with self.engine.begin() as conn:
            job = self._get(conn, job_id)
            if job is not None:
                conn.execute(delete(JOBS).where(JOBS.c.id == job_id))
            return job

    def media_removed(self, job_id: str) -> None:
        """Notes that the job's upload has been removed from the media directory."""
        with self.engine.begin() as conn:
            conn.execute(update(JOBS).where(JOBS.c.id == job_id).values(media_name=None))

    def expired(self, *, now: float, limit: int = 100) -> List[Job]:
        """Finished jobs whose retention has run out, longest expired first."""
        query = (select(JOBS).where(JOBS.c.status.in_(FINISHED), JOBS.c.expires_at <= now)
                 .order_by(JOBS.c.expires_at, JOBS.c.id).limit(limit))
        with self.engine.connect() as conn:
            return [_job_from_row(r) for r in conn.execute(query)]

    # Runners

    def claim(self, *, now: float, lease_s: float) -> Optional[Job]:
        """Takes the oldest claimable job for this runner, under a new lease.

        Claimable: queued, or running under an expired lease (its runner died). Each candidate is
        taken by a compare-and-set on the status and token seen, so of two runners racing for a
        job exactly one gets it; the loser moves on to the next candidate.

        Returns:
            The job as claimed (status "running", a new lease_token, attempt + 1), or None when
            nothing is claimable (or every candidate went to other runners).
        """
        for _ in range(CLAIM_ROUNDS):
            candidates = self._claim_candidates(now)
            if not candidates:
                return None
            for job_id, seen_status, seen_token in candidates:
                job = self._take(job_id, seen_status, seen_token, now=now, lease_s=lease_s)
                if job is not None:
                    return job
        return None

    def renew(self, job_id: str, token: str, *, now: float, lease_s: float) -> Optional[bool]:
        """Extends the lease to now + lease_s if `token` still holds it.

        Returns:
            Whether a cancel was requested, or None when the lease is lost (the runner must stop).
        """
        with self.engine.begin() as conn:
            renewed = conn.execute(update(JOBS).where(*_fenced(job_id, token)).values(lease_expires_at=now + lease_s))
            if renewed.rowcount == 0:
                return None
            return bool(conn.scalar(select(JOBS.c.cancel_requested).where(JOBS.c.id == job_id)))

    def progress(self, job_id: str, token: str, *, now: float, stage: str, done_seconds: float,
                 total_seconds: Optional[float], model: Optional[str], warnings: List[str], segments: List[dict],
                 text: str) -> bool:
        """Records how far the runner holding the lease has got.

        `total_seconds` and `model` of None leave the stored values: not knowing them (yet) does
        not unlearn them.

        Returns:
            False when the lease is lost (nothing is written).
        """
        values = dict(updated_at=now, stage=stage, done_seconds=done_seconds, warnings=warnings,
                      segments=segments, text=text)
        if total_seconds is not None:
            values["total_seconds"] = total_seconds
        if model is not None:
            values["model"] = model
        with self.engine.begin() as conn:
            return conn.execute(update(JOBS).where(*_fenced(job_id, token)).values(**values)).rowcount > 0

    def restart(self, job_id: str, token: str, *, now: float) -> bool:
        """Clears the progress of a claimed job that starts over (an earlier attempt's runner died).

        Returns:
            False when the lease is lost (nothing is written).
        """
        values = dict(updated_at=now, done_seconds=0.0, segments=[], text="", warnings=[])
        with self.engine.begin() as conn:
            return conn.execute(update(JOBS).where(*_fenced(job_id, token)).values(**values)).rowcount > 0

    def release(self, job_id: str, token: str, *, now: float) -> bool:
        """Hands a claimed job back to the queue (its runner is being stopped gracefully): it is
        claimable at once, starts over, and the run does not count as an attempt.

        Returns:
            False when the lease is lost (nothing is written).
        """
        values = dict(updated_at=now, status="queued", stage="Queued again: its runner was stopped", lease_token=None,
                      lease_expires_at=None, attempt=JOBS.c.attempt - 1, done_seconds=0.0, segments=[], text="", warnings=[])
        with self.engine.begin() as conn:
            return conn.execute(update(JOBS).where(*_fenced(job_id, token)).values(**values)).rowcount > 0

    def finish(self, job_id: str, token: Optional[str], *, status: str, now: float, retention_s: float,
               result: Optional[dict] = None, error: Optional[dict] = None, stage: str) -> Optional[Job]:
        """Ends a job: succeeded, failed or cancelled.

        The lease is cleared, the job expires at now + retention_s, and its webhook becomes due
        now if it has a callback_url. A succeeded job's segments and text are taken from
        `result` where it has them.

        Args:
            token: the runner's lease token; None to cancel a job that no runner has claimed.

        Returns:
            The finished job; None when `token` no longer holds the lease, or (token None) when
            the job is no longer queued.

        Raises:
            ValueError: `status` is not a finished status.
        """
        _check_status(status, FINISHED)
        no_callback = JOBS.c.callback_url.is_(None)
        values: dict = dict(
            status=status, stage=stage, updated_at=now, finished_at=now, expires_at=now + retention_s,
            result=result, error=error, lease_token=None, lease_expires_at=None,
            webhook_state=case((no_callback, "none"), else_="pending"),
            webhook_next_at=case((no_callback, null()), else_=literal(now, Double())),
        )
        if status == "succeeded" and result:
            if "segments" in result:
                values["segments"] = result["segments"]
            if "text" in result:
                values["text"] = result["text"]
        where = _fenced(job_id, token) if token is not None else (JOBS.c.id == job_id, JOBS.c.status == "queued")
        with self.engine.begin() as conn:
            if conn.execute(update(JOBS).where(*where).values(**values)).rowcount == 0:
                return None
            return self._get(conn, job_id)

    def request_cancel(self, job_id: str, *, now: float) -> Optional[Job]:
        """Asks the runner of an unfinished job to stop; it learns so when it next renews its lease.

        Returns:
            The job (unchanged if already finished), or None if there is none with this id.
        """
        with self.engine.begin() as conn:
            conn.execute(update(JOBS).where(JOBS.c.id == job_id, JOBS.c.status.not_in(FINISHED))
                         .values(cancel_requested=True, updated_at=now))
            return self._get(conn, job_id)

    # Webhooks

    def due_webhooks(self, *, now: float, limit: int = 10) -> List[Job]:
        """Jobs whose webhook is pending and due by `now`, longest due first."""
        query = (select(JOBS).where(JOBS.c.webhook_state == "pending", JOBS.c.webhook_next_at <= now)
                 .order_by(JOBS.c.webhook_next_at, JOBS.c.id).limit(limit))
        with self.engine.connect() as conn:
            return [_job_from_row(r) for r in conn.execute(query)]

    def webhook_result(self, job_id: str, *, delivered: bool, now: float, next_at: Optional[float],
                       error: Optional[str]) -> None:
        """Records a delivery attempt of a pending webhook.

        Args:
            delivered: the callback answered with success.
            next_at: when to try again after a failure; None to give up ("failed").
            error: what went wrong, for the record.
        """
        if delivered:
            state, next_at = "delivered", None
        elif next_at is None:
            state = "failed"
        else:
            state = "pending"
        # Only a pending webhook: a late report from a second sender must not undo a delivery.
        with self.engine.begin() as conn:
            conn.execute(update(JOBS).where(JOBS.c.id == job_id, JOBS.c.webhook_state == "pending").values(
                webhook_attempts=JOBS.c.webhook_attempts + 1, webhook_state=state, webhook_next_at=next_at,
                webhook_error=error, updated_at=now))

    # Helpers

    def _get(self, conn: Connection, job_id: str) -> Optional[Job]:
        row = conn.execute(select(JOBS).where(JOBS.c.id == job_id)).first()
        return _job_from_row(row) if row is not None else None

    def _claim_candidates(self, now: float) -> List[Tuple[str, str, Optional[str]]]:
        """The oldest claimable jobs: (id, status, lease_token) as seen now."""
        query = (select(JOBS.c.id, JOBS.c.status, JOBS.c.lease_token).where(_claimable(now))
                 .order_by(JOBS.c.created_at, JOBS.c.id).limit(CLAIM_CANDIDATES))
        # Read in a transaction of its own: on SQLite, a write in a transaction that had read an
        # older snapshot would fail at once instead of waiting out the busy timeout.
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(query)]

    def _take(self, job_id: str, seen_status: str, seen_token: Optional[str], *, now: float,
              lease_s: float) -> Optional[Job]:
        """Claims one candidate if it is still as seen and still claimable (compare-and-set)."""
        same_token = JOBS.c.lease_token.is_(None) if seen_token is None else JOBS.c.lease_token == seen_token
        values = dict(
            status="running", stage="Starting", updated_at=now, lease_token=uuid.uuid4().hex,
            lease_expires_at=now + lease_s, attempt=JOBS.c.attempt + 1,
            started_at=func.coalesce(JOBS.c.started_at, literal(now, Double())),
        )
        with self.engine.begin() as conn:
            taken = conn.execute(update(JOBS).where(
                JOBS.c.id == job_id, JOBS.c.status == seen_status, same_token, _claimable(now)).values(**values))
            if taken.rowcount == 0:
                return None
            return self._get(conn, job_id)
