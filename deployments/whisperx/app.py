"""WhisperX transcriber deployment.

Runs in the whisperx runtime env. The module's top level imports only stdlib, numpy, pydantic
and ray (every env has them); whisperx, torch and faster-whisper are imported in `__init__`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
from pydantic import Field
from ray import serve
from ray.serve import Application

from deployments.contract import (
    EnvInfo,
    InvalidOptionsError,
    ModelInfo,
    ModelUnavailableError,
    SAMPLE_RATE,
    Segment,
    TranscribeOptions,
    TranscriptionResult,
)
from deployments.pinned_decode import PinnedLengthWhisper, counting_window_tokens, report_pinned
from deployments.runtime import (
    ModelAppArgs,
    cap_torch_gpu_memory,
    check_environment,
    configure_offline,
    package_versions,
    process_memory,
    resolve_device,
    set_torch_threads,
    validate_audio,
)

logger = logging.getLogger(__name__)

APP_NAME = "whisperx"


class WhisperXArgs(ModelAppArgs):
    """Settings of the WhisperX application, filled from the Serve config's `args:`."""

    model: str = Field("large-v3", description="Whisper size name (e.g. 'large-v3') or a CTranslate2 model directory.")
    compute_type: str = Field("default", description="CTranslate2 compute type; 'default' is float16 on cuda, float32 on cpu.")
    batch_size: int = Field(16, ge=1, description="VAD chunks decoded together in one batch.")
    cpu_threads: int = Field(0, ge=0, description="CPU threads of CTranslate2 (decoding) and of PyTorch (VAD, alignment), the latter set in every decoding thread (runtime.set_torch_threads); 0 lets each choose.")
    chunk_size: float = Field(30.0, gt=0, le=30, description="Longest VAD chunk handed to Whisper, in seconds.")
    vad_onset: float = Field(0.5, gt=0, lt=1, description="VAD speech-start threshold.")
    vad_offset: float = Field(0.363, gt=0, lt=1, description="VAD speech-end threshold.")
    window_s: float = Field(600.0, ge=120, description="Longest stretch of audio run through VAD, ASR and alignment at once; longer audio is cut into windows at quiet moments, so memory stays flat with length.")
    window_cut_search_s: float = Field(20.0, gt=0, le=60, description="A window ends at the quietest 0.1 s within this many seconds before its limit.")
    align_models: Dict[str, str] = Field(default_factory=dict, description="Alignment model per language code (HF id or local directory); whisperx's defaults otherwise.")
    align_cache_size: int = Field(4, ge=1, description="Alignment models kept loaded at once (least recently used go first).")
    diarization_model: Optional[str] = Field(None, description="pyannote diarization pipeline (HF id or local directory); diarization is off without it.")
    hf_token_env: str = Field("HF_TOKEN", description="Environment variable holding the Hugging Face token for gated models.")
    nltk_data: Optional[str] = Field(None, description="NLTK data root for the aligner's sentence splitter (Punkt); default '<model_cache>/nltk_data', else '~/nltk_data'.")


class _AlignModelCache:
    """Alignment models per language, bounded, least recently used evicted first."""

    def __init__(self, size: int):
        self._size = size
        self._models: "collections.OrderedDict[str, tuple]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, language: str, load) -> tuple:
        with self._lock:
            if language in self._models:
                self._models.move_to_end(language)
                return self._models[language]
        loaded = load(language)
        with self._lock:
            self._models[language] = loaded
            self._models.move_to_end(language)
            while len(self._models) > self._size:
                evicted, _ = self._models.popitem(last=False)
                logger.info("Evicted the alignment model for %r.", evicted)
        return loaded


@serve.deployment(
    name="WhisperXTranscriber",
    max_ongoing_requests=4,
    health_check_period_s=10,
    health_check_timeout_s=30,
)
class WhisperXTranscriber:
    """One WhisperX model per replica; `transcribe` is safe to call concurrently."""

    def __init__(self, args: Optional[dict] = None):
        self._args = WhisperXArgs.model_validate(args or {})
        self._versions = check_environment()
        configure_offline(self._args.model_cache)
        started = time.perf_counter()
        import torch

        self._torch = torch
        self._device = resolve_device(self._args.device)
        self._gpu_fraction = cap_torch_gpu_memory(self._args.gpu_memory_fraction) if self._device == "cuda" else None
        self._compute_type = self._args.compute_type
        if self._compute_type == "default":
            self._compute_type = "float16" if self._device == "cuda" else "float32"
        self._model, self._vad = self._load_asr()
        self._align_cache = _AlignModelCache(self._args.align_cache_size)
        self._prepare_sentence_splitter()
        self._diarizer = None
        self._diarizer_lock = threading.Lock()
        self._load_time_s = time.perf_counter() - started
        logger.info(
            "Loaded WhisperX %s on %s (%s) in %.1f s.",
            self._args.model, self._device, self._compute_type, self._load_time_s,
        )
        self._warmup()

    def _load_asr(self):
        from whisperx.asr import WhisperModel  # faster-whisper's, plus batched generation
        from whisperx.vads import Pyannote

        model = WhisperModel(
            self._args.model,
            device=self._device,
            compute_type=self._compute_type,
            cpu_threads=self._args.cpu_threads,
            download_root=self._args.model_cache,
            local_files_only=self._args.local_files_only,
        )
        if self._args.pinned_decode_tokens:
            model.model = PinnedLengthWhisper(
                model.model, self._args.pinned_decode_tokens, end_of_text=model.hf_tokenizer.token_to_id("<|endoftext|>")
            )
        # The pyannote segmentation model ships inside the whisperx wheel, so VAD works
        # offline; whisperx's silero option fetches through torch.hub and does not.
        vad = Pyannote(
            self._torch.device(self._device),
            token=None,
            vad_onset=self._args.vad_onset,
            vad_offset=self._args.vad_offset,
        )
        return model, vad

    def _prepare_sentence_splitter(self) -> None:
        from whisperx.utils import PUNKT_LANGUAGES

        from deployments.whisperx.punkt import ensure_punkt_tab

        import tempfile

        root = self._args.nltk_data or os.path.join(self._args.model_cache or os.path.expanduser("~"), "nltk_data")
        # whisperx.align falls back to Punkt's English model for languages it has no entry for.
        languages = {"english", *PUNKT_LANGUAGES.values()}
        try:
            ensure_punkt_tab(root, languages)
        except OSError as e:  # a read-only model cache (an image's /models): this replica's temp dir
            logger.warning("Cannot write Punkt data under %s (%s); using a temporary directory.", root, e)
            ensure_punkt_tab(tempfile.mkdtemp(prefix="nltk_data-"), languages)

    def _warmup(self) -> None:
        started = time.perf_counter()
        try:
            self._model.detect_language(np.zeros(SAMPLE_RATE, dtype=np.float32))
            logger.info("Warm-up took %.2f s.", time.perf_counter() - started)
        except Exception:  # a failed warm-up costs latency on the first request, nothing else
            logger.exception("Warm-up failed.")

    # -- public methods (called through DeploymentHandles) --------------------------------

    async def transcribe(self, audio: np.ndarray, options: Optional[dict] = None) -> TranscriptionResult:
        """Transcribes 16 kHz mono float32 audio.

        Args:
            audio: The waveform.
            options: `TranscribeOptions.to_dict()`.

        Returns:
            A `TranscriptionResult` made of builtins only.

        Raises:
            InvalidAudioError: The waveform is unusable.
            InvalidOptionsError: The options are malformed or ask for what is not configured.
        """
        opts = TranscribeOptions.from_dict(options)
        self._check_diarization_options(opts)
        audio = validate_audio(audio, max_seconds=self._args.max_audio_seconds)
        return await asyncio.to_thread(self._transcribe, audio, opts)

    def memory(self, reset_peak: bool = False) -> dict:
        """This replica's resident memory now and at its peak (`runtime.process_memory`).

        Args:
            reset_peak: First reset the peak, so that a later call reports the peak of what ran
                in between (bench/whisperx_app.py).
        """
        return process_memory(reset_peak)

    def info(self) -> EnvInfo:
        """This replica's runtime env: interpreter, Ray and library versions, device, model."""
        import sys

        return EnvInfo(
            app=APP_NAME,
            python=self._versions["python_version"],
            python_executable=sys.executable,
            ray=self._versions["ray_version"],
            packages=package_versions(["torch", "whisperx", "faster-whisper", "ctranslate2", "transformers"]),
            device=self._device,
            model=self._args.model,
            loaded=self._model is not None,
            load_error=None,
        )

    def check_health(self) -> None:
        if self._model is None:
            raise ModelUnavailableError("WhisperX model not loaded.")

    # -- stages ------------------------------------------------------------------------------

    def _check_diarization_options(self, opts: TranscribeOptions) -> None:
        # min > max and values < 1 are rejected by TranscribeOptions itself.
        if opts.diarize and not self._args.diarization_model:
            raise InvalidOptionsError(
                "Got diarize=True, but this whisperx deployment has no diarization_model configured; "
                "set args.diarization_model (a pyannote pipeline id or directory) to enable it."
            )
        if not opts.diarize and (opts.min_speakers is not None or opts.max_speakers is not None):
            raise InvalidOptionsError(
                f"Got min_speakers={opts.min_speakers}, max_speakers={opts.max_speakers} with diarize=False; "
                "speaker counts only apply when diarizing."
            )

    def _transcribe(self, audio: np.ndarray, opts: TranscribeOptions) -> TranscriptionResult:
        set_torch_threads(self._args.cpu_threads if self._device == "cpu" else 0)  # a worker thread
        warnings: list = []
        window_tokens: List[int] = []
        duration = audio.size / SAMPLE_RATE
        language, probability = self._language(audio, opts)
        align = opts.word_timestamps
        segments: List[Segment] = []
        for start, end in audio_windows(audio, self._args.window_s, self._args.window_cut_search_s):
            piece = audio[start:end]  # a view: windows bound what VAD, ASR and alignment hold at once
            raw_segments = self._asr(piece, opts, language, window_tokens)
            window_segments = [_segment(s) for s in raw_segments]
            if align and window_segments:
                aligned = self._align(raw_segments, piece, language, warnings)
                align = aligned is not None  # one warning per request, not per window
                window_segments = aligned or window_segments
            segments.extend(_shifted(s, start / SAMPLE_RATE) for s in window_segments)
            del piece, raw_segments, window_segments
            release_freed_memory()
        if opts.diarize and segments:
            segments = self._diarize(segments, audio, opts)
        model_info = self._model_info()
        if self._args.pinned_decode_tokens:
            report_pinned(model_info, warnings, self._args.pinned_decode_tokens, window_tokens)
        return TranscriptionResult(
            segments=segments,
            language=language,
            language_probability=probability,
            duration=duration,
            warnings=warnings,
            model=model_info,
        )

    def _language(self, audio: np.ndarray, opts: TranscribeOptions) -> tuple:
        if opts.language:
            return opts.language, None
        if not self._model.model.is_multilingual:
            return "en", None
        language, probability, _ = self._model.detect_language(audio)
        return language, float(probability)

    def _asr(self, audio: np.ndarray, opts: TranscribeOptions, language: str, window_tokens: Optional[List[int]] = None) -> list:
        """Runs whisperx's batched ASR on one window; with `pinned_decode_tokens`, appends the tokens
        each VAD chunk decoded to `window_tokens`."""
        from faster_whisper.tokenizer import Tokenizer
        from whisperx.asr import FasterWhisperPipeline

        # A pipeline per request: whisperx's pipeline rewrites its tokenizer and options during
        # transcribe(), so one shared instance would mix concurrent requests' settings.
        pipeline = FasterWhisperPipeline(
            model=self._model,
            vad=self._vad,
            vad_params={"vad_onset": self._args.vad_onset, "vad_offset": self._args.vad_offset},
            options=_asr_options(opts, self._model.model.is_multilingual),
            tokenizer=Tokenizer(
                self._model.hf_tokenizer,
                self._model.model.is_multilingual,
                task=opts.task,
                language=language,
            ),
            language=language,
            device=self._device,
        )
        with counting_window_tokens(window_tokens):
            result = pipeline.transcribe(
                audio,
                batch_size=self._args.batch_size,
                language=language,
                task=opts.task,
                chunk_size=self._args.chunk_size,
            )
        return [s for s in result["segments"] if s["text"].strip()]

    def _load_align_model(self, language: str) -> tuple:
        import whisperx

        return whisperx.load_align_model(
            language_code=language,
            device=self._device,
            model_name=self._args.align_models.get(language),
            model_dir=self._args.model_cache,
            model_cache_only=self._args.local_files_only,
        )

    def _align(self, raw_segments: list, audio: np.ndarray, language: str, warnings: list) -> Optional[list]:
        import whisperx

        try:
            model, metadata = self._align_cache.get(language, self._load_align_model)
        except Exception as e:  # offline, or no alignment model for this language
            logger.warning("No alignment model for %r: %s", language, e)
            warnings.append(
                f"Word timestamps are unavailable for language {language!r}: the alignment model "
                f"could not be loaded ({type(e).__name__}: {e}). Segment timestamps are kept."
            )
            return None
        aligned = whisperx.align(raw_segments, model, metadata, audio, self._device)
        return [_segment(s) for s in aligned["segments"] if s.get("text", "").strip()]

    def _diarize(self, segments: list, audio: np.ndarray, opts: TranscribeOptions) -> list:
        import whisperx
        from whisperx.diarize import DiarizationPipeline

        with self._diarizer_lock:
            if self._diarizer is None:
                try:
                    self._diarizer = DiarizationPipeline(
                        model_name=self._args.diarization_model,
                        token=os.environ.get(self._args.hf_token_env),
                        device=self._device,
                        cache_dir=self._args.model_cache,
                    )
                except Exception as e:
                    raise ModelUnavailableError(
                        f"Diarization was requested but the configured diarization_model "
                        f"{self._args.diarization_model!r} could not be loaded ({type(e).__name__}: {e})."
                    ) from e
        turns = self._diarizer(audio, min_speakers=opts.min_speakers, max_speakers=opts.max_speakers)
        labelled = whisperx.assign_word_speakers(turns, {"segments": segments})
        return [_segment(s) for s in labelled["segments"]]

    def _model_info(self) -> ModelInfo:
        info = ModelInfo(
            app=APP_NAME,
            engine="whisperx",
            model=self._args.model,
            device=self._device,
            compute_type=self._compute_type,
            load_time_s=round(self._load_time_s, 3),
        )
        if self._device == "cuda":
            info["gpu_memory_bytes"] = int(self._torch.cuda.max_memory_allocated())
        return info


def _asr_options(opts: TranscribeOptions, multilingual: bool):
    from faster_whisper.transcribe import TranscriptionOptions

    # whisperx.asr.load_model's defaults, with the request's decoding choices on top.
    return TranscriptionOptions(
        beam_size=opts.beam_size,
        best_of=5,
        patience=1,
        length_penalty=1,
        repetition_penalty=1,
        no_repeat_ngram_size=0,
        temperatures=list(opts.temperature),
        compression_ratio_threshold=2.4,
        log_prob_threshold=-1.0,
        no_speech_threshold=0.6,
        condition_on_previous_text=False,
        prompt_reset_on_temperature=0.5,
        initial_prompt=opts.initial_prompt,
        prefix=None,
        suppress_blank=True,
        suppress_tokens=[-1],
        without_timestamps=True,
        max_initial_timestamp=0.0,
        word_timestamps=False,
        prepend_punctuations="\"'“¿([{-",
        append_punctuations="\"'.。,，!！?？:：”)]}、",
        multilingual=multilingual,
        max_new_tokens=None,
        clip_timestamps=None,
        hallucination_silence_threshold=None,
        hotwords=None,
    )


def _segment(raw: Dict[str, Any]) -> Segment:
    """A whisperx segment as builtins: numpy floats and extra keys dropped."""
    seg = Segment(start=float(raw["start"]), end=float(raw["end"]), text=str(raw["text"]).strip())
    words = [
        {k: (float(w[k]) if k in ("start", "end", "score") else str(w[k])) for k in ("word", "start", "end", "score", "speaker") if k in w}
        for w in raw.get("words") or ()
    ]
    if words:
        seg["words"] = words
    if raw.get("speaker") is not None:
        seg["speaker"] = str(raw["speaker"])
    return seg


def audio_windows(audio: np.ndarray, window_s: float, cut_search_s: float) -> Iterator[Tuple[int, int]]:
    """Sample ranges that cover the audio, each at most `window_s` long, cut at quiet moments.

    A window that does not reach the end of the audio ends at the centre of the quietest 0.1 s
    frame (lowest mean square) within its last `cut_search_s` seconds, so a cut falls in a pause
    rather than inside a word. Audio of at most `window_s` is one window.

    Args:
        audio: The samples (read, not copied).
        window_s: Longest window, in seconds.
        cut_search_s: How far before a window's limit to look for the quietest frame, in seconds;
            less than `window_s`.

    Yields:
        (start, end) sample indices, contiguous, from 0 to `audio.size`.
    """
    num_samples = audio.size
    window, search, frame = int(window_s * SAMPLE_RATE), int(cut_search_s * SAMPLE_RATE), SAMPLE_RATE // 10
    start = 0
    while num_samples - start > window:
        limit = start + window
        region = audio[limit - search : limit]
        frames = region[: region.size // frame * frame].reshape(-1, frame)
        quietest = int(np.argmin(np.mean(np.square(frames, dtype=np.float64), axis=1)))
        end = limit - search + quietest * frame + frame // 2
        yield start, end
        start = end
    yield start, num_samples


def release_freed_memory() -> None:
    """Hands memory that glibc's malloc keeps after frees back to the OS (no-op elsewhere).

    VAD and batched decoding allocate and free many large buffers from several threads; glibc
    keeps freed memory in its per-thread arenas, so without a trim the RSS keeps what the
    largest window needed and creeps up with fragmentation; see malloc_trim(3).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _shifted(segment: Segment, offset_s: float) -> Segment:
    """A segment (and its words) moved from window time to file time."""
    if not offset_s:
        return segment
    out = Segment(segment)
    out["start"] = round(segment["start"] + offset_s, 3)
    out["end"] = round(segment["end"] + offset_s, 3)
    if "words" in segment:
        out["words"] = [
            {**w, **{k: round(w[k] + offset_s, 3) for k in ("start", "end") if k in w}} for w in segment["words"]
        ]
    return out


def build_app(args: Dict[str, Any]) -> Application:
    """The WhisperX application: one `WhisperXTranscriber` deployment.

    Args:
        args: The Serve config's `args:` (see `WhisperXArgs`).
    """
    validated = WhisperXArgs.model_validate(args or {})
    return WhisperXTranscriber.bind(validated.model_dump())
