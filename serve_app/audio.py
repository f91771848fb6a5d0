"""Decoding uploads with PyAV to 16 kHz mono float32."""

from __future__ import annotations

import io
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
    return audio
