"""Hardening that needs no cluster (fast): the container allow-list against uploads that would
make FFmpeg open other files, cut-off uploads, language codes, what error messages may show,
API keys, and how a lost replica is answered. The same cases over HTTP: tests/test_hardening_live.py.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from deployments.contract import InvalidAudioError, TranscribeOptions, UnsupportedLanguageError
from deployments.languages import asks_traditional_script, normalize_language
from serve_app.audio import TruncatedAudioError, UnsupportedMediaError, decode_audio
from serve_app.errors import client_message, error_response_for, redact, redact_paths
from serve_app.guards import ApiKeys
from tests.conftest import DATA, ROOT
from tests.media import encode_media, tone

LIMIT_S = 3 * 3600
CLIP = "tests/data/en_jfk.flac"

# Uploads that name other files or streams: FFmpeg would open them if it were allowed to probe
# every demuxer it has (the concat script transcribed tests/data/en_jfk.flac from the server).
HOSTILE = {
    "concat, relative path": f"ffconcat version 1.0\nfile {CLIP}\n".encode(),
    "concat, absolute path": f"ffconcat version 1.0\nfile {ROOT / CLIP}\n".encode(),
    "concat, the clip 5 times": b"ffconcat version 1.0\n" + f"file {ROOT / CLIP}\n".encode() * 5,
    "concat, missing file": b"ffconcat version 1.0\nfile /nonexistent/secret.flac\n",
    "hls playlist": f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile://{ROOT / CLIP}\n#EXT-X-ENDLIST\n".encode(),
    "m3u playlist": f"#EXTM3U\n#EXTINF:11,jfk\n{ROOT / CLIP}\n".encode(),
    "sdp (network stream)": b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=audio 5004 RTP/AVP 0\n",
    "png image": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89" + b"\x00" * 64,
    "image sequence pattern": b"img%03d.png\n",
    "srt subtitles": b"1\n00:00:01,000 --> 00:00:02,000\nhello\n",
    "ffmetadata": b";FFMETADATA1\ntitle=x\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_uploads_that_name_other_files_or_streams_are_refused(name):
    with pytest.raises(UnsupportedMediaError) as refused:
        decode_audio(HOSTILE[name], max_seconds=LIMIT_S)
    # One answer for all, whether or not a named file exists: nothing tells what is on the disk.
    with pytest.raises(UnsupportedMediaError) as plain_text:
        decode_audio(b"plain text, not audio\n" * 20, max_seconds=LIMIT_S)
    assert str(refused.value) == str(plain_text.value)


@pytest.mark.parametrize("container, codec, rate", [("ogg", "libopus", 48000), ("webm", "libopus", 48000), ("ipod", "aac", 16000),
                                                    ("wav", "pcm_s16le", 16000), ("mp3", "libmp3lame", 16000), ("flac", "flac", 16000)])
def test_the_allowed_containers_still_decode(container, codec, rate):
    audio = decode_audio(encode_media(tone(2.0), container=container, audio_codec=codec, rate=rate), max_seconds=LIMIT_S)
    assert audio.size / 16000 == pytest.approx(2.0, abs=0.15)


def test_a_flac_cut_to_two_percent_is_damaged_audio_not_an_unsupported_kind():
    flac = (DATA / "en_jfk.flac").read_bytes()
    with pytest.raises(InvalidAudioError) as refused:
        decode_audio(flac[: len(flac) // 50], max_seconds=LIMIT_S)
    assert not isinstance(refused.value, UnsupportedMediaError)


def test_an_ogg_opus_cut_in_half_is_truncated():
    ogg = encode_media(tone(5.0), container="ogg", audio_codec="libopus")
    with pytest.raises(TruncatedAudioError, match="no final page"):
        decode_audio(ogg[: len(ogg) // 2], max_seconds=LIMIT_S)


def test_a_wav_whose_header_declares_60_s_but_holds_5_is_truncated():
    wav = bytearray(encode_media(tone(5.0), container="wav", audio_codec="pcm_s16le", rate=16000))
    data = wav.find(b"data")
    struct.pack_into("<I", wav, data + 4, 60 * 16000 * 2)
    with pytest.raises(TruncatedAudioError, match="declares 60.00 s but only 5.00 s"):
        decode_audio(bytes(wav), max_seconds=LIMIT_S)


@pytest.mark.parametrize("given, code", [("zh", "zh"), ("zh-CN", "zh"), ("zh-TW", "zh"), ("ZH", "zh"), ("zh_Hant_HK", "zh"), ("cmn", "zh"),
                                         ("Mandarin", "zh"), ("chinese", "zh"), ("en-US", "en"), ("eng", "en"), ("yue", "yue"), ("iw", "he"),
                                         ("castilian", "es")])
def test_language_codes_are_normalised(given, code):
    assert normalize_language(given) == code
    assert TranscribeOptions(language=given).language == code


@pytest.mark.parametrize("given", ["xx", "zz-CN", "klingon", "", "../etc"])
def test_unknown_languages_are_refused_naming_the_parameter(given):
    with pytest.raises(UnsupportedLanguageError, match="for language"):
        TranscribeOptions(language=given)
    response = error_response_for(UnsupportedLanguageError("Got 'xx' for language"))
    body = json.loads(response.body)
    assert response.status_code == 400 and body["error"]["param"] == "language" and body["error"]["code"] == "unsupported_language"


def test_traditional_script_tags():
    assert all(asks_traditional_script(t) for t in ("zh-TW", "zh-HK", "zh-Hant", "zh_hant_tw", "cmn-TW"))
    assert not any(asks_traditional_script(t) for t in ("zh", "zh-CN", "zh-Hans", "en-TW", "ja"))


def test_client_messages_carry_no_traceback_path_address_or_id():
    traceback = "\x1b[36mray::ServeReplica:belle2\x1b[0m (pid=1234, ip=10.0.0.5, actor_id=9f8e7d6c5b4a39281706f5e4d3c2b1a0)\nTraceback (most recent call last):\n  File \"/work/main/.venvs/belle2/lib/x.py\", line 3"
    assert client_message(traceback, "generic") == "generic"
    assert redact("could not load '/work/main/models/whisper-base-hf' from 10.1.2.3:6379 (id 0123456789abcdef0123456789abcdef)") == \
        "could not load 'whisper-base-hf' from <address> (id <id>)"
    assert redact("BELLE-2/Belle-whisper-large-v3-zh, 1/2 done") == "BELLE-2/Belle-whisper-large-v3-zh, 1/2 done"
    info = {"model": "/work/main/models/whisper-base-hf", "packages": {"cuda-toolkit": "13.0.3.0"}, "warnings": ["cache /root/.cache/x"]}
    assert redact_paths(info) == {"model": "whisper-base-hf", "packages": {"cuda-toolkit": "13.0.3.0"}, "warnings": ["cache x"]}


def test_an_error_with_a_traceback_in_its_text_becomes_a_generic_message():
    class FromRay(ValueError):
        pass

    body = json.loads(error_response_for(FromRay("ray::Foo (pid=1, ip=1.2.3.4)\nTraceback (most recent call last):\n ...")).body)
    assert body["error"]["message"] == "The request is invalid." and "Traceback" not in json.dumps(body)


def test_a_lost_replica_is_a_503_with_a_code_and_retry_after():
    from ray.exceptions import ActorDiedError

    response = error_response_for(ActorDiedError())
    body = json.loads(response.body)
    assert response.status_code == 503 and body["error"]["code"] == "model_replica_lost"
    assert response.headers["Retry-After"] == "10"


def test_api_keys_plain_and_hashed():
    import hashlib

    keys = ApiKeys(["sk-plain", "sha256:" + hashlib.sha256(b"sk-hashed").hexdigest(), " "])
    assert keys and keys.accepts("sk-plain") and keys.accepts("sk-hashed")
    assert not keys.accepts("sk-other") and not keys.accepts("")
    assert not ApiKeys([])
    with pytest.raises(ValueError, match="64 hexadecimal"):
        ApiKeys(["sha256:abcd"])


def test_the_speech_gate_passes_every_recording_of_speech_and_nothing_else():
    from serve_app.speech import contains_speech

    for path in sorted(DATA.glob("*.flac")):
        audio = decode_audio(path.read_bytes(), max_seconds=LIMIT_S)
        assert contains_speech(audio) == (not path.name.startswith("noise")), path.name
        if path.name == "en_jfk.flac":
            assert not contains_speech(audio[16000 : 16000 + 1600])  # 0.1 s of it
    t = np.arange(3 * 16000) / 16000
    assert not contains_speech((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    assert not contains_speech((0.1 * np.random.default_rng(0).standard_normal(t.size)).astype(np.float32))
