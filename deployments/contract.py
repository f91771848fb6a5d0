"""The contract between the ingress and the model applications.

Everything that crosses a DeploymentHandle between two runtime envs is a builtin or a numpy
array: a class defined in one env (a pydantic model, a `TorchVersion` string) does not unpickle
in another. So options travel as a plain dict (`TranscribeOptions.to_dict()`, converted back
once with `TranscribeOptions.from_dict()` inside the model app), and results are plain dicts
shaped by the TypedDicts below. This module imports the standard library only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping, Optional, Tuple, TypedDict

SAMPLE_RATE = 16_000
"""Every model app takes mono float32 audio at this rate."""

Task = Literal["transcribe", "translate"]
Script = Literal["simplified", "traditional"]


class InvalidOptionsError(ValueError):
    """Raised when a request's options are malformed; the ingress maps it to HTTP 400."""


class InvalidAudioError(ValueError):
    """Raised when audio cannot be used (wrong shape, dtype, empty); mapped to HTTP 400."""


class ModelUnavailableError(RuntimeError):
    """Raised when a model app cannot serve (not loaded, load failed); the ingress may fall back."""


@dataclasses.dataclass(frozen=True)
class TranscribeOptions:
    """Options of one transcription request, shared by both model apps.

    Attributes:
        language: ISO 639-1 code of the spoken language, or None to let the model detect it.
            The BELLE-2 app always decodes as "zh".
        task: "transcribe" keeps the spoken language; "translate" produces English.
        initial_prompt: Text fed to the decoder as previous context (names, spelling, style).
        temperature: Temperatures tried in order; the next one is used when a window's output
            fails the compression-ratio or log-probability thresholds.
        beam_size: Beam width for temperature 0; 1 means greedy decoding.
        word_timestamps: Ask for word-level times (WhisperX aligns with wav2vec2).
        diarize: Label segments and words with speakers (WhisperX, when configured).
        min_speakers: Lower bound on the number of speakers when diarizing.
        max_speakers: Upper bound on the number of speakers when diarizing.
        script: Chinese script of the output: "simplified" or "traditional".
    """

    language: Optional[str] = None
    task: Task = "transcribe"
    initial_prompt: Optional[str] = None
    temperature: Tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    beam_size: int = 5
    word_timestamps: bool = False
    diarize: bool = False
    min_speakers: Optional[int] = None
    max_speakers: Optional[int] = None
    script: Script = "simplified"

    def __post_init__(self) -> None:
        if self.task not in ("transcribe", "translate"):
            raise InvalidOptionsError(f"Got {self.task!r} for task; expected 'transcribe' or 'translate'.")
        if self.script not in ("simplified", "traditional"):
            raise InvalidOptionsError(
                f"Got {self.script!r} for script; expected 'simplified' or 'traditional'."
            )
        if self.beam_size < 1:
            raise InvalidOptionsError(f"Got {self.beam_size} for beam_size; it must be >= 1.")
        temps = tuple(float(t) for t in self.temperature)
        if not temps or any(not 0.0 <= t <= 1.0 for t in temps):
            raise InvalidOptionsError(
                f"Got {self.temperature!r} for temperature; expected one or more values in [0, 1]."
            )
        object.__setattr__(self, "temperature", temps)
        for name in ("min_speakers", "max_speakers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidOptionsError(f"Got {value} for {name}; it must be >= 1.")
        if (
            self.min_speakers is not None
            and self.max_speakers is not None
            and self.min_speakers > self.max_speakers
        ):
            raise InvalidOptionsError(
                f"Got min_speakers={self.min_speakers} > max_speakers={self.max_speakers}."
            )

    def to_dict(self) -> dict:
        """The options as builtins, safe to send to any env."""
        out = dataclasses.asdict(self)
        out["temperature"] = list(self.temperature)
        return out

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> "TranscribeOptions":
        """Builds options from a dict, rejecting unknown keys.

        Raises:
            InvalidOptionsError: A key is unknown or a value is out of range.
        """
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidOptionsError(f"Got unknown option(s) {unknown}; known: {sorted(known)}.")
        if isinstance(data.get("temperature"), (int, float)):
            data["temperature"] = (data["temperature"],)
        try:
            return cls(**data)
        except TypeError as e:
            raise InvalidOptionsError(str(e)) from e


class Word(TypedDict, total=False):
    """One word with its time span in seconds; `score` is the aligner's confidence."""

    word: str
    start: float
    end: float
    score: float
    speaker: str


class Segment(TypedDict, total=False):
    """One segment of the transcript; times in seconds from the start of the audio."""

    start: float
    end: float
    text: str
    words: list  # list[Word]
    speaker: str


class ModelInfo(TypedDict, total=False):
    """What served a request: engine, weights, device and how the replica was set up."""

    app: str
    engine: str
    model: str
    device: str
    compute_type: str
    load_time_s: float
    gpu_memory_bytes: int
    pinned_decode_tokens: int  # benchmark mode only (deployments/pinned_decode.py)
    window_tokens: list  # list[int]: tokens each window of this request decoded, in that mode


class TranscriptionResult(TypedDict):
    """What a model app's `transcribe` returns."""

    segments: list  # list[Segment]
    language: str
    language_probability: Optional[float]
    duration: float
    warnings: list  # list[str]
    model: ModelInfo


class EnvInfo(TypedDict):
    """What a replica reports about its own runtime env (`info()`), as strings."""

    app: str
    python: str
    python_executable: str
    ray: str
    packages: dict  # name -> version string
    device: str
    model: str
    loaded: bool
    load_error: Optional[str]
