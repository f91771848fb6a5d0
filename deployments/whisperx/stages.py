"""Stages of the WhisperX core that need no model: ASR options, segments as builtins, windows of
long audio, the alignment-model cache, and handing freed memory back (stdlib and numpy; the
libraries are imported where used)."""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Dict, Iterator, Tuple

import numpy as np

from deployments.contract import SAMPLE_RATE, Segment, TranscribeOptions

logger = logging.getLogger(__name__)


class AlignModelCache:
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


def asr_options(opts: TranscribeOptions, multilingual: bool):
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


def as_segment(raw: Dict[str, Any]) -> Segment:
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


def shifted(segment: Segment, offset_s: float) -> Segment:
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


def cross_attention_words(model: Any, tokenizer: Any, segments: list, audio: np.ndarray, batch_size: int, asr: Any) -> list:
    """Word times from Whisper itself: its alignment heads' cross-attention over each segment's
    text, through dynamic time warping (faster-whisper's `word_timestamps=True`), for languages
    without a wav2vec2 aligner (or offline).

    whisperx's batched ASR keeps no tokens or encoder output, so each segment (a VAD chunk of at
    most 30 s) is encoded again, `batch_size` at a time, and its text re-tokenized.

    Args:
        model: faster-whisper's `WhisperModel`.
        tokenizer: faster-whisper's `Tokenizer` for the request's language and task.
        segments: whisperx's raw segments (`start`, `end`, `text`) in `audio`'s time.
        asr: The request's `TranscriptionOptions` (its punctuation to merge with words).

    Returns:
        The segments as `as_segment` builds them, each with `words` (`score`: the tokens' mean
        probability).
    """
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.transcribe import merge_punctuations

    extractor = model.feature_extractor
    out = []
    for first in range(0, len(segments), batch_size):
        batch = segments[first : first + batch_size]
        clips = [audio[int(s["start"] * SAMPLE_RATE) : int(s["end"] * SAMPLE_RATE)] for s in batch]
        features = [extractor(clip) for clip in clips]
        frames = [min(f.shape[-1], extractor.nb_max_frames) for f in features]
        encoded = model.encode(np.stack([pad_or_trim(f) for f in features]))
        tokens = [[t for t in tokenizer.encode(s["text"]) if t < tokenizer.eot] for s in batch]
        alignments = model.find_alignment(tokenizer, tokens, encoded, frames)
        for raw, alignment in zip(batch, alignments):
            merge_punctuations(alignment, asr.prepend_punctuations, asr.append_punctuations)
            start, end = float(raw["start"]), float(raw["end"])
            words = [
                {
                    "word": timing["word"].strip(),
                    "start": round(min(max(start + float(timing["start"]), start), end), 3),
                    "end": round(min(max(start + float(timing["end"]), start), end), 3),
                    "score": round(float(timing["probability"]), 3),
                }
                for timing in alignment
                if timing["word"].strip()
            ]
            out.append(as_segment({**raw, "words": words}))
    return out
