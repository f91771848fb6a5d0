"""What every model replica tells Prometheus, through Ray's metrics agent (`ray.serve.metrics`).

Serve adds the `deployment`, `replica` and `application` labels; Ray prefixes each name with
`ray_` and exports a counter as `<name>_total`. So `klipnote_model_audio_seconds` is scraped as
`ray_klipnote_model_audio_seconds_total{application="belle2", ...}`. Labels stay low in
cardinality: an error type, never a request id or a file name.

The core counts what decoding does (`deployments.core.DecodeEvents`, no Ray there);
`ReplicaMetrics` is the events object a replica gives its core, recording each event as it is
counted, and what a whole request took.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, Optional, Tuple

from deployments.core import DecodeEvents

PREFIX = "klipnote_model_"

RTF_BOUNDARIES = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0]
BATCH_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
"""Upper bounds: a batch of 2 lands in le="2"."""

_EVENT_DESCRIPTIONS = {
    DecodeEvents.WINDOWS: "Windows (up to 30 s of audio each) decoded.",
    DecodeEvents.NO_SPEECH_WINDOWS: "Windows that decoded to no text (silence, or skipped as no speech).",
    DecodeEvents.TEMPERATURE_RETRIES: "Windows decoded again at a higher temperature (temperature fallback).",
    DecodeEvents.REPETITION_COLLAPSES: "Segments whose repetition loop the text guard cut.",
}


class KeptGauges:
    """Gauges set again every `period_s`, in a daemon thread.

    Ray 2.60's metrics agent stops exporting a gauge soon after it was last set (within a minute
    here: a model's load time, set once at start, was gone from Prometheus by the time anyone
    looked), while counters stay. So a value that holds until it changes is recorded again and
    again.
    """

    def __init__(self, period_s: float = 5.0):
        self._values: Dict[Any, float] = {}
        self._lock = threading.Lock()
        self._period_s = period_s
        threading.Thread(target=self._keep, name="klipnote-gauges", daemon=True).start()

    def set(self, gauge: Any, value: float, tags: Optional[Dict[str, str]] = None) -> None:
        tags = tags or {}
        with self._lock:
            self._values[(gauge, tuple(sorted(tags.items())))] = value
        gauge.set(value, tags=tags)

    def _keep(self) -> None:
        while True:
            time.sleep(self._period_s)
            with self._lock:
                values = list(self._values.items())
            for (gauge, tags), value in values:
                try:
                    gauge.set(value, tags=dict(tags))
                except Exception:  # a metric must never stop the replica
                    pass


class ReplicaMetrics(DecodeEvents):
    """A model replica's metrics. Created in the replica (Serve's labels come from its context)."""

    def __init__(self):
        super().__init__()
        from ray.serve.metrics import Counter, Gauge, Histogram

        self._event_counters = {
            event: Counter(PREFIX + event, description=description) for event, description in _EVENT_DESCRIPTIONS.items()
        }
        self._batch_size = Histogram(PREFIX + "batch_size", description="Windows per model call (cross-request batches included).", boundaries=BATCH_BOUNDARIES)
        self._audio_seconds = Counter(PREFIX + "audio_seconds", description="Seconds of audio transcribed.")
        self._processing_seconds = Counter(PREFIX + "processing_seconds", description="Seconds spent transcribing (wall time per request, summed).")
        self._rtf = Histogram(PREFIX + "real_time_factor", description="Processing seconds per second of audio, per request.", boundaries=RTF_BOUNDARIES)
        self._failures = Counter(PREFIX + "failures", description="Requests that failed in the model app, by error type.", tag_keys=("error",))
        self._load_seconds = Gauge(PREFIX + "load_seconds", description="Seconds the replica took to load its model.")
        self._gpu_used = Gauge(PREFIX + "gpu_memory_bytes", description="GPU memory this replica's model uses (only with a GPU).")
        self._gpu_cap = Gauge(PREFIX + "gpu_memory_cap_bytes", description="GPU memory this replica may use: its share of the card (only with a GPU).")
        self._gauges = KeptGauges()

    def count(self, event: str, n: int = 1) -> None:
        super().count(event, n)
        if n > 0 and event in self._event_counters:
            self._event_counters[event].inc(n, tags={})

    def batch(self, size: int) -> None:
        super().batch(size)
        self._batch_size.observe(size, tags={})
        self._event_counters[DecodeEvents.WINDOWS].inc(size, tags={})

    def request_done(self, audio_seconds: float, processing_seconds: float) -> None:
        """One request transcribed."""
        if audio_seconds > 0:
            self._audio_seconds.inc(audio_seconds, tags={})
            self._rtf.observe(processing_seconds / audio_seconds, tags={})
        if processing_seconds > 0:
            self._processing_seconds.inc(processing_seconds, tags={})

    def request_failed(self, error: str) -> None:
        self._failures.inc(1, tags={"error": error})

    def loaded(self, load_seconds: float) -> None:
        self._gauges.set(self._load_seconds, load_seconds)

    def gpu_memory(self, used_and_cap: Optional[Tuple[int, int]]) -> None:
        if used_and_cap is not None:
            used, cap = used_and_cap
            self._gauges.set(self._gpu_used, used)
            self._gauges.set(self._gpu_cap, cap)
