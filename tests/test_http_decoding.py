"""Decoding uploads with PyAV: real files decode, cut-off and broken ones are refused (fast)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from deployments.contract import InvalidAudioError
from serve_app.audio import UnsupportedMediaError, decode_audio
from tests.conftest import DATA, load_manifest
from tests.media import wav_bytes

LIMIT_S = 3 * 3600


@pytest.mark.parametrize("name", sorted(load_manifest()))
def test_every_fixture_decodes_to_its_full_length(name):
    row = load_manifest()[name]
    audio = decode_audio((DATA / name).read_bytes(), max_seconds=LIMIT_S)
    assert audio.dtype == np.float32 and audio.ndim == 1
    # the mp3 row counts its encoder padding (5.652 s); decoding drops it gaplessly (5.547 s)
    assert audio.size / 16000 == pytest.approx(row["duration_s"], abs=0.15)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9])
def test_a_cut_off_mp3_is_refused_although_every_frame_left_decodes(fraction):
    mp3 = (DATA / "zh_funasr_asr_example.mp3").read_bytes()
    with pytest.raises(InvalidAudioError, match="truncated: its header declares 5.55 s"):
        decode_audio(mp3[: int(len(mp3) * fraction)], max_seconds=LIMIT_S)


def test_a_streaming_wav_with_a_placeholder_size_is_accepted():
    data = bytearray(wav_bytes(np.zeros(16000 * 2, dtype=np.float32)))
    data[4:8] = struct.pack("<I", 0xFFFFFFFF)  # RIFF size and data size as a live recorder leaves them
    data[40:44] = struct.pack("<I", 0xFFFFFFFF)
    assert decode_audio(bytes(data), max_seconds=LIMIT_S).size == 16000 * 2


@pytest.mark.parametrize(
    "content, error",
    [
        (b"", InvalidAudioError),
        (b"plain text, not audio\n" * 20, UnsupportedMediaError),
        (wav_bytes(np.zeros(0, dtype=np.float32)), InvalidAudioError),
    ],
    ids=["empty", "text", "zero-length wav"],
)
def test_unusable_uploads(content, error):
    with pytest.raises(error):
        decode_audio(content, max_seconds=LIMIT_S)


def test_too_long_audio_is_refused_while_decoding():
    with pytest.raises(InvalidAudioError, match="longer than the limit of 5 s"):
        decode_audio((DATA / "en_jfk.flac").read_bytes(), max_seconds=5)
