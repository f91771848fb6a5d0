"""OpenAI-compatible request types for the audio endpoints."""

from __future__ import annotations

from typing import List, Literal, Optional

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.contract import TranscribeOptions
from deployments.languages import asks_traditional_script

ResponseFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]
TimestampGranularity = Literal["word", "segment"]


class TranscriptionRequest(BaseModel):
    """`POST /v1/audio/transcriptions`, OpenAI's fields in OpenAI's order, plus KlipNote's own."""

    model_config = ConfigDict(populate_by_name=True)

    file: UploadFile
    """The audio file: any container FFmpeg reads (wav, flac, mp3, m4a, ogg, webm, video)."""

    model: str = "auto"
    """"auto" (route by language; "whisper-1" means the same) or a model of `GET /v1/models`."""

    language: Optional[str] = None
    """ISO 639-1 code of the audio's language; detected when absent. Tags, other ISO codes and
    English names are accepted (`zh-CN`, `cmn`, `mandarin` -> `zh`); `zh-TW`, `zh-HK` and
    `zh-Hant` also ask for Traditional script unless `script` is given."""

    prompt: Optional[str] = None
    """Text to guide the model's style or continue a previous segment."""

    response_format: ResponseFormat = "json"
    """json, text, srt, verbose_json or vtt."""

    temperature: float = Field(0.0, ge=0.0, le=1.0)
    """Sampling temperature; 0 decodes with beam search and falls back to higher ones as needed."""

    timestamp_granularities: List[TimestampGranularity] = Field(
        default_factory=lambda: ["segment"], alias="timestamp_granularities[]"
    )
    """"word" and/or "segment"; needs response_format verbose_json."""

    stream: bool = False
    """Answer with server-sent events as the transcript becomes final (`transcript.text.delta`,
    `transcript.text.segment`, `transcript.progress`, then `transcript.text.done`), whatever
    `response_format` says."""

    segmentation: Optional[Literal["subtitle", "raw"]] = None
    """KlipNote: "subtitle" (cues of 1-7 s and at most 200 characters, the default) or "raw"
    (the model's own segments). Applies to segments, srt and vtt."""

    script: Optional[Literal["simplified", "traditional"]] = None
    """KlipNote: Chinese output in Simplified (the default) or Traditional script."""

    diarize: bool = False
    """KlipNote: label segments and words with speakers (a model whose spec lists `diarize`)."""

    min_speakers: Optional[int] = Field(None, ge=1)
    """KlipNote: fewest speakers when diarizing."""

    max_speakers: Optional[int] = Field(None, ge=1)
    """KlipNote: most speakers when diarizing."""

    @model_validator(mode="before")
    @classmethod
    def _check_granularities(cls, data):
        if isinstance(data, dict):
            fmt = data.get("response_format") or "json"
            grans = data.get("timestamp_granularities[]") or data.get("timestamp_granularities") or []
            if isinstance(grans, str):
                grans = [grans]
            if "word" in grans and fmt != "verbose_json":
                raise ValueError("timestamp_granularities[]=word requires response_format=verbose_json.")
            if isinstance(data.get("language"), str) and not data["language"].strip():
                data = {**data, "language": None}
        return data

    def to_transcribe_options(self, *, task: str = "transcribe") -> TranscribeOptions:
        """The model apps' options for this request."""
        temperature = (
            (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) if self.temperature == 0 else (self.temperature,)
        )
        return TranscribeOptions(
            language=self.language,
            task=task,
            initial_prompt=self.prompt,
            temperature=temperature,
            word_timestamps="word" in self.timestamp_granularities,
            diarize=self.diarize,
            min_speakers=self.min_speakers,
            max_speakers=self.max_speakers,
            **({"script": self.script} if self.script else {"script": "traditional"} if self.language and asks_traditional_script(self.language) else {}),
        )


class JobRequest(TranscriptionRequest):
    """`POST /v1/audio/transcriptions/jobs`: the transcription's fields, plus where to call back.
    The result is kept as verbose_json; `response_format` only says which rendering the job's
    links name first. `stream` has no meaning here (follow a job at `.../jobs/{id}/events`)."""

    callback_url: Optional[str] = None
    """KlipNote: POSTed the job (id, status, links) when it succeeds or fails, signed
    (X-KlipNote-Signature); http or https, public addresses unless the service allows others."""
