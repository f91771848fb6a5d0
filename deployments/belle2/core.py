"""BELLE-2 model core: Hugging Face transformers Whisper decoding Mandarin, without Ray.

Long audio is cut into <= 30 s windows at speech boundaries (silero VAD through onnxruntime,
`deployments/vad.py`) and the windows are decoded in batches, instead of transformers'
sequential long-form decoding, which runs one window after another. Everything around decoding
(options, text cleaning, the result, info) is the shared base's (`deployments/core.py`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Dict, List, Literal, Optional

import numpy as np
from pydantic import Field

from deployments.belle2.speedups import Speedups
from deployments.belle2.windows import Window, plan_windows, remaining_window
from deployments.belle2.words import FRAMES_PER_SECOND, alignment_heads, recorded_cross_attention, timed_words, token_times
from deployments.contract import SAMPLE_RATE, WORDS_FROM_CROSS_ATTENTION, ModelInfo, ModelSpec, Segment, TranscribeOptions
from deployments.core import BatchedModelArgs, Decoded, DecodeEvents, DecodeRequest, ModelCore, read_speech_clip, resolve_compute_type, set_torch_threads, spec_options, stop_if_cancelled
from deployments.pinned_decode import transformers_generate_kwargs, transformers_window_tokens
from deployments.vad import VadOptions, speech_timestamps

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 30
# Speech the decoder left undecoded at the end of a window (an early end-of-text) is decoded
# again from where it stopped, when there is at least this much of it, at most this many times.
FOLLOW_UP_MIN_SPEECH_S = 0.5
MAX_FOLLOW_UPS = 2
WARMUP_TOKENS = 8


class Belle2Args(BatchedModelArgs):
    """Settings of the BELLE-2 application, filled from the Serve config's `args:`."""

    model: str = Field("BELLE-2/Belle-whisper-large-v3-zh", description="Hugging Face model id or a local directory in transformers format.")
    compute_type: Literal["default", "float16", "float32"] = Field("default", description="'float16', 'float32', or 'default': float16 on cuda, float32 on cpu.")
    compression_ratio_threshold: float = Field(2.4, gt=0, description="A window whose text compresses better than this is decoded again at the next temperature.")
    logprob_threshold: float = Field(-1.0, description="A window whose average log-probability is below this is decoded again at the next temperature.")
    no_speech_threshold: float = Field(0.6, ge=0, le=1, description="With a low log-probability, a window whose no-speech probability exceeds this is dropped as silence.")
    condition_on_previous_text: bool = Field(False, description="Feed each window the previous one's text; off because it lets a loop carry over.")
    vad_threshold: float = Field(0.35, gt=0, lt=1, description="Silero speech probability threshold; below faster-whisper's 0.5, which missed 22 s of a softly read poem (the decoder's no-speech check judges the rest).")
    vad_min_silence_ms: int = Field(500, ge=0, description="Silence that ends a speech span.")
    window_pad_ms: int = Field(200, ge=0, description="Context added around each window where there is room.")
    decoding_shortcuts: bool = Field(True, description="Read no-speech from the prompt pass, build suppression masks once per call, project, cache and read the beams' shared cross-attention keys and values once per input, reorder only the self-attention cache (deployments/belle2/decoding.py); the same tokens, off only to measure what they save. Guarded: off, with a warning in info(), outside the verified transformers versions or when the warm-up self-check sees a token change (deployments/belle2/speedups.py).")
    onednn_linears: bool = Field(True, description="On CPU, run every linear layer on oneDNN rather than MKL's sgemm (deployments/belle2/onednn.py): up to 2.7x as fast, most for decoding's few-row matrices; equal up to float rounding, not bit for bit. Guarded like decoding_shortcuts.")
    decoder_cpu_threads: int = Field(0, ge=0, description="Threads for the decoding steps on CPU, when fewer than `cpu_threads` serve better: each step is hundreds of small operations, and on the 2-vCPU test machine 2 threads made them slower than 1 (the encoder's large matrices keep `cpu_threads`). 0: as `cpu_threads`.")


class Belle2Core(ModelCore):
    """BELLE-2 (or any transformers Whisper checkpoint) decoding Mandarin."""

    spec = ModelSpec(
        name="belle2",
        description="BELLE-2 Whisper large-v3 fine-tuned for Mandarin (transformers): forced zh, beam search, temperature fallback.",
        languages=("zh",),
        tasks=("transcribe",),
        options=spec_options("initial_prompt", "temperature", "beam_size", "word_timestamps", "script"),
        detects_language=False,
        aliases=("belle-2",),
    )
    Args = Belle2Args
    packages = ("torch", "transformers", "tokenizers", "opencc", "onnxruntime")

    def load(self) -> None:
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        args = self.args
        self._torch = torch
        self._compute_type = resolve_compute_type(args.compute_type, self.device)
        self._dtype = {"float16": torch.float16, "float32": torch.float32}[self._compute_type]
        cpu = self.device == "cpu"
        self._encoder_threads = args.cpu_threads if cpu else 0
        self._decoder_threads = (args.decoder_cpu_threads or args.cpu_threads) if cpu else 0
        load = dict(cache_dir=args.model_cache, local_files_only=args.local_files_only)
        self._processor = WhisperProcessor.from_pretrained(args.model, **load)
        self._model = WhisperForConditionalGeneration.from_pretrained(
            args.model, dtype=self._dtype, attn_implementation="sdpa", **load
        ).to(self.device).eval()
        if self._decoder_threads != self._encoder_threads:
            self._encode_on_all_threads()
        self.speedups = Speedups(
            self._model, shortcuts=args.decoding_shortcuts, onednn=cpu and args.onednn_linears, warn=self.warn_at_start
        )
        self._alignment_heads, heads_note = alignment_heads(self._model)
        if heads_note:
            (logger.info if self._alignment_heads else self.warn_at_start)(f"Word times: {heads_note}.")
        self.batcher = self.batched(self._generate_batch)
        self._vad_options = VadOptions(
            threshold=args.vad_threshold,
            min_silence_duration_ms=args.vad_min_silence_ms,
            max_speech_duration_s=WINDOW_SECONDS - 1,
            speech_pad_ms=0,
        )

    def model_spec(self) -> ModelSpec:
        if getattr(self, "_alignment_heads", True) is None:  # no heads to place words with
            return self.spec._replace(options=self.spec.options - {"word_timestamps"})
        return self.spec

    def decode_threads(self) -> int:
        return self._decoder_threads

    def prompt_tokenizer(self):
        tokenizer = self._processor.tokenizer
        return (lambda text: tokenizer.encode(text, add_special_tokens=False)), tokenizer.decode

    def describe(self) -> ModelInfo:
        return ModelInfo(engine="transformers", compute_type=self._compute_type)

    def _encode_on_all_threads(self) -> None:
        """Runs the encoder on `cpu_threads` while decoding steps keep `decoder_cpu_threads`."""
        encoder = self._model.get_encoder()
        forward = encoder.forward

        @functools.wraps(forward)
        def forward_on_all_threads(*args, **kwargs):
            set_torch_threads(self._encoder_threads)
            try:
                return forward(*args, **kwargs)
            finally:
                set_torch_threads(self._decoder_threads)

        encoder.forward = forward_on_all_threads

    def warm_up(self) -> None:
        if self.speedups.needs_check:  # decodes real speech: a warm-up too
            clip = read_speech_clip()
            # Two different windows, beam 2: every shortcut has something to share or skip.
            chunks, opts = [clip, clip[: clip.size * 3 // 5]], TranscribeOptions(beam_size=2)
            # A pinned decode has no no-speech check, so that shortcut has nothing to skip there.
            self.speedups.self_check(
                lambda: self.generate(chunks, opts)["sequences"].tolist(),
                expect_no_speech=not self.args.pinned_decode_tokens,
            )
            logger.info("BELLE-2 speed-ups after the self-check: %s", self.speedups.counts())
            return
        # A few tokens are enough to initialise everything; silence decoded in full ran to the
        # length limit (13 s of replica start-up on CPU).
        silence = [np.zeros(SAMPLE_RATE, dtype=np.float32)]
        limit = {} if self.args.pinned_decode_tokens else {"max_new_tokens": WARMUP_TOKENS}  # a pin decodes its own length
        self.generate(silence, TranscribeOptions(beam_size=1, temperature=(0.0,)), **limit)

    def run_largest_batch(self) -> int:
        """`batch_size` windows of 30 s of speech at `max_beam_size`, every window decoded to the
        decoder's length limit, then their word-time pass (which runs in the request's thread,
        beside the next batch): the peak of the first plus what the second adds."""
        cuda = self._torch.cuda if self.device == "cuda" else None  # on CPU: the same work, 0 bytes (the GPU check's dry run)
        window = np.resize(read_speech_clip(), WINDOW_SECONDS * SAMPLE_RATE)
        chunks = [window] * self.args.batch_size
        opts = TranscribeOptions(beam_size=self.args.max_beam_size, temperature=(0.0,))
        longest = self._model.config.max_target_positions - 8  # room for the prompt tokens
        if cuda:
            cuda.synchronize()
            cuda.reset_peak_memory_stats()
        out = self.generate(chunks, opts, **transformers_generate_kwargs(longest))
        self.largest_batch_tokens = out["sequences"].shape[-1]
        generate_peak = cuda.max_memory_reserved() if cuda else 0
        before_words = cuda.memory_reserved() if cuda else 0
        if cuda:
            cuda.reset_peak_memory_stats()
        if self._alignment_heads is not None:
            self.word_times(chunks, out["segments"], opts)
        del out
        return generate_peak + max(0, (cuda.max_memory_reserved() if cuda else 0) - before_words)

    def speedup_counts(self) -> Dict[str, int]:
        """How often each decoding shortcut has applied since start, and how many linear layers
        run on oneDNN (`Speedups.counts`); the warm-up self-check's own decodes included."""
        return self.speedups.counts()

    # -- decoding ------------------------------------------------------------------------------

    def decode(self, request: DecodeRequest) -> Decoded:
        audio, opts = request.audio, request.options
        speech = self._speech(audio)
        windows = self._windows(speech, audio.size)
        segments: List[Segment] = []
        pinned = self.args.pinned_decode_tokens
        # A pinned window ends wherever random timestamps put it: no follow-up pass (or its work) then.
        for follow_up in range(1 if pinned else 1 + MAX_FOLLOW_UPS):
            left_over: List[Window] = []
            for first in range(0, len(windows), self.args.batch_size):
                stop_if_cancelled()
                batch = windows[first : first + self.args.batch_size]
                chunks = [audio[w.start : w.end] for w in batch]
                decoded = self.decode_together(generate_key(opts), chunks)
                window_segments_list = [window_segments for window_segments, _ in decoded]
                if pinned:
                    request.window_tokens.extend(transformers_window_tokens([row for _, row in decoded], self._processor.tokenizer))
                words = self.word_times(chunks, window_segments_list, opts) if opts.word_timestamps else [None] * len(batch)
                for window, window_segments, window_words in zip(batch, window_segments_list, words):
                    placed = self._place(window, window_segments, audio.size, window_words)
                    if not follow_up and not placed:
                        self.events.count(DecodeEvents.NO_SPEECH_WINDOWS)
                    if follow_up:
                        placed = _from_speech_onset(placed, window, speech)
                    segments.extend(placed)
                    rest = self._remaining(window, placed, speech)
                    if rest is not None:
                        left_over.append(rest)
            if not left_over:
                break
            logger.info("Decoding again the speech left after an early end in %d window(s).", len(left_over))
            windows = left_over
        segments.sort(key=lambda s: s["start"])
        word_times = WORDS_FROM_CROSS_ATTENTION if opts.word_timestamps else None
        return Decoded(segments=_without_overlaps(segments), language="zh", word_times=word_times)

    def _generate_batch(self, key: TranscribeOptions, chunks: List[np.ndarray]) -> List[tuple]:
        """`generate` on windows of one or more requests that share `key`: per window, its
        segments (generate's) and its row of token ids."""
        out = self.generate(chunks, key)
        return list(zip(out["segments"], out["sequences"].tolist()))

    def windows(self, audio: np.ndarray) -> List[Window]:
        """The decoder inputs `decode` cuts `audio` into (VAD spans merged to <= 30 s)."""
        return self._windows(self._speech(audio), audio.size)

    def _speech(self, audio: np.ndarray) -> List[dict]:
        return speech_timestamps(audio, self._vad_options, sampling_rate=SAMPLE_RATE)

    def _windows(self, speech: List[dict], total_samples: int) -> List[Window]:
        return plan_windows(
            speech,
            total_samples=total_samples,
            max_samples=WINDOW_SECONDS * SAMPLE_RATE,
            pad_samples=self.args.window_pad_ms * SAMPLE_RATE // 1000,
        )

    def generate(self, chunks: List[np.ndarray], opts: TranscribeOptions, **overrides: Any) -> Any:
        """transformers' `generate` on up to `batch_size` windows at once, as the app decodes them.

        Returns generate's output (a dict with `sequences` and `segments`). `overrides` replace
        or add generate arguments (bench/gpu_check.py adds a logits recorder, for example).
        """
        features = self._processor.feature_extractor(
            chunks, sampling_rate=SAMPLE_RATE, return_tensors="pt"
        ).input_features.to(self.device, self._dtype)
        prompt_ids = None
        if opts.initial_prompt:
            prompt_ids = self._processor.get_prompt_ids(opts.initial_prompt, return_tensors="pt").to(self.device)
        settings = dict(
            temperature=opts.temperature if len(opts.temperature) > 1 else opts.temperature[0],
            compression_ratio_threshold=self.args.compression_ratio_threshold,
            logprob_threshold=self.args.logprob_threshold,
            no_speech_threshold=self.args.no_speech_threshold,
        )
        if self.args.pinned_decode_tokens:
            settings.update(transformers_generate_kwargs(self.args.pinned_decode_tokens))
        settings = dict(
            language="zh",
            task=opts.task,
            num_beams=opts.beam_size,
            do_sample=False,
            **settings,
            condition_on_prev_tokens=self.args.condition_on_previous_text,
            prompt_ids=prompt_ids,
            return_timestamps=True,
            return_segments=True,
        )
        settings.update(overrides)
        from transformers import LogitsProcessorList

        retries = temperature_retry_counter()
        settings["logits_processor"] = LogitsProcessorList([*(settings.get("logits_processor") or []), retries])
        with self._torch.inference_mode(), self.speedups.active():
            out = self._model.generate(features, **settings)
        self.events.count(DecodeEvents.TEMPERATURE_RETRIES, retries.retried)
        return out

    def _remaining(self, window: Window, placed: List[Segment], speech: List[dict]) -> Optional[Window]:
        if not placed:  # nothing decoded (silence, or skipped as no speech): the same again would be too
            return None
        return remaining_window(
            window,
            int(max(s["end"] for s in placed) * SAMPLE_RATE),
            speech,
            min_speech_samples=int(FOLLOW_UP_MIN_SPEECH_S * SAMPLE_RATE),
        )

    def word_times(self, chunks: List[np.ndarray], segments: List[list], opts: TranscribeOptions) -> List[List[List[dict]]]:
        """Words of each window's segments, in window time (deployments/belle2/words.py): one
        encoder and one teacher-forced decoder pass per batch of windows, recording the alignment
        heads, then DTW per window.

        Returns:
            Per window, per segment of `segments` (generate's), its words.
        """
        torch = self._torch
        tokenizer = self._processor.tokenizer
        end_of_text = tokenizer.eos_token_id
        prefix = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|zh|>", f"<|{opts.task}|>", "<|notimestamps|>"])
        texts = [[[t for t in seg["tokens"].tolist() if t < end_of_text] for seg in window] for window in segments]
        flat = [[t for seg in window for t in seg] for window in texts]
        ids = torch.full((len(chunks), len(prefix) + max(map(len, flat), default=0) + 1), end_of_text, dtype=torch.long)
        for row, tokens in enumerate(flat):
            ids[row, : len(prefix) + len(tokens)] = torch.tensor(prefix + tokens, dtype=torch.long)
        features = self._processor.feature_extractor(chunks, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        with torch.inference_mode(), recorded_cross_attention(self._model, self._alignment_heads) as recorded:
            encoded = self._model.get_encoder()(features.to(self.device, self._dtype)).last_hidden_state
            hidden = self._model.get_decoder()(input_ids=ids.to(self.device), encoder_hidden_states=encoded, use_cache=False).last_hidden_state
            log_probs = self._model.proj_out(hidden).float().log_softmax(dim=-1)
        weights = torch.stack([recorded[(layer, head)] for layer, head in self._alignment_heads], dim=1)
        decode = functools.partial(tokenizer.decode, skip_special_tokens=True)
        out = []
        for row, (chunk, window_texts, tokens) in enumerate(zip(chunks, texts, flat)):
            first = len(prefix) - 1  # the position that predicts the first text token
            times = token_times(weights[row, :, first:], len(tokens), chunk.size * FRAMES_PER_SECOND // SAMPLE_RATE) if tokens else []
            predicted = log_probs[row, first : first + len(tokens)].gather(-1, torch.tensor(tokens, dtype=torch.long, device=log_probs.device)[:, None])
            probabilities = predicted.squeeze(-1).exp().cpu().numpy() if tokens else []
            window_words, at = [], 0
            for seg_tokens in window_texts:
                span = slice(at, at + len(seg_tokens) + 1)
                window_words.append(timed_words(seg_tokens, times[span], decode, probabilities[at : at + len(seg_tokens)]) if seg_tokens else [])
                at += len(seg_tokens)
            out.append(window_words)
        return out

    def _place(self, window: Window, raw_segments: list, total_samples: int, words: Optional[List[List[dict]]] = None) -> List[Segment]:
        """Turns a window's segments into absolute times, clipped to the window; with `words`
        (per segment, window time), each segment spans its words."""
        offset = window.start / SAMPLE_RATE
        limit = min(window.end, total_samples) / SAMPLE_RATE
        placed = []
        for i, raw in enumerate(raw_segments):
            text = self._processor.tokenizer.decode(raw["tokens"], skip_special_tokens=True).strip()
            if not text:
                continue
            start = min(offset + float(raw["start"]), limit)
            end = min(max(offset + float(raw["end"]), start), limit)
            segment = Segment(start=round(start, 3), end=round(end, 3), text=text)
            if words is not None and words[i]:
                segment["words"] = [
                    {**w, "word": w["word"].strip(), "start": round(min(offset + w["start"], limit), 3), "end": round(min(offset + w["end"], limit), 3)}
                    for w in words[i] if w["word"].strip()
                ]
                segment["start"], segment["end"] = segment["words"][0]["start"], segment["words"][-1]["end"]
            placed.append(segment)
        return placed


def _from_speech_onset(placed: List[Segment], window: Window, speech: List[dict]) -> List[Segment]:
    """A follow-up window's first segment starts where its speech does.

    A follow-up window starts where decoding stopped, often in the pause before the speech it was
    opened for (it does not start at the VAD's next span: the VAD misses soft speech). Whisper
    then stamps its first segment at 0.0: a Mandarin sentence's cue began 1.2 s early, in the end
    of the sentence before. Without word times, the VAD's onset is the better start.
    """
    if not placed or placed[0].get("words"):
        return placed
    onset = next((int(s["start"]) for s in speech if int(s["end"]) > window.start), None)
    first = placed[0]
    if onset is None or onset <= window.start:
        return placed
    onset_s = round(onset / SAMPLE_RATE, 3)
    if first["start"] < onset_s < first["end"]:
        placed = [Segment({**first, "start": onset_s}), *placed[1:]]
    return placed


def _without_overlaps(segments: List[Segment]) -> List[Segment]:
    """Sorted segments with each start moved to the previous end where padded windows overlapped."""
    out: List[Segment] = []
    for seg in segments:
        if out and seg["start"] < out[-1]["end"]:
            start = out[-1]["end"]
            seg = Segment({**seg, "start": start, "end": max(seg["end"], start)})
            if seg.get("words"):
                seg["words"] = [{**w, "start": max(w["start"], start), "end": max(w["end"], start)} for w in seg["words"]]
        out.append(seg)
    return out


def temperature_retry_counter() -> Any:
    """A logits processor counting the windows that transformers' Whisper `generate` decodes
    again at a higher temperature (its fallback loop reports nothing). Each pass of that loop
    starts over at the prompt's length, with one row per window it decodes again (sampling, so
    no beams); the first pass is the decode itself."""
    return _temperature_retry_counter_class()()


@functools.lru_cache(maxsize=None)
def _temperature_retry_counter_class() -> type:
    from transformers import LogitsProcessor

    class TemperatureRetryCounter(LogitsProcessor):
        def __init__(self):
            self.passes = 0
            self.retried = 0
            self._length: Optional[int] = None

        def __call__(self, input_ids, scores):
            length = input_ids.shape[-1]
            if self._length is None or length <= self._length:
                self.passes += 1
                if self.passes > 1:
                    self.retried += input_ids.shape[0]
            self._length = length
            return scores

    return TemperatureRetryCounter


def generate_key(opts: TranscribeOptions) -> TranscribeOptions:
    """What windows must share to be decoded in one `generate` call: transformers takes one task,
    beam width, temperature schedule and prompt per call (the language is always zh)."""
    return TranscribeOptions(task=opts.task, beam_size=opts.beam_size, temperature=opts.temperature, initial_prompt=opts.initial_prompt)

