"""Start-up checks and helpers shared by the model replicas (stdlib, numpy and ray only)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import sys
from typing import Iterable, Mapping, Optional

import numpy as np
import ray
from pydantic import BaseModel, Field, field_validator

from deployments.contract import SAMPLE_RATE, InvalidAudioError, ModelUnavailableError
from deployments.pinned_decode import MAX_PINNED_DECODE_TOKENS

logger = logging.getLogger(__name__)


class EnvironmentMismatchError(RuntimeError):
    """A replica's Ray or Python version differs from the cluster's."""


def local_versions() -> dict:
    """The Ray and Python versions of this process, as strings."""
    return {"ray_version": ray.__version__, "python_version": platform.python_version()}


def cluster_versions() -> Optional[dict]:
    """The Ray and Python versions the cluster's head was started with.

    Ray records them in the GCS when the head starts (the "cluster metadata"); they are what
    Ray itself compares against, but Ray only logs a warning on a mismatch.

    Returns:
        A dict with "ray_version" and "python_version", or None if the cluster has no record.
    """
    # Private Ray API: the key and namespace `ray._common.usage.usage_lib` writes at head start.
    from ray._common.usage.usage_constants import CLUSTER_METADATA_KEY
    from ray._private.ray_constants import KV_NAMESPACE_CLUSTER
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(CLUSTER_METADATA_KEY, namespace=KV_NAMESPACE_CLUSTER)
    if not raw:
        return None
    meta = json.loads(raw)
    return {"ray_version": meta.get("ray_version"), "python_version": meta.get("python_version")}


def compare_versions(local: Mapping[str, str], cluster: Mapping[str, str]) -> None:
    """Raises if the local Ray or Python version differs from the cluster's.

    Python is compared on major.minor.micro, as Ray pickles code across processes and a
    different interpreter can fail to unpickle it in ways that surface much later.

    Raises:
        EnvironmentMismatchError: The versions differ; the message names both.
    """
    problems = [
        f"{key.split('_')[0]} {local[key]} here but {cluster[key]} on the cluster"
        for key in ("ray_version", "python_version")
        if cluster.get(key) is not None and local.get(key) != cluster[key]
    ]
    if problems:
        raise EnvironmentMismatchError(
            f"This replica ({sys.executable}) does not match its Ray cluster: "
            + "; ".join(problems)
            + ". Rebuild its runtime env with the cluster's versions (runtime_envs/)."
        )


def check_environment() -> dict:
    """Fails loudly when this process's Ray or Python differs from the cluster's.

    Returns:
        The local versions, for logging and `info()`.

    Raises:
        EnvironmentMismatchError: The versions differ.
    """
    local = local_versions()
    cluster = cluster_versions()
    if cluster is None:
        logger.warning("The cluster has no version record; skipping the version check.")
    else:
        compare_versions(local, cluster)
    return local


def package_versions(names: Iterable[str]) -> dict:
    """Installed versions of the named distributions as plain strings ("absent" if missing).

    `importlib.metadata` gives `str`, never a library's own version class (torch's
    `TorchVersion` would not unpickle in an env without torch).
    """
    out = {}
    for name in names:
        try:
            out[name] = str(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def assigned_gpu_fraction() -> float:
    """The share of one GPU Ray scheduled this replica with (0 when it has none)."""
    ctx = ray.get_runtime_context()
    if not ctx.get_accelerator_ids().get("GPU"):
        return 0.0
    try:
        resources = ctx.get_assigned_resources()
    except Exception:  # outside an actor (e.g. a test calling this directly)
        return 0.0
    return float(resources.get("GPU", 0.0))


def cap_torch_gpu_memory(fraction: Optional[float]) -> Optional[float]:
    """Caps this process's PyTorch allocations to its share of the GPU.

    Ray's fractional GPUs are a scheduling label only: two replicas at 0.5 each can still take
    the whole card. The caching allocator refuses to grow past the cap instead.

    Args:
        fraction: Share of device memory this replica may use; None means the Ray-assigned share.

    Returns:
        The fraction applied, or None when there is no GPU.
    """
    import torch

    if not torch.cuda.is_available():
        return None
    if fraction is None:
        fraction = assigned_gpu_fraction() or 1.0
    fraction = min(max(fraction, 0.05), 1.0)
    torch.cuda.set_per_process_memory_fraction(fraction)
    logger.info("Capped this replica's GPU memory to %.2f of the device.", fraction)
    return fraction


def validate_audio(audio: np.ndarray, *, max_seconds: Optional[float] = None) -> np.ndarray:
    """Checks a waveform and returns a writable float32 copy.

    Arrays that arrive through Ray are read-only views of the object store; torch refuses
    those (`torch.from_numpy` warns and writes would crash), so every replica copies first.

    Raises:
        InvalidAudioError: Not a 1-D float array, empty, or longer than `max_seconds`.
    """
    if not isinstance(audio, np.ndarray) or audio.ndim != 1:
        shape = getattr(audio, "shape", type(audio).__name__)
        raise InvalidAudioError(f"Got audio of shape {shape}; expected mono 1-D samples.")
    if audio.size == 0:
        raise InvalidAudioError("Got empty audio (0 samples).")
    if not np.issubdtype(audio.dtype, np.floating):
        raise InvalidAudioError(f"Got audio of dtype {audio.dtype}; expected float32 in [-1, 1].")
    if max_seconds is not None and audio.size > max_seconds * SAMPLE_RATE:
        raise InvalidAudioError(
            f"Got {audio.size / SAMPLE_RATE:.1f} s of audio; this app accepts at most {max_seconds} s."
        )
    return np.array(audio, dtype=np.float32, copy=True)


def configure_offline(model_cache: Optional[str]) -> None:
    """Points the Hugging Face cache at `model_cache` (if given) for this process."""
    if model_cache:
        os.environ.setdefault("HF_HOME", model_cache)


class ModelAppArgs(BaseModel):
    """Settings every model application has, filled from the Serve config's `args:`."""

    device: str = Field("auto", description="'cuda', 'cpu' or 'auto' (cuda when available).")
    model_cache: Optional[str] = Field(None, description="Hugging Face cache directory for downloaded models.")
    local_files_only: bool = Field(False, description="Never reach the hub; load from the cache or a local directory only.")
    gpu_memory_fraction: Optional[float] = Field(None, gt=0, le=1, description="Share of the GPU this replica may use; default: its Ray num_gpus.")
    max_audio_seconds: float = Field(4 * 3600, gt=0, description="Longest audio accepted.")
    pinned_decode_tokens: Optional[int] = Field(
        None,
        ge=1,
        le=MAX_PINNED_DECODE_TOKENS,
        description="Benchmark only, for random weights (bench/random_whisper.py): every window decodes exactly this "
        "many tokens, once, at one temperature, none skipped as silence; results say so in `warnings` "
        "(deployments/pinned_decode.py). None decodes normally.",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda"):
            raise ValueError(f"Got {v!r} for device; expected 'auto', 'cpu' or 'cuda'.")
        return v


def resolve_device(device: str) -> str:
    """'auto' becomes 'cuda' when a GPU is visible, else 'cpu'.

    Raises:
        ModelUnavailableError: 'cuda' was configured but this replica sees no GPU.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailableError("device 'cuda' was configured but this replica sees no GPU.")
    return device


def set_torch_threads(threads: int) -> None:
    """Sets PyTorch's CPU intra-op threads for the calling thread; 0 leaves them as they are.

    `torch.set_num_threads` reaches OpenMP only in the thread that calls it, and replicas decode
    in worker threads (`asyncio.to_thread`), which start from OMP_NUM_THREADS (1 in our Serve
    configs, so that replicas do not oversubscribe their cores). So each decoding call sets it
    again: set only in `__init__`, a replica configured for 2 threads decoded on 1 (BELLE-2's
    4.3 s clip took 3.4 s instead of 2.4 s).
    """
    if threads:
        import torch

        torch.set_num_threads(threads)  # get_num_threads() reads a process-wide value: no shortcut


def process_memory(reset_peak: bool = False) -> dict:
    """This process's resident memory now and at its peak (Linux /proc), as builtins.

    Model replicas return it from `memory()` so that bench/ can record peak RSS per replica
    without reaching into the cluster's processes.

    Args:
        reset_peak: First reset the peak to the current RSS (Linux `clear_refs`), so that a
            later call reports the peak of what ran in between.
    """
    if reset_peak:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # "5" resets the peak RSS (VmHWM); see proc(5)
        except OSError:
            logger.warning("Could not reset the peak RSS (not Linux?).")
    fields = {"VmRSS": "rss_bytes", "VmHWM": "peak_rss_bytes"}
    out = {"pid": os.getpid(), "rss_bytes": 0, "peak_rss_bytes": 0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in fields:
                    out[fields[key]] = int(value.split()[0]) * 1024
    except OSError:  # not Linux: report zeros rather than fail a bench
        pass
    return out
