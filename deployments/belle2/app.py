"""BELLE-2 transcriber deployment: Hugging Face transformers Whisper, Chinese decoding.

Runs in the belle2 runtime env. The module's top level imports only stdlib, numpy, pydantic and
ray; torch and transformers are imported in `__init__`.

Long audio is cut into <= 30 s windows at speech boundaries (silero VAD, the ONNX model inside
faster-whisper, offline) and the windows are decoded in batches, instead of transformers'
sequential long-form decoding, which runs one window after another.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np
from pydantic import Field
from ray import serve
from ray.serve import Application

from deployments.belle2.decoding import (
    NoSpeechFromPrefill,
    SharedCrossAttention,
    SuppressionMaskCache,
    reorder_self_attention_only,
)
from deployments.belle2.onednn import use_onednn_linears
from deployments.belle2.text import ScriptConverter, collapse_repetitions
from deployments.belle2.windows import Window, plan_windows, remaining_window
from deployments.contract import (
    SAMPLE_RATE,
    EnvInfo,
    ModelInfo,
    ModelUnavailableError,
    Segment,
    TranscribeOptions,
    TranscriptionResult,
)
from deployments.pinned_decode import report_pinned, transformers_generate_kwargs, transformers_window_tokens
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

APP_NAME = "belle2"
WINDOW_SECONDS = 30
# Speech the decoder left undecoded at the end of a window (an early end-of-text) is decoded
# again from where it stopped, when there is at least this much of it, at most this many times.
FOLLOW_UP_MIN_SPEECH_S = 0.5
MAX_FOLLOW_UPS = 2
WARMUP_TOKENS = 8


class Belle2Args(ModelAppArgs):
    """Settings of the BELLE-2 application, filled from the Serve config's `args:`."""

    model: str = Field("BELLE-2/Belle-whisper-large-v3-zh", description="Hugging Face model id or a local directory in transformers format.")
    batch_size: int = Field(8, ge=1, description="Windows of up to 30 s decoded together.")
    compression_ratio_threshold: float = Field(2.4, gt=0, description="A window whose text compresses better than this is decoded again at the next temperature.")
    logprob_threshold: float = Field(-1.0, description="A window whose average log-probability is below this is decoded again at the next temperature.")
    no_speech_threshold: float = Field(0.6, ge=0, le=1, description="With a low log-probability, a window whose no-speech probability exceeds this is dropped as silence.")
    condition_on_previous_text: bool = Field(False, description="Feed each window the previous one's text; off because it lets a loop carry over.")
    vad_threshold: float = Field(0.35, gt=0, lt=1, description="Silero speech probability threshold; below faster-whisper's 0.5, which missed 22 s of a softly read poem (the decoder's no-speech check judges the rest).")
    vad_min_silence_ms: int = Field(500, ge=0, description="Silence that ends a speech span.")
    window_pad_ms: int = Field(200, ge=0, description="Context added around each window where there is room.")
    decoding_shortcuts: bool = Field(True, description="Read no-speech from the prompt pass, build suppression masks once per call, project, cache and read the beams' shared cross-attention keys and values once per input, reorder only the self-attention cache (deployments/belle2/decoding.py); the same tokens, off only to measure what they save.")
    onednn_linears: bool = Field(True, description="On CPU, run every linear layer on oneDNN rather than MKL's sgemm (deployments/belle2/onednn.py): up to 2.7x as fast, most for decoding's few-row matrices; equal up to float rounding, not bit for bit.")
    cpu_threads: int = Field(0, ge=0, description="PyTorch intra-op threads on CPU, set in every decoding thread (runtime.set_torch_threads); 0 keeps PyTorch's default (OMP_NUM_THREADS or the core count).")
    decoder_cpu_threads: int = Field(0, ge=0, description="Threads for the decoding steps on CPU, when fewer than `cpu_threads` serve better: each step is hundreds of small operations, and on the 2-vCPU test machine 2 threads made them slower than 1 (the encoder's large matrices keep `cpu_threads`). 0: as `cpu_threads`.")


@serve.deployment(
    name="Belle2Transcriber",
    max_ongoing_requests=4,
    health_check_period_s=10,
    health_check_timeout_s=30,
)
class Belle2Transcriber:
    """BELLE-2 (or any transformers Whisper checkpoint) decoding Mandarin."""

    def __init__(self, args: Optional[dict] = None):
        self._args = Belle2Args.model_validate(args or {})
        self._versions = check_environment()
        configure_offline(self._args.model_cache)
        started = time.perf_counter()
        import torch

        self._torch = torch
        self._device = resolve_device(self._args.device)
        if self._device == "cuda":
            cap_torch_gpu_memory(self._args.gpu_memory_fraction)
        self._dtype = torch.float16 if self._device == "cuda" else torch.float32
        self._cpu_threads = self._args.cpu_threads if self._device == "cpu" else 0
        self._decoder_threads = (self._args.decoder_cpu_threads or self._cpu_threads) if self._device == "cpu" else 0
        set_torch_threads(self._cpu_threads)
        self._processor, self._model = self._load_model()
        self._onednn_linears = 0
        if self._device == "cpu" and self._args.onednn_linears:
            self._onednn_linears = use_onednn_linears(self._model)
        if self._decoder_threads != self._cpu_threads:
            self._encode_on_all_threads()
        self._no_speech = NoSpeechFromPrefill(self._model, enabled=self._args.decoding_shortcuts)
        self._suppression = SuppressionMaskCache(self._model, enabled=self._args.decoding_shortcuts)
        self._shared_cross = None
        if self._args.decoding_shortcuts:
            self._model._reorder_cache = reorder_self_attention_only
            self._shared_cross = SharedCrossAttention(self._model)
        from faster_whisper.vad import VadOptions

        self._vad_options = VadOptions(
            threshold=self._args.vad_threshold,
            min_silence_duration_ms=self._args.vad_min_silence_ms,
            max_speech_duration_s=WINDOW_SECONDS - 1,
            speech_pad_ms=0,
        )
        self._script = ScriptConverter()
        self._load_time_s = time.perf_counter() - started
        logger.info(
            "Loaded %s on %s (%s, %d torch threads, %d linear layers on oneDNN) in %.1f s.",
            self._args.model, self._device, self._dtype, torch.get_num_threads(), self._onednn_linears, self._load_time_s,
        )
        self._warmup()

    def _load_model(self) -> tuple:
        """Loads the processor and the model (safetensors preferred where the repo has both).

        Raises:
            ModelUnavailableError: The weights cannot be loaded; the message names the model,
                where it was looked for, and the cause, so Serve's deployment status shows it.
        """
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        args = self._args
        load = dict(cache_dir=args.model_cache, local_files_only=args.local_files_only)
        try:
            processor = WhisperProcessor.from_pretrained(args.model, **load)
            model = WhisperForConditionalGeneration.from_pretrained(
                args.model, dtype=self._dtype, attn_implementation="sdpa", **load
            ).to(self._device)
        except Exception as e:
            where = "offline, cache " + str(args.model_cache) if args.local_files_only else "hub or cache"
            raise ModelUnavailableError(
                f"BELLE-2 app could not load model {args.model!r} ({where}): {type(e).__name__}: {e}"
            ) from e
        return processor, model.eval()

    def _encode_on_all_threads(self) -> None:
        """Runs the encoder on `cpu_threads` while decoding steps keep `decoder_cpu_threads`."""
        encoder = self._model.get_encoder()
        forward = encoder.forward

        @functools.wraps(forward)
        def forward_on_all_threads(*args, **kwargs):
            set_torch_threads(self._cpu_threads)
            try:
                return forward(*args, **kwargs)
            finally:
                set_torch_threads(self._decoder_threads)

        encoder.forward = forward_on_all_threads

    def _warmup(self) -> None:
        started = time.perf_counter()
        try:
            # A few tokens are enough to initialise everything; silence decoded in full ran to the
            # length limit (13 s of replica start-up on CPU).
            self._decode(
                [np.zeros(SAMPLE_RATE, dtype=np.float32)],
                TranscribeOptions(beam_size=1, temperature=(0.0,)),
                max_new_tokens=WARMUP_TOKENS,
            )
            logger.info("Warm-up took %.2f s.", time.perf_counter() - started)
        except Exception:  # a failed warm-up costs latency on the first request, nothing else
            logger.exception("Warm-up failed.")

    # -- public methods (called through DeploymentHandles) --------------------------------

    async def transcribe(self, audio: np.ndarray, options: Optional[dict] = None) -> TranscriptionResult:
        """Transcribes 16 kHz mono float32 Mandarin audio.

        Args:
            audio: The waveform.
            options: `TranscribeOptions.to_dict()`; `language` is ignored (always "zh").

        Returns:
            A `TranscriptionResult` made of builtins only.

        Raises:
            InvalidAudioError: The waveform is unusable.
            InvalidOptionsError: The options are malformed.
        """
        opts = TranscribeOptions.from_dict(options)
        audio = validate_audio(audio, max_seconds=self._args.max_audio_seconds)
        return await asyncio.to_thread(self._transcribe, audio, opts)

    def info(self) -> EnvInfo:
        """This replica's runtime env: interpreter, Ray and library versions, device, model."""
        return EnvInfo(
            app=APP_NAME,
            python=self._versions["python_version"],
            python_executable=sys.executable,
            ray=self._versions["ray_version"],
            packages=package_versions(["torch", "transformers", "tokenizers", "opencc", "faster-whisper"]),
            device=self._device,
            model=self._args.model,
            loaded=self._model is not None,
            load_error=None,
        )

    def memory(self) -> dict:
        """This replica's resident memory now and at its peak (`runtime.process_memory`)."""
        return process_memory()

    def speedup_counts(self) -> Dict[str, int]:
        """How often each decoding shortcut (deployments/belle2/decoding.py) has applied since
        start, and how many linear layers run on oneDNN (deployments/belle2/onednn.py).

        All stay 0 with `decoding_shortcuts: false` and `onednn_linears: false`; one that stays 0
        with them on means a transformers or torch change went round it (tests/test_belle2.py
        checks this).
        """
        shared = self._shared_cross
        return {
            "no_speech_from_prefill": self._no_speech.hits,
            "suppression_mask_cached": self._suppression.hits,
            "cross_projection_shared": shared.projection_hits if shared else 0,
            "cross_attention_shared": shared.attention_hits if shared else 0,
            "onednn_linears": self._onednn_linears,
        }

    def check_health(self) -> None:
        if self._model is None:
            raise ModelUnavailableError("BELLE-2 model not loaded.")

    # -- stages ------------------------------------------------------------------------------

    def _transcribe(self, audio: np.ndarray, opts: TranscribeOptions) -> TranscriptionResult:
        set_torch_threads(self._decoder_threads)  # this runs in a worker thread
        warnings: List[str] = []
        window_tokens: List[int] = []
        speech = self._speech(audio)
        windows = self._windows(speech, audio.size)
        segments: List[Segment] = []
        pinned = self._args.pinned_decode_tokens
        # A pinned window ends wherever random timestamps put it: no follow-up pass (or its work) then.
        for _ in range(1 if pinned else 1 + MAX_FOLLOW_UPS):
            left_over: List[Window] = []
            for first in range(0, len(windows), self._args.batch_size):
                batch = windows[first : first + self._args.batch_size]
                decoded = self._decode([audio[w.start : w.end] for w in batch], opts, window_tokens)
                for window, window_segments in zip(batch, decoded):
                    placed = self._place(window, window_segments, audio.size)
                    segments.extend(placed)
                    rest = self._remaining(window, placed, speech)
                    if rest is not None:
                        left_over.append(rest)
            if not left_over:
                break
            logger.info("Decoding again the speech left after an early end in %d window(s).", len(left_over))
            windows = left_over
        segments.sort(key=lambda s: s["start"])
        segments = self._clean(segments, opts, warnings)
        model_info = self._model_info()
        if pinned:
            report_pinned(model_info, warnings, pinned, window_tokens)
        return TranscriptionResult(
            segments=segments,
            language="zh",
            language_probability=None,
            duration=audio.size / SAMPLE_RATE,
            warnings=warnings,
            model=model_info,
        )

    def _speech(self, audio: np.ndarray) -> List[dict]:
        from faster_whisper.vad import get_speech_timestamps

        return get_speech_timestamps(audio, vad_options=self._vad_options, sampling_rate=SAMPLE_RATE)

    def _windows(self, speech: List[dict], total_samples: int) -> List[Window]:
        return plan_windows(
            speech,
            total_samples=total_samples,
            max_samples=WINDOW_SECONDS * SAMPLE_RATE,
            pad_samples=self._args.window_pad_ms * SAMPLE_RATE // 1000,
        )

    def _decode(
        self,
        chunks: List[np.ndarray],
        opts: TranscribeOptions,
        window_tokens: Optional[List[int]] = None,
        max_new_tokens: Optional[int] = None,
    ) -> List[list]:
        """Decodes up to `batch_size` windows at once; returns each window's raw segments.

        With `pinned_decode_tokens`, each window decodes exactly that many tokens, and the
        count each produced is appended to `window_tokens` (if given).
        """
        torch = self._torch
        features = self._processor.feature_extractor(
            chunks, sampling_rate=SAMPLE_RATE, return_tensors="pt"
        ).input_features.to(self._device, self._dtype)
        prompt_ids = None
        if opts.initial_prompt:
            prompt_ids = self._processor.get_prompt_ids(opts.initial_prompt, return_tensors="pt").to(self._device)
        temperature = opts.temperature if len(opts.temperature) > 1 else opts.temperature[0]
        settings = dict(
            temperature=temperature,
            compression_ratio_threshold=self._args.compression_ratio_threshold,
            logprob_threshold=self._args.logprob_threshold,
            no_speech_threshold=self._args.no_speech_threshold,
        )
        if self._args.pinned_decode_tokens:
            settings.update(transformers_generate_kwargs(self._args.pinned_decode_tokens))
        elif max_new_tokens:
            settings["max_new_tokens"] = max_new_tokens
        shared_cross = self._shared_cross.active() if self._shared_cross else contextlib.nullcontext()
        with torch.inference_mode(), self._no_speech.active(), shared_cross:
            out = self._model.generate(
                features,
                language="zh",
                task=opts.task,
                num_beams=opts.beam_size,
                do_sample=False,
                **settings,
                condition_on_prev_tokens=self._args.condition_on_previous_text,
                prompt_ids=prompt_ids,
                return_timestamps=True,
                return_segments=True,
            )
        if self._args.pinned_decode_tokens and window_tokens is not None:
            window_tokens.extend(transformers_window_tokens(out["sequences"].tolist(), self._processor.tokenizer))
        return out["segments"]

    def _remaining(self, window: Window, placed: List[Segment], speech: List[dict]) -> Optional[Window]:
        if not placed:  # nothing decoded (silence, or skipped as no speech): the same again would be too
            return None
        return remaining_window(
            window,
            int(max(s["end"] for s in placed) * SAMPLE_RATE),
            speech,
            min_speech_samples=int(FOLLOW_UP_MIN_SPEECH_S * SAMPLE_RATE),
        )

    def _place(self, window: Window, raw_segments: list, total_samples: int) -> List[Segment]:
        """Turns a window's segments into absolute times, clipped to the window."""
        offset = window.start / SAMPLE_RATE
        limit = min(window.end, total_samples) / SAMPLE_RATE
        placed = []
        for raw in raw_segments:
            text = self._processor.tokenizer.decode(raw["tokens"], skip_special_tokens=True).strip()
            if not text:
                continue
            start = min(offset + float(raw["start"]), limit)
            end = min(max(offset + float(raw["end"]), start), limit)
            placed.append(Segment(start=round(start, 3), end=round(end, 3), text=text))
        return placed

    def _clean(self, segments: List[Segment], opts: TranscribeOptions, warnings: List[str]) -> List[Segment]:
        cleaned: List[Segment] = []
        looped = 0
        for seg in segments:
            text, collapsed = collapse_repetitions(seg["text"])
            looped += collapsed
            text = self._script(text, opts.script)
            if cleaned and seg["start"] < cleaned[-1]["end"]:  # windows padded into each other
                seg = Segment(start=cleaned[-1]["end"], end=max(seg["end"], cleaned[-1]["end"]), text=text)
            cleaned.append(Segment(start=seg["start"], end=seg["end"], text=text))
        if looped:
            warnings.append(f"Collapsed a repetition loop in {looped} segment(s).")
        return cleaned

    def _model_info(self) -> ModelInfo:
        info = ModelInfo(
            app=APP_NAME,
            engine="transformers",
            model=self._args.model,
            device=self._device,
            compute_type=str(self._dtype).replace("torch.", ""),
            load_time_s=round(self._load_time_s, 3),
        )
        if self._device == "cuda":
            info["gpu_memory_bytes"] = int(self._torch.cuda.max_memory_allocated())
        return info


def build_app(args: Dict[str, Any]) -> Application:
    """The BELLE-2 application: one `Belle2Transcriber` deployment.

    Args:
        args: The Serve config's `args:` (see `Belle2Args`).
    """
    validated = Belle2Args.model_validate(args or {})
    return Belle2Transcriber.bind(validated.model_dump())
