"""Media files made from audio for tests: wav bytes, and audio (with or without a picture) in
any container PyAV writes. `audio` is always 16 kHz mono float32, as decode_audio gives it.
"""

from __future__ import annotations

import io
import wave
from typing import Callable, Optional, Tuple

import av
import numpy as np

from deployments.contract import SAMPLE_RATE

ENCODE_BLOCK_S = 60
"""Audio goes to the encoder a minute at a time: an hour of it is never one frame."""


def tone(seconds: float, *, hz: float = 440.0, level: float = 0.3) -> np.ndarray:
    """A sine tone: sound that is not speech."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (level * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def wav_bytes(audio: np.ndarray, *, rate: int = SAMPLE_RATE, channels: int = 1, sample_width: int = 2) -> bytes:
    """`audio` as a wav, resampled (linearly) to `rate` and copied to `channels`; 16-bit PCM, or
    32-bit float with `sample_width=4`."""
    if rate != SAMPLE_RATE:
        audio = np.interp(np.arange(int(audio.size * rate / SAMPLE_RATE)) * SAMPLE_RATE / rate, np.arange(audio.size), audio)
    frames = np.repeat(np.clip(audio, -1, 1)[:, None], channels, axis=1)
    buf = io.BytesIO()
    if sample_width == 4:  # 32-bit float wav (format 3), which the wave module cannot write
        data = frames.astype("<f4").tobytes()
        fmt = (b"fmt " + (16).to_bytes(4, "little") + (3).to_bytes(2, "little") + channels.to_bytes(2, "little")
               + rate.to_bytes(4, "little") + (rate * channels * 4).to_bytes(4, "little") + (channels * 4).to_bytes(2, "little") + (32).to_bytes(2, "little"))
        buf.write(b"RIFF" + (4 + len(fmt) + 8 + len(data)).to_bytes(4, "little") + b"WAVE" + fmt + b"data" + len(data).to_bytes(4, "little") + data)
        return buf.getvalue()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((frames * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def grey_picture(width: int, height: int, frame_index: int, fps: int) -> np.ndarray:
    return np.full((height, width, 3), 128, np.uint8)


def encode_media(
    audio: np.ndarray,
    *,
    container: str,
    audio_codec: str,
    rate: int = 48000,
    layout: str = "mono",
    bit_rate: Optional[int] = None,
    video_codec: Optional[str] = None,
    size: Tuple[int, int] = (64, 48),
    fps: int = 5,
    picture: Callable[[int, int, int, int], np.ndarray] = grey_picture,
) -> bytes:
    """`audio` encoded with `audio_codec` at `rate` Hz in `container`; with `video_codec`, under a
    picture of `size` at `fps` (`picture(width, height, frame_index, fps)` gives each frame, RGB)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        video = None
        if video_codec:
            video = out.add_stream(video_codec, rate=fps)
            video.width, video.height, video.pix_fmt = *size, "yuv420p"
        sound = out.add_stream(audio_codec, rate=rate)
        sound.layout = layout
        if bit_rate:
            sound.bit_rate = bit_rate
        resampler = av.AudioResampler(format=sound.codec_context.format.name, layout=layout, rate=rate)
        step = SAMPLE_RATE * ENCODE_BLOCK_S
        blocks = [audio[at:at + step] for at in range(0, audio.size, step)]
        for block in [*blocks, None]:  # None: what the resampler holds back
            frame = None
            if block is not None:
                frame = av.AudioFrame.from_ndarray(block.astype(np.float32)[None, :], format="flt", layout="mono")
                frame.sample_rate = SAMPLE_RATE
            for converted in resampler.resample(frame):
                converted.pts = None
                for packet in sound.encode(converted):
                    out.mux(packet)
        for packet in sound.encode(None):
            out.mux(packet)
        if video is not None:
            width, height = size
            for i in range(int(audio.size / SAMPLE_RATE * fps) + 1):
                frame = av.VideoFrame.from_ndarray(picture(width, height, i, fps), format="rgb24")
                frame.pts = i
                for packet in video.encode(frame):
                    out.mux(packet)
            for packet in video.encode(None):
                out.mux(packet)
    return buf.getvalue()
