"""Long recordings over the service: `stream=true` through the `openai` SDK and a handle, a video
upload, an upload past OpenAI's 25 MiB, and cuts that fall mid-sentence.

Cuts are tested through `probe-pieces`, an ingress beside the real one whose pieces are 6-20 s
(the default is 240 s), so short real recordings are cut where a sentence pauses, not between
sentences; the words must come out as when the recording goes whole. It also listens for the
language at several points of recordings from 60 s on (the default: 600 s).
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import numpy as np
import pytest
from openai import OpenAI

from deployments.contract import SAMPLE_RATE
from serve_app.audio import decode_audio
from tests.conftest import small_pieces_ingress
from tests.media import encode_media, wav_bytes
from tests.textnorm import cer, wer

pytestmark = pytest.mark.slow

ZH_70S = "zh_funasr_vad_example_70s.flac"
ZH_SHORT = "zh_aishell1_BAC009S0724W0121.flac"
EN = "en_jfk.flac"
LIMIT_S = 3 * 3600


def decoded(data_dir, name: str) -> np.ndarray:
    return decode_audio((data_dir / name).read_bytes(), max_seconds=LIMIT_S)


@pytest.fixture(scope="module")
def probe_pieces(serve_cluster):
    with serve_cluster.beside(small_pieces_ingress(serve_cluster)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> OpenAI:
    return OpenAI(base_url=f"{base_url}/v1", api_key="anything", max_retries=0, timeout=900)


def sse_events(response: httpx.Response) -> list:
    return [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]


def test_the_openai_sdk_streams_a_multi_minute_recording_piece_by_piece(client, data_dir):
    zh = decoded(data_dir, ZH_70S)
    recording = np.concatenate([zh, np.zeros(5 * SAMPLE_RATE, np.float32), zh])
    length = recording.size / SAMPLE_RATE  # 145.9 s
    stream = client.audio.transcriptions.create(model="whisper-1", file=("meeting.wav", wav_bytes(recording)), stream=True)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done" and kinds.count("transcript.text.done") == 1
    from openai.types.audio import TranscriptionTextDeltaEvent, TranscriptionTextDoneEvent, TranscriptionTextSegmentEvent

    assert {type(e) for e in events if e.type == "transcript.text.segment"} == {TranscriptionTextSegmentEvent}
    assert {type(e) for e in events if e.type == "transcript.text.delta"} == {TranscriptionTextDeltaEvent}
    assert isinstance(events[-1], TranscriptionTextDoneEvent)
    progress = [e for e in events if e.type == "transcript.progress"]
    # The first piece is at most 30 s when streaming: segments of it come before the rest is done.
    assert len(progress) >= 2
    done_s = [p.done_seconds for p in progress]
    assert done_s == sorted(done_s) and done_s[0] <= 30 and done_s[-1] == pytest.approx(length, abs=0.01)
    assert all(p.total_seconds == pytest.approx(length, abs=0.01) for p in progress)
    first_progress = kinds.index("transcript.progress")
    assert "transcript.text.segment" in kinds[:first_progress]
    assert "transcript.text.segment" in kinds[first_progress + 1 :]
    segments = [e for e in events if e.type == "transcript.text.segment"]
    assert all(s.speaker is None for s in segments)
    starts = [s.start for s in segments]
    assert starts == sorted(starts) and segments[-1].end > 130
    assert all(1.0 <= s.end - s.start <= 7.0 + 1e-6 for s in segments[:-1])  # subtitle cues by default
    done = events[-1]
    assert done.text == "".join(e.delta for e in events if e.type == "transcript.text.delta")
    assert done.model == "belle2" and done.language == "zh" and done.duration == pytest.approx(length, abs=0.01)
    # the recording is the clip twice: each half is transcribed alike
    half = [s.text for s in segments if s.end <= length / 2], [s.text for s in segments if s.start >= length / 2]
    assert cer("".join(half[0]), "".join(half[1])) < 0.1


def test_a_handle_streams_the_same_events_and_cuts_mid_sentence_lose_no_word(serve_cluster, probe_pieces, data_dir):
    from ray import serve

    whole = httpx.post(f"{serve_cluster.url}/v1/audio/transcriptions", files={"file": (EN, (data_dir / EN).read_bytes())},
                       data={"response_format": "verbose_json"}, timeout=600).json()
    handle = serve.get_app_handle("probe-pieces").options(stream=True)
    events = list(handle.transcribe_stream.remote((data_dir / EN).read_bytes()))
    progress = [e for e in events if e["type"] == "transcript.progress"]
    # jfk's 11 s sentence, cut at 6 s at most: in a pause inside the sentence
    assert len(progress) == 2 and progress[0]["done_seconds"] <= 6
    done = events[-1]
    assert done["type"] == "transcript.text.done" and done["model"] == "whisperx"
    assert wer(whole["text"], done["text"]) <= 0.1, (whole["text"], done["text"])
    words = done["text"].lower().replace(",", "").replace(".", "").split()
    assert all(a != b for a, b in zip(words, words[1:])), words  # nothing doubled at the cut
    segments = [e for e in events if e["type"] == "transcript.text.segment"]
    assert [s["start"] for s in segments] == sorted(s["start"] for s in segments) and segments[-1]["end"] <= 11.1


def test_mandarin_cut_into_pieces_reads_as_when_whole(base_url, probe_pieces, data_dir):
    upload = {"file": (ZH_70S, (data_dir / ZH_70S).read_bytes())}
    whole = httpx.post(f"{base_url}/v1/audio/transcriptions", files=upload, data={"response_format": "verbose_json"}, timeout=600).json()
    # streamed for longer than probe-pieces' 5 s upload idle limit, which ends with the upload
    with httpx.stream("POST", f"{probe_pieces}/v1/audio/transcriptions", files=upload, data={"stream": "true"}, timeout=600) as r:
        events = sse_events(r)
    done = events[-1]
    assert done["type"] == "transcript.text.done", done
    assert whole["model"] == done["model"] == "belle2"
    assert len([e for e in events if e["type"] == "transcript.progress"]) >= 4
    assert cer(whole["text"], done["text"]) < 0.12, (whole["text"], done["text"])
    assert done["duration"] == pytest.approx(whole["duration"], abs=0.01)
    segments = [e for e in events if e["type"] == "transcript.text.segment"]
    assert [s["start"] for s in segments] == sorted(s["start"] for s in segments) and segments[-1]["end"] > 60


def test_a_video_upload_is_transcribed_from_its_sound_track(client, data_dir):
    audio = decoded(data_dir, ZH_SHORT)
    from_flac = client.audio.transcriptions.create(model="whisper-1", file=(ZH_SHORT, (data_dir / ZH_SHORT).read_bytes()))
    from_video = client.audio.transcriptions.create(model="whisper-1", file=("meeting.mp4", encode_media(audio, container="mp4", video_codec="libx264", audio_codec="aac", layout="stereo")))
    assert from_video.text and cer(from_flac.text, from_video.text) < 0.15, (from_flac.text, from_video.text)


def test_an_upload_past_openais_25_mib_is_accepted(base_url, data_dir):
    speech = decoded(data_dir, EN)
    recording = np.concatenate([np.zeros(35 * SAMPLE_RATE, np.float32), speech, np.zeros(35 * SAMPLE_RATE, np.float32)])
    upload = wav_bytes(recording, rate=48000, channels=2, sample_width=4)
    assert len(upload) > 25 * 2**20
    r = httpx.post(f"{base_url}/v1/audio/transcriptions", files={"file": ("long.wav", upload)},
                   data={"response_format": "verbose_json"}, timeout=600)
    assert r.status_code == 200, r.text
    body = r.json()
    assert "country" in body["text"].lower() and body["duration"] == pytest.approx(recording.size / SAMPLE_RATE, abs=0.05)
    assert body["segments"][0]["start"] >= 34


def test_a_stream_refused_before_it_starts_is_a_plain_http_error(base_url):
    r = httpx.post(f"{base_url}/v1/audio/transcriptions", files={"file": ("notes.txt", b"plain text, not audio\n" * 20)},
                   data={"stream": "true"}, timeout=60)
    assert r.status_code == 415 and r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "unsupported_media"


def test_a_truncated_upload_streams_what_it_holds_with_a_warning(base_url, data_dir):
    full = wav_bytes(decoded(data_dir, EN))
    cut = full[: len(full) * 2 // 3]
    with httpx.stream("POST", f"{base_url}/v1/audio/transcriptions", files={"file": ("cut.wav", cut)}, data={"stream": "true"}, timeout=600) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    done = events[-1]
    assert done["type"] == "transcript.text.done" and "fellow americans" in done["text"].lower()
    assert any("truncated" in w for w in done["warnings"]), done["warnings"]
    # the same upload without streaming is refused as before
    r = httpx.post(f"{base_url}/v1/audio/transcriptions", files={"file": ("cut.wav", cut)}, timeout=600)
    assert r.status_code == 400 and r.json()["error"]["code"] == "truncated_audio"


def _wait_for(condition, *, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"Still waiting after {timeout_s} s for {what}.")


def _ingress_replicas(serve_cluster) -> set:
    replicas = serve_cluster.details()["applications"]["transcription"]["deployments"]["TranscriptionIngress"]["replicas"]
    return {(r["replica_id"], r["pid"]) for r in replicas if r["state"] == "RUNNING"}


@pytest.mark.parametrize(("stream", "leave_after"), [(False, "decode"), (True, "decode"), (True, "piece")], ids=["plain", "streamed", "streamed-after-a-piece"])
def test_a_client_that_goes_away_stops_the_model_work(serve_cluster, data_dir, stream, leave_after):
    """23 min of German, left while WhisperX decodes a piece ("decode"), or as soon as the first
    piece is done, while the ingress's feed cuts the next ones ("piece"): the decode stops, and
    the ingress replica lives on (closing the reader under the feed's thread killed it, on
    every client that left a long recording after its first piece)."""
    from ray import serve

    whisperx = serve.get_app_handle("whisperx")
    activity = lambda: whisperx.activity.remote().result(timeout_s=60)  # noqa: E731
    before = activity()
    ingress_before = _ingress_replicas(serve_cluster)
    recording = np.tile(decoded(data_dir, "de_librivox_simplicissimus.flac"), 20)
    boundary = "klipnote-test"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"stream\"\r\n\r\n{str(stream).lower()}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"talk.wav\"\r\n\r\n").encode()
    body += wav_bytes(recording) + f"\r\n--{boundary}--\r\n".encode()
    sock = socket.create_connection(("127.0.0.1", serve_cluster.http_port), timeout=300)
    sock.sendall((f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
    if leave_after == "piece":
        answer = b""
        while b"transcript.progress" not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer[-500:]
            answer += chunk
    else:
        _wait_for(lambda: activity()["decoding"] >= 1, timeout_s=300, what="whisperx to start decoding")
    sock.close()
    # The decode stops at its next batch: no thread left decoding, one more decode stopped by a
    # cancellation (a decode that ran to its end would not count), and the CPU time stays put.
    # Left after a piece, the next one may not have reached WhisperX yet: nothing to stop there.
    after = _wait_for(lambda: (a := activity())["decoding"] == 0 and a["in_flight"] == 0 and a, timeout_s=300, what="the decode to stop")
    assert after["cancelled"] == before["cancelled"] + (leave_after == "decode") or leave_after == "piece"
    time.sleep(3)
    assert activity()["cpu_seconds"] - after["cpu_seconds"] < 1.0
    assert _ingress_replicas(serve_cluster) == ingress_before


def test_a_long_recording_is_routed_by_the_language_most_of_it_is_in(base_url, probe_pieces, data_dir):
    """Small talk in English, then a Mandarin meeting (161 s). probe-pieces, one language per
    recording, listens at 5 points of recordings from 60 s on; the main ingress routes each
    language's stretches to its model: English first, then Mandarin. The progress events name
    the models; the client then leaves (which also stops the work)."""
    english = np.concatenate([decoded(data_dir, EN), decoded(data_dir, "en_librispeech_1995-1837-0001.flac")])
    recording = np.concatenate([english, np.tile(decoded(data_dir, ZH_70S), 2)])
    upload = wav_bytes(recording)

    def progress_models(url: str, count: int) -> list:
        models = []
        with httpx.stream("POST", f"{url}/v1/audio/transcriptions", files={"file": ("meeting.wav", upload)}, data={"stream": "true"}, timeout=600) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["type"] == "transcript.progress":
                    models.append(json.loads(line[6:])["model"])
                    if len(models) == count:
                        return models
        raise AssertionError(f"{len(models)} progress events")

    first, second = progress_models(base_url, 2)
    assert first.startswith("whisperx") and "belle2" in first + second, (first, second)
    assert progress_models(probe_pieces, 1) == ["belle2"]
