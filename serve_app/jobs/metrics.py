"""The job runner's metrics (ray.serve.metrics; Serve adds application, deployment and replica).

`klipnote_jobs{status}` counts the whole job database, so every runner replica reports the same
figure: the dashboard takes the max over replicas, not the sum.
"""

from __future__ import annotations

from deployments.metrics import KeptGauges

WAIT_BOUNDARIES = [1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600]
"""Seconds in the queue, or running: jobs last from seconds to hours."""

WEBHOOK_OUTCOMES = ("delivered", "retry", "failed")


class JobMetrics:
    """Created in the runner replica (Serve's labels come from its context)."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self._jobs = Gauge("klipnote_jobs", description="Jobs queued and running now, in the whole job database (each runner replica reports the same figure).", tag_keys=("status",))
        self._finished = Counter("klipnote_jobs_finished", description="Jobs this runner replica ended, by status and error code (\"\" on success).", tag_keys=("status", "code"))
        self._queue_seconds = Histogram("klipnote_job_queue_seconds", description="Seconds from a job's submission to its first start.", boundaries=WAIT_BOUNDARIES)
        self._run_seconds = Histogram("klipnote_job_run_seconds", description="Seconds from a succeeded job's last start to its end.", boundaries=WAIT_BOUNDARIES)
        self._webhooks = Counter("klipnote_job_webhooks", description="Webhook delivery attempts by outcome: delivered, retry (to be tried again), failed (refused, or no attempts left).", tag_keys=("outcome",))
        self._gauges = KeptGauges()

    def counts(self, queued: int, running: int) -> None:
        self._gauges.set(self._jobs, queued, {"status": "queued"})
        self._gauges.set(self._jobs, running, {"status": "running"})

    def started(self, queued_s: float) -> None:
        self._queue_seconds.observe(max(queued_s, 0.0), tags={})

    def finished(self, status: str, code: str, run_s: float) -> None:
        self._finished.inc(1, tags={"status": status, "code": code})
        if status == "succeeded":
            self._run_seconds.observe(max(run_s, 0.0), tags={})

    def webhook(self, delivered: bool, retried: bool) -> None:
        self._webhooks.inc(1, tags={"outcome": "delivered" if delivered else "retry" if retried else "failed"})
