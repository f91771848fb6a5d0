"""Cross-request batching in the running service: concurrent requests' windows decoded in one
model call (seen in the model app's own counters, by request id), each request getting its own
segments back (deployments/batching.py; tests/test_batching.py has the batcher on its own)."""

from __future__ import annotations

import concurrent.futures
import uuid

import httpx
import pytest

from tests.textnorm import cer

pytestmark = pytest.mark.slow

CLIPS = {
    "whisperx": ["en_jfk.flac", "de_picovoice_test_de.flac", "fr_picovoice_test_fr.flac", "es_picovoice_test_es.flac"],
    "belle2": ["zh_aishell1_BAC009S0724W0121.flac", "zh_paddlespeech_zh.flac", "zh_aishell3_SSB00050015.flac", "zh_funasr_asr_example.flac"],
}
LANGUAGES = {"en": "en", "de": "de", "fr": "fr", "es": "es", "zh": "zh"}


def _transcribe(base_url: str, data_dir, clip: str, request_id: str) -> dict:
    r = httpx.post(
        f"{base_url}/v1/audio/transcriptions",
        files={"file": (clip, (data_dir / clip).read_bytes())},
        data={"response_format": "verbose_json", "language": LANGUAGES[clip[:2]]},
        headers={"X-Request-Id": request_id},
        timeout=600,
    )
    assert r.status_code == 200, r.text
    assert r.headers["X-Request-Id"] == request_id
    return r.json()


def test_concurrent_requests_share_batches_and_each_gets_its_own_segments(base_url, data_dir):
    from ray import serve

    before = {model: serve.get_app_handle(model).batches.remote().result(timeout_s=60) for model in CLIPS}
    clips = [(model, clip) for model, names in CLIPS.items() for clip in names]
    alone = {clip: _transcribe(base_url, data_dir, clip, f"alone-{uuid.uuid4().hex[:8]}") for _, clip in clips}

    ids = {clip: f"together-{clip[:2]}-{uuid.uuid4().hex[:8]}" for _, clip in clips}
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(clips)) as pool:
        futures = {clip: pool.submit(_transcribe, base_url, data_dir, clip, ids[clip]) for _, clip in clips}
        together = {clip: f.result() for clip, f in futures.items()}

    for model, clip in clips:
        body = together[clip]
        assert body["model"] == alone[clip]["model"] == model
        own = alone[clip]["text"]
        # its own text (batched float maths may round a token differently, hence a small margin) ...
        assert cer(own, body["text"]) <= 0.05, (clip, own, body["text"])
        # ... and nobody else's
        for other in CLIPS[model]:
            if other != clip:
                assert cer(alone[other]["text"], body["text"]) > 0.5, (clip, other, body["text"])
        assert body["segments"] and body["duration"] == alone[clip]["duration"]

    for model, names in CLIPS.items():
        stats = serve.get_app_handle(model).batches.remote().result(timeout_s=60)
        assert stats["max_batch_size"] >= 2
        ours = {ids[clip] for clip in names}
        new = stats["batches"] - before[model]["batches"]
        recent = stats["recent"][-new:]
        shared = [b for b in recent if len(ours.intersection(b["requests"])) >= 2]
        print(model, "batches since the concurrent requests:", [(b["size"], b["requests"]) for b in recent])
        # windows of two or more of the concurrent requests went through the model in one call;
        # with max_batch_size 1 there would be none
        assert shared, recent
        assert all(b["size"] <= stats["max_batch_size"] for b in recent)
        assert stats["shared"] > before[model]["shared"]


def test_a_beam_wider_than_the_app_allows_is_refused_before_it_reaches_a_batch(serve_cluster, data_dir):
    from ray import serve

    from deployments.contract import InvalidOptionsError
    from serve_app.audio import decode_audio

    audio = decode_audio((data_dir / "en_jfk.flac").read_bytes(), max_seconds=60)
    limit = serve_cluster.app_config("whisperx")["args"].get("max_beam_size", 8)
    with pytest.raises(InvalidOptionsError, match="max_beam_size"):
        serve.get_app_handle("whisperx").transcribe.remote(audio, {"beam_size": limit + 1}).result(timeout_s=120)
