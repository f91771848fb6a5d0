"""Silero VAD through onnxruntime: speech spans of 16 kHz audio, with numpy and onnxruntime only.

The model cores and (later) the ingress's speech plan need speech boundaries without faster-whisper,
whose package import pulls PyAV and CTranslate2: neither exists on the GPU check's host, and the
BELLE-2 env needs neither to decode. This is faster-whisper 1.2.1's `faster_whisper/vad.py`
(MIT, Copyright (c) 2023 SYSTRAN; itself adapted from snakers4/silero-vad, MIT) less its package
import, with the same ONNX model (`deployments/assets/silero_vad_v6.onnx`), so the spans are the
same: tests/test_vad.py compares them with faster-whisper's on real clips, and fails if either
side changes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from pathlib import Path
from typing import List, Optional

import numpy as np

MODEL_PATH = Path(__file__).resolve().parent / "assets" / "silero_vad_v6.onnx"
MODEL_SHA256 = "4cbf549b8326f60f80f2536d9eefeb450a9abe83365a098031c89719f1be17d2"
WINDOW_SAMPLES = 512
"""Silero scores 32 ms windows at 16 kHz."""


@dataclasses.dataclass(frozen=True)
class VadOptions:
    """What counts as speech (faster-whisper's `VadOptions`, same fields and defaults).

    Attributes:
        threshold: Speech probability at or above which a window is speech.
        neg_threshold: Probability below which speech ends (default: threshold - 0.15).
        min_speech_duration_ms: Shorter spans are dropped.
        max_speech_duration_s: Longer spans are split, at a silence of 98 ms or more if any.
        min_silence_duration_ms: Silence that ends a span.
        speech_pad_ms: Padding added to each side of a span.
    """

    threshold: float = 0.5
    neg_threshold: Optional[float] = None
    min_speech_duration_ms: int = 0
    max_speech_duration_s: float = math.inf
    min_silence_duration_ms: int = 2000
    speech_pad_ms: int = 400


class SileroVad:
    """The ONNX model on one CPU thread: speech probability of every 512-sample window."""

    def __init__(self, path: Path = MODEL_PATH):
        import onnxruntime

        data = Path(path).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != MODEL_SHA256:
            raise ValueError(f"{path} is not the Silero VAD v6 model this code was checked with (sha256 {digest}).")
        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        opts.enable_cpu_mem_arena = False
        opts.log_severity_level = 4
        self.session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"], sess_options=opts)

    def __call__(self, audio: np.ndarray, context_samples: int = 64) -> np.ndarray:
        """Probabilities for `audio`, whose length must be a multiple of 512 samples."""
        if audio.ndim != 1 or audio.shape[0] % WINDOW_SAMPLES:
            raise ValueError(f"Expected 1-D audio whose length is a multiple of {WINDOW_SAMPLES}.")
        h = np.zeros((1, 1, 128), dtype=np.float32)
        c = np.zeros((1, 1, 128), dtype=np.float32)
        windows = audio.reshape(-1, WINDOW_SAMPLES)
        # Each window is scored with the 64 samples before it (zeros for the first). As in
        # faster-whisper, `context` is a view: the last window's own last 64 samples become zeros
        # too (callers pass a padded copy), which keeps the probabilities identical to its.
        context = windows[..., -context_samples:]
        context[-1] = 0
        context = np.roll(context, 1, 0)
        batched = np.concatenate([context, windows], 1).astype(np.float32, copy=False)
        outputs = []
        for first in range(0, batched.shape[0], 10000):
            out, h, c = self.session.run(None, {"input": batched[first : first + 10000], "h": h, "c": c})
            outputs.append(out)
        return np.concatenate(outputs, axis=0)


@functools.lru_cache(maxsize=1)
def silero_vad() -> SileroVad:
    """The process's one VAD model (about 1 MB; loaded on first use)."""
    return SileroVad()


def speech_timestamps(audio: np.ndarray, options: Optional[VadOptions] = None, sampling_rate: int = 16000) -> List[dict]:
    """Speech spans of `audio` as `{"start", "end"}` sample offsets (faster-whisper's
    `get_speech_timestamps`, line for line)."""
    options = options or VadOptions()
    threshold = options.threshold
    neg_threshold = options.neg_threshold
    min_speech_samples = sampling_rate * options.min_speech_duration_ms / 1000
    speech_pad_samples = sampling_rate * options.speech_pad_ms / 1000
    max_speech_samples = sampling_rate * options.max_speech_duration_s - WINDOW_SAMPLES - 2 * speech_pad_samples
    min_silence_samples = sampling_rate * options.min_silence_duration_ms / 1000
    min_silence_samples_at_max_speech = sampling_rate * 98 / 1000
    audio_length_samples = len(audio)

    padded_audio = np.pad(audio, (0, WINDOW_SAMPLES - audio.shape[0] % WINDOW_SAMPLES))
    speech_probs = silero_vad()(padded_audio)

    triggered = False
    speeches: List[dict] = []
    current_speech: dict = {}
    if neg_threshold is None:
        neg_threshold = max(threshold - 0.15, 0.01)
    temp_end = 0  # a possible end of the current span (some silence is tolerated)
    prev_end = next_start = 0  # where to split if the span reaches its maximum length

    for i, speech_prob in enumerate(speech_probs):
        if (speech_prob >= threshold) and temp_end:
            temp_end = 0
            if next_start < prev_end:
                next_start = WINDOW_SAMPLES * i

        if (speech_prob >= threshold) and not triggered:
            triggered = True
            current_speech["start"] = WINDOW_SAMPLES * i
            continue

        if triggered and (WINDOW_SAMPLES * i) - current_speech["start"] > max_speech_samples:
            if prev_end:
                current_speech["end"] = prev_end
                speeches.append(current_speech)
                current_speech = {}
                # silence was seen before (< neg_threshold) and there is still no speech
                if next_start < prev_end:
                    triggered = False
                else:
                    current_speech["start"] = next_start
                prev_end = next_start = temp_end = 0
            else:
                current_speech["end"] = WINDOW_SAMPLES * i
                speeches.append(current_speech)
                current_speech = {}
                prev_end = next_start = temp_end = 0
                triggered = False
                continue

        if (speech_prob < neg_threshold) and triggered:
            if not temp_end:
                temp_end = WINDOW_SAMPLES * i
            # do not cut at a very short silence
            if (WINDOW_SAMPLES * i) - temp_end > min_silence_samples_at_max_speech:
                prev_end = temp_end
            if (WINDOW_SAMPLES * i) - temp_end < min_silence_samples:
                continue
            current_speech["end"] = temp_end
            if (current_speech["end"] - current_speech["start"]) > min_speech_samples:
                speeches.append(current_speech)
            current_speech = {}
            prev_end = next_start = temp_end = 0
            triggered = False
            continue

    if current_speech and (audio_length_samples - current_speech["start"]) > min_speech_samples:
        current_speech["end"] = audio_length_samples
        speeches.append(current_speech)

    for i, speech in enumerate(speeches):
        if i == 0:
            speech["start"] = int(max(0, speech["start"] - speech_pad_samples))
        if i != len(speeches) - 1:
            silence_duration = speeches[i + 1]["start"] - speech["end"]
            if silence_duration < 2 * speech_pad_samples:
                speech["end"] += int(silence_duration // 2)
                speeches[i + 1]["start"] = int(max(0, speeches[i + 1]["start"] - silence_duration // 2))
            else:
                speech["end"] = int(min(audio_length_samples, speech["end"] + speech_pad_samples))
                speeches[i + 1]["start"] = int(max(0, speeches[i + 1]["start"] - speech_pad_samples))
        else:
            speech["end"] = int(min(audio_length_samples, speech["end"] + speech_pad_samples))

    return speeches
