"""WhisperX model core: batched faster-whisper, VAD, wav2vec2 alignment, optional diarization.

Runs in the whisperx env, without Ray; whisperx, torch and faster-whisper are imported in
`load`. Everything around decoding (options, text cleaning, the result, info) is the shared
base's (`deployments/core.py`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from pydantic import Field

from deployments.contract import SAMPLE_RATE, WORDS_FROM_ALIGNER, WORDS_FROM_CROSS_ATTENTION, InvalidOptionsError, ModelInfo, ModelSpec, ModelUnavailableError, Segment, TranscribeOptions
from deployments.core import BatchedModelArgs, Decoded, DecodeEvents, DecodeRequest, ModelCore, ct2_whisper, spec_options, stop_if_cancelled, tokenizers_prompt_tokenizer
from deployments.pinned_decode import MAX_PINNED_DECODE_TOKENS, PinnedLengthWhisper, count_window_tokens, counting_window_tokens
from deployments.whisperx.stages import (
    AlignModelCache,
    as_segment,
    asr_options,
    audio_windows,
    cross_attention_words,
    release_freed_memory,
    shifted,
)

logger = logging.getLogger(__name__)

_OPTIONS = ("initial_prompt", "temperature", "beam_size", "word_timestamps", "script")
_SPEAKER_OPTIONS = ("diarize", "min_speakers", "max_speakers")


def generate_key(options: Any) -> tuple:
    """The `generate` settings chunks must share to be decoded in one call (the prompt, which
    carries language, task and initial prompt, is per chunk)."""
    return (
        ("beam_size", options.beam_size),
        ("patience", options.patience),
        ("length_penalty", options.length_penalty),
        ("suppress_blank", options.suppress_blank),
        ("suppress_tokens", tuple(options.suppress_tokens)),
        ("no_repeat_ngram_size", options.no_repeat_ngram_size),
        ("repetition_penalty", options.repetition_penalty),
    )


def batching_pipeline() -> type:
    """whisperx's `FasterWhisperPipeline` whose model calls go through the core's cross-request
    batcher: each batch of VAD chunks becomes items (features, this request's prompt) that
    `WhisperXCore._generate_batch` decodes with other requests' chunks."""
    from whisperx.asr import FasterWhisperPipeline

    class BatchingPipeline(FasterWhisperPipeline):
        def __init__(self, *args, core: "WhisperXCore", **kwargs):
            super().__init__(*args, **kwargs)
            self._core = core

        def _forward(self, model_inputs):
            return self._core._decode_chunks(model_inputs["inputs"], self.tokenizer, self.options)

    return BatchingPipeline


class WhisperXArgs(BatchedModelArgs):
    """Settings of the WhisperX application, filled from the Serve config's `args:`."""

    model: str = Field("large-v3", description="Whisper size name (e.g. 'large-v3') or a CTranslate2 model directory.")
    compute_type: str = Field("default", description="CTranslate2 compute type; 'default' is float16 on cuda, float32 on cpu.")
    batch_size: int = Field(16, ge=1, description="Most VAD chunks decoded in one model call, from one request or several; bounds the memory of a call.")
    cpu_threads: int = Field(0, ge=0, description="CPU threads of CTranslate2 (decoding) and of PyTorch (VAD, alignment), the latter set in every decoding thread (core.set_torch_threads); 0 lets each choose.")
    chunk_size: float = Field(30.0, gt=0, le=30, description="Longest VAD chunk handed to Whisper, in seconds.")
    vad_onset: float = Field(0.5, gt=0, lt=1, description="VAD speech-start threshold.")
    vad_offset: float = Field(0.363, gt=0, lt=1, description="VAD speech-end threshold.")
    window_s: float = Field(600.0, ge=120, description="Longest stretch of audio run through VAD, ASR and alignment at once; longer audio is cut into windows at quiet moments, so memory stays flat with length.")
    window_cut_search_s: float = Field(20.0, gt=0, le=60, description="A window ends at the quietest 0.1 s within this many seconds before its limit.")
    align_models: Dict[str, str] = Field(default_factory=dict, description="Alignment model per language code (HF id or local directory); whisperx's defaults otherwise.")
    align_cache_size: int = Field(4, ge=1, description="Alignment models kept loaded at once (least recently used go first).")
    diarization_model: Optional[str] = Field(None, description="pyannote diarization pipeline (HF id or local directory); diarization is off without it (the spec then lists no speaker options).")
    hf_token_env: str = Field("HF_TOKEN", description="Environment variable holding the Hugging Face token for gated models.")
    nltk_data: Optional[str] = Field(None, description="NLTK data root for the aligner's sentence splitter (Punkt); default '<model_cache>/nltk_data', else '~/nltk_data'.")


class WhisperXCore(ModelCore):
    """One WhisperX model; `transcribe` is safe to call from several threads at once."""

    spec = ModelSpec(
        name="whisperx",
        description="WhisperX (batched faster-whisper, VAD, wav2vec2 word alignment, optional diarization): every language.",
        languages=(),
        tasks=("transcribe", "translate"),
        options=spec_options(*_OPTIONS),
        detects_language=True,
    )
    Args = WhisperXArgs
    packages = ("torch", "whisperx", "faster-whisper", "ctranslate2", "transformers", "opencc")

    def model_spec(self) -> ModelSpec:
        if self.args.diarization_model:
            return self.spec._replace(options=spec_options(*_OPTIONS, *_SPEAKER_OPTIONS))
        return self.spec

    def load(self) -> None:
        import torch
        from whisperx.vads import Pyannote

        self._torch = torch
        from whisperx.asr import WhisperModel

        if self.device == "cuda":
            free, total = torch.cuda.mem_get_info()
            self._gpu_used_at_load = total - free
        self._model, self._compute_type = ct2_whisper(WhisperModel, self.args, self.device)
        self._pipeline_class = batching_pipeline()
        self.batcher = self.batched(self._generate_batch)
        if self.args.pinned_decode_tokens:
            self._model.model = PinnedLengthWhisper(
                self._model.model, self.args.pinned_decode_tokens, end_of_text=self._model.hf_tokenizer.token_to_id("<|endoftext|>")
            )
        # The pyannote segmentation model ships inside the whisperx wheel, so VAD works
        # offline; whisperx's silero option fetches through torch.hub and does not.
        self._vad = Pyannote(torch.device(self.device), token=None, vad_onset=self.args.vad_onset, vad_offset=self.args.vad_offset)
        self._align_cache = AlignModelCache(self.args.align_cache_size)
        self._prepare_sentence_splitter()
        self._diarizer = None
        self._diarizer_lock = threading.Lock()

    def _prepare_sentence_splitter(self) -> None:
        from whisperx.utils import PUNKT_LANGUAGES

        from deployments.whisperx.punkt import ensure_punkt_tab

        root = self.args.nltk_data or os.path.join(self.args.model_cache or os.path.expanduser("~"), "nltk_data")
        # whisperx.align falls back to Punkt's English model for languages it has no entry for.
        languages = {"english", *PUNKT_LANGUAGES.values()}
        try:
            ensure_punkt_tab(root, languages)
        except OSError as e:  # a read-only model cache (an image's /models): this replica's temp dir
            logger.warning("Cannot write Punkt data under %s (%s); using a temporary directory.", root, e)
            ensure_punkt_tab(tempfile.mkdtemp(prefix="nltk_data-"), languages)

    def warm_up(self) -> None:
        self._model.detect_language(np.zeros(SAMPLE_RATE, dtype=np.float32))

    def run_largest_batch(self) -> int:
        """`batch_size` chunks of 30 s at `max_beam_size`, each decoded to CTranslate2's length
        limit (end-of-text suppressed, as the pinned-decode benchmark does).

        CTranslate2 has no memory counter of its own and is not capped by torch's, so this
        counts the GPU memory in use on the device now against before this replica loaded:
        weights, VAD and the batch's caches (which CTranslate2's allocator keeps). Another
        replica loading on the same card at the same moment would be counted too: start replicas
        that share a card one after another, as Serve does on a single-GPU node."""
        import torch
        from faster_whisper.audio import pad_or_trim
        from faster_whisper.tokenizer import Tokenizer

        # What is decoded does not matter with the length pinned: only the shapes do.
        noise = np.random.default_rng(0).standard_normal(30 * SAMPLE_RATE).astype(np.float32) * 0.1
        features = np.stack([pad_or_trim(self._model.feature_extractor(noise))] * self.args.batch_size)
        tokenizer = Tokenizer(self._model.hf_tokenizer, self._model.model.is_multilingual, task="transcribe", language="en")
        prompt = self._model.get_prompt(tokenizer, [], without_timestamps=True)
        pinned = PinnedLengthWhisper(self._model.model, MAX_PINNED_DECODE_TOKENS, end_of_text=tokenizer.eot)
        pinned.generate(self._model.encode(features), [prompt] * self.args.batch_size, beam_size=self.args.max_beam_size, max_length=self._model.max_length)
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        return max(0, (total - free) - self._gpu_used_at_load)

    def describe(self) -> ModelInfo:
        return ModelInfo(engine="whisperx", compute_type=self._compute_type)

    def gpu_memory(self) -> Optional[Tuple[int, int]]:
        """CTranslate2 allocates outside torch: the card's use beyond what it was at load (with
        another replica on the card, its allocations count too: NVML would be needed per process)."""
        if self.device != "cuda":
            return None
        free, total = self._torch.cuda.mem_get_info()
        return max(0, (total - free) - self._gpu_used_at_load), int(self.gpu_share * total)

    def prompt_tokenizer(self):
        return tokenizers_prompt_tokenizer(self._model.hf_tokenizer)

    def check_options(self, opts: TranscribeOptions) -> None:
        # min > max and values < 1 are rejected by TranscribeOptions itself.
        if not opts.diarize and (opts.min_speakers is not None or opts.max_speakers is not None):
            raise InvalidOptionsError(
                f"Got min_speakers={opts.min_speakers}, max_speakers={opts.max_speakers} with diarize=False; "
                "speaker counts only apply when diarizing."
            )

    # -- stages ------------------------------------------------------------------------------

    def decode(self, request: DecodeRequest) -> Decoded:
        from faster_whisper.tokenizer import Tokenizer

        audio, opts = request.audio, request.options
        language, probability = self._language(audio, opts)
        word_times = self._word_time_source(language, request.warnings) if opts.word_timestamps else None
        segments: List[Segment] = []
        for start, end in audio_windows(audio, self.args.window_s, self.args.window_cut_search_s):
            stop_if_cancelled()
            piece = audio[start:end]  # a view: windows bound what VAD, ASR and alignment hold at once
            raw_segments = self._asr(piece, opts, language, request.window_tokens)
            if word_times == WORDS_FROM_ALIGNER and raw_segments:
                window_segments = self._align(raw_segments, piece, language)
            elif word_times == WORDS_FROM_CROSS_ATTENTION and raw_segments:
                tokenizer = Tokenizer(self._model.hf_tokenizer, self._model.model.is_multilingual, task=opts.task, language=language)
                window_segments = cross_attention_words(
                    self._model, tokenizer, raw_segments, piece, self.args.batch_size, asr_options(opts, self._model.model.is_multilingual)
                )
            else:
                window_segments = [as_segment(s) for s in raw_segments]
            segments.extend(shifted(s, start / SAMPLE_RATE) for s in window_segments)
            del piece, raw_segments, window_segments
            release_freed_memory()
        if opts.diarize and segments:
            segments = self._diarize(segments, audio, opts)
        return Decoded(segments=segments, language=language, language_probability=probability, word_times=word_times)

    def _language(self, audio: np.ndarray, opts: TranscribeOptions) -> tuple:
        if opts.language:
            return opts.language, None
        if not self._model.model.is_multilingual:
            return "en", None
        language, probability, _ = self._model.detect_language(audio)
        return language, float(probability)

    def _asr(self, audio: np.ndarray, opts: TranscribeOptions, language: str, window_tokens: List[int]) -> list:
        """Runs whisperx's batched ASR on one window; with `pinned_decode_tokens`, appends the tokens
        each VAD chunk decoded to `window_tokens`."""
        from faster_whisper.tokenizer import Tokenizer

        # A pipeline per request: whisperx's pipeline rewrites its tokenizer and options during
        # transcribe(), so one shared instance would mix concurrent requests' settings.
        multilingual = self._model.model.is_multilingual
        pipeline = self._pipeline_class(
            core=self,
            model=self._model,
            vad=self._vad,
            vad_params={"vad_onset": self.args.vad_onset, "vad_offset": self.args.vad_offset},
            options=asr_options(opts, multilingual),
            tokenizer=Tokenizer(self._model.hf_tokenizer, multilingual, task=opts.task, language=language),
            language=language,
            device=self.device,
        )
        with counting_window_tokens(window_tokens):
            result = pipeline.transcribe(
                audio, batch_size=self.args.batch_size, language=language, task=opts.task, chunk_size=self.args.chunk_size
            )
        return [s for s in result["segments"] if s["text"].strip()]

    def _decode_chunks(self, features: Any, tokenizer: Any, options: Any) -> dict:
        """One batch of a request's VAD chunks (whisperx's `generate_segment_batched`'s output),
        decoded by the batcher with other requests' chunks of the same `generate` settings."""
        prompt = self._model.get_prompt(
            tokenizer,
            tokenizer.encode(" " + options.initial_prompt.strip()) if options.initial_prompt is not None else [],
            without_timestamps=options.without_timestamps,
            prefix=options.prefix,
            hotwords=options.hotwords,
        )
        features = np.asarray(features)
        decoded = self.decode_together(generate_key(options), [(features[i], prompt) for i in range(features.shape[0])])
        count_window_tokens(len(tokens) for tokens, _ in decoded)
        texts = tokenizer.tokenizer.decode_batch([[t for t in tokens if t < tokenizer.eot] for tokens, _ in decoded])
        self.events.count(DecodeEvents.NO_SPEECH_WINDOWS, sum(1 for text in texts if not text.strip()))
        return {"text": texts, "avg_logprob": [logprob for _, logprob in decoded]}

    def _generate_batch(self, key: tuple, items: List[tuple]) -> List[tuple]:
        """CTranslate2's `generate` on chunks of one or more requests that share `key`: one
        encoder pass, a prompt per chunk (its request's language, task and initial prompt).
        As whisperx's `generate_segment_batched`, which takes one prompt for a whole batch.

        Returns:
            Per chunk, its token ids and average log-probability.
        """
        settings = dict(key)
        encoder_output = self._model.encode(np.stack([features for features, _ in items]))
        result = self._model.model.generate(
            encoder_output,
            [prompt for _, prompt in items],
            max_length=self._model.max_length,
            return_scores=True,
            **settings,
        )
        out = []
        for res in result:
            tokens = res.sequences_ids[0]
            cumulative = res.scores[0] * (len(tokens) ** settings["length_penalty"])
            out.append((tokens, cumulative / (len(tokens) + 1)))
        return out

    def _load_align_model(self, language: str) -> tuple:
        import whisperx

        return whisperx.load_align_model(
            language_code=language,
            device=self.device,
            model_name=self.args.align_models.get(language),
            model_dir=self.args.model_cache,
            model_cache_only=self.args.local_files_only,
        )

    def _word_time_source(self, language: str, warnings: list) -> str:
        """wav2vec2 alignment when the language's aligner loads, else Whisper's cross-attention."""
        try:
            self._align_cache.get(language, self._load_align_model)
            return WORDS_FROM_ALIGNER
        except Exception as e:  # offline, or no alignment model for this language
            logger.warning("No alignment model for %r: %s", language, e)
            warnings.append(
                f"Word times for language {language!r} come from Whisper's cross-attention, coarser than a "
                f"wav2vec2 aligner's: that aligner could not be loaded ({type(e).__name__}: {e})."
            )
            return WORDS_FROM_CROSS_ATTENTION

    def _align(self, raw_segments: list, audio: np.ndarray, language: str) -> list:
        import whisperx

        model, metadata = self._align_cache.get(language, self._load_align_model)
        aligned = whisperx.align(raw_segments, model, metadata, audio, self.device)
        return [as_segment(s) for s in aligned["segments"] if s.get("text", "").strip()]

    def _diarize(self, segments: list, audio: np.ndarray, opts: TranscribeOptions) -> list:
        import whisperx
        from whisperx.diarize import DiarizationPipeline

        with self._diarizer_lock:
            if self._diarizer is None:
                try:
                    self._diarizer = DiarizationPipeline(
                        model_name=self.args.diarization_model,
                        token=os.environ.get(self.args.hf_token_env),
                        device=self.device,
                        cache_dir=self.args.model_cache,
                    )
                except Exception as e:
                    raise ModelUnavailableError(
                        f"Diarization was requested but the configured diarization_model "
                        f"{self.args.diarization_model!r} could not be loaded ({type(e).__name__}: {e})."
                    ) from e
        turns = self._diarizer(audio, min_speakers=opts.min_speakers, max_speakers=opts.max_speakers)
        labelled = whisperx.assign_word_speakers(turns, {"segments": segments})
        return [as_segment(s) for s in labelled["segments"]]
