"""The base of every model plug-in, without Ray: what all models share around their own decoding.

A model plug-in is a `ModelCore` subclass that declares its `spec` and `Args` and implements
`load` and `decode`; everything else a model app does is here, once:

- settings validated from a dict (`Args`, a `ModelAppArgs` subclass);
- device choice, GPU memory cap and CPU threads;
- loading with a clear load error (`ModelUnavailableError` naming the model and the cause);
- a warm-up, timed and logged, whose failure costs latency only;
- options parsed once, those the spec does not honour refused (`UnsupportedOptionError`), never dropped;
- text post-processing for every model (repetition guard, Chinese script: `deployments/text.py`);
- the result envelope (`TranscriptionResult`), model info, the pinned-decode report;
- `info()`, `check_health()` and `memory()`;
- what decoding did, counted for the replica's metrics (`DecodeEvents`).

It imports the standard library, numpy and pydantic only, so the model core runs without Ray
or Serve (bench/, the GPU check); `deployments/replica.py` puts a core behind Serve.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import functools
import importlib.metadata
import logging
import math
import os
import platform
import sys
import threading
import time
import wave
from pathlib import Path
from typing import Any, ClassVar, List, Mapping, Optional, Tuple, Type, Union

import numpy as np
from pydantic import BaseModel, Field, field_validator

from deployments.batching import BatchWithdrawn, CrossRequestBatcher
from deployments.contract import (
    SAMPLE_RATE,
    EnvInfo,
    InvalidAudioError,
    InvalidOptionsError,
    ModelInfo,
    ModelSpec,
    ModelUnavailableError,
    Segment,
    TranscribeOptions,
    TranscriptionResult,
    UnsupportedOptionError,
    describe_unhonoured,
    unhonoured_options,
)
from deployments.pinned_decode import MAX_PINNED_DECODE_TOKENS, report_pinned
from deployments.text import TextPostProcessor

logger = logging.getLogger(__name__)


class ModelAppArgs(BaseModel):
    """Settings every model application has, filled from the Serve config's `args:`."""

    model: str = Field(..., description="Model id or local directory; each plug-in sets its default.")
    device: str = Field("auto", description="'cuda', 'cpu' or 'auto' (cuda when available).")
    model_cache: Optional[str] = Field(None, description="Hugging Face cache directory for downloaded models.")
    local_files_only: bool = Field(False, description="Never reach the hub; load from the cache or a local directory only.")
    gpu_memory_fraction: Optional[float] = Field(None, gt=0, le=1, description="Share of the GPU this replica may use; default: its Ray num_gpus.")
    cpu_threads: int = Field(0, ge=0, description="CPU threads for decoding, set in every decoding thread (`set_torch_threads`); 0 keeps the library's default.")
    max_audio_seconds: float = Field(4 * 3600, gt=0, description="Longest audio accepted.")
    pinned_decode_tokens: Optional[int] = Field(
        None,
        ge=1,
        le=MAX_PINNED_DECODE_TOKENS,
        description="Benchmark only, for random weights (bench/random_whisper.py): every window decodes exactly this "
        "many tokens, once, at one temperature, none skipped as silence; results say so in `warnings` "
        "(deployments/pinned_decode.py). None decodes normally.",
    )
    health_decode_interval_s: float = Field(
        60.0, ge=0, description="Serve's health check decodes a short clip when no decode succeeded for this long "
        "(a request's batch counts); 0: the check only asks whether the model is loaded.",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda"):
            raise ValueError(f"Got {v!r} for device; expected 'auto', 'cpu' or 'cuda'.")
        return v


class BatchedModelArgs(ModelAppArgs):
    """Settings of a model app that decodes windows of concurrent requests together
    (`deployments/batching.py`)."""

    batch_size: int = Field(8, ge=1, description="Most windows (of up to 30 s) decoded in one model call, from one request or several; bounds the memory of a call (checked at start-up against the GPU share where there is a GPU).")
    batch_wait_ms: float = Field(20.0, ge=0, le=1000, description="How long the oldest waiting window may wait for windows of other requests to join its batch; only while another request is still preparing its windows.")
    batch_across_requests: bool = Field(True, description="Decode windows of concurrent requests together; off, each request's windows are batched only with its own (bench/concurrency.py compares both).")
    max_beam_size: int = Field(8, ge=1, description="Largest beam_size a request may ask for: a call decodes batch_size x beam rows, so this and batch_size bound its memory.")


@dataclasses.dataclass
class Decoded:
    """What a plug-in's `decode` returns: segments in file time and the language it decoded."""

    segments: List[Segment]
    language: str
    language_probability: Optional[float] = None
    word_times: Optional[str] = None
    """Where the segments' word times come from ("wav2vec2", "whisper-cross-attention"); None: no words."""


@dataclasses.dataclass
class DecodeRequest:
    """One request as a plug-in's `decode` sees it: options already checked against the spec."""

    audio: np.ndarray
    """16 kHz mono float32, writable."""
    options: TranscribeOptions
    warnings: List[str] = dataclasses.field(default_factory=list)
    """Append what the client should know about this result."""
    window_tokens: List[int] = dataclasses.field(default_factory=list)
    """With `pinned_decode_tokens`: append the tokens each window decoded."""


class DecodeEvents:
    """What decoding did, event by event, for the replica's metrics (`deployments/metrics.py`
    records them in Prometheus). Counted in memory here, so a core without Ray (bench, the GPU
    check, tests) counts too. Called from request threads and the batch runner alike."""

    WINDOWS = "windows"
    """Windows (up to 30 s of audio each) the model decoded."""
    NO_SPEECH_WINDOWS = "no_speech_windows"
    """Windows that decoded to no text (silence, or skipped as no speech)."""
    TEMPERATURE_RETRIES = "temperature_retries"
    """Windows decoded again at a higher temperature (temperature fallback)."""
    REPETITION_COLLAPSES = "repetition_collapses"
    """Segments whose repetition loop the text guard cut (`deployments/text.py`)."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.batch_sizes: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def count(self, event: str, n: int = 1) -> None:
        if n > 0:
            with self._lock:
                self.counts[event] += n

    def batch(self, size: int) -> None:
        """One model call on `size` windows."""
        with self._lock:
            self.batch_sizes[size] += 1
            self.counts[self.WINDOWS] += size


class ModelCore:
    """A loaded model and the shared pipeline around it; subclass it for a model plug-in.

    Subclasses set `spec`, `Args` and `packages` and implement `load` and `decode`; they may
    override `warm_up`, `model_spec`, `check_options`, `decode_threads` and `describe`.

    Args:
        args: The app's settings (a dict is validated with `Args`).
        gpu_fraction: The GPU share Ray scheduled this replica with, used when the settings
            give no `gpu_memory_fraction` (None outside Ray).

    Raises:
        ModelUnavailableError: The device or the model cannot be had; the message says why.
    """

    spec: ClassVar[ModelSpec]
    Args: ClassVar[Type[ModelAppArgs]] = ModelAppArgs
    packages: ClassVar[Tuple[str, ...]] = ()
    """Distributions whose versions `info()` reports."""

    batcher: Optional[CrossRequestBatcher] = None
    """Set in `load` by a plug-in that batches windows across requests (`batched`)."""
    events: DecodeEvents
    """What decoding did; the replica swaps in one that also records metrics."""

    def __init__(self, args: Union[ModelAppArgs, Mapping[str, Any], None] = None, *, gpu_fraction: Optional[float] = None):
        self.args = args if isinstance(args, self.Args) else self.Args.model_validate(dict(args or {}))
        self.start_warnings: List[str] = []
        self.events = DecodeEvents()
        self.decoded_at = -math.inf
        """When a decode last succeeded (monotonic seconds): a batch, or a whole request's."""
        self.health_decodes = 0
        """Decodes the health check ran (`check_health`)."""
        configure_offline(self.args.model_cache)
        started = time.perf_counter()
        self.device = resolve_device(self.args.device)
        self.gpu_share = self.args.gpu_memory_fraction or gpu_fraction or 1.0
        if self.device == "cuda":
            cap_torch_gpu_memory(self.gpu_share)
        try:
            self.load()
        except ModelUnavailableError:
            raise
        except Exception as e:
            where = f"offline, cache {self.args.model_cache}" if self.args.local_files_only else "hub or cache"
            raise ModelUnavailableError(
                f"{self.spec.name} app could not load model {self.args.model!r} ({where}): {type(e).__name__}: {e}"
            ) from e
        self.text = TextPostProcessor(convert_script=self.model_spec().script_choice)
        self.load_time_s = time.perf_counter() - started
        logger.info("Loaded %s (%s) on %s in %.1f s.", self.spec.name, self.args.model, self.device, self.load_time_s)
        self._loaded = True
        started = time.perf_counter()
        try:
            self.warm_up()
            logger.info("Warm-up took %.2f s.", time.perf_counter() - started)
        except Exception:  # a failed warm-up costs latency on the first request, nothing else
            logger.exception("Warm-up failed.")
        if self.device == "cuda" and self.batcher is not None:
            self.check_largest_batch()

    # -- what a plug-in implements ---------------------------------------------------------------

    def load(self) -> None:
        """Loads the model onto `self.device`; any exception becomes a clear load error."""
        raise NotImplementedError

    def decode(self, request: DecodeRequest) -> Decoded:
        """Turns audio and options into segments (text cleaning and the envelope come after)."""
        raise NotImplementedError

    def warm_up(self) -> None:
        """Runs the model once so that the first request does not pay for initialisation."""

    def model_spec(self) -> ModelSpec:
        """The spec this replica serves under (a plug-in may refine `spec` from its settings)."""
        return self.spec

    def check_options(self, opts: TranscribeOptions) -> None:
        """Raises `InvalidOptionsError` for options this replica cannot serve as configured."""

    def prompt_tokenizer(self) -> Optional[Tuple[Any, Any]]:
        """(encode: text -> token ids, decode: token ids -> text) of the model's tokenizer, so
        that `prepare` can cut a prompt longer than the decoder takes; None: no cutting."""
        return None

    def run_largest_batch(self) -> int:
        """Runs the largest model call requests can cause (`batch_size` windows of 30 s at
        `max_beam_size`, decoded to the longest length) and returns the GPU bytes it took at its
        peak, as this plug-in's allocator counts them. Only called on a GPU."""
        raise NotImplementedError

    def gpu_memory(self) -> Optional[Tuple[int, int]]:
        """(GPU bytes this replica's model holds, GPU bytes its share allows); None without a GPU.
        torch's allocator's reserved bytes: a plug-in whose engine allocates outside torch
        overrides it."""
        if self.device != "cuda":
            return None
        import torch

        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return torch.cuda.memory_reserved(), int(self.gpu_share * total)

    def decode_threads(self) -> int:
        """CPU threads each decoding thread runs on (0: the library's default)."""
        return self.args.cpu_threads if self.device == "cpu" else 0

    def describe(self) -> ModelInfo:
        """Engine and compute type for the result's model info."""
        return ModelInfo(engine=self.spec.name, compute_type="")

    # -- the shared pipeline ---------------------------------------------------------------------

    def transcribe(self, audio: np.ndarray, options: Optional[Mapping[str, Any]] = None) -> TranscriptionResult:
        """Transcribes 16 kHz mono float32 audio; runs in the caller's thread.

        Args:
            audio: The waveform.
            options: `TranscribeOptions.to_dict()`.

        Returns:
            A `TranscriptionResult` made of builtins only.

        Raises:
            InvalidAudioError: The waveform is unusable.
            UnsupportedOptionError: An option the spec does not honour.
            InvalidOptionsError: The options are malformed or ask for what is not configured.
        """
        request = self.prepare(audio, options)
        set_torch_threads(self.decode_threads())  # worker threads start from OMP_NUM_THREADS
        with self.batcher.joined() if self.batcher is not None else contextlib.nullcontext():
            decoded = self.decode(request)
        self.decoded_at = time.monotonic()
        return self.envelope(request, decoded)

    def batched(self, run: Any, *, name: Optional[str] = None) -> CrossRequestBatcher:
        """A batcher for this core's model calls, sized by `batch_size` and `batch_wait_ms`;
        `run(key, items)` runs in its thread, with this core's decoding threads."""
        threads = self.decode_threads()
        return CrossRequestBatcher(
            run,
            max_batch_size=self.args.batch_size,
            max_wait_ms=self.args.batch_wait_ms,
            name=name or self.spec.name,
            thread_setup=lambda: set_torch_threads(threads),
            on_batch=self._batch_done,
        )

    def _batch_done(self, size: int) -> None:
        self.decoded_at = time.monotonic()
        self.events.batch(size)

    def decode_together(self, key: Any, items: List[Any]) -> List[Any]:
        """`items` decoded by `self.batcher`, with other requests' items of the same `key`.

        Raises:
            TranscriptionCancelled: This request was cancelled before a batch took its items.
        """
        stop_if_cancelled()
        stop = _STOP.get()
        try:
            return self.batcher.submit(
                key, items, should_stop=stop.is_set if stop is not None else None, alone=not self.args.batch_across_requests
            )
        except BatchWithdrawn:
            raise TranscriptionCancelled() from None

    def prepare(self, audio: np.ndarray, options: Optional[Mapping[str, Any]]) -> DecodeRequest:
        """Checks audio and options.

        A caller of the model app has chosen this model, so an option its spec does not honour is
        refused, never dropped (the ingress, routing on its own, leaves such options out and says
        so in the result's warnings instead).

        Raises:
            UnsupportedOptionError: An option this model does not honour.
            InvalidOptionsError, InvalidAudioError: Malformed options or audio.
        """
        opts = TranscribeOptions.from_dict(options)
        refused = unhonoured_options(self.model_spec(), opts)
        if refused:
            raise UnsupportedOptionError(describe_unhonoured(refused, opts), option=refused[0].option)
        max_beam = getattr(self.args, "max_beam_size", None)
        if max_beam is not None and opts.beam_size > max_beam:
            raise InvalidOptionsError(
                f"Got beam_size={opts.beam_size}; this model app takes at most {max_beam} (max_beam_size)."
            )
        self.check_options(opts)
        warnings: List[str] = []
        tokenizer = self.prompt_tokenizer() if opts.initial_prompt else None
        if tokenizer is not None:
            prompt, warning = cut_prompt(opts.initial_prompt, *tokenizer)
            if warning:
                opts = dataclasses.replace(opts, initial_prompt=prompt)
                warnings.append(warning)
        return DecodeRequest(validate_audio(audio, max_seconds=self.args.max_audio_seconds), opts, warnings)

    def envelope(self, request: DecodeRequest, decoded: Decoded) -> TranscriptionResult:
        """The result: cleaned text, duration, warnings, model info (and the pin, if any)."""
        segments = self.text(
            decoded.segments, language=decoded.language, script=request.options.script, warnings=request.warnings,
            on_collapse=lambda n: self.events.count(DecodeEvents.REPETITION_COLLAPSES, n),
        )
        model_info = self.model_info()
        if self.args.pinned_decode_tokens:
            report_pinned(model_info, request.warnings, self.args.pinned_decode_tokens, request.window_tokens)
        return TranscriptionResult(
            segments=segments,
            language=decoded.language,
            language_probability=decoded.language_probability,
            duration=request.audio.size / SAMPLE_RATE,
            warnings=request.warnings,
            model=model_info,
            word_times=decoded.word_times,
        )

    def check_largest_batch(self) -> None:
        """Refuses to start a replica whose largest batch does not fit its GPU share.

        Ray's fractional GPUs only place replicas; torch's cap makes a BELLE-2 batch over the
        share fail, and CTranslate2 (WhisperX) is not capped at all. So the largest call a mix of
        requests can make is run once, at start-up, and measured against the share: a replica
        that passes cannot be pushed over it by batching later.

        Raises:
            ModelUnavailableError: It did not fit; the message names the settings to lower.
        """
        import torch

        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        what = f"batch_size {self.args.batch_size} x max_beam_size {self.args.max_beam_size}"
        try:
            peak = self.run_largest_batch()
        except torch.OutOfMemoryError as e:
            raise ModelUnavailableError(
                f"{self.spec.name}: the largest batch ({what}) ran out of GPU memory within this replica's share "
                f"({self.gpu_share:.2f} of {total / 2**30:.0f} GiB); lower batch_size or max_beam_size ({e})."
            ) from None
        problem = batch_memory_problem(peak, total, self.gpu_share, what)
        if problem:
            raise ModelUnavailableError(f"{self.spec.name}: {problem}")
        logger.info("The largest batch (%s) peaked at %.1f GiB of this replica's %.1f GiB share.", what, peak / 2**30, self.gpu_share * total / 2**30)
        self.largest_batch_bytes = peak

    def model_info(self) -> ModelInfo:
        info = ModelInfo(
            app=self.spec.name,
            model=self.args.model,
            device=self.device,
            load_time_s=round(self.load_time_s, 3),
            **self.describe(),
        )
        if self.device == "cuda":
            import torch

            info["gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated())
        return info

    def info(self, versions: Optional[Mapping[str, str]] = None) -> EnvInfo:
        """This replica's runtime env: interpreter, library versions, device, model, warnings."""
        versions = versions or {}
        return EnvInfo(
            app=self.spec.name,
            python=versions.get("python_version", platform.python_version()),
            python_executable=sys.executable,
            ray=versions.get("ray_version", "absent"),
            packages=package_versions(self.packages),
            device=self.device,
            model=self.args.model,
            loaded=self._loaded,
            load_error=None,
            warnings=list(self.start_warnings),
        )

    def check_health(self) -> None:
        """Serve's health check: raises unless the model can decode.

        A decode that succeeded within `health_decode_interval_s` (a batch of any request's
        windows, or the last check's), or a model call running for less than that, is proof
        enough, so a busy replica decodes nothing extra (a long CPU batch would hold a check
        past Serve's timeout); otherwise `HEALTH_CLIP_SECONDS` of `SPEECH_CLIP` is decoded (in
        the batcher's queue, like any request). Runs in a worker thread
        (`ModelReplica.check_health`).

        Raises:
            ModelUnavailableError: The model is not loaded, or its decode failed.
        """
        if not getattr(self, "_loaded", False):
            raise ModelUnavailableError(f"{self.spec.name} model not loaded.")
        interval = self.args.health_decode_interval_s
        now = time.monotonic()
        if not interval or now - self.decoded_at < interval:
            return
        busy_since = self.batcher.busy_since if self.batcher is not None else None
        if busy_since is not None and now - busy_since < interval:
            return  # a model call is running, and not for long: a check would only queue behind it
        try:
            self.transcribe(read_speech_clip()[: int(HEALTH_CLIP_SECONDS * SAMPLE_RATE)])
        except Exception as e:
            logger.exception("The health-check decode failed.")
            raise ModelUnavailableError(f"{self.spec.name} cannot decode: {type(e).__name__}: {e}") from e
        self.health_decodes += 1

    def warn_at_start(self, message: str) -> None:
        """Logs `message` loudly and lists it in `info()`'s warnings for the replica's lifetime."""
        logger.warning("%s", message)
        self.start_warnings.append(message)


HEALTH_CLIP_SECONDS = 1.5
"""The health check decodes this much of `SPEECH_CLIP`, with the app's default options (any
option could be one a plug-in's spec does not honour)."""

SPEECH_CLIP = Path(__file__).with_name("assets") / "speech_zh.wav"
"""5 s of read Mandarin (PaddleSpeech's zh.wav, Apache-2.0; deployments/assets/README.md):
what the BELLE-2 warm-up self-check and every model's health-check decode hear."""


@functools.lru_cache(maxsize=1)
def read_speech_clip() -> np.ndarray:
    """`SPEECH_CLIP` as 16 kHz mono float32 (stdlib `wave`: no PyAV needed in any env)."""
    with wave.open(str(SPEECH_CLIP), "rb") as f:
        if (f.getnchannels(), f.getsampwidth(), f.getframerate()) != (1, 2, SAMPLE_RATE):
            raise ValueError(f"{SPEECH_CLIP} must be 16-bit mono {SAMPLE_RATE} Hz.")
        frames = f.readframes(f.getnframes())
    return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0


# -- helpers every env can use (stdlib and numpy; torch imported where needed) --------------------


def batch_memory_problem(peak_bytes: int, total_bytes: int, share: float, what: str) -> Optional[str]:
    """Why a largest batch of `peak_bytes` does not fit `share` of a `total_bytes` GPU; None if it does."""
    allowed = share * total_bytes
    if peak_bytes <= allowed:
        return None
    return (
        f"the largest batch ({what}) peaked at {peak_bytes / 2**30:.1f} GiB, over this replica's share of the GPU "
        f"({share:.2f} of {total_bytes / 2**30:.0f} GiB = {allowed / 2**30:.1f} GiB); lower batch_size or max_beam_size."
    )


def package_versions(names) -> dict:
    """Installed versions of the named distributions as plain strings ("absent" if missing).

    `importlib.metadata` gives `str`, never a library's own version class (torch's
    `TorchVersion` would not unpickle in an env without torch).
    """
    out = {}
    for name in names:
        try:
            out[name] = str(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


MAX_PROMPT_TOKENS = 223
"""The most prompt tokens a Whisper decoder is given: half its 448-token context, less the
`<|startofprev|>` token (openai/whisper and faster-whisper cut there too); longer prompts made
transformers' generate raise."""


def cut_prompt(text: str, encode, decode, max_tokens: int = MAX_PROMPT_TOKENS) -> Tuple[str, Optional[str]]:
    """`text`, or its last `max_tokens` tokens with a warning saying so.

    Args:
        encode: text -> token ids; decode: token ids -> text (the model's tokenizer).
    """
    ids = list(encode(" " + text.strip()))
    if len(ids) <= max_tokens:
        return text, None
    kept = decode(ids[-max_tokens:]).lstrip("\ufffd").strip()  # a character cut in two decodes to U+FFFD
    return kept, (
        f"The prompt was {len(ids)} tokens; the model takes at most {max_tokens}, so only its last "
        f"{max_tokens} were used."
    )


def tokenizers_prompt_tokenizer(tokenizer: Any) -> Tuple[Any, Any]:
    """`prompt_tokenizer()` for a `tokenizers.Tokenizer` (faster-whisper's `hf_tokenizer`)."""
    return (lambda text: tokenizer.encode(text, add_special_tokens=False).ids), tokenizer.decode


def validate_audio(audio: np.ndarray, *, max_seconds: Optional[float] = None) -> np.ndarray:
    """Checks a waveform and returns a writable float32 copy.

    Arrays that arrive through Ray are read-only views of the object store; torch refuses
    those (`torch.from_numpy` warns and writes would crash), so every replica copies first.

    Raises:
        InvalidAudioError: Not a 1-D float array, empty, or longer than `max_seconds`.
    """
    if not isinstance(audio, np.ndarray) or audio.ndim != 1:
        shape = getattr(audio, "shape", type(audio).__name__)
        raise InvalidAudioError(f"Got audio of shape {shape}; expected mono 1-D samples.")
    if audio.size == 0:
        raise InvalidAudioError("Got empty audio (0 samples).")
    if not np.issubdtype(audio.dtype, np.floating):
        raise InvalidAudioError(f"Got audio of dtype {audio.dtype}; expected float32 in [-1, 1].")
    if max_seconds is not None and audio.size > max_seconds * SAMPLE_RATE:
        raise InvalidAudioError(
            f"Got {audio.size / SAMPLE_RATE:.1f} s of audio; this app accepts at most {max_seconds} s."
        )
    return np.array(audio, dtype=np.float32, copy=True)


def configure_offline(model_cache: Optional[str]) -> None:
    """Points the Hugging Face cache at `model_cache` (if given) for this process."""
    if model_cache:
        os.environ.setdefault("HF_HOME", model_cache)


def resolve_device(device: str) -> str:
    """'auto' becomes 'cuda' when a GPU is visible, else 'cpu'.

    Raises:
        ModelUnavailableError: 'cuda' was configured but this replica sees no GPU.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailableError("device 'cuda' was configured but this replica sees no GPU.")
    return device


def cap_torch_gpu_memory(fraction: float) -> float:
    """Caps this process's PyTorch allocations to `fraction` of the GPU.

    Ray's fractional GPUs are a scheduling label only: two replicas at 0.5 each can still take
    the whole card. The caching allocator refuses to grow past the cap instead.
    """
    import torch

    fraction = min(max(fraction, 0.05), 1.0)
    torch.cuda.set_per_process_memory_fraction(fraction)
    logger.info("Capped this replica's GPU memory to %.2f of the device.", fraction)
    return fraction


def set_torch_threads(threads: int) -> None:
    """Sets PyTorch's CPU intra-op threads for the calling thread; 0 leaves them as they are.

    `torch.set_num_threads` reaches OpenMP only in the thread that calls it, and replicas decode
    in worker threads (`asyncio.to_thread`), which start from OMP_NUM_THREADS (1 in our Serve
    configs, so that replicas do not oversubscribe their cores). So each decoding call sets it
    again: set only in `__init__`, a replica configured for 2 threads decoded on 1 (BELLE-2's
    4.3 s clip took 3.4 s instead of 2.4 s).
    """
    if threads:
        import torch

        torch.set_num_threads(threads)  # get_num_threads() reads a process-wide value: no shortcut


def process_memory(reset_peak: bool = False, pid: Optional[int] = None) -> dict:
    """This process's resident memory now and at its peak (Linux /proc), as builtins.

    Model replicas return it from `memory()` so that bench/ can record peak RSS per replica
    without reaching into the cluster's processes.

    Args:
        reset_peak: First reset the peak to the current RSS (Linux `clear_refs`), so that a
            later call reports the peak of what ran in between.
        pid: Another process of the same user (bench/ reads Serve's proxy with it).
    """
    proc = f"/proc/{pid}" if pid else "/proc/self"
    if reset_peak:
        try:
            with open(f"{proc}/clear_refs", "w") as f:
                f.write("5")  # "5" resets the peak RSS (VmHWM); see proc(5)
        except OSError:
            logger.warning("Could not reset the peak RSS (not Linux?).")
    fields = {"VmRSS": "rss_bytes", "VmHWM": "peak_rss_bytes", "RssAnon": "rss_anon_bytes", "RssShmem": "rss_shmem_bytes"}
    out = {"pid": pid or os.getpid(), **{name: 0 for name in fields.values()}}
    try:
        with open(f"{proc}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in fields:
                    out[fields[key]] = int(value.split()[0]) * 1024
    except OSError:  # not Linux: report zeros rather than fail a bench
        pass
    return out


class TranscriptionCancelled(Exception):
    """The caller stopped waiting (a client went away, a timeout): the decode stops at its next batch."""


_STOP: contextvars.ContextVar[Optional[threading.Event]] = contextvars.ContextVar("klipnote_stop", default=None)


def stop_if_cancelled() -> None:
    """Raises `TranscriptionCancelled` once the request this thread decodes for was cancelled.

    Model cores call it between batches. A thread cannot be interrupted: Serve's cancellation
    reaches the coroutine that awaits the thread, and without this the decode ran on, for
    minutes on a long recording, for nobody.
    """
    stop = _STOP.get()
    if stop is not None and stop.is_set():
        raise TranscriptionCancelled()


async def run_cancellable(fn: Any, *args: Any) -> Any:
    """`fn(*args)` in a worker thread that stops at its next `stop_if_cancelled` when the awaiting
    task is cancelled.

    Raises:
        asyncio.CancelledError: The task was cancelled (the thread stops soon after, on its own).
    """
    stop = threading.Event()
    token = _STOP.set(stop)  # asyncio.to_thread runs fn in a copy of this context
    try:
        return await asyncio.to_thread(fn, *args)
    except asyncio.CancelledError:
        stop.set()
        raise
    finally:
        _STOP.reset(token)


def release_free_memory() -> int:
    """Hands the C heap's free pages back to the OS (glibc `malloc_trim`); bytes of RSS released.

    A decode's working memory (beam caches, features, encoder states) is freed when it ends, but
    glibc keeps the freed pages: a BELLE-2 replica grew from 1.25 GB after warm-up to 2.6 GB in a
    4-minute mixed loop and stayed there idle, and to 3.8 GB after one 12-minute recording; after
    `malloc_trim(0)` it was back at 1.08-1.14 GB (bench/soak.py records it through the service).
    Replicas call it when their last request ends. Not glibc (or not Linux): does nothing.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or platform.libc_ver()[0] != "glibc":
        return 0
    before = process_memory()["rss_bytes"]
    ctypes.CDLL(name).malloc_trim(0)
    return max(0, before - process_memory()["rss_bytes"])


def release_free_memory_soon() -> asyncio.Future:
    """`release_free_memory` in a worker thread, not awaited: for the event loop, after an answer
    has gone (the release takes tens of milliseconds). Keep the future while it runs."""
    return asyncio.ensure_future(asyncio.to_thread(release_free_memory))


def resolve_compute_type(compute_type: str, device: str) -> str:
    """'default' becomes float16 on cuda and float32 on cpu; any other value stays."""
    if compute_type == "default":
        return "float16" if device == "cuda" else "float32"
    return compute_type


def ct2_whisper(model_class: Any, args: ModelAppArgs, device: str) -> Tuple[Any, str]:
    """A CTranslate2 Whisper (faster-whisper's `WhisperModel` or a subclass) as `args` configure it.

    Returns:
        The model and its compute type ('default' resolved: float16 on cuda, float32 on cpu).
    """
    compute_type = resolve_compute_type(getattr(args, "compute_type", "default"), device)
    model = model_class(
        args.model,
        device=device,
        compute_type=compute_type,
        cpu_threads=args.cpu_threads,
        download_root=args.model_cache,
        local_files_only=args.local_files_only,
    )
    return model, compute_type


def import_core(path: str) -> Type[ModelCore]:
    """The `ModelCore` subclass at "package.module:Class"."""
    import importlib

    module, _, name = path.partition(":")
    core = getattr(importlib.import_module(module), name)
    if not (isinstance(core, type) and issubclass(core, ModelCore)):
        raise TypeError(f"Got {path!r}; expected a ModelCore subclass.")
    return core


def spec_options(*names: str) -> frozenset:
    """A spec's `options`, checked against `TranscribeOptions`' fields."""
    known = {f.name for f in dataclasses.fields(TranscribeOptions)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"Got unknown option(s) {unknown}; known: {sorted(known)}.")
    return frozenset(names)


__all__ = [
    "BatchedModelArgs",
    "batch_memory_problem",
    "Decoded",
    "DecodeRequest",
    "ModelAppArgs",
    "ModelCore",
    "cap_torch_gpu_memory",
    "configure_offline",
    "ct2_whisper",
    "import_core",
    "package_versions",
    "process_memory",
    "resolve_compute_type",
    "release_free_memory",
    "release_free_memory_soon",
    "resolve_device",
    "set_torch_threads",
    "spec_options",
    "validate_audio",
]
