"""Admission control in the ingress: a full replica answers at once instead of queueing.

Serve queues what a replica cannot take (`max_ongoing_requests`) and rejects beyond
`max_queued_requests` with a fixed plain-text body that cannot be changed. So the ingress
deployment's own queue is unbounded (`max_queued_requests: -1`: Serve never rejects there) and
the ingress admits at most `max_in_flight` transcriptions per replica, answering the rest with
503, OpenAI's error body and Retry-After. For HTTP it decides before the upload is read
(`AdmitTranscriptions`, ASGI middleware), so the answer comes at once whatever the file's size.
The deployment's `max_ongoing_requests` must exceed `max_in_flight`, so the requests over the
limit reach the replica to be told. A full model app's queue is Serve's `BackPressureError` at
the handle, answered as 503 `model_overloaded` (or served by the fallback model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Callable, Dict, Iterable, Iterator, Optional

from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.errors import IngressOverloadedError, error_response_for

logger = logging.getLogger(__name__)


class Admission:
    """Counts the transcriptions in flight on this replica and refuses those over the limit: the
    smaller of `max_in_flight` and what the model apps can take now (`set_capacity`)."""

    def __init__(
        self,
        max_in_flight: int,
        retry_after_s: int,
        on_idle: Optional[Callable[[], None]] = None,
        on_admit: Optional[Callable[[], None]] = None,
    ):
        self.max_in_flight = max_in_flight
        self._on_admit = on_admit
        """Called (in the event loop) before each admission decision (to refresh `set_capacity`)."""
        self._capacity: Optional[int] = None
        self._retry_after_s = retry_after_s
        self._in_flight = 0
        self._on_idle = on_idle
        """Called (in the event loop) when the last transcription in flight ends."""

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def limit(self) -> int:
        return self.max_in_flight if self._capacity is None else max(1, min(self.max_in_flight, self._capacity))

    def set_capacity(self, capacity: Optional[int]) -> None:
        """What the model apps behind this replica can take (`ModelCapacity.per_ingress_replica`);
        None: unbounded or unknown, so `max_in_flight` alone applies."""
        changed = capacity != self._capacity
        self._capacity = capacity
        if changed:
            logger.info("Admission limit now %d (model capacity %s, max_in_flight %d).", self.limit, capacity, self.max_in_flight)

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Holds one slot for the duration of the block.

        Raises:
            IngressOverloadedError: All `max_in_flight` slots are taken.
        """
        # One event loop per replica: the check and the increment cannot interleave.
        if self._on_admit is not None:
            self._on_admit()
        limit = self.limit
        if self._in_flight >= limit:
            logger.warning("Refusing a request: %d transcriptions in flight (limit %d).", self._in_flight, limit)
            raise IngressOverloadedError(self._in_flight, limit, self._retry_after_s)
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0 and self._on_idle is not None:
                self._on_idle()


@dataclasses.dataclass(frozen=True)
class AppCapacity:
    """One application's share of the capacity: its running replicas and queue sizes."""

    running_replicas: int
    max_ongoing_requests: int
    max_queued_requests: int
    """Per caller (each ingress replica's handle queues its own); -1: unbounded."""


@dataclasses.dataclass(frozen=True)
class ModelCapacity:
    """What the model apps behind the ingress can take at once, from Serve's own view of them.

    A model replica runs `max_ongoing_requests` and each caller's handle queues up to
    `max_queued_requests` more; beyond that Serve refuses (`BackPressureError`). So one
    ingress replica can hand its model apps, without a refusal, its share of their running slots
    plus its own queues. Scaling a model app out raises it; the ingress admits that many.
    """

    ingress_replicas: int
    apps: Dict[str, AppCapacity]

    @property
    def per_ingress_replica(self) -> Optional[int]:
        """Transcriptions one ingress replica can place at once; None when a queue is unbounded."""
        if any(app.max_queued_requests < 0 for app in self.apps.values()):
            return None
        running = sum(app.running_replicas * app.max_ongoing_requests for app in self.apps.values())
        return running // max(1, self.ingress_replicas) + sum(app.max_queued_requests for app in self.apps.values())

    @classmethod
    def from_serve(cls, details: dict, ingress_app: str, model_apps: Iterable[str]) -> "ModelCapacity":
        """From Serve's details dict (`serve_details`: what `serve status` and the dashboard's
        REST API show, in the shape of `ray.serve.schema.ServeInstanceDetails`). A model app not
        deployed counts as no replicas and no queue; an option left out has Serve's default."""

        def app_capacity(name: str) -> AppCapacity:
            deployments = (details.get("applications", {}).get(name) or {}).get("deployments") or {}
            if not deployments:
                return AppCapacity(0, 0, 0)
            # Model apps have one deployment; an app of several counts its first (its ingress).
            deployment = next(iter(deployments.values()))
            config = deployment.get("deployment_config") or {}
            running = sum(1 for replica in deployment.get("replicas") or () if replica.get("state") == "RUNNING")
            max_queued = config.get("max_queued_requests")
            return AppCapacity(
                running,
                config.get("max_ongoing_requests") or _serve_default("max_ongoing_requests"),
                max_queued if max_queued is not None else _serve_default("max_queued_requests"),
            )

        return cls(
            ingress_replicas=max(1, app_capacity(ingress_app).running_replicas),
            apps={name: app_capacity(name) for name in sorted(set(model_apps))},
        )

    def to_dict(self) -> dict:
        return {
            "ingress_replicas": self.ingress_replicas,
            "per_ingress_replica": self.per_ingress_replica,
            "apps": {name: dataclasses.asdict(app) for name, app in self.apps.items()},
        }


def serve_details() -> dict:
    """Serve's details from its controller, as the JSON-like dict it sends (blocking: call it in
    a thread).

    Kept a dict on purpose: building `ServeInstanceDetails` (as `serve.status()` does) builds
    each deployment's autoscaling policy, which registers and then unregisters
    `ray.serve.autoscaling_policy` with cloudpickle, process-wide. Two such builds in two
    threads (the ingress reading status and capacity at once) raced, and a request failed
    with "... is not registered for pickle by value".
    """
    from ray.serve import context

    return context._get_global_client().get_serve_details()


def _serve_default(option: str) -> int:
    from ray.serve._private.config import DeploymentConfig

    return DeploymentConfig.model_fields[option].default


ADMITTED_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")
"""Routes that transcribe while the client waits: the only ones that take a slot. (A job's
submission only stores its upload; the job runner has limits of its own.)"""


class AdmitTranscriptions:
    """Takes an admission slot (`app.state.admission`) for each transcription request before
    its body is read, holds it until the response is sent, and answers 503 at once without one."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        admission = getattr(scope["app"].state, "admission", None) if scope["type"] == "http" else None
        if admission is None or not is_transcription(scope):
            await self.app(scope, receive, send)
            return
        with contextlib.ExitStack() as slot:
            try:
                slot.enter_context(admission.admit())
            except IngressOverloadedError as refused:
                response = error_response_for(refused)
                response.headers["Connection"] = "close"  # the upload behind it is not read
                await response(scope, receive, send)
                return
            await self.app(scope, receive, send)


def is_transcription(scope: Scope) -> bool:
    """An HTTP request to a route that transcribes (`ADMITTED_PATHS`)."""
    return scope["type"] == "http" and scope["method"] == "POST" and route_path(scope).rstrip("/") in ADMITTED_PATHS


def route_prefix(scope: Scope) -> str:
    """The application's route prefix, as Serve passes it: the scope's root_path ("" at `/`)."""
    return scope.get("root_path", "")


def route_path(scope: Scope) -> str:
    """The path within the app, without its route prefix."""
    path, root = scope["path"], route_prefix(scope)
    return path[len(root):] or "/" if root and path.startswith(root) else path
