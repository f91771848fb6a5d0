"""faster-whisper model core: CTranslate2 Whisper with Silero VAD and Whisper's own word times.

The smallest complete model plug-in: a spec, settings, `load` and `decode`; the replica base
does the rest (`deployments/core.py`, `deployments/replica.py`). It needs only faster-whisper,
which the whisperx env already has, so it runs there (README, "Adding a model").
"""

from __future__ import annotations

from typing import List

from pydantic import Field

from deployments.contract import SAMPLE_RATE, ModelInfo, ModelSpec, Segment
from deployments.core import Decoded, DecodeRequest, ModelAppArgs, ModelCore, ct2_whisper, spec_options, stop_if_cancelled, tokenizers_prompt_tokenizer


class FasterWhisperArgs(ModelAppArgs):
    """Settings of a faster-whisper application, filled from the Serve config's `args:`."""

    model: str = Field("large-v3", description="Whisper size name or a CTranslate2 model directory.")
    compute_type: str = Field("default", description="CTranslate2 compute type; 'default' is float16 on cuda, float32 on cpu.")
    vad_filter: bool = Field(True, description="Skip non-speech with faster-whisper's Silero VAD.")


class FasterWhisperCore(ModelCore):
    """One faster-whisper `WhisperModel`; CTranslate2 serves concurrent calls itself."""

    spec = ModelSpec(
        name="fasterwhisper",
        description="faster-whisper (CTranslate2 Whisper, Silero VAD, cross-attention word times): every language.",
        languages=(),
        tasks=("transcribe", "translate"),
        options=spec_options("initial_prompt", "temperature", "beam_size", "word_timestamps", "script"),
        detects_language=True,
        aliases=("faster-whisper",),
    )
    Args = FasterWhisperArgs
    packages = ("faster-whisper", "ctranslate2", "opencc")

    def load(self) -> None:
        from faster_whisper import WhisperModel

        if self.args.pinned_decode_tokens:
            raise ValueError("pinned_decode_tokens is not supported by the faster-whisper app.")
        self._model, self._compute_type = ct2_whisper(WhisperModel, self.args, self.device)

    def warm_up(self) -> None:
        import numpy as np

        self._model.detect_language(np.zeros(SAMPLE_RATE, dtype=np.float32))

    def describe(self) -> ModelInfo:
        return ModelInfo(engine="faster-whisper", compute_type=self._compute_type)

    def prompt_tokenizer(self):
        return tokenizers_prompt_tokenizer(self._model.hf_tokenizer)

    def decode(self, request: DecodeRequest) -> Decoded:
        opts = request.options
        pieces, info = self._model.transcribe(
            request.audio,
            language=opts.language,
            task=opts.task,
            initial_prompt=opts.initial_prompt,
            temperature=list(opts.temperature),
            beam_size=opts.beam_size,
            word_timestamps=opts.word_timestamps,
            vad_filter=self.args.vad_filter,
            condition_on_previous_text=False,
        )
        segments: List[Segment] = []
        for piece in pieces:  # a generator: decoding happens here
            stop_if_cancelled()
            if not piece.text.strip():
                continue
            segment = Segment(start=round(piece.start, 3), end=round(piece.end, 3), text=piece.text.strip())
            if piece.words:
                segment["words"] = [
                    {"word": w.word.strip(), "start": round(w.start, 3), "end": round(w.end, 3), "score": round(w.probability, 3)}
                    for w in piece.words
                ]
            segments.append(segment)
        probability = None if opts.language else float(info.language_probability)
        return Decoded(segments=segments, language=info.language, language_probability=probability)
