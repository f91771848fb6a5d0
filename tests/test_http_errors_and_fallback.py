"""Bad uploads get a clear 4xx in OpenAI's error shape; a missing BELLE-2 falls back visibly."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from opencc import OpenCC

from tests.mixed import MANDARIN_ENGLISH, mixed_recording
from tests.media import wav_bytes

pytestmark = pytest.mark.slow


def _post(base_url: str, content: bytes, filename: str, **form) -> httpx.Response:
    return httpx.post(
        f"{base_url}/v1/audio/transcriptions",
        files={"file": (filename, content)},
        data=form,
        timeout=600,
    )


def _bad_inputs(data_dir):
    flac = (data_dir / "en_jfk.flac").read_bytes()
    mp3 = (data_dir / "zh_funasr_asr_example.mp3").read_bytes()
    return [
        ("empty", b"", "empty.wav", 400),
        ("text file", b"this is not audio at all\n" * 20, "notes.txt", 415),
        ("truncated flac", flac[: len(flac) // 3], "cut.flac", 400),
        # every mp3 frame left is valid: only the LAME header's length gives the cut away
        ("truncated mp3", mp3[: len(mp3) // 2], "cut.mp3", 400),
        ("zero-length wav", wav_bytes(np.zeros(0, np.float32)), "zero.wav", 400),
    ]


def _assert_openai_error(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"


def test_bad_uploads_get_4xx_and_the_service_keeps_serving(base_url, data_dir):
    for label, content, filename, status in _bad_inputs(data_dir):
        r = _post(base_url, content, filename)
        assert r.status_code == status, f"{label}: {r.status_code} {r.text}"
        _assert_openai_error(r, status)
        if label == "truncated mp3":
            assert "truncated" in r.json()["error"]["message"]
    ok = _post(base_url, (data_dir / "en_jfk.flac").read_bytes(), "en_jfk.flac")
    assert ok.status_code == 200 and "ask not" in ok.json()["text"].lower()


def test_unknown_model_and_bad_format_are_400(base_url, data_dir):
    audio = (data_dir / "en_jfk.flac").read_bytes()
    _assert_openai_error(_post(base_url, audio, "a.flac", model="gpt-9"), 400)
    _assert_openai_error(_post(base_url, audio, "a.flac", response_format="docx"), 400)


def test_oversize_upload_is_413(serve_cluster, data_dir):
    small = serve_cluster.ingress_variant("transcription-small-limit", route_prefix="/small", max_upload_bytes=50_000)
    with serve_cluster.beside(small, timeout_s=300) as url:
        r = httpx.post(f"{url}/v1/audio/transcriptions", files={"file": ("en_jfk.flac", (data_dir / "en_jfk.flac").read_bytes())}, timeout=120)
        _assert_openai_error(r, 413)
        assert r.json()["error"]["code"] == "file_too_large"


def test_other_ray_app_transcribes_through_the_handle(serve_cluster, data_dir):
    caller = {
        "name": "handle-caller",
        "route_prefix": "/caller",
        "import_path": "tests.apps.handle_caller:build_app",
        "runtime_env": serve_cluster.app_config("transcription")["runtime_env"],
        # the three apps already hold most of this machine's two CPUs
        "deployments": [{"name": "HandleCaller", "ray_actor_options": {"num_cpus": 0}}],
    }
    with serve_cluster.beside(caller, timeout_s=300) as url:
        r = httpx.post(url, content=(data_dir / "zh_aishell1_BAC009S0724W0121.flac").read_bytes(), timeout=600)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "belle2" and body["language"] == "zh"
        assert "广州" in body["text"]


def test_mandarin_falls_back_to_whisperx_visibly_when_belle2_is_gone(serve_cluster, data_dir):
    audio = (data_dir / "zh_aishell1_BAC009S0724W0121.flac").read_bytes()
    serve_cluster.deploy(without=["belle2"])
    try:
        serve_cluster.wait_gone("belle2")
        r = _post(serve_cluster.url, audio, "zh.flac", response_format="verbose_json")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "whisperx"
        assert r.headers["X-KlipNote-Fallback"] == "belle2->whisperx"
        assert any("belle2" in w and "whisperx" in w for w in body["warnings"])
        # one script throughout: WhisperX's Chinese is converted as BELLE-2's is (simplified by default)
        simplified = OpenCC("t2s")
        assert "广州" in body["text"] and simplified.convert(body["text"]) == body["text"]
        meeting, _ = mixed_recording([data_dir / f for f in MANDARIN_ENGLISH], [f[:2] for f in MANDARIN_ENGLISH])
        r = _post(serve_cluster.url, wav_bytes(meeting), "meeting.wav", response_format="verbose_json")
        assert r.status_code == 200, r.text
        mixed = r.json()
        assert {s["model"] for s in mixed["segments"]} == {"whisperx"}
        assert {s["language"] for s in mixed["segments"]} == {"zh", "en"}
        assert r.headers["X-KlipNote-Fallback"] == "belle2->whisperx"
        zh_text = "".join(s["text"] for s in mixed["segments"] if s["language"] == "zh")
        assert "广州" in zh_text and simplified.convert(zh_text) == zh_text
        health = httpx.get(f"{serve_cluster.url}/health", timeout=30).json()
        assert health["models"] == {"belle2": False, "whisperx": True}
    finally:
        serve_cluster.deploy()
        serve_cluster.wait()
    r = _post(serve_cluster.url, audio, "zh.flac", response_format="verbose_json")
    assert r.json()["model"] == "belle2"


def _wait_for_status(serve_cluster, name: str, statuses, timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve_cluster.details().get("applications", {}).get(name, {})
        if app.get("status") in statuses:
            return app
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} not in {statuses} after {timeout_s} s: {app.get('status')}")
        time.sleep(2)


def test_fallback_warning_carries_serves_reason_when_belle2_failed_to_deploy(serve_cluster, data_dir):
    missing = "/nonexistent/klipnote-missing-belle2-model"
    broken = serve_cluster.app_config("belle2")
    broken["args"]["model"] = missing
    audio = (data_dir / "zh_aishell1_BAC009S0724W0121.flac").read_bytes()
    # Remove the healthy app first, so no replica of the old version survives the update.
    serve_cluster.deploy(without=["belle2"])
    try:
        serve_cluster.wait_gone("belle2")
        serve_cluster.deploy(without=["belle2"], extra=[broken])
        app = _wait_for_status(serve_cluster, "belle2", {"DEPLOY_FAILED", "UNHEALTHY"})
        time.sleep(2.5)  # the ingress caches Serve's status for 2 s
        r = _post(serve_cluster.url, audio, "zh.flac", response_format="verbose_json")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "whisperx"
        assert r.headers["X-KlipNote-Fallback"] == "belle2->whisperx"
        warning = next(w for w in body["warnings"] if w.startswith("belle2 could not serve"))
        assert f"application status {app['status']}: " in warning, warning
        reason = warning.split(f"application status {app['status']}: ", 1)[1]
        assert len(reason.split(")")[0]) > 10, warning  # Serve's own words, not an empty message
        assert "served by whisperx" in warning
        health = httpx.get(f"{serve_cluster.url}/health", timeout=30).json()
        assert health["models"] == {"belle2": False, "whisperx": True}
    finally:
        # Gone first: right after a redeploy Serve may still report the old DEPLOY_FAILED.
        serve_cluster.deploy(without=["belle2"])
        serve_cluster.wait_gone("belle2")
        serve_cluster.deploy()
        serve_cluster.wait()
    time.sleep(2.5)
    r = _post(serve_cluster.url, audio, "zh.flac", response_format="verbose_json")
    assert r.status_code == 200 and r.json()["model"] == "belle2"
