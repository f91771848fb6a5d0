"""Decoding uploads with PyAV to 16 kHz mono float32."""

from __future__ import annotations

import io
from typing import Optional

import numpy as np

from deployments.contract import SAMPLE_RATE, InvalidAudioError


class UnsupportedMediaError(InvalidAudioError):
    """The upload is not an audio or video container with an audio track (HTTP 415)."""


def decode_audio(data: bytes, *, max_seconds: float) -> np.ndarray:
    """Decodes any container FFmpeg reads (wav, flac, mp3, m4a, ogg/opus, webm, video) to audio.

    Args:
        data: The uploaded bytes.
        max_seconds: Longest audio accepted; decoding stops as soon as it is exceeded.

    Returns:
        Mono float32 samples at 16 kHz.

    Raises:
        UnsupportedMediaError: Not a media file, or no audio stream in it.
        InvalidAudioError: Empty, truncated or corrupt audio, no samples, or too long.
    """
    import av

    if not data:
        raise InvalidAudioError("The uploaded file is empty.")
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except av.FFmpegError as e:
        raise UnsupportedMediaError(f"The file is not audio or video FFmpeg can read ({e}).") from e
    with container:
        if not container.streams.audio:
            raise UnsupportedMediaError("The file has no audio stream.")
        stream = container.streams.audio[0]
        declared = _declared_seconds(stream)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks = []
        total = 0
        limit = int(max_seconds * SAMPLE_RATE)
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    total += chunks[-1].size
                if total > limit:
                    raise InvalidAudioError(
                        f"The audio is longer than the limit of {max_seconds:g} s."
                    )
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except av.FFmpegError as e:
            # Transcribing the part before the damage would drop the rest without a word.
            raise InvalidAudioError(f"The audio is corrupt or truncated ({e}).") from e
    if not chunks:
        raise InvalidAudioError("The file contains no audio samples.")
    audio = np.concatenate(chunks).astype(np.float32, copy=False)
    if audio.size == 0:
        raise InvalidAudioError("The file contains no audio samples.")
    _check_complete(audio.size / SAMPLE_RATE, declared, max_seconds=max_seconds)
    return audio


def _declared_seconds(stream) -> Optional[float]:
    """The audio stream's duration as its header states it (Xing/LAME, STREAMINFO, RIFF, moov)."""
    if stream.duration is None or stream.time_base is None:
        return None
    return float(stream.duration * stream.time_base)


def _check_complete(decoded: float, declared: Optional[float], *, max_seconds: float) -> None:
    """Refuses audio that decodes to less than its header promises: a cut-off upload.

    FFmpeg decodes a truncated mp3 or wav without an error (the frames that are there are
    valid), so a transcript would silently end early. A declared length beyond `max_seconds`
    is a placeholder (streaming writers put 0xFFFFFFFF in the RIFF size), not a promise.
    """
    if declared is None or declared > max_seconds:
        return
    tolerance = 0.25 + 0.02 * declared  # encoder delay and padding, frame rounding
    if decoded < declared - tolerance:
        raise InvalidAudioError(
            f"The audio is truncated: its header declares {declared:.2f} s but only "
            f"{decoded:.2f} s could be decoded."
        )
