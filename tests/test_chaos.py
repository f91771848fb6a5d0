"""Replicas killed with a real signal mid-request: every request gets an answer, none is lost.

Run last (marker `chaos`, tests/conftest.py), against the session cluster, each test waiting
until the killed app serves again. What a client sees:

- BELLE-2 killed with requests in flight and queued on it: each is served by the fallback model
  (whisperx), visibly, rather than failing or waiting for BELLE-2's restart.
- WhisperX killed under a request that chose it (no other model can serve it): 503
  `model_replica_lost` with Retry-After, never a bare 500.
- BELLE-2 killed in the middle of a recording sent in pieces: the pieces it finished stay its,
  the rest are served by the fallback, and a warning says from when.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
import signal
import time

import httpx
import pytest

from tests.conftest import small_pieces_ingress

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

ZH_LONG = "zh_funasr_vad_example_70s.flac"


def _replica_pid(app: str) -> int:
    from ray import serve

    return serve.get_app_handle(app).memory.remote().result(timeout_s=300)["pid"]


def _wait_until_serving_again(app: str, old_pid: int, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if _replica_pid(app) != old_pid:
                return
        except Exception:
            pass
        time.sleep(2)
    raise TimeoutError(f"{app} did not come back within {timeout_s} s")


def _post(url: str, audio: bytes, **form) -> httpx.Response:
    return httpx.post(f"{url}/v1/audio/transcriptions", files={"file": ("a.flac", audio)},
                      data={"response_format": "verbose_json", **form}, timeout=900)


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _wait_busy(pid: int, seconds: float) -> None:
    """Waits until the process has used `seconds` of CPU: the requests have reached it."""
    start = _cpu_seconds(pid)
    deadline = time.monotonic() + 120
    while _cpu_seconds(pid) - start < seconds:
        assert time.monotonic() < deadline, "the requests never reached the replica"
        time.sleep(0.2)


def test_belle2_killed_mid_request_its_requests_fall_back_and_none_is_lost(base_url, data_dir):
    audio = (data_dir / ZH_LONG).read_bytes()
    pid = _replica_pid("belle2")
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        # three in flight on BELLE-2 (max_ongoing_requests 4)
        futures = [pool.submit(_post, base_url, audio, language="zh") for _ in range(3)]
        _wait_busy(pid, 3.0)
        os.kill(pid, signal.SIGKILL)
        answers = [f.result(timeout=900) for f in futures]
    for r in answers:
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "whisperx" and r.headers["X-KlipNote-Fallback"] == "belle2->whisperx", body["warnings"]
        assert body["warnings"][0].startswith("belle2 could not serve this request"), body["warnings"]
        assert body["text"], body
    _wait_until_serving_again("belle2", pid)
    r = _post(base_url, (data_dir / "zh_paddlespeech_zh.flac").read_bytes(), language="zh")
    assert r.status_code == 200 and r.json()["model"] == "belle2", r.text


def test_whisperx_killed_under_a_request_only_it_can_serve_gives_503_with_a_code(base_url, data_dir):
    audio = (data_dir / "de_librivox_simplicissimus.flac").read_bytes()
    pid = _replica_pid("whisperx")
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(_post, base_url, audio, model="whisperx", language="de")
        _wait_busy(pid, 2.0)
        os.kill(pid, signal.SIGKILL)
        r = future.result(timeout=900)
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] in ("model_replica_lost", "model_unavailable") and error["type"] == "server_error", error
    assert int(r.headers["Retry-After"]) > 0
    for leak in ("Traceback", "ActorDiedError", "pid=", "ray::"):
        assert leak not in r.text
    _wait_until_serving_again("whisperx", pid)
    r = _post(base_url, (data_dir / "en_jfk.flac").read_bytes())
    assert r.status_code == 200 and r.json()["model"] == "whisperx", r.text


def test_belle2_killed_mid_recording_the_rest_falls_back_and_the_done_pieces_stay(serve_cluster, data_dir):
    serve_cluster.deploy(extra=[small_pieces_ingress(serve_cluster, "probe-chaos")])
    try:
        serve_cluster.wait(["probe-chaos"], timeout_s=600)
        pid = _replica_pid("belle2")
        events, first_piece_done = [], threading.Event()

        def stream() -> None:
            with httpx.stream("POST", f"{serve_cluster.url}/probe-chaos/v1/audio/transcriptions", timeout=900,
                              files={"file": ("talk.flac", (data_dir / ZH_LONG).read_bytes())}, data={"stream": "true", "language": "zh"}) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
                        if events[-1]["type"] == "transcript.progress":
                            first_piece_done.set()

        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(stream)
            assert first_piece_done.wait(timeout=300), events
            os.kill(pid, signal.SIGKILL)
            future.result(timeout=900)
        done = events[-1]
        assert done["type"] == "transcript.text.done", done
        served = [e["model"] for e in events if e["type"] == "transcript.progress"]
        # belle2 for the pieces before the kill, whisperx for every piece after
        assert served[0] == "belle2" and served[-1] == "whisperx" and served == sorted(served), served
        assert done["model"] == "belle2" and done["fallback"] == "belle2->whisperx"
        warning = next(w for w in done["warnings"] if "could not serve" in w)
        assert warning.startswith("From 0:00:") and "belle2 could not serve this request" in warning, done["warnings"]
        assert done["duration"] > 70 and done["text"]
        segments = [e for e in events if e["type"] == "transcript.text.segment"]
        assert segments[-1]["end"] > 60 and [s["start"] for s in segments] == sorted(s["start"] for s in segments)
        _wait_until_serving_again("belle2", pid)
    finally:
        serve_cluster.deploy()
        serve_cluster.wait_gone("probe-chaos")
