"""The ingress application: OpenAI-compatible HTTP API and a DeploymentHandle API.

Light by design: it decodes and checks the upload, detects the language, picks a model app and
awaits it. It never imports torch, transformers or whisperx; the model apps live in their own
runtime envs and are reached by name with `serve.get_app_handle`.
"""


import asyncio
import io
import logging
import math
import platform
import sys
import time
from contextlib import AsyncExitStack
from typing import Annotated, Any, AsyncIterator, BinaryIO, Dict, Optional, Union

import numpy as np
from fastapi import Depends, FastAPI, Form, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
import ray
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.contract import ModelUnavailableError, TranscribeOptions
from deployments.core import package_versions, process_memory, release_free_memory_soon
from deployments.logs import send_to_serve_logs
from deployments.runtime import check_environment
from serve_app.admission import AdmitTranscriptions, Admission, ModelCapacity, route_prefix, serve_details
from serve_app.events import sse_stream, stream_events
from serve_app.transcriber import Transcriber, check_segmentation
from serve_app.config import AUTO_NAMES, IngressSettings
from serve_app.errors import APIError, ErrorResponse, JobsDisabledError, UploadTooLargeError, create_error_response, error_response_for, redact_paths
from serve_app.formats import render, server_timing
from serve_app.guards import ApiKeys, RequireApiKey, UploadLimits, configure
from serve_app.langid import LanguageDetector
from serve_app.page import add_page_routes
from serve_app.protocol import JobRequest, TranscriptionRequest
from serve_app.jobs.service import JOBS_PATH, RESULT_FORMATS, JobService, job_request, list_limit, under_prefix
from serve_app.routing import AUTO, ModelRouter
from serve_app import metrics as ingress_metrics
from serve_app.metrics import RecordRequests

logger = logging.getLogger(__name__)

FALLBACK_HEADER = "X-KlipNote-Fallback"
MODEL_HEADER = "X-KlipNote-Model"
_ERROR_RESPONSES = {
    code: {"model": ErrorResponse}
    for code in (400, 413, 415, 422, 429, 500, 501, 503, 504)
}

api = FastAPI(
    title="KlipNote Serve",
    description="Speech to subtitle-ready text from the deployed model apps, routed by language "
    "(by default BELLE-2 for Mandarin, WhisperX for everything else); GET /v1/models lists them.",
    version="0.1.0",
    docs_url=None,  # served offline by add_page_routes
    redoc_url=None,
)
add_page_routes(api)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query")]
    message = first.get("msg", "Invalid request.")
    return create_error_response(400, message, type="invalid_request_error", param=".".join(loc) or None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc.__cause__, APIError):  # raised while FastAPI read the body (`UploadLimits`)
        return error_response_for(exc.__cause__)
    return create_error_response(exc.status_code, str(exc.detail), type="invalid_request_error")


# Outermost last: the key is checked before anything reads the body.
api.add_middleware(UploadLimits)
api.add_middleware(AdmitTranscriptions)
api.add_middleware(RequireApiKey)
api.add_middleware(RecordRequests)  # outermost: it sees the answers of those inside too


@api.exception_handler(APIError)
@api.exception_handler(ValueError)  # InvalidAudioError, InvalidOptionsError, UnsupportedMediaError
@api.exception_handler(ModelUnavailableError)
@api.exception_handler(BackPressureError)
@api.exception_handler(TimeoutError)
@api.exception_handler(NotImplementedError)
async def _expected_error(request: Request, exc: Exception) -> JSONResponse:
    # Handled here, Starlette answers and stops; the catch-all below answers and re-raises,
    # which Serve logs as a failed request with a traceback: right for a 500, noise for a 4xx.
    return error_response_for(exc)


@api.exception_handler(Exception)
async def _any_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response_for(exc)


async def transcription_form(request: Annotated[TranscriptionRequest, Form()]) -> TranscriptionRequest:
    # Serve's class-based views rewrite method signatures, which hides a form model from
    # FastAPI; parsing it in a plain function dependency keeps OpenAI's flat form fields.
    return request


async def job_form(request: Annotated[JobRequest, Form()]) -> JobRequest:
    return request  # as transcription_form


async def _closing(events: AsyncIterator[bytes], stack: AsyncExitStack) -> AsyncIterator[bytes]:
    # Defined before the class: `serve.ingress` pickles the class with the globals its methods
    # name as they are at that moment.
    async with stack:
        async for chunk in events:
            yield chunk


@serve.deployment(name="TranscriptionIngress", max_ongoing_requests=64)
@serve.ingress(api)
class TranscriptionIngress:
    def __init__(self, settings: Optional[dict] = None, job_runner: Optional[DeploymentHandle] = None):
        check_environment()
        send_to_serve_logs("serve_app", "deployments")
        ingress_metrics.install()
        self._settings = IngressSettings(**(settings or {}))
        self._router = ModelRouter(self._settings)
        self._detector = LanguageDetector(self._settings.language_id)
        self._transcriber = Transcriber(self._settings, self._router, self._detector)
        self._admission = Admission(
            self._settings.max_in_flight, self._settings.retry_after_s, on_idle=self._release_memory, on_admit=self._refresh_capacity_soon
        )
        self._jobs = JobService(self._settings) if self._settings.jobs.enabled else None
        self._job_runner = job_runner
        self._capacity: Optional[ModelCapacity] = None
        self._capacity_read_at = -math.inf
        self._capacity_reading: Optional[asyncio.Task] = None
        configure(
            api,
            admission=self._admission,
            api_keys=ApiKeys(self._settings.api_keys),
            upload_idle_timeout_s=self._settings.upload_idle_timeout_s,
            max_upload_bytes=self._settings.max_upload_bytes,
        )

    # -- HTTP --------------------------------------------------------------------------------

    @api.post("/v1/audio/transcriptions", responses=_ERROR_RESPONSES)
    async def create_transcription(self, request: TranscriptionRequest = Depends(transcription_form)) -> Response:
        """Transcribes audio in its own language (OpenAI's `audio.transcriptions.create`)."""
        return await self._serve_http(request, task="transcribe")

    @api.post("/v1/audio/translations", responses=_ERROR_RESPONSES)
    async def create_translation(self, request: TranscriptionRequest = Depends(transcription_form)) -> Response:
        """Translates speech into English text, with a model whose spec lists "translate"."""
        return await self._serve_http(request, task="translate")

    @api.get("/v1/models")
    async def list_models(self) -> dict:
        """The model names a request may give: "auto" (routing by language) and each model app,
        with the languages, tasks and capabilities its spec declares."""
        settings = self._settings
        specs = await self._router.specs()
        data = [
            {
                "id": AUTO,
                "object": "model",
                "created": 0,
                "owned_by": "klipnote",
                "description": "Routes each request by its language: `routes`, else `default_model`; falls back to `fallback_model`.",
                "aliases": [name for name in AUTO_NAMES if name != AUTO],
                "routes": dict(settings.routes),
                "default_model": settings.default_model,
                "fallback_model": settings.fallback_model,
            }
        ]
        for model, app in settings.model_apps.items():
            entry = {"id": model, "object": "model", "created": 0, "owned_by": "klipnote", "app": app, "available": await self._router.available(model)}
            spec = specs.get(model)
            if spec is not None:
                entry.update({k: v for k, v in spec.to_dict().items() if k != "name"}, engine=spec.name)
            data.append(entry)
        return {"object": "list", "data": data}

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """200 while the ingress and at least one model app can serve; lists each app."""
        apps = {m: await self._router.available(m) for m in self._settings.model_apps}
        status = 200 if any(apps.values()) else 503
        return JSONResponse({"status": "ok" if status == 200 else "unavailable", "models": apps}, status_code=status)

    @api.get("/v1/info")
    async def runtime_info(self) -> dict:
        """Each app's runtime env: Python, Ray, torch / transformers / whisperx versions. Server
        paths (interpreters, model directories) only with the `expose_paths` setting; the
        handle method `info()` always has them."""
        info = await self.info()
        if self._settings.expose_paths:
            return info
        return {app: redact_paths({k: v for k, v in entry.items() if k != "python_executable"}) for app, entry in info.items()}

    # -- jobs (serve_app/jobs/) ----------------------------------------------------------------

    @api.post(JOBS_PATH, status_code=202, responses=_ERROR_RESPONSES)
    async def create_job(self, http: Request, request: JobRequest = Depends(job_form)) -> JSONResponse:
        """Queues a transcription of the upload; answers 202 with the job at once. Follow it with
        GET .../jobs/{id} or .../jobs/{id}/events; its result stays for `jobs.retention_s`."""
        if request.stream:
            raise APIError(400, "A job is not streamed; follow it at GET /v1/audio/transcriptions/jobs/{id}/events.", param="stream", code="unsupported_option")
        upload = self._spooled_upload(request)
        job = await self._job_service().submit(upload, request=job_request(request, filename=request.file.filename), callback_url=request.callback_url)
        self._wake_job_runner()
        job = under_prefix(job, route_prefix(http.scope))
        return JSONResponse(job, status_code=202, headers={"Location": job["links"]["self"]})

    @api.get(JOBS_PATH)
    async def list_jobs_http(self, http: Request, limit: int = 20, after: Optional[str] = None) -> dict:
        """Jobs, newest first, `limit` at a time (1-100); `after` is the last id of the page before."""
        return under_prefix(await self._job_service().list(limit=list_limit(limit), after=after), route_prefix(http.scope))

    @api.get(JOBS_PATH + "/{job_id}", responses=_ERROR_RESPONSES)
    async def get_job_http(self, http: Request, job_id: str, format: Optional[str] = None) -> Response:
        """The job: status, stage, progress, model, warnings, and its result (verbose_json) once it
        succeeded; `?format=srt|vtt|text|json|verbose_json` answers the result alone, rendered."""
        if format is None:
            return JSONResponse(under_prefix(await self._job_service().get(job_id), route_prefix(http.scope)))
        if format not in RESULT_FORMATS:
            raise APIError(400, f"Got format={format!r}; expected one of {list(RESULT_FORMATS)}.", param="format", code="invalid_format")
        media_type, content = await self._job_service().result(job_id, format)
        if media_type == "application/json":
            return JSONResponse(content)
        return Response(content, media_type=f"{media_type}; charset=utf-8")

    @api.delete(JOBS_PATH + "/{job_id}", responses=_ERROR_RESPONSES)
    async def delete_job_http(self, http: Request, job_id: str) -> dict:
        """Cancels a queued or running job; removes a finished one with its result and media."""
        return under_prefix(await self._job_service().delete(job_id), route_prefix(http.scope))

    @api.get(JOBS_PATH + "/{job_id}/events", responses=_ERROR_RESPONSES)
    async def job_events_http(self, job_id: str) -> StreamingResponse:
        """The job's progress as server-sent events (the streamed transcription's event types)."""
        service = self._job_service()
        await service.job(job_id)  # an unknown job: 404 before the stream starts
        return StreamingResponse(service.sse(job_id), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    # -- DeploymentHandle API ------------------------------------------------------------------

    async def transcribe(
        self,
        audio: Union[bytes, np.ndarray],
        *,
        language: Optional[str] = None,
        model: str = "auto",
        task: str = "transcribe",
        segmentation: Optional[str] = None,
        **options: Any,
    ) -> dict:
        """Transcribes audio for another Ray app: `serve.get_app_handle("transcription")`.

        Args:
            audio: An encoded file (bytes) or 16 kHz mono float32 samples.
            language: ISO 639-1 code, or None to detect it.
            model: "auto" or a model name of `/v1/models` (or an alias of one).
            task: "transcribe" or "translate".
            segmentation: "subtitle" (1-7 s cues) or "raw" (the model's segments); None: the
                configured default.
            **options: Further `TranscribeOptions` fields (beam_size, word_timestamps, ...).

        Returns:
            verbose_json as a dict (text, segments, language, model, warnings, ...).

        Raises:
            InvalidAudioError, InvalidOptionsError: Bad input.
            ModelUnavailableError: No model app could serve.
        """
        opts = TranscribeOptions.from_dict({"language": language, "task": task, **options})
        async with self._transcriber.open(audio, model, opts, segmentation=segmentation) as transcription:
            finished = await transcription.collect()
        return {**finished.body, "segments": finished.segments}

    async def transcribe_stream(
        self,
        audio: Union[bytes, np.ndarray],
        *,
        language: Optional[str] = None,
        model: str = "auto",
        task: str = "transcribe",
        segmentation: Optional[str] = None,
        **options: Any,
    ) -> AsyncIterator[dict]:
        """`transcribe`, as the events of a streamed HTTP transcription (`stream=true`), each a dict
        with its `type`: call with `handle.options(stream=True).transcribe_stream.remote(...)`.

        Errors before the first event are raised; later ones arrive as an `error` event.
        """
        opts = TranscribeOptions.from_dict({"language": language, "task": task, **options})
        async with self._transcriber.open(audio, model, opts, segmentation=segmentation, streaming=True) as transcription:
            async for event in stream_events(transcription):
                yield event

    async def submit_job(
        self,
        audio: bytes,
        *,
        callback_url: Optional[str] = None,
        filename: Optional[str] = None,
        model: str = "auto",
        language: Optional[str] = None,
        segmentation: Optional[str] = None,
        **options: Any,
    ) -> dict:
        """Queues a transcription job of `audio` (an encoded file) for another Ray app; returns
        the job as `GET /v1/audio/transcriptions/jobs/{id}` shows it. Options as `transcribe`'s."""
        check_segmentation(segmentation)
        opts = TranscribeOptions.from_dict({"language": language, **options})
        request = {"model": model, "options": opts.to_dict(), "segmentation": segmentation, "words": opts.word_timestamps,
                   "response_format": "verbose_json", "filename": filename}
        job = await self._job_service().submit(io.BytesIO(audio), request=request, callback_url=callback_url)
        self._wake_job_runner()
        return job

    async def get_job(self, job_id: str, format: Optional[str] = None) -> Any:
        """A job (a dict), or with `format` its result rendered (a str, or a dict for json formats)."""
        if format is None:
            return await self._job_service().get(job_id)
        return (await self._job_service().result(job_id, format))[1]

    async def list_jobs(self, limit: int = 20, after: Optional[str] = None) -> dict:
        return await self._job_service().list(limit=list_limit(limit), after=after)

    async def delete_job(self, job_id: str) -> dict:
        return await self._job_service().delete(job_id)

    async def job_events(self, job_id: str) -> AsyncIterator[dict]:
        """The job's events as dicts: `handle.options(stream=True).job_events.remote(job_id)`."""
        async for event in self._job_service().events(job_id):
            yield event

    async def info(self) -> dict:
        """Every app's runtime env, server paths included (for callers inside the cluster)."""
        own = {
            "app": "transcription",
            "python": platform.python_version(),
            "python_executable": sys.executable,
            "ray": ray.__version__,
            "packages": package_versions(["torch", "transformers", "whisperx", "faster-whisper", "ctranslate2", "av"]),
            "device": self._settings.language_id.device,
            "model": self._settings.language_id.model,
            "loaded": True,
            "load_error": None,
            "warnings": [],
        }
        return {"transcription": own, **{m: await self.model_info(m) for m in self._settings.model_apps}}

    async def admission(self) -> dict:
        """This replica's admission now: its limit, what is in flight, and the model capacity the
        limit follows (`serve_app/admission.py`), read from Serve for this answer."""
        await self._read_capacity()
        admission = self._admission
        return {
            "limit": admission.limit,
            "in_flight": admission.in_flight,
            "max_in_flight": admission.max_in_flight,
            "capacity": self._capacity.to_dict() if self._capacity is not None else None,
        }

    def _refresh_capacity_soon(self) -> None:
        # Read lazily, on admissions: an idle ingress does not poll the controller.
        refresh_s = self._settings.capacity_refresh_s
        due = time.monotonic() - self._capacity_read_at >= refresh_s
        if refresh_s and due and (self._capacity_reading is None or self._capacity_reading.done()):
            self._capacity_reading = asyncio.ensure_future(self._read_capacity())

    async def _read_capacity(self) -> None:
        if not self._settings.capacity_refresh_s:
            return
        self._capacity_read_at = time.monotonic()
        try:
            details = await asyncio.to_thread(serve_details)
            capacity = ModelCapacity.from_serve(details, serve.get_replica_context().app_name, self._settings.model_apps.values())
        except Exception as e:  # the controller is busy or restarting: keep the last reading
            logger.warning("Could not read the model apps' capacity from Serve (%s: %s); keeping the last.", type(e).__name__, e)
            return
        self._capacity = capacity
        self._admission.set_capacity(capacity.per_ingress_replica)

    def _release_memory(self) -> None:
        # Uploads and decoded audio are freed with their request; glibc keeps the pages unless
        # asked (deployments/core.py).
        self._release = release_free_memory_soon()

    def memory(self, reset_peak: bool = False) -> dict:
        """This replica's resident memory now and at its peak (`core.process_memory`; bench/)."""
        return process_memory(reset_peak)

    async def model_info(self, model: str) -> dict:
        """A model app's `info()` (runtime env), or why it is unavailable."""
        try:
            return await self._router.call(model, "info")
        except Exception as e:
            return {"app": model, "loaded": False, "load_error": f"{type(e).__name__}: {e}"}

    # -- stages ------------------------------------------------------------------------------

    async def _serve_http(self, request: TranscriptionRequest, *, task: str) -> Response:
        # The admission slot was taken before the upload was read (`AdmitTranscriptions`), and
        # the upload was spooled to a temporary file as it arrived (Starlette's form parser).
        upload = self._spooled_upload(request)
        opts = request.to_transcribe_options(task=task)
        timings: Dict[str, float] = {}
        ingress_metrics.note_request(response_format=request.response_format, upload_bytes=request.file.size, timings=timings)
        stack = AsyncExitStack()
        transcription = await stack.enter_async_context(
            self._transcriber.open(upload, request.model, opts, segmentation=request.segmentation, streaming=request.stream, timings=timings)
        )
        if request.stream:
            return StreamingResponse(_closing(sse_stream(transcription), stack), media_type="text/event-stream", headers={"Cache-Control": "no-store"})
        try:
            async with stack:
                finished = await transcription.collect()
        except BackPressureError as e:
            # Serve adds its own handler for this exception to the app when the replica starts,
            # over ours, and it answers in plain text: answer it here.
            return error_response_for(e)
        ingress_metrics.note_result(finished.body)
        headers = {MODEL_HEADER: finished.body["model"] or "", "Server-Timing": server_timing(timings)}
        if finished.fallback:
            headers[FALLBACK_HEADER] = finished.fallback
        return render(
            request.response_format,
            finished.body,
            finished.segments,
            words="word" in request.timestamp_granularities,
            headers=headers,
        )

    def _job_service(self) -> JobService:
        if self._jobs is None:
            raise JobsDisabledError()
        return self._jobs

    def _wake_job_runner(self) -> None:
        if self._job_runner is None:
            return

        async def wake() -> None:
            try:
                await self._job_runner.wake.remote()
            except Exception as e:  # it polls anyway
                logger.info("Could not wake the job runner: %s", e)

        self._waking = asyncio.ensure_future(wake())

    def _spooled_upload(self, request: TranscriptionRequest) -> BinaryIO:
        limit = self._settings.max_upload_bytes
        if request.file.size is not None and request.file.size > limit:
            raise UploadTooLargeError(request.file.size, limit)
        return request.file.file


def build_app(args: Dict[str, Any]) -> Application:
    """The ingress application: the `TranscriptionIngress` deployment, and the `JobRunner`
    deployment (serve_app/jobs/runner.py) unless `jobs.enabled` is off.

    Args:
        args: The Serve config's `args:` (see `IngressSettings`); validated here so a bad value
            fails the deploy with a message naming it.
    """
    settings = IngressSettings(**(args or {}))
    dumped = settings.model_dump()
    if not settings.jobs.enabled:
        return TranscriptionIngress.bind(dumped)
    from serve_app.jobs.runner import JobRunner

    return TranscriptionIngress.bind(dumped, JobRunner.bind(dumped))
