"""The job runner: a Serve deployment that claims queued jobs and transcribes them.

Each replica loops: claim jobs while it runs fewer than `max_running`, deliver due webhooks,
remove expired jobs. A claim is a lease (`JobStore.claim`) that the replica renews every third of
`lease_s` while the job runs. When a replica dies, its leases run out and the jobs are claimed
again, by a new replica or another one, and start over from the start; the store's lease token
fences out the old run, so a job is never finished twice. A job whose runner died `max_attempts`
times fails instead of taking the next one down too. A replica that Serve stops gracefully (a
redeploy, the cluster shutting down) hands its jobs back to the queue at once (`__del__`).

A job is transcribed as a streamed HTTP request would be (`Transcriber`, the same language ID,
routing, pieces and fallback), its progress, segments and warnings written to the store after each
piece, so any ingress replica can answer for it and follow it (`serve_app/jobs/service.py`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Dict, List, Optional

from ray import serve

from deployments.contract import TranscribeOptions
from deployments.logs import send_to_serve_logs
from deployments.runtime import check_environment
from serve_app.config import IngressSettings
from serve_app.errors import error_body
from serve_app.formats import verbose_json
from serve_app.jobs.media import MediaDir
from serve_app.jobs.metrics import JobMetrics
from serve_app.jobs.store import Job, JobStore
from serve_app.jobs.webhooks import WebhookSettings, deliver, payload_for
from serve_app.jobs.service import links
from serve_app.langid import LanguageDetector
from serve_app.routing import ModelRouter
from serve_app.transcriber import Transcriber
from serve_app.transcription import Finished, PieceDone

logger = logging.getLogger(__name__)

COUNT_EVERY_S = 5.0
"""How often the queued and running jobs are counted for the metrics."""

TRANSIENT_CODES = frozenset({"model_unavailable", "model_overloaded", "timeout", "model_replica_lost", "ingress_overloaded"})
"""Errors that a later try may not meet (a model app starting, scaling or busy): the job waits."""


class LeaseLost(Exception):
    """Another runner holds the job now (this one's lease ran out): stop without writing."""


class CancelRequested(Exception):
    """The client asked for the job to be cancelled."""


class Released(Exception):
    """Serve is stopping this replica gracefully: the job went back to the queue."""


class JobRun:
    """One claimed job: keeps its lease, writes its progress, knows why it was stopped."""

    def __init__(self, runner: "JobRunner", job: Job):
        self.runner = runner
        self.job = job
        self.token = job.lease_token
        self.stopped_for: Optional[Exception] = None
        self.task: Optional[asyncio.Task] = None
        self.segments: List[dict] = []
        self.text = ""
        self.started = time.time()

    async def store(self, fn, *args, **kwargs):
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def keep_lease(self, task: asyncio.Task) -> None:
        jobs = self.runner.jobs
        while True:
            await asyncio.sleep(jobs.lease_s / 3)
            try:
                cancel = await self.store(self.runner.store.renew, self.job.id, self.token, now=time.time(), lease_s=jobs.lease_s)
            except Exception as e:  # the database is briefly away: the lease has two more thirds to go
                logger.warning("Could not renew the lease of job %s: %s", self.job.id, e)
                continue
            if cancel is None or cancel:
                self.stopped_for = LeaseLost() if cancel is None else CancelRequested()
                task.cancel()
                return

    async def progress(self, stage: str, *, done_s: float = 0.0, model: Optional[str] = None, warnings: Optional[List[str]] = None) -> None:
        written = await self.store(
            self.runner.store.progress, self.job.id, self.token, now=time.time(), stage=stage, done_seconds=done_s,
            total_seconds=None, model=model, warnings=warnings or [], segments=self.segments, text=self.text,
        )
        if not written:
            raise LeaseLost()

    async def finish(self, status: str, stage: str, *, result: Optional[dict] = None, error: Optional[dict] = None) -> Optional[Job]:
        finished = await self.store(
            self.runner.store.finish, self.job.id, self.token, status=status, now=time.time(),
            retention_s=self.runner.jobs.retention_s, result=result, error=error, stage=stage,
        )
        if finished is not None:
            self.runner.metrics.finished(status, (error or {}).get("code") or "", time.time() - self.started)
        return finished


@serve.deployment(name="JobRunner", num_replicas=1, max_ongoing_requests=8, health_check_period_s=10)
class JobRunner:
    async def __init__(self, settings: dict):
        check_environment()
        send_to_serve_logs("serve_app", "deployments")
        self._settings = IngressSettings(**settings)
        self.jobs = self._settings.jobs
        self.store: Optional[JobStore] = None  # opened by the loop, which keeps trying while the database is away
        self.media = MediaDir(self.jobs.media())
        self._router = ModelRouter(self._settings)
        detector = await asyncio.to_thread(LanguageDetector, self._settings.language_id)
        self._transcriber = Transcriber(self._settings, self._router, detector)
        self._webhooks = WebhookSettings(
            secret=self.jobs.webhook_secret, allow_private=self.jobs.allow_private_callbacks,
            max_attempts=self.jobs.webhook_max_attempts, backoff_s=self.jobs.webhook_backoff_s,
            max_backoff_s=self.jobs.webhook_max_backoff_s, timeout_s=self.jobs.webhook_timeout_s,
        )
        if self.jobs.webhook_secret is None:
            logger.warning("jobs.webhook_secret is not set: webhook deliveries go unsigned.")
        self._runs: Dict[str, JobRun] = {}
        self.metrics = JobMetrics()
        self._counted_at = -math.inf
        self._by_model: Dict[str, int] = collections.Counter()
        self._model_freed = asyncio.Condition()
        self._wake = asyncio.Event()
        self._sending: set = set()
        self._loop = asyncio.create_task(self._work())

    # -- handle methods -------------------------------------------------------------------------

    def wake(self) -> None:
        """Look for queued jobs now (the ingress calls this after a submission)."""
        self._wake.set()

    def state(self) -> dict:
        """This replica's process id and the jobs it runs now (operators, tests)."""
        return {"pid": os.getpid(), "running": sorted(self._runs)}

    def check_health(self) -> None:
        if self._loop.done():  # the loop never ends by itself: restart the replica
            raise RuntimeError(f"The job loop stopped: {self._loop.exception() if not self._loop.cancelled() else 'cancelled'}")

    async def __del__(self) -> None:
        """Serve stops the replica gracefully (a redeploy, scaling in, the cluster shutting down):
        its jobs go back to the queue at once rather than when their leases run out, and the run
        does not count against `max_attempts`. A replica that dies leaves them to the leases."""
        self._loop.cancel()
        runs = list(self._runs.values())
        if self.store is None:
            return
        for run in runs:
            run.stopped_for = Released()
            run.task.cancel()
        await asyncio.wait([run.task for run in runs] or [self._loop], timeout=5)
        for run in runs:
            try:
                if await asyncio.to_thread(self.store.release, run.job.id, run.token, now=time.time()):
                    logger.info("Job %s went back to the queue: this runner is stopping.", run.job.id)
            except Exception as e:  # its lease runs out instead
                logger.warning("Could not hand job %s back: %s", run.job.id, e)

    # -- the loop ------------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            if self.store is None and not await self._open_store():
                await asyncio.sleep(self.jobs.poll_s)
                continue
            for step in (self._claim_jobs, self._send_webhooks, self._remove_expired, self._count_jobs):
                try:
                    await step()
                except Exception:
                    logger.exception("Job loop step %s failed; trying again.", step.__name__)
            try:
                await asyncio.wait_for(self._wake.wait(), self.jobs.poll_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def _open_store(self) -> bool:
        try:
            self.store = await asyncio.to_thread(JobStore, self.jobs.database())
            return True
        except Exception as e:
            logger.warning("The job database cannot be reached (%s: %s); trying again.", type(e).__name__, e)
            return False

    async def _claim_jobs(self) -> None:
        while len(self._runs) < self.jobs.max_running:
            job = await asyncio.to_thread(self.store.claim, now=time.time(), lease_s=self.jobs.lease_s)
            if job is None:
                return
            logger.info("Claimed job %s (attempt %d).", job.id, job.attempt)
            if job.attempt == 1:
                self.metrics.started(time.time() - job.created_at)
            run = JobRun(self, job)
            run.task = asyncio.create_task(self._run(run))
            self._runs[job.id] = run
            run.task.add_done_callback(lambda _, job_id=job.id: self._job_done(job_id))

    def _job_done(self, job_id: str) -> None:
        self._runs.pop(job_id, None)
        self._wake.set()  # a slot is free: claim the next job now

    async def _run(self, run: JobRun) -> None:
        job = run.job
        lease = asyncio.create_task(run.keep_lease(asyncio.current_task()))
        try:
            if job.attempt > self.jobs.max_attempts:
                await self._fail(run, {"message": f"The job was started {job.attempt - 1} times and its runner stopped each time; it is not tried again.",
                                       "type": "server_error", "param": None, "code": "job_attempts_exhausted"})
                return
            if job.attempt > 1 and not await run.store(self.store.restart, job.id, run.token, now=time.time()):
                return
            await self._transcribe_until_done(run)
        except asyncio.CancelledError:
            if isinstance(run.stopped_for, CancelRequested):
                await self._cancelled(run)
            elif isinstance(run.stopped_for, LeaseLost):
                logger.warning("Job %s: the lease was lost; another runner has it.", job.id)
            elif not isinstance(run.stopped_for, Released):
                raise
        except LeaseLost:
            logger.warning("Job %s: the lease was lost; another runner has it.", job.id)
        except FileNotFoundError:
            logger.exception("Job %s: its upload is not in the media directory %s.", job.id, self.media.root)
            await self._fail(run, {"message": "The job's upload is missing from the service's media directory (on a cluster of several nodes, "
                                              "jobs.data_dir must be storage every node mounts).", "type": "server_error", "param": None, "code": "job_media_missing"})
        except Exception:
            logger.exception("Job %s failed in the runner.", job.id)
            await self._fail(run, {"message": "The job failed on the server.", "type": "server_error", "param": None, "code": "job_failed"})
        finally:
            lease.cancel()

    async def _transcribe_until_done(self, run: JobRun) -> None:
        """Transcribes; errors that a later try may not meet are waited out for `model_wait_s`."""
        deadline = time.monotonic() + self.jobs.model_wait_s
        await self._wait_for_starting_models(run, deadline)
        delay = 2.0
        while True:
            try:
                await self._transcribe(run)
                return
            except (LeaseLost, asyncio.CancelledError, FileNotFoundError):
                raise
            except Exception as e:
                error = error_body(e)
                if error.get("code") not in TRANSIENT_CODES or time.monotonic() + delay > deadline:
                    await self._fail(run, error)
                    return
                logger.info("Job %s: %s; trying again in %.0f s.", run.job.id, error["message"], delay)
                run.segments, run.text = [], ""
                await run.progress(f"Waiting for a model app ({error['code']}); trying again in {delay:.0f} s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    async def _wait_for_starting_models(self, run: JobRun, deadline: float) -> None:
        """Waits while a model app is still starting (the cluster just started, say): nobody
        waits on a job's answer, and the fallback would serve what the routed model does better."""
        while time.monotonic() < deadline:
            states = {model: await self._router.state(model) for model in self._settings.model_apps}
            starting = [model for model, state in states.items() if state.status == "DEPLOYING" and not state.running]
            if not starting:
                return
            await run.progress(f"Waiting for {', '.join(starting)} to start")
            await asyncio.sleep(2.0)

    async def _transcribe(self, run: JobRun) -> None:
        job = run.job
        request = job.request
        opts = TranscribeOptions.from_dict(request["options"])
        run.segments, run.text = [], ""
        await run.progress("Opening the recording; identifying its language")
        with open(self.media.path(job.media_name), "rb") as upload:
            # As a streamed answer, a recording that ends early gets a transcript and a warning (a
            # job cannot turn into a 400 either); but nobody waits for its first segments, so its
            # pieces are all as long as throughput wants (bench/jobs_overhead.py).
            async with self._transcriber.open(upload, request["model"], opts, segmentation=request.get("segmentation"),
                                              streaming=True, quick_first_piece=False) as transcription:
                model = transcription.model
                async with self._model_slot(run, model):
                    await run.progress(f"Transcribing with {model}", model=model)
                    async for event in transcription.events():
                        if isinstance(event, PieceDone):
                            run.segments += event.segments
                            run.text += event.delta
                            stage = f"Transcribing with {event.model or model}"
                            if event.model and model and model not in event.model.split("+"):
                                stage = f"{model} unavailable, using {event.model} fallback"
                            await run.progress(stage, done_s=event.done_s, model=event.model or model, warnings=event.warnings)
                        elif isinstance(event, Finished):
                            result = verbose_json(event.body, event.segments, words=bool(request.get("words")))
                            result["fallback"] = event.fallback
                            finished = await run.finish("succeeded", "Done", result=result)
                            if finished is None:
                                raise LeaseLost()
                            await self._remove_media(finished)
                            logger.info("Job %s succeeded.", job.id)

    @asynccontextmanager
    async def _model_slot(self, run: JobRun, model: Optional[str]) -> AsyncIterator[None]:
        """Waits while `model` runs `max_running_per_model` jobs of this replica already."""
        limit = self.jobs.max_running_per_model.get(model) if model else None
        if limit is None:
            yield
            return
        async with self._model_freed:
            if self._by_model[model] >= limit:
                await run.progress(f"Waiting for {model}, which runs {limit} job(s) at once", model=model)
            await self._model_freed.wait_for(lambda: self._by_model[model] < limit)
            self._by_model[model] += 1
        try:
            yield
        finally:
            async with self._model_freed:
                self._by_model[model] -= 1
                self._model_freed.notify_all()

    async def _fail(self, run: JobRun, error: dict) -> None:
        finished = await run.finish("failed", "Failed", error=error)
        if finished is not None:
            logger.info("Job %s failed: %s", run.job.id, error.get("code"))
            await self._remove_media(finished)

    async def _cancelled(self, run: JobRun) -> None:
        finished = await run.finish("cancelled", "Cancelled")
        if finished is not None:
            logger.info("Job %s was cancelled.", run.job.id)
            await self._remove_media(finished)

    async def _remove_media(self, job: Job) -> None:
        # The upload is kept until the job ends (a restarted run needs it), not for its retention.
        if job.media_name:
            await asyncio.to_thread(self.media.remove, job.media_name)
            await asyncio.to_thread(self.store.media_removed, job.id)
        self._wake.set()  # its webhook is due now

    # -- webhooks and retention ------------------------------------------------------------------

    async def _send_webhooks(self) -> None:
        due = await asyncio.to_thread(self.store.due_webhooks, now=time.time(), limit=10)
        for job in due:
            if job.id in self._sending:
                continue
            self._sending.add(job.id)
            task = asyncio.create_task(self._send_webhook(job))
            task.add_done_callback(lambda _, job_id=job.id: self._sending.discard(job_id))

    async def _send_webhook(self, job: Job) -> None:
        payload = payload_for(
            job.id, job.status, links=links(job.id, self.jobs.public_url.rstrip("/") if self.jobs.public_url else ""),
            created_at=job.created_at, finished_at=job.finished_at, error=job.error, model=job.model,
        )
        outcome = await deliver(
            job.callback_url, payload, event=f"job.{job.status}", delivery_id=f"{job.id}:{job.status}",
            settings=self._webhooks, attempt=job.webhook_attempts + 1, now=time.time(),
        )
        if not outcome.delivered:
            logger.warning("Webhook of job %s not delivered (attempt %d): %s", job.id, job.webhook_attempts + 1, outcome.error)
        self.metrics.webhook(outcome.delivered, retried=outcome.next_at is not None)
        await asyncio.to_thread(self.store.webhook_result, job.id, delivered=outcome.delivered, now=time.time(), next_at=outcome.next_at, error=outcome.error)

    async def _count_jobs(self) -> None:
        if time.monotonic() - self._counted_at < COUNT_EVERY_S:
            return
        self._counted_at = time.monotonic()
        queued, running = await asyncio.to_thread(lambda: (self.store.count("queued"), self.store.count("running")))
        self.metrics.counts(queued, running)

    async def _remove_expired(self) -> None:
        for job in await asyncio.to_thread(self.store.expired, now=time.time()):
            if job.media_name:
                await asyncio.to_thread(self.media.remove, job.media_name)
            await asyncio.to_thread(self.store.delete, job.id)
            logger.info("Removed job %s: its retention ended.", job.id)
