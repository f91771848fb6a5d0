"""The Serve side every model application shares: one replica class around a `ModelCore`.

A model app's `build_app` is one call, `model_app(CoreClass, args, name="...")`; the replica
checks its env against the cluster, builds the core (load, warm-up), and answers the handle
methods the ingress and other Ray apps call: `transcribe`, `spec`, `info`, `memory`, and
Serve's `check_health`. Errors leave it as the contract's types only (`deployments/contract.py`):
an exception class from torch or transformers would not unpickle in the ingress env.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Dict, Optional, Type

import numpy as np
from ray import serve
from ray.serve import Application

from deployments.batching import REQUEST_ID
from deployments.contract import (
    InvalidAudioError,
    InvalidOptionsError,
    ModelFailedError,
    ModelUnavailableError,
    TranscriptionResult,
)
from deployments.core import ModelCore, TranscriptionCancelled, import_core, process_memory, release_free_memory, run_cancellable
from deployments.logs import send_to_serve_logs
from deployments.metrics import ReplicaMetrics
from deployments.runtime import assigned_gpu_fraction, check_environment, publish_spec

logger = logging.getLogger(__name__)

_CONTRACT_ERRORS = (InvalidAudioError, InvalidOptionsError, ModelUnavailableError, ModelFailedError)


class ModelReplica:
    """One replica of a model app. Subclass it only to add handle methods of a model's own."""

    def __init__(self, core: str, args: Optional[dict] = None):
        send_to_serve_logs("deployments")
        self._versions = check_environment()
        self.core: ModelCore = import_core(core)(args, gpu_fraction=assigned_gpu_fraction() or None)
        self.metrics = ReplicaMetrics()
        self.core.events = self.metrics  # from here on; the warm-up's decodes are not service
        self.metrics.loaded(self.core.load_time_s)
        self.metrics.gpu_memory(self.core.gpu_memory())
        publish_spec(serve.get_replica_context().app_name, self.spec())
        self._replica = serve.get_replica_context().replica_tag
        self._in_flight = 0
        self._served = 0
        self._decoding = 0
        self._cancelled = 0
        self._counts = threading.Lock()
        release_free_memory()  # what loading and the warm-up freed

    async def transcribe(self, audio: np.ndarray, options: Optional[dict] = None) -> TranscriptionResult:
        """Transcribes 16 kHz mono float32 audio (`ModelCore.transcribe`) in a worker thread.

        Raises:
            InvalidAudioError, InvalidOptionsError: Bad input.
            ModelUnavailableError: The model cannot serve.
            ModelFailedError: Anything else that went wrong, by type name and message.
        """
        self._in_flight += 1
        REQUEST_ID.set(serve_request_id())  # this request's task only; batch log lines list it
        started = time.perf_counter()
        try:
            result = await run_cancellable(self._decode, audio, options)
            self._served += 1
            if result is not None:
                self._record(result, time.perf_counter() - started)
            return result
        except _CONTRACT_ERRORS as e:
            self.metrics.request_failed(type(e).__name__)
            raise
        except Exception as e:
            logger.exception("Transcription failed.")
            self.metrics.request_failed(ModelFailedError.__name__)
            raise ModelFailedError(f"{type(e).__name__}: {e}") from None
        finally:
            self._in_flight -= 1

    def _record(self, result: TranscriptionResult, seconds: float) -> None:
        audio_s = result["duration"]
        self.metrics.request_done(audio_s, seconds)
        self.metrics.gpu_memory(self.core.gpu_memory())
        logger.info("Transcribed %.1f s of audio in %.2f s (real-time factor %.3f), %d segments.",
                    audio_s, seconds, seconds / audio_s if audio_s else 0.0, len(result["segments"]))

    def _decode(self, audio: np.ndarray, options: Optional[dict]) -> Optional[TranscriptionResult]:
        """`core.transcribe` in the worker thread, counted: Serve stops counting a cancelled
        request at once, while its thread runs to the next batch (`activity()` shows both)."""
        with self._counts:
            self._decoding += 1
        try:
            return self.core.transcribe(audio, options)
        except TranscriptionCancelled:
            logger.info("Stopped decoding a cancelled request.")
            with self._counts:
                self._cancelled += 1
            return None  # nobody awaits it any more
        finally:
            with self._counts:
                self._decoding -= 1
                idle = self._decoding == 0
            if idle:
                release_free_memory()  # what the decode freed; glibc keeps it otherwise

    def activity(self) -> dict:
        """This replica's id, requests in flight (Serve's view) and served since start, decodes
        still running in threads, decodes stopped by a cancellation since start, decodes its
        health checks ran, and this process's CPU seconds."""
        with self._counts:
            return {
                "replica": self._replica,
                "in_flight": self._in_flight,
                "served": self._served,
                "decoding": self._decoding,
                "cancelled": self._cancelled,
                "health_decodes": self.core.health_decodes,
                "cpu_seconds": time.process_time(),
            }

    def batches(self) -> dict:
        """What cross-request batching did since start (`deployments/batching.py`): batches,
        windows, batches shared by two or more requests, a histogram of batch sizes and the
        last batches with their request ids. Empty for a model that does not batch."""
        batcher = self.core.batcher
        if batcher is None:
            return {}
        return {"max_batch_size": batcher.max_batch_size, "max_wait_ms": batcher.max_wait_s * 1000, **batcher.stats.to_dict()}

    def spec(self) -> dict:
        """What this model is for and what it honours (`ModelSpec.to_dict()`)."""
        return self.core.model_spec().to_dict()

    def info(self) -> dict:
        """This replica's runtime env: interpreter, Ray and library versions, device, model."""
        return self.core.info(self._versions)

    def memory(self, reset_peak: bool = False) -> dict:
        """This replica's resident memory now and at its peak (`core.process_memory`).

        Args:
            reset_peak: First reset the peak, so that a later call reports the peak of what ran
                in between (bench/whisperx_app.py).
        """
        return process_memory(reset_peak)

    async def check_health(self) -> None:
        """Serve calls it every `health_check_period_s`; it may decode (`ModelCore.check_health`),
        so in a thread: the replica's event loop keeps answering meanwhile."""
        await asyncio.to_thread(self.core.check_health)


def serve_request_id() -> str:
    """The id Serve gave the request being handled (the client's X-Request-Id, carried through
    the ingress's handle calls), or "" outside a request."""
    from ray.serve import context

    try:
        return str(context._get_serve_request_context().request_id or "")
    except AttributeError:  # a Ray without the private accessor: batches are listed without ids
        return ""


def model_app(
    core: Type[ModelCore],
    args: Optional[Dict[str, Any]],
    *,
    name: str,
    replica: Type[ModelReplica] = ModelReplica,
) -> Application:
    """A model application: one deployment of `replica` around `core`.

    Args:
        core: The plug-in's `ModelCore` subclass.
        args: The Serve config's `args:`; validated here with `core.Args`, so a bad value fails
            the deploy with a message naming it.
        name: The deployment's name (the Serve config's `deployments:` entries refer to it).
        replica: `ModelReplica` or a subclass with handle methods of the model's own.
    """
    validated = core.Args.model_validate(args or {})
    deployment = serve.deployment(
        replica,
        name=name,
        max_ongoing_requests=4,
        health_check_period_s=10,
        health_check_timeout_s=30,
    )
    return deployment.bind(f"{core.__module__}:{core.__qualname__}", validated.model_dump())
