"""Long recordings without a cluster (fast): the block reader on files and video containers, cuts
at quiet moments that lose and double nothing, and the piece feed that stops its thread when
closed. The same over HTTP and a handle: tests/test_long_audio.py.
"""

from __future__ import annotations

import asyncio
import io
import tempfile
import time
from contextlib import aclosing

import av
import numpy as np
import pytest

from deployments.contract import SAMPLE_RATE
from deployments.vad import WINDOW_SAMPLES, silero_vad
from serve_app.audio import AudioReader, TruncatedAudioError, decode_audio
from serve_app.pieces import QUIET_PROBABILITY, cut_pieces, feed_pieces
from tests.conftest import DATA
from tests.media import encode_media, wav_bytes

LIMIT_S = 3 * 3600
ZH_70S = DATA / "zh_funasr_vad_example_70s.flac"


@pytest.fixture(scope="module")
def zh_70s() -> np.ndarray:
    return decode_audio(ZH_70S.read_bytes(), max_seconds=LIMIT_S)


def test_the_reader_gives_the_same_samples_from_a_path_a_spool_file_and_bytes_in_bounded_blocks(zh_70s):
    with AudioReader(ZH_70S, max_seconds=LIMIT_S, block_seconds=10) as reader:
        blocks = []
        for block in reader.blocks():
            blocks.append(block)
            time.sleep(0.25)  # a consumer's time is not decoding time (the `decode` stage's metric)
        assert reader.expected_seconds == pytest.approx(70.47, abs=0.01)
        assert 0 < reader.decode_seconds < 1.5  # the consumer held the blocks for 2 s
    assert max(b.size for b in blocks) == 10 * SAMPLE_RATE and len(blocks) == 8
    assert np.array_equal(np.concatenate(blocks), zh_70s)
    # An HTTP upload is a spooled temporary file that has rolled over to disk.
    with tempfile.SpooledTemporaryFile(max_size=1024) as spool:
        spool.write(ZH_70S.read_bytes())
        assert spool._rolled
        with AudioReader(spool, max_seconds=LIMIT_S) as reader:
            assert np.array_equal(np.concatenate(list(reader.blocks())), zh_70s)
        assert not spool.closed  # the request's file is closed by its owner


@pytest.mark.parametrize("container, video_codec, audio_codec", [("mp4", "libx264", "aac"), ("matroska", "mpeg4", "libopus"), ("webm", "libvpx", "libopus"), ("mov", "mpeg4", "aac")])
def test_the_sound_track_of_a_video_is_decoded(zh_70s, container, video_codec, audio_codec):
    clip = zh_70s[: 8 * SAMPLE_RATE]
    video = encode_media(clip, container=container, video_codec=video_codec, audio_codec=audio_codec, layout="stereo")
    with av.open(io.BytesIO(video)) as check:
        assert check.streams.video and check.streams.audio
    audio = decode_audio(video, max_seconds=LIMIT_S)
    assert audio.size / SAMPLE_RATE == pytest.approx(8.0, abs=0.1)
    # the same sound (lossy codecs, resampled twice): strongly correlated once aligned
    lag = int(np.argmax(np.correlate(audio[8000:24000], clip[8000:12000], "valid")))
    n = min(clip.size, audio.size - lag) - 1000
    assert np.corrcoef(audio[lag : lag + n], clip[:n])[0, 1] > 0.9


def test_a_truncated_recording_is_refused_or_becomes_a_warning(zh_70s):
    wav = wav_bytes(zh_70s[: 20 * SAMPLE_RATE])
    cut = wav[: len(wav) // 2]
    with pytest.raises(TruncatedAudioError):
        decode_audio(cut, max_seconds=LIMIT_S)
    with AudioReader(cut, max_seconds=LIMIT_S, truncation_is_warning=True) as reader:
        audio = np.concatenate(list(reader.blocks()))
        (warning,) = reader.warnings()
    assert audio.size / SAMPLE_RATE == pytest.approx(10.0, abs=0.01)
    assert "declares 20.00 s but only 10.00 s" in warning


def test_pieces_are_cut_in_quiet_moments_and_lose_or_double_nothing(zh_70s):
    blocks = [zh_70s[i : i + 7 * SAMPLE_RATE] for i in range(0, zh_70s.size, 7 * SAMPLE_RATE)]
    pieces = list(cut_pieces(blocks, piece_seconds=20, first_piece_seconds=10, search_seconds=6))
    assert np.array_equal(np.concatenate([p.audio for p in pieces]), zh_70s)
    assert [p.index for p in pieces] == list(range(len(pieces))) and len(pieces) >= 4
    assert pieces[0].duration_s <= 10 and all(p.duration_s <= 20 for p in pieces)
    assert all(a.start_sample + a.audio.size == b.start_sample for a, b in zip(pieces, pieces[1:]))
    vad = silero_vad()
    for piece in pieces[1:]:
        around = zh_70s[piece.start_sample - WINDOW_SAMPLES * 2 : piece.start_sample + WINDOW_SAMPLES * 2]
        assert vad(around.copy()).max() < QUIET_PROBABILITY + 0.15, piece.start_s


def test_a_recording_within_the_piece_length_stays_whole(zh_70s):
    (piece,) = cut_pieces([zh_70s[:30 * SAMPLE_RATE], zh_70s[30 * SAMPLE_RATE:]], piece_seconds=71, first_piece_seconds=71, search_seconds=10)
    assert piece.start_sample == 0 and np.array_equal(piece.audio, zh_70s)


def test_closing_the_feed_stops_decoding_and_closes_the_reader():
    async def main():
        reader = AudioReader(ZH_70S, max_seconds=LIMIT_S, block_seconds=5)
        feed = feed_pieces(cut_pieces(reader.blocks(), piece_seconds=10, first_piece_seconds=10, search_seconds=4))
        async with aclosing(feed):
            first = await anext(feed)
        reader.close()
        return first, reader.decoded_samples

    first, decoded = asyncio.run(main())
    assert first.index == 0
    # one piece consumed, one queued, one being cut when the feed closed: far from the 70 s
    assert decoded / SAMPLE_RATE <= 45


_CLOSE_WHILE_DECODING = """
import asyncio, io, sys, tempfile, threading, time, wave
import anyio, numpy as np
from serve_app.audio import AudioReader
from serve_app.pieces import cut_pieces, feed_pieces

rate = 16000
buf = io.BytesIO()
with wave.open(buf, "wb") as w:
    w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
    w.writeframes((np.sin(np.arange(rate * 600) / 9) * 8000).astype("<i2").tobytes())
wav = buf.getvalue()

def spooled():
    spool = tempfile.SpooledTemporaryFile(max_size=1 << 20)  # as Starlette spools an upload
    spool.write(wav)
    spool.seek(0)
    return spool

# 1. close() from another thread while blocks() decodes
for i in range(8):
    reader = AudioReader(spooled(), max_seconds=3600, block_seconds=30)
    outcome = []
    def read():
        try:
            for _ in reader.blocks():
                pass
            outcome.append("end")
        except Exception as e:
            outcome.append(type(e).__name__)
    t = threading.Thread(target=read)
    t.start()
    time.sleep(0.004 * i)
    reader.close()
    t.join()
    print("close", outcome[0], flush=True)

# 2. the uploader closes its spool file mid-read: the reader reads on
spool = spooled()
reader = AudioReader(spool, max_seconds=3600, block_seconds=30)
blocks = reader.blocks()
next(blocks)
spool.close()
print("spool", sum(b.size for b in blocks) + 30 * rate == 600 * rate, flush=True)
reader.close()

# 3. a streamed answer whose client left: anyio cancels every await of the scope, the closes
# in its finally included, while the feed's thread decodes the next piece
async def streamed():
    reader = AudioReader(spooled(), max_seconds=3600, block_seconds=30)
    feed = feed_pieces(cut_pieces(reader.blocks(), piece_seconds=240, first_piece_seconds=30, search_seconds=20))
    with anyio.CancelScope() as scope:
        await anext(feed)
        scope.cancel()
        try:
            await anyio.sleep(5)
        finally:
            try:
                await feed.aclose()
            finally:
                reader.close()
    for _ in range(200):
        if not any(t.name == "klipnote-pieces" for t in threading.enumerate()):
            return reader.decoded_samples / rate
        await asyncio.sleep(0.05)
    return None

print("feed", asyncio.run(streamed()), flush=True)
"""


def test_closing_a_reader_while_a_thread_decodes_it_ends_the_read_not_the_process():
    """A replica's piece feed decodes in a thread while the request ends: FFmpeg's container
    closed under a read kills the process (it did, the ingress replica, on every client that
    left a long recording). In a process of its own, so that a crash fails this test only."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    run = subprocess.run([sys.executable, "-c", _CLOSE_WHILE_DECODING], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line.split(" ", 1) for line in run.stdout.splitlines()]
    closes = [v for k, v in lines if k == "close"]
    assert len(closes) == 8 and set(closes) <= {"ReaderClosedError", "end"} and "ReaderClosedError" in closes, closes
    assert dict(lines)["spool"] == "True"
    decoded_s = dict(lines)["feed"]
    assert decoded_s != "None", "the feed's thread did not stop"
    assert float(decoded_s) < 600  # it stopped on the close, not at the end of the recording


def test_each_piece_is_prepared_in_the_feeds_thread_ahead_of_the_consumer():
    # Language ID per stretch is worked out there while the model transcribes the piece before.
    import dataclasses
    import threading

    from serve_app.stretches import LanguagePlan

    prepared = []

    def prepare(piece):
        prepared.append((piece.index, threading.current_thread().name))
        return dataclasses.replace(piece, languages=LanguagePlan([], 0.1))

    async def main():
        reader = AudioReader(ZH_70S.read_bytes(), max_seconds=LIMIT_S)
        feed = feed_pieces(cut_pieces(reader.blocks(), piece_seconds=20, first_piece_seconds=20, search_seconds=4), prepare=prepare)
        async with aclosing(feed):
            first = await anext(feed)
            await asyncio.sleep(1.0)  # the consumer busy with the first piece
            ahead = len(prepared)
            rest = [p async for p in feed]
        return first, ahead, rest

    first, ahead, rest = asyncio.run(main())
    assert ahead >= 2  # the next piece was prepared while the first was in use
    assert [p.languages for p in [first, *rest]] == [LanguagePlan([], 0.1)] * (1 + len(rest)) and len(rest) >= 2
    assert {name for _, name in prepared} == {"klipnote-pieces"}


def test_errors_while_decoding_reach_the_consumer():
    async def main():
        damaged = bytearray(ZH_70S.read_bytes())
        damaged[len(damaged) // 2 :] = b"\x00" * (len(damaged) - len(damaged) // 2)
        reader = AudioReader(bytes(damaged), max_seconds=LIMIT_S)
        feed = feed_pieces(cut_pieces(reader.blocks(), piece_seconds=10, first_piece_seconds=10, search_seconds=4))
        async with aclosing(feed):
            return [p async for p in feed]

    with pytest.raises(Exception) as e:
        asyncio.run(main())
    assert "damaged or cut off" in str(e.value) or "truncated" in str(e.value)


def test_stream_events_follow_openais_shapes_and_end_with_an_error_event_on_failure():
    from deployments.contract import ModelUnavailableError
    from serve_app.events import stream_events
    from serve_app.transcription import PieceDone

    class FailsAfterOnePiece:  # the one part of a Transcription that stream_events reads
        async def events(self):
            yield PieceDone([{"start": 0.0, "end": 2.5, "text": "Hello there.", "language": "en"}], "Hello there.", 30.0, 90.0, "whisperx", ["w"])
            raise ModelUnavailableError("whisperx has no running replica")

    async def collect():
        return [e async for e in stream_events(FailsAfterOnePiece())]

    delta, segment, progress, error = asyncio.run(collect())
    assert delta == {"type": "transcript.text.delta", "delta": "Hello there."}
    assert segment == {"type": "transcript.text.segment", "id": "seg_0", "start": 0.0, "end": 2.5, "text": "Hello there.", "speaker": None, "language": "en"}
    assert progress == {"type": "transcript.progress", "done_seconds": 30.0, "total_seconds": 90.0, "model": "whisperx", "warnings": ["w"]}
    assert error["type"] == "error" and set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["code"] == "model_unavailable"


def test_excerpts_come_from_where_they_are_asked_and_the_reader_then_starts_over(zh_70s):
    with AudioReader(ZH_70S, max_seconds=LIMIT_S) as reader:
        excerpts = reader.excerpts([10.0, 40.0], 5.0)
        whole = np.concatenate(list(reader.blocks()))
    assert np.array_equal(whole, zh_70s)
    for start, excerpt in zip((10.0, 40.0), excerpts):
        assert excerpt.size == 5 * SAMPLE_RATE
        at = int(start * SAMPLE_RATE)
        assert np.allclose(excerpt, zh_70s[at : at + excerpt.size], atol=1e-3)


def test_the_points_vote_by_confidence_and_silent_points_do_not_count():
    from serve_app.langid import DetectedLanguage, listen_points, vote

    assert listen_points(100.0, 5, 10.0) == [5.0, 25.0, 45.0, 65.0, 85.0]
    assert listen_points(20.0, 2, 30.0) == [0.0, 0.0]
    result = vote([DetectedLanguage("en", 0.99), DetectedLanguage("zh", 0.9), DetectedLanguage("zh", 0.8), DetectedLanguage(None, 0.0)])
    assert result.language == "zh" and result.heard == {"zh": 2, "en": 1}
    assert result.probability == pytest.approx(1.7 / 3)
    assert vote([DetectedLanguage(None, 0.0)]).language is None


def test_open_feeds_leave_the_default_executor_free():
    """Ten transcriptions each waiting for the model with a piece decoded ahead: the short steps
    (speech gate, language ID) still get a thread at once. Producers in the loop's default
    executor (6 threads here) would hold every one of them."""
    async def main():
        feeds = []
        for _ in range(10):
            reader = AudioReader(ZH_70S, max_seconds=LIMIT_S, block_seconds=5)
            feed = feed_pieces(cut_pieces(reader.blocks(), piece_seconds=10, first_piece_seconds=10, search_seconds=4))
            await anext(feed)
            feeds.append((feed, reader))
        try:
            return await asyncio.wait_for(asyncio.to_thread(lambda: "free"), timeout=30)
        finally:
            for feed, reader in feeds:
                await feed.aclose()
                reader.close()

    assert asyncio.run(main()) == "free"
