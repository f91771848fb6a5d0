"""Decoding uploads with PyAV to 16 kHz mono float32, from an allow-list of media containers."""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from typing import BinaryIO, Iterator, List, Optional, Tuple, Union

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


class ReaderClosedError(RuntimeError):
    """The reader was closed while its audio was still being read (the request ended)."""


AudioSource = Union[bytes, BinaryIO, str, "os.PathLike[str]"]
"""An upload: its bytes, a readable binary file (the spool file of an HTTP upload), or a path
of a file the service itself wrote."""

_EDGE_BYTES = 70_000
"""How much of a file's head and tail the container checks read (an Ogg page is at most
65,307 bytes; RIFF headers sit at the start)."""


def decode_audio(source: AudioSource, *, max_seconds: float) -> np.ndarray:
    """Decodes any container FFmpeg reads (wav, flac, mp3, m4a, ogg/opus, webm, video) to audio.

    Holds the whole recording in memory: for short audio and tests. Long recordings go through
    `AudioReader.blocks`.

    Args:
        source: The upload (bytes, a binary file or a path).
        max_seconds: Longest audio accepted; decoding stops as soon as it is exceeded.

    Returns:
        Mono float32 samples at 16 kHz.

    Raises:
        UnsupportedMediaError: Not a media file, or no audio stream in it.
        InvalidAudioError: Empty, truncated or corrupt audio, no samples, or too long.
    """
    with AudioReader(source, max_seconds=max_seconds) as reader:
        return np.concatenate(list(reader.blocks()))


class AudioReader:
    """Decodes an upload block by block to 16 kHz mono float32, from an allow-list of containers.

    Memory stays at one block however long the recording: a file is read by FFmpeg as it
    decodes, never loaded whole. Use as a context manager; `blocks()` raises the same errors
    as `decode_audio`, the truncation checks after the last block.

    `close()` may be called from any thread at any time: FFmpeg's container must not be closed
    while another thread reads from it (the process dies), so a close that comes while a block
    or excerpt is being read is carried out by the reading thread as soon as it lets go, and
    `blocks()` then raises `ReaderClosedError`. A file-like source is read through a handle of
    the reader's own, so whoever spooled the upload may close it at any time as well.
    """

    def __init__(self, source: AudioSource, *, max_seconds: float, block_seconds: float = 30.0, truncation_is_warning: bool = False):
        """
        Args:
            truncation_is_warning: A recording that ends before its container says it does is
                transcribed as far as it goes, with a warning (`warnings()`), rather than
                refused: for streamed answers, which cannot turn into a 400 once they started.
        """
        import av

        self.max_seconds = max_seconds
        self._truncation_is_warning = truncation_is_warning
        self._warnings: List[str] = []
        self._block = int(block_seconds * SAMPLE_RATE)
        self._lock = threading.Lock()
        self._close_requested = False
        self._closed = False
        self._file, self._owned = _binary_file(source)
        self._head, self._tail, size = _edges(self._file)
        if size == 0:
            self._close_file()
            raise InvalidAudioError("The uploaded file is empty.")
        try:
            self._container = _open_container(self._file)
        except av.FFmpegError as e:
            self._close_file()
            logger.info("Refused an upload of %d bytes: %s", size, e)
            if _looks_like_accepted_media(self._head):
                raise InvalidAudioError("The audio file is damaged or cut off: its container could not be read.") from e
            raise UnsupportedMediaError(
                "The file is not an audio or video format this service reads (wav, flac, mp3, ogg/opus, "
                "webm/mkv, mp4/m4a/mov, aac, amr, aiff and the like)."
            ) from e
        if not self._container.streams.audio:
            self.close()
            raise UnsupportedMediaError("The file has no audio stream.")
        self._stream = self._container.streams.audio[0]
        self.declared_seconds = _declared_wav_seconds(self._head) or _declared_seconds(self._stream)
        """The length the container states, if it does (for progress and the truncation check)."""
        self.decoded_samples = 0
        self.decode_seconds = 0.0
        """Time spent decoding and resampling in `blocks()` so far (not while a block is out)."""

    def __enter__(self) -> "AudioReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Closes the container and the reader's file now, or, while another thread is reading
        from them, as soon as it has read its block."""
        self._close_requested = True
        if self._lock.acquire(blocking=False):
            try:
                self._close_now()
            finally:
                self._lock.release()

    def _close_now(self) -> None:
        if not self._closed:
            self._closed = True
            self._container.close()
            self._close_file()

    def _close_file(self) -> None:
        if self._owned:
            self._file.close()

    def _take(self) -> None:
        """Holds the container for reading; raises `ReaderClosedError` once `close()` was called."""
        self._lock.acquire()
        if self._close_requested:
            self._let_go()
            raise ReaderClosedError("The audio reader was closed.")

    def _let_go(self) -> None:
        """Lets go of the container, closing it first when `close()` came meanwhile."""
        try:
            if self._close_requested:
                self._close_now()
        finally:
            self._lock.release()

    @property
    def expected_seconds(self) -> Optional[float]:
        """The declared length when it is a real one (within the limit), else None."""
        declared = self.declared_seconds
        return declared if declared is not None and declared <= self.max_seconds else None

    def blocks(self) -> Iterator[np.ndarray]:
        """The audio in blocks of `block_seconds` (the last one shorter), float32 at 16 kHz."""
        import av

        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        limit = int(self.max_seconds * SAMPLE_RATE)
        pending: List[np.ndarray] = []
        pending_size = 0
        self._take()
        held = True
        resumed = time.perf_counter()
        try:
            for frame in self._container.decode(self._stream):
                for out in resampler.resample(frame):
                    samples = out.to_ndarray().reshape(-1)
                    pending.append(samples)
                    pending_size += samples.size
                    self.decoded_samples += samples.size
                if self.decoded_samples > limit:
                    raise InvalidAudioError(f"The audio is longer than the limit of {self.max_seconds:g} s.")
                if pending_size >= self._block:
                    joined = np.concatenate(pending)
                    # The container is free while the block is out: a close may come meanwhile.
                    held = False
                    self._let_go()
                    self.decode_seconds += time.perf_counter() - resumed
                    yield joined[: self._block]
                    resumed = time.perf_counter()
                    self._take()
                    held = True
                    pending, pending_size = [joined[self._block :]], joined.size - self._block
            for out in resampler.resample(None):
                pending.append(out.to_ndarray().reshape(-1))
                self.decoded_samples += pending[-1].size
        except av.FFmpegError as e:
            # Transcribing the part before the damage would drop the rest without a word.
            logger.info("Refused an upload that failed to decode after %.1f s: %s", self.decoded_samples / SAMPLE_RATE, e)
            raise InvalidAudioError(
                f"The audio is damaged or cut off: it could not be decoded after {self.decoded_samples / SAMPLE_RATE:.2f} s."
            ) from e
        finally:
            if held:
                self._let_go()
        if self.decoded_samples == 0:
            raise InvalidAudioError("The file contains no audio samples.")
        try:
            self._check_complete()
        except TruncatedAudioError as e:
            if not self._truncation_is_warning:
                raise
            self._warnings.append(f"{e} The transcript ends there.")
        last = np.concatenate(pending) if pending else np.zeros(0, np.float32)
        self.decode_seconds += time.perf_counter() - resumed
        if last.size:
            yield last.astype(np.float32, copy=False)

    def excerpts(self, starts_s: List[float], seconds: float) -> List[np.ndarray]:
        """About `seconds` of audio from each of `starts_s`, found by seeking; then back to the start.

        Call before `blocks()` (language ID listens at several points of a long recording before
        it is transcribed from the beginning).
        """
        import av

        out = []
        wanted = int(seconds * SAMPLE_RATE)
        try:
            self._take()
        except ReaderClosedError:
            return out
        try:
            for start in starts_s:
                self._container.seek(int(start * av.time_base), any_frame=False)
                resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
                pieces, size, skip = [], 0, None
                for frame in self._container.decode(self._stream):
                    if skip is None:  # a seek lands on a frame (or seek point) before the time asked
                        skip = max(0, int(round((start - (frame.time or 0.0)) * SAMPLE_RATE)))
                    for resampled in resampler.resample(frame):
                        pieces.append(resampled.to_ndarray().reshape(-1))
                        size += pieces[-1].size
                    if size >= wanted + skip:
                        break
                joined = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
                out.append(joined[skip or 0 :][:wanted])
        except av.FFmpegError as e:  # a container that cannot seek: the first speech decides
            logger.info("Could not seek in an upload for language ID: %s", e)
        try:
            if not self._close_requested:
                self._reopen()
        finally:
            self._let_go()
        return out

    def _reopen(self) -> None:
        """The container again, at the start (a seek back to 0 is not exact in every format)."""
        self._container.close()
        self._file.seek(0)
        self._container = _open_container(self._file)
        self._stream = self._container.streams.audio[0]

    def warnings(self) -> List[str]:
        """What the client should know about the upload (a truncation, when it is a warning)."""
        return list(self._warnings)

    def _check_complete(self) -> None:
        decoded = self.decoded_samples / SAMPLE_RATE
        _check_complete(decoded, self.declared_seconds, max_seconds=self.max_seconds)
        if self._head[:4] == b"OggS" and not _ogg_ends_with_last_page(self._tail):
            raise TruncatedAudioError(f"The audio is truncated: the Ogg stream has no final page ({decoded:.2f} s could be decoded).")


def _open_container(file: BinaryIO):
    """`file` opened by FFmpeg with the demuxer allow-list and no protocols."""
    import av

    return av.open(file, mode="r", metadata_errors="ignore", options=OPEN_OPTIONS)


def _binary_file(source: AudioSource) -> Tuple[BinaryIO, bool]:
    """A seekable binary file for `source`, and whether this module opened it (and closes it).

    A file on disk is opened again through a duplicate of its descriptor: the one who gave it
    (Starlette, for an upload) may close theirs while a thread still reads the recording.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source)), True
    if isinstance(source, (str, os.PathLike)):
        return open(source, "rb"), True
    try:
        fd = source.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return source, False
    if hasattr(source, "flush"):
        source.flush()
    position = source.tell()
    own = os.fdopen(os.dup(fd), "rb")  # shares the offset, which nobody else moves any more
    own.seek(position)
    return own, True


def _edges(file: BinaryIO) -> Tuple[bytes, bytes, int]:
    """The first and last `_EDGE_BYTES` of `file` and its size; leaves it at the start."""
    file.seek(0, io.SEEK_END)
    size = file.tell()
    file.seek(max(0, size - _EDGE_BYTES))
    tail = file.read()
    file.seek(0)
    head = file.read(_EDGE_BYTES)
    file.seek(0)
    return head, tail, size


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
