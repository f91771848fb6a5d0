"""Decoding uploads with PyAV to 16 kHz mono float32, from an allow-list of media containers."""

from __future__ import annotations

import io
import logging
from typing import Optional

import numpy as np

from deployments.contract import SAMPLE_RATE, InvalidAudioError


logger = logging.getLogger(__name__)

ACCEPTED_CONTAINERS = (
    "wav", "w64", "flac", "mp3", "ogg", "opus", "matroska", "mov", "aac", "ac3", "eac3", "amr", "amrnb", "amrwb",
    "aiff", "caf", "au", "wv", "avi", "asf", "flv", "mpegts", "mpeg",
)
"""FFmpeg demuxers an upload may be read with: audio files and the video containers recordings
come in (matroska covers webm and mkv; mov covers mp4, m4a and 3gp; asf wma and wmv). FFmpeg
probes every demuxer it has otherwise, and some of them open other files or streams (concat
scripts, hls and other playlists, image sequences, sdp): an upload that is one of those would
be transcribed as files from the server's own disk."""

OPEN_OPTIONS = {"format_whitelist": ",".join(ACCEPTED_CONTAINERS), "protocol_whitelist": "none"}
"""avformat options for every upload: the demuxer allow-list, and no protocol at all, so that
nothing an upload names is opened (the upload itself is read from memory, not by a protocol)."""

# Leading bytes of the accepted containers: such a file that FFmpeg cannot open is damaged or
# cut off (400), not of an unsupported kind (415).
_SIGNATURES = (b"RIFF", b"RF64", b"fLaC", b"OggS", b"ID3", b"\x1aE\xdf\xa3", b"FORM", b"caff", b".snd", b"wvpk", b"#!AMR", b"riff")


class UnsupportedMediaError(InvalidAudioError):
    """The upload is not an audio or video container with an audio track (HTTP 415)."""


class TruncatedAudioError(InvalidAudioError):
    """The audio ends before its container says it does: a cut-off upload (HTTP 400)."""


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
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore", options=OPEN_OPTIONS)
    except av.FFmpegError as e:
        logger.info("Refused an upload of %d bytes: %s", len(data), e)
        if _looks_like_accepted_media(data):
            raise InvalidAudioError("The audio file is damaged or cut off: its container could not be read.") from e
        raise UnsupportedMediaError(
            "The file is not an audio or video format this service reads (wav, flac, mp3, ogg/opus, "
            "webm/mkv, mp4/m4a/mov, aac, amr, aiff and the like)."
        ) from e
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
            logger.info("Refused an upload that failed to decode after %.1f s: %s", total / SAMPLE_RATE, e)
            raise InvalidAudioError(f"The audio is damaged or cut off: it could not be decoded after {total / SAMPLE_RATE:.2f} s.") from e
    if not chunks:
        raise InvalidAudioError("The file contains no audio samples.")
    audio = np.concatenate(chunks).astype(np.float32, copy=False)
    if audio.size == 0:
        raise InvalidAudioError("The file contains no audio samples.")
    _check_complete(audio.size / SAMPLE_RATE, _declared_wav_seconds(data) or declared, max_seconds=max_seconds)
    if data[:4] == b"OggS" and not _ogg_ends_with_last_page(data):
        raise TruncatedAudioError(
            f"The audio is truncated: the Ogg stream has no final page ({audio.size / SAMPLE_RATE:.2f} s could be decoded)."
        )
    return audio


def _looks_like_accepted_media(data: bytes) -> bool:
    head = data[:12]
    return (
        head.startswith(_SIGNATURES)
        or head[4:8] == b"ftyp"  # mp4, m4a, mov, 3gp
        or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)  # an MPEG audio frame (mp3, aac ADTS)
    )


def _declared_wav_seconds(data: bytes) -> Optional[float]:
    """The length a RIFF/WAVE header's data chunk declares (FFmpeg caps it at the bytes present,
    so a cut-off wav decodes as if whole)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, byte_rate = 12, 0
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if chunk == b"fmt " and pos + 20 <= len(data):
            byte_rate = int.from_bytes(data[pos + 16 : pos + 20], "little")
        elif chunk == b"data":
            # 0 and 0xFFFFFFFF are what streaming writers put before they know the size.
            return size / byte_rate if byte_rate and size not in (0, 0xFFFFFFFF) else None
        pos += 8 + size + (size & 1)
    return None


def _ogg_ends_with_last_page(data: bytes) -> bool:
    """Whether the last Ogg page in `data` is whole and marked end-of-stream (header type bit 2)."""
    start = data.rfind(b"OggS")
    if start < 0 or start + 27 > len(data):
        return False
    segments = data[start + 26]
    if start + 27 + segments > len(data):
        return False
    body = sum(data[start + 27 : start + 27 + segments])
    return bool(data[start + 5] & 0x04) and start + 27 + segments + body <= len(data)


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
        raise TruncatedAudioError(
            f"The audio is truncated: its header declares {declared:.2f} s but only "
            f"{decoded:.2f} s could be decoded."
        )
