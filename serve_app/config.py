"""Ingress settings: one pydantic-settings object, from the Serve config's `args:` and the env."""

from __future__ import annotations

import functools
from typing import Annotated, Dict, List, Optional, Union

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ModelName = str
"""A model's name in requests and config: a key of `IngressSettings.model_apps`."""

AUTO_NAMES = ("auto", "whisper-1")
"""Request `model` values that mean "route by language"; no model may be called so."""


class LanguageIdSettings(BaseModel):
    """Spoken-language identification in the ingress (Whisper's language ID, faster-whisper)."""

    model: str = Field("base", description="faster-whisper model name or CTranslate2 directory.")
    device: str = Field("cpu", description="Device for language ID; the ingress has no GPU by default.")
    compute_type: str = Field("int8", description="CTranslate2 compute type (int8 is fastest on CPU).")
    cpu_threads: int = Field(2, ge=0, description="CTranslate2 threads for language ID.")
    max_seconds: float = Field(8.0, gt=0, le=30, description="Speech (after VAD trimming) that language ID listens to; the encoder's cost grows with it (bench/langid_latency.py).")
    min_seconds: float = Field(5.0, ge=0, le=30, description="Shorter speech is padded with silence to this length, as Whisper's training windows were.")
    scan_seconds: float = Field(120.0, gt=0, description="How far into the recording the VAD looks for speech.")
    threshold: float = Field(0.5, ge=0, le=1, description="Below this probability the detected language is not trusted and `default_model` serves.")
    model_cache: Optional[str] = Field(None, description="Download directory for a model name.")
    local_files_only: bool = Field(False, description="Never reach the hub for the language-ID model.")
    listen_points: int = Field(5, ge=1, le=20, description="A recording of at least `listen_points_min_seconds` is heard at this many evenly spread points, and routed by the language most of them hear (weighted by confidence): a meeting that opens with small talk in another language goes by its majority.")
    listen_points_min_seconds: float = Field(600.0, gt=0, description="Shorter recordings are routed by their first speech.")
    per_stretch: bool = Field(True, description="Mixed-language recordings: identify the language of each stretch of speech between pauses and send each run of one language to the model it routes to (`serve_app/stretches.py`). Off: one language per recording. Requests that name a model or a language are never split; their language is only checked.")
    per_stretch_min_seconds: float = Field(20.0, gt=0, description="Recordings shorter than this keep one language (a clip is one utterance; language ID per stretch would only cost time).")
    stretch_min_silence_ms: int = Field(300, ge=50, description="A pause at least this long separates two stretches.")
    stretch_seconds: float = Field(5.0, gt=0, le=30, description="Speech of each stretch that language ID listens to (from its start; shorter stretches are padded with silence, which is how Whisper was trained).")
    stretch_threshold: float = Field(0.8, ge=0, le=1, description="Confidence from which a stretch's language counts as heard (length-weighted over neighbours heard alike). Above `threshold`: on single-language recordings stretches were heard as Latin, Greek or Japanese at 0.53-0.61 and Russian at 0.82 (2.2 s).")
    stretch_min_sure_seconds: float = Field(2.5, ge=0, description="Less speech than this in one language (neighbouring stretches together) takes the language of the speech around it: on a second or two Whisper's language token drifts.")
    batch_size: int = Field(8, ge=1, description="Stretches whose language is identified in one encoder pass.")
    check_requested: bool = Field(True, description="A request that names its model or language is still heard (its first speech; stretch by stretch from `per_stretch_min_seconds`): speech confidently in a language the named model does not decode, or other than the named language, gets a warning in the result.")


    @model_validator(mode="after")
    def _check_lengths(self) -> "LanguageIdSettings":
        if self.min_seconds > self.max_seconds:
            raise ValueError(f"Got min_seconds={self.min_seconds} > max_seconds={self.max_seconds} for language_id.")
        return self


class PieceSettings(BaseModel):
    """Recordings travel to the model apps in pieces cut at quiet moments (`serve_app/pieces.py`):
    each replica holds one piece at a time however long the recording, and each piece's
    segments can be streamed as soon as it is done."""

    seconds: float = Field(240.0, ge=5, description="Longest piece; a recording no longer than this goes whole. Longer pieces batch more windows per model call; memory grows with it (1 MB per 16 s).")
    first_seconds_streaming: float = Field(30.0, ge=5, description="Longest first piece of a streamed transcription: the first segments arrive after this much audio is transcribed.")
    cut_search_seconds: float = Field(20.0, ge=1, description="A cut falls at the quietest moment in the last this-many seconds before a piece's limit.")

    @model_validator(mode="after")
    def _check_lengths(self) -> "PieceSettings":
        if self.cut_search_seconds >= min(self.seconds, self.first_seconds_streaming):
            raise ValueError(f"Got cut_search_seconds={self.cut_search_seconds}; it must be below seconds and first_seconds_streaming.")
        return self


class SubtitleSettings(BaseModel):
    """Subtitle-ready segments (`serve_app/subtitles.py`): what the ingress returns by default."""

    enabled: bool = Field(True, description="Return subtitle segments; False returns the model's own segments (a request can also ask with `segmentation=raw`).")
    min_seconds: float = Field(1.0, ge=0, description="Shortest cue: shorter ones are merged with a neighbour or kept on screen longer.")
    max_seconds: float = Field(7.0, gt=0, description="Longest cue: longer segments are split.")
    max_chars: int = Field(200, gt=0, description="Most characters in one cue.")
    max_merge_gap_seconds: float = Field(1.5, ge=0, description="Two cues further apart than this are never merged.")
    extend_short: bool = Field(True, description="Keep a cue shorter than `min_seconds` on screen into the silence around it.")

    @model_validator(mode="after")
    def _check_lengths(self) -> "SubtitleSettings":
        if self.min_seconds >= self.max_seconds:
            raise ValueError(f"Got min_seconds={self.min_seconds} >= max_seconds={self.max_seconds} for subtitles.")
        return self


class JobSettings(BaseModel):
    """Transcription jobs (`/v1/audio/transcriptions/jobs`, `serve_app/jobs/`): records and
    results in a database, uploads in a media directory, run by the `JobRunner` deployment."""

    enabled: bool = Field(True, description="Serve the job API and deploy the job runner.")
    data_dir: str = Field("/var/lib/klipnote", description="Where the SQLite database (when `database_url` is unset) and the media directory live. On a cluster of several nodes the media directory must be storage every node mounts at the same path (NFS, a shared volume): the ingress that stores an upload and the runner that reads it may be on different nodes.")
    database_url: Optional[str] = Field(None, description="SQLAlchemy URL of the job database, e.g. postgresql+psycopg://user:password@host/klipnote; None: SQLite at <data_dir>/jobs.sqlite3 (one node only). From the env: KLIPNOTE_JOBS__DATABASE_URL.", repr=False)
    media_dir: Optional[str] = Field(None, description="Uploads of jobs until they end; None: <data_dir>/media.")
    max_running: int = Field(2, ge=0, description="Jobs one runner replica transcribes at once; 0 pauses the runner (jobs stay queued).")
    max_running_per_model: Dict[ModelName, int] = Field(default_factory=dict, description="At most this many running jobs served by a model (the model routing picked for the job's start), per runner replica; a job over it waits, in stage 'Waiting for <model>'.")
    max_queued: int = Field(1000, ge=1, description="More queued jobs than this and a submission gets 429 (jobs_queue_full).")
    max_media_bytes: int = Field(100 * 1024**3, gt=0, description="Bytes of uploads the media directory holds for jobs at most (queued and running ones; a job's upload is removed when it ends). A submission that would go past it gets 429 (jobs_media_full) and leaves nothing behind. 100 GiB: about fifty of the largest uploads (`max_upload_bytes`).")
    lease_s: float = Field(30.0, gt=0, description="A runner holds a running job for this long and renews it every third of it; a job whose runner died is picked up again once its lease runs out.")
    poll_s: float = Field(1.0, gt=0, description="How often an idle runner looks for queued jobs, expired results and due webhooks.")
    max_attempts: int = Field(3, ge=1, description="Runs of one job at most: a job whose runner died this many times fails (job_attempts_exhausted) instead of taking the next runner down too.")
    model_wait_s: float = Field(600.0, ge=0, description="A job whose model apps are unavailable or overloaded (while the cluster starts, say) waits and tries again for this long before it fails with that error.")
    public_url: Optional[str] = Field(None, description="The URL clients reach the service at (https://stt.example.com): webhook notifications carry absolute links with it; None: links are paths.")
    retention_s: float = Field(7 * 86400, gt=0, description="A finished job's record, result and media are removed this long after it ended (GET then answers 404).")
    webhook_secret: Optional[str] = Field(None, description="HMAC-SHA256 key of the X-KlipNote-Signature header on webhook deliveries; None sends them unsigned. From the env: KLIPNOTE_JOBS__WEBHOOK_SECRET.", repr=False)
    webhook_max_attempts: int = Field(6, ge=1, description="Deliveries of one notification at most (the first included).")
    webhook_backoff_s: float = Field(2.0, gt=0, description="First retry of a failed delivery after this long, doubling each time, at most `webhook_max_backoff_s`.")
    webhook_max_backoff_s: float = Field(300.0, gt=0)
    webhook_timeout_s: float = Field(10.0, gt=0, description="How long one delivery waits for the receiver's answer.")
    allow_private_callbacks: bool = Field(False, description="Allow callback URLs on private, loopback and link-local addresses (a receiver inside your network). Off, they are refused at submission and again before each delivery.")

    @field_validator("webhook_secret", "database_url", "media_dir", "public_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, v):
        return None if isinstance(v, str) and not v.strip() else v

    def database(self) -> str:
        """The database URL, the SQLite default filled in."""
        return self.database_url or f"sqlite:///{self.data_dir.rstrip('/')}/jobs.sqlite3"

    def media(self) -> str:
        return self.media_dir or f"{self.data_dir.rstrip('/')}/media"


class IngressSettings(BaseSettings):
    """Everything the ingress application is configured with.

    Values come from the Serve config's `args:` first, then `KLIPNOTE_*` environment variables
    (nested with "__", e.g. `KLIPNOTE_LANGUAGE_ID__THRESHOLD=0.6`), then the defaults below.
    """

    model_config = SettingsConfigDict(env_prefix="KLIPNOTE_", env_nested_delimiter="__", extra="forbid")

    model_apps: Dict[ModelName, str] = Field(
        default_factory=lambda: {"belle2": "belle2", "whisperx": "whisperx"},
        description="The model applications: model name (what a request's `model` and the settings below use) -> "
        "Serve application name. A list of names means each model's application has its name. Each app declares "
        "its languages, tasks and options itself (its `spec()`); nothing else lists models.",
    )
    routes: Dict[str, ModelName] = Field(
        default_factory=lambda: {"zh": "belle2", "yue": "belle2"},
        description="Model per detected or requested language (ISO 639-1 code).",
    )
    default_model: ModelName = Field("whisperx", description="Model for languages not in `routes`, and for low-confidence detection.")
    fallback_model: Optional[ModelName] = Field("whisperx", description="Model that serves when the routed one is missing, unhealthy, overloaded or fails; None disables fallback.")
    max_upload_bytes: int = Field(2 * 1024**3, gt=0, description="Largest accepted upload; spooled to a temporary file (TMPDIR) while it arrives, never held in memory. 2 GiB fits three hours of 128 kbps audio or a meeting video; OpenAI's own limit is 25 MiB (26214400).")
    max_audio_seconds: float = Field(3 * 3600, gt=0, description="Longest accepted audio after decoding.")
    request_timeout_s: float = Field(900.0, gt=0, description="How long the ingress waits for a model app's answer on one piece of a recording (`pieces.seconds`) before answering 504; a long recording making progress is never cut.")
    max_in_flight: int = Field(48, ge=1, description="HTTP transcriptions one ingress replica serves at once, at most; fewer while its model apps' running replicas and queues cannot take that many (`capacity_refresh_s`); more get 503 with Retry-After at once. Keep it below the deployment's max_ongoing_requests so the excess reaches the replica to be told.")
    capacity_refresh_s: float = Field(5.0, ge=0, description="How often (at most) the ingress reads its model apps' running replicas and queue sizes from Serve, to admit no more than they can take (serve_app/admission.py, `ModelCapacity`); scaling a model app out raises the limit. 0: `max_in_flight` alone.")
    retry_after_s: int = Field(5, ge=1, description="Retry-After (seconds) on a 503 for an overloaded ingress or model.")
    api_keys: Annotated[List[str], NoDecode] = Field(
        default_factory=list,
        description="When set, every route but /health, / and the docs needs `Authorization: Bearer <key>` (401 otherwise). "
        "Each entry a key, or 'sha256:<hex>' of one. From the env: KLIPNOTE_API_KEYS, comma-separated.",
        repr=False,
    )
    upload_idle_timeout_s: float = Field(30.0, gt=0, description="An upload whose body sends nothing for this long is dropped (408).")
    expose_paths: bool = Field(False, description="Admin flag: `GET /v1/info` and verbose_json's `model_info` show server paths (interpreters, model directories); off, they show versions and names only.")
    language_id: LanguageIdSettings = Field(default_factory=LanguageIdSettings)
    subtitles: SubtitleSettings = Field(default_factory=SubtitleSettings)
    pieces: PieceSettings = Field(default_factory=PieceSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_from_text(cls, v: Union[str, List[str]]):
        return [k for k in v.split(",")] if isinstance(v, str) else v

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, v: List[str]) -> List[str]:
        from serve_app.guards import ApiKeys

        ApiKeys(v)  # a malformed sha256: entry fails the deploy, naming the setting
        return [k.strip() for k in v if k.strip()]

    @field_validator("model_apps", mode="before")
    @classmethod
    def _apps_from_list(cls, v: Union[Dict[str, str], List[str]]):
        return {name: name for name in v} if isinstance(v, (list, tuple)) else v

    @field_validator("model_apps")
    @classmethod
    def _check_model_names(cls, v: Dict[str, str]) -> Dict[str, str]:
        if not v:
            raise ValueError("Got no model_apps; at least one model application is needed.")
        reserved = sorted(set(v) & set(AUTO_NAMES))
        if reserved:
            raise ValueError(f"Got {reserved} in model_apps; {list(AUTO_NAMES)} mean routing by language and cannot name a model.")
        return v

    @field_validator("routes")
    @classmethod
    def _lowercase_languages(cls, v: Dict[str, str]) -> Dict[str, str]:
        return {k.lower(): m for k, m in v.items()}

    @model_validator(mode="after")
    def _check_models_are_deployed(self) -> "IngressSettings":
        known = sorted(self.model_apps)
        named = [("default_model", self.default_model)]
        if self.fallback_model is not None:
            named.append(("fallback_model", self.fallback_model))
        named += [(f"routes[{language!r}]", model) for language, model in self.routes.items()]
        for setting, model in named:
            if model not in self.model_apps:
                raise ValueError(f"Got {model!r} for {setting}; it has no entry in model_apps ({known}).")
        return self

    def route(self, language: Optional[str]) -> ModelName:
        """The model configured for `language` (None: unknown language)."""
        if language is None:
            return self.default_model
        return self.routes.get(language.lower(), self.default_model)


@functools.lru_cache(maxsize=1)
def get_config() -> IngressSettings:
    """Settings from the environment alone, loaded once (for tools and tests)."""
    return IngressSettings()
