"""The ingress's side of transcription jobs: submitting, reading, cancelling and following them.

A submission stores the upload in the media directory, checks it opens as audio (a bad file is
refused at once, not found out later), and records the job as queued; the `JobRunner`
deployment (`serve_app/jobs/runner.py`) does the rest. Every answer here comes from the job
database, so any ingress replica answers for any job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from typing import Any, AsyncIterator, BinaryIO, Dict, Optional, Tuple

from serve_app.audio import AudioReader
from serve_app.config import IngressSettings
from sqlalchemy.exc import SQLAlchemyError

from serve_app.errors import APIError, JobNotFinishedError, JobNotFoundError, JobsMediaFullError, JobsQueueFullError, JobsUnavailableError, error_body
from serve_app.formats import to_srt, to_vtt
from serve_app.jobs.media import MediaDir
from serve_app.jobs.store import Job, JobStore
from serve_app.jobs.webhooks import CallbackURLError, check_callback_url

logger = logging.getLogger(__name__)

JOBS_PATH = "/v1/audio/transcriptions/jobs"
RESULT_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
KEEPALIVE_S = 15.0
"""A comment line this often on a quiet event stream, so that proxies keep it open."""


def new_job_id() -> str:
    # 80 random bits; short of the 24 hex digits that error messages redact as internal ids.
    return "job_" + secrets.token_hex(10)


def links(job_id: str, base: str = "") -> Dict[str, str]:
    own = f"{base}{JOBS_PATH}/{job_id}"
    return {
        "self": own,
        "events": f"{own}/events",
        **{fmt: f"{own}?format={fmt}" for fmt in ("srt", "vtt", "text")},
    }


def under_prefix(body: dict, root_path: str) -> dict:
    """A job, or a list of jobs, with its links under the app's route prefix (an HTTP request's
    root_path), as a client outside the cluster reaches them."""
    root = root_path.rstrip("/")
    if not root:
        return body
    for job in body.get("data", [body]):
        if isinstance(job.get("links"), dict):
            job["links"] = {name: root + url for name, url in job["links"].items()}
    return body


def job_view(job: Job, *, queue_position: Optional[int] = None, with_result: bool = True) -> dict:
    """A job as the API shows it (`with_result=False` in lists: results can be large)."""
    total = job.total_seconds
    view = {
        "id": job.id,
        "object": "transcription.job",
        "status": job.status,
        "stage": job.stage,
        "created_at": int(job.created_at),
        "started_at": _seconds(job.started_at),
        "finished_at": _seconds(job.finished_at),
        "expires_at": _seconds(job.expires_at),
        "model": job.model,
        "requested_model": job.request.get("model"),
        "filename": job.request.get("filename"),
        "progress": {
            "done_seconds": round(job.done_seconds, 3),
            "total_seconds": None if total is None else round(total, 3),
            "fraction": round(min(job.done_seconds / total, 1.0), 4) if total else (1.0 if job.status == "succeeded" else None),
        },
        "queue_position": queue_position,
        "attempt": job.attempt,
        "warnings": list(job.warnings),
        "error": job.error,
        "webhook": {"state": job.webhook_state, "attempts": job.webhook_attempts} if job.callback_url else None,
        "links": links(job.id),
    }
    if with_result:
        view["result"] = job.result if job.status == "succeeded" else None
    return view


def render_result(job: Job, fmt: str) -> Tuple[str, Any]:
    """(media type, content) of a succeeded job's result in `fmt`."""
    if job.status != "succeeded" or job.result is None:
        raise JobNotFinishedError(job.id, job.status)
    result = job.result
    if fmt == "verbose_json":
        return "application/json", result
    if fmt == "json":
        return "application/json", {"text": result["text"]}
    if fmt == "text":
        return "text/plain", result["text"]
    if fmt == "srt":
        return "text/plain", to_srt(result["segments"])
    return "text/vtt", to_vtt(result["segments"])


def _seconds(t: Optional[float]) -> Optional[int]:
    return None if t is None else int(t)


class JobService:
    """Job operations for the ingress's HTTP routes and handle methods."""

    def __init__(self, settings: IngressSettings):
        self._settings = settings
        self._jobs = settings.jobs
        self._store: Optional[JobStore] = None
        self._opening = threading.Lock()
        self.media = MediaDir(self._jobs.media())

    @property
    def store(self) -> JobStore:
        """The job database, opened on first use: while it cannot be reached, the job routes
        answer 503 and everything else serves on."""
        with self._opening:
            if self._store is None:
                self._store = JobStore(self._jobs.database())
            return self._store

    async def _call(self, fn, *args, **kwargs):
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except SQLAlchemyError as e:
            logger.warning("The job database failed: %s", e)
            raise JobsUnavailableError(self._settings.retry_after_s) from None

    def _stored(self, method: str):
        """A method of the store, looked up when called (in a worker thread: opening the database may block)."""
        return lambda *args, **kwargs: getattr(self.store, method)(*args, **kwargs)

    async def submit(self, upload: BinaryIO, *, request: dict, callback_url: Optional[str]) -> dict:
        """Stores `upload` and records a queued job; returns the job as the API shows it.

        Raises:
            APIError: The callback URL is refused (invalid_callback_url), the queue is full
                (jobs_queue_full) or the uploads held would pass `max_media_bytes` (jobs_media_full).
            InvalidAudioError, UnsupportedMediaError: The upload does not open as audio.
        """
        if callback_url is not None:
            try:
                callback_url = await self._call(check_callback_url, callback_url, allow_private=self._jobs.allow_private_callbacks)
            except CallbackURLError as e:
                raise APIError(400, str(e), param="callback_url", code="invalid_callback_url") from None
        queued = await self._call(self._stored("count"), "queued")
        if queued >= self._jobs.max_queued:
            raise JobsQueueFullError(queued, self._settings.retry_after_s)
        job_id = new_job_id()
        size = await self._call(self.media.save, job_id, upload)
        try:
            # Concurrent submissions may each see room for themselves: the cap can be passed by
            # what arrives at the same moment, never by more.
            if await self._call(self._stored("media_bytes_held")) + size > self._jobs.max_media_bytes:
                raise JobsMediaFullError(self._settings.retry_after_s)
            total_s = await self._call(self._probe, job_id)
            job = await self._call(
                self._stored("create"), job_id, request=request, media_name=job_id, media_bytes=size,
                total_seconds=total_s, callback_url=callback_url, now=time.time(),
            )
        except BaseException:
            await self._call(self.media.remove, job_id)
            raise
        logger.info("Queued job %s (%d bytes, %s s).", job_id, size, total_s)
        return job_view(job, queue_position=await self._call(self._stored("queue_position"), job_id))

    def _probe(self, media_name: str) -> Optional[float]:
        """The stored upload's length, once it has opened as audio (raises what a bad one is refused with)."""
        with open(self.media.path(media_name), "rb") as f:
            reader = AudioReader(f, max_seconds=self._settings.max_audio_seconds)
            try:
                return reader.expected_seconds
            finally:
                reader.close()

    async def job(self, job_id: str) -> Job:
        job = await self._call(self._stored("get"), job_id)
        if job is None:
            raise JobNotFoundError(job_id)
        return job

    async def get(self, job_id: str) -> dict:
        job = await self.job(job_id)
        position = await self._call(self._stored("queue_position"), job_id) if job.status == "queued" else None
        return job_view(job, queue_position=position)

    async def result(self, job_id: str, fmt: str) -> Tuple[str, Any]:
        return render_result(await self.job(job_id), fmt)

    async def list(self, *, limit: int, after: Optional[str]) -> dict:
        try:
            jobs, has_more = await self._call(self._stored("list"), limit=limit, after=after)
        except KeyError:
            raise JobNotFoundError(after) from None
        data = [job_view(j, with_result=False) for j in jobs]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }

    async def delete(self, job_id: str) -> dict:
        """Cancels a queued or running job; removes a finished one, its result and its media.

        Returns the job as it stands after: `cancelled` (a queued job), still `running` with
        `cancel_requested` until its runner stops it, or `{"id", "object", "deleted": true}`.
        """
        job = await self.job(job_id)
        if job.status == "queued":
            cancelled = await self._call(
                self._stored("finish"), job_id, None, status="cancelled", now=time.time(),
                retention_s=self._jobs.retention_s, stage="Cancelled before it started",
            )
            if cancelled is not None:
                await self._call(self._remove_media, cancelled)
                await self._call(self._stored("media_removed"), job_id)
                return {**job_view(cancelled), "cancel_requested": True}
            job = await self.job(job_id)  # a runner claimed it meanwhile: cancel it running
        if job.status == "running":
            job = await self._call(self._stored("request_cancel"), job_id, now=time.time())
            if job is None:
                raise JobNotFoundError(job_id)
            return {**job_view(job), "cancel_requested": True}
        removed = await self._call(self._stored("delete"), job_id)
        if removed is None:
            raise JobNotFoundError(job_id)
        await self._call(self._remove_media, removed)
        return {"id": job_id, "object": "transcription.job.deleted", "deleted": True}

    def _remove_media(self, job: Job) -> None:
        if job.media_name:
            self.media.remove(job.media_name)

    async def events(self, job_id: str, *, poll_s: float = 0.5) -> AsyncIterator[dict]:
        """The job's progress as the streaming transcription's events, read from the database
        until the job ends: `transcript.progress` (with the job's `status` and `stage`) when
        they change, `transcript.text.segment` and `transcript.text.delta` as pieces are done,
        then `transcript.text.done` (the result but its segments) or an `error` event.
        A job run again after its runner died starts over: segments already sent are not sent again.
        """
        job = await self.job(job_id)
        sent_segments, sent_text, last_state = 0, "", None
        while True:
            segments, text = job.segments, job.text
            if job.status == "succeeded" and job.result is not None:
                segments, text = job.result["segments"], job.result["text"]
            if text.startswith(sent_text) and len(text) > len(sent_text):
                yield {"type": "transcript.text.delta", "delta": text[len(sent_text):]}
                sent_text = text
            for i in range(sent_segments, len(segments)):
                seg = segments[i]
                event = {"type": "transcript.text.segment", "id": f"seg_{i}", "start": seg["start"], "end": seg["end"],
                         "text": seg["text"], "speaker": seg.get("speaker"), "language": seg.get("language")}
                if seg.get("words"):  # as a streamed transcription's segment events
                    event["words"] = seg["words"]
                yield event
            sent_segments = max(sent_segments, len(segments))
            state = (job.status, job.stage, job.done_seconds, len(job.warnings))
            if state != last_state:
                last_state = state
                yield {"type": "transcript.progress", "status": job.status, "stage": job.stage,
                       "done_seconds": round(job.done_seconds, 3),
                       "total_seconds": None if job.total_seconds is None else round(job.total_seconds, 3),
                       "model": job.model, "warnings": list(job.warnings)}
            if job.finished:
                yield _end_event(job)
                return
            await asyncio.sleep(poll_s)
            # A long job's segments so far are megabytes: they are read again only once it changed.
            if await self._call(self._stored("updated_at"), job_id) == job.updated_at:
                continue
            fresh = await self._call(self._stored("get"), job_id)
            if fresh is None:
                yield {"type": "error", "error": error_body(JobNotFoundError(job_id))}
                return
            job = fresh

    async def sse(self, job_id: str) -> AsyncIterator[bytes]:
        """`events` as server-sent events, with a keep-alive comment on a quiet stream. (The route
        looks the job up first: an unknown one is a 404, which a started stream cannot be.)"""
        events = self.events(job_id)
        next_event = asyncio.ensure_future(anext(events, None))
        try:
            while True:
                done, _ = await asyncio.wait({next_event}, timeout=KEEPALIVE_S)
                if not done:
                    yield b": keep-alive\n\n"
                    continue
                event = next_event.result()
                if event is None:
                    return
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()
                next_event = asyncio.ensure_future(anext(events, None))
        finally:
            next_event.cancel()
            await events.aclose()


def _end_event(job: Job) -> dict:
    if job.status == "succeeded":
        body = {k: v for k, v in (job.result or {}).items() if k not in ("segments", "words")}
        return {"type": "transcript.text.done", **body}
    if job.status == "cancelled":
        return {"type": "error", "error": {"message": "The job was cancelled.", "type": "invalid_request_error", "param": None, "code": "job_cancelled"}}
    error = job.error or {}
    return {"type": "error", "error": {"message": error.get("message", "The job failed."), "type": error.get("type", "server_error"),
                                       "param": error.get("param"), "code": error.get("code")}}


def job_request(form: Any, *, filename: Optional[str]) -> Dict[str, Any]:
    """What a job records of its request (a `TranscriptionRequest`): enough to run it later."""
    opts = form.to_transcribe_options(task="transcribe")
    return {
        "model": form.model,
        "options": opts.to_dict(),
        "segmentation": form.segmentation,
        "words": "word" in form.timestamp_granularities,
        "response_format": form.response_format,
        "filename": filename,
    }


def list_limit(limit: int) -> int:
    if not 1 <= limit <= 100:
        raise APIError(400, f"Got limit={limit}; it must be between 1 and 100.", param="limit", code="invalid_limit")
    return limit

