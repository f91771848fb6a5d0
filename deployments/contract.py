"""The contract between the ingress and the model applications.

Everything that crosses a DeploymentHandle between two runtime envs is a builtin or a numpy
array: a class defined in one env (a pydantic model, a `TorchVersion` string) does not unpickle
in another. So options travel as a plain dict (`TranscribeOptions.to_dict()`, converted back
once with `TranscribeOptions.from_dict()` inside the model app), and results are plain dicts
shaped by the TypedDicts below. This module imports the standard library only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, FrozenSet, List, Literal, Mapping, NamedTuple, Optional, Tuple, TypedDict

from deployments.languages import normalize_language

SAMPLE_RATE = 16_000
"""Every model app takes mono float32 audio at this rate."""

Task = Literal["transcribe", "translate"]
Script = Literal["simplified", "traditional"]


class InvalidOptionsError(ValueError):
    """Raised when a request's options are malformed; the ingress maps it to HTTP 400."""


class UnsupportedLanguageError(InvalidOptionsError):
    """The request names a language no Whisper model knows; mapped to HTTP 400 on `language`."""


class InvalidAudioError(ValueError):
    """Raised when audio cannot be used (wrong shape, dtype, empty); mapped to HTTP 400."""


class ModelUnavailableError(RuntimeError):
    """Raised when a model app cannot serve (not loaded, load failed); the ingress may fall back."""


class UnsupportedOptionError(InvalidOptionsError):
    """A request chose a model explicitly and asked for an option that model does not honour."""

    def __init__(self, message: str, *, option: str):
        super().__init__(message)
        self.option = option

    def __reduce__(self):  # keyword arguments do not survive pickling on their own
        return (_unsupported_option_error, (str(self), self.option))


def _unsupported_option_error(message: str, option: str) -> "UnsupportedOptionError":
    return UnsupportedOptionError(message, option=option)


class ModelFailedError(RuntimeError):
    """A model app failed while transcribing; carries the original error's type and message.

    The replica base converts any other exception to this one: a torch or transformers
    exception class does not unpickle in the ingress env.
    """


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
        if self.language is not None:
            try:
                object.__setattr__(self, "language", normalize_language(self.language))
            except ValueError as e:
                raise UnsupportedLanguageError(str(e)) from None
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


WORDS_FROM_ALIGNER = "wav2vec2"
WORDS_FROM_CROSS_ATTENTION = "whisper-cross-attention"
"""Where a result's word times come from (`TranscriptionResult.word_times`): a wav2vec2 CTC
aligner (WhisperX), or the Whisper model's own alignment heads (any model, offline)."""


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
    word_times: Optional[str]
    """Where word times come from: "wav2vec2" (an aligner), "whisper-cross-attention" (the
    model's alignment heads); None when no words were asked for."""


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
    warnings: list  # list[str]: what the replica turned off or could not do at start (patch guards)


class ModelSpec(NamedTuple):
    """What a model application is for and what it honours, declared by the app itself.

    Each model app returns `to_dict()` from its `spec()` handle method; the ingress builds its
    model names, `/v1/models`, translation routing, language-ID skipping and the check of
    request options from these, never from model names written into its code.

    Attributes:
        name: The plug-in's name ("belle2"); the ingress's model name is its `model_apps` key.
        description: One line for `/v1/models`.
        languages: ISO 639-1 codes the model is meant for; empty means every Whisper language.
        tasks: "transcribe" and/or "translate".
        options: The `TranscribeOptions` fields it honours (language and task are judged by
            `languages` and `tasks`).
        detects_language: It identifies the spoken language itself when none is given, so the
            ingress need not run its own language ID before calling it.
        aliases: Further names a request's `model` may use for it.
    """

    name: str
    description: str = ""
    languages: Tuple[str, ...] = ()
    tasks: Tuple[str, ...] = ("transcribe",)
    options: FrozenSet[str] = frozenset()
    detects_language: bool = False
    aliases: Tuple[str, ...] = ()

    @property
    def word_timestamps(self) -> bool:
        """It produces word times."""
        return "word_timestamps" in self.options

    @property
    def speakers(self) -> bool:
        """It labels speakers (diarization)."""
        return "diarize" in self.options

    @property
    def script_choice(self) -> bool:
        """It writes Chinese in the script a request asks for."""
        return "script" in self.options

    def to_dict(self) -> dict:
        """The spec as builtins, safe to send to any env."""
        return {
            "name": self.name,
            "description": self.description,
            "languages": list(self.languages),
            "tasks": list(self.tasks),
            "options": sorted(self.options),
            "detects_language": self.detects_language,
            "aliases": list(self.aliases),
            "capabilities": {
                "word_timestamps": self.word_timestamps,
                "speakers": self.speakers,
                "script_choice": self.script_choice,
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelSpec":
        """The spec a model app sent (`to_dict()`); derived keys are ignored."""
        return cls(
            name=str(data["name"]),
            description=str(data.get("description", "")),
            languages=tuple(data.get("languages", ())),
            tasks=tuple(data.get("tasks", ("transcribe",))),
            options=frozenset(data.get("options", ())),
            detects_language=bool(data.get("detects_language", False)),
            aliases=tuple(data.get("aliases", ())),
        )


class UnhonouredOption(NamedTuple):
    """An option of a request that a model would not apply, and why."""

    option: str
    """The `TranscribeOptions` field."""
    reason: str
    """Why, naming the model: "belle2 does not produce word timestamps"."""


_OPTION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TranscribeOptions)}
_OPTION_WHAT = {
    "initial_prompt": "take a prompt",
    "temperature": "take temperatures",
    "beam_size": "take a beam size",
    "word_timestamps": "produce word timestamps",
    "diarize": "label speakers",
    "min_speakers": "label speakers",
    "max_speakers": "label speakers",
    "script": "convert Chinese script",
}


def unhonoured_options(spec: ModelSpec, opts: TranscribeOptions) -> List[UnhonouredOption]:
    """The options of `opts` that the model of `spec` would not apply (defaults never count).

    Args:
        spec: The model's declared spec.
        opts: A request's options.

    Returns:
        One entry per option, in `TranscribeOptions` field order; empty when all apply.
    """
    out: List[UnhonouredOption] = []
    if opts.language and spec.languages and opts.language not in spec.languages:
        out.append(UnhonouredOption("language", f"{spec.name} decodes {'/'.join(spec.languages)} only"))
    if opts.task not in spec.tasks:
        out.append(UnhonouredOption("task", f"{spec.name} does not {opts.task}"))
    for name, default in _OPTION_DEFAULTS.items():
        if name in ("language", "task") or name in spec.options:
            continue
        value = getattr(opts, name)
        if name == "temperature":
            value, default = tuple(value), tuple(default)
        if value != default:
            out.append(UnhonouredOption(name, f"{spec.name} does not {_OPTION_WHAT.get(name, 'take ' + name)}"))
    return out


def without_options(opts: TranscribeOptions, names) -> TranscribeOptions:
    """`opts` with the named options back at their defaults (language: None)."""
    names = set(names)
    if not names:
        return opts
    return dataclasses.replace(opts, **{n: _OPTION_DEFAULTS[n] for n in names})


def describe_unhonoured(items: List[UnhonouredOption], opts: TranscribeOptions) -> str:
    """One sentence for a refusal: "Got word_timestamps=True, but belle2 does not produce word timestamps."."""
    return " ".join(f"Got {i.option}={getattr(opts, i.option)!r}, but {i.reason}." for i in items)
