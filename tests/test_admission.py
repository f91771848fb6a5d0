"""Admission control: what a client sees when the ingress or a model app is full.

Fast tests cover the ingress's own limit and the mapping to HTTP. The live test deploys probe
apps with tiny limits beside the real ones and fills them deterministically:

- `belle2-probe`: the real BELLE-2 app with max_ongoing_requests=1 and max_queued_requests=1;
  the test process occupies its one slot through a handle with a long recording.
- `probe-fallback`: an ingress routing zh to belle2-probe. One request waits in its queue, so
  the next finds the queue full (BackPressureError) and falls back to whisperx, visibly.
- `probe-admission`: an ingress admitting two transcriptions at a time without fallback. While
  one request waits in its queue for belle2-probe, one that names belle2 gets 503
  `model_overloaded`; while an upload that stalls holds the second slot, the next gets 503
  `ingress_overloaded` with OpenAI's error body and Retry-After at once.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import numpy as np
import pytest
from ray.serve.exceptions import BackPressureError

from serve_app.admission import Admission, AppCapacity, ModelCapacity
from serve_app.errors import IngressOverloadedError, error_response_for
from serve_app.routing import _app_state


def test_admission_refuses_over_the_limit_and_frees_slots():
    admission = Admission(max_in_flight=2, retry_after_s=7)
    with admission.admit(), admission.admit():
        with pytest.raises(IngressOverloadedError) as e:
            with admission.admit():
                pass
        assert admission.in_flight == 2
    assert admission.in_flight == 0
    response = error_response_for(e.value)
    assert response.status_code == 503 and response.headers["Retry-After"] == "7"
    error = json.loads(response.body)["error"]
    assert error["code"] == "ingress_overloaded" and error["type"] == "server_error" and "limit 2" in error["message"]
    with admission.admit():  # a failure inside the block frees its slot too
        pass
    with pytest.raises(RuntimeError):
        with admission.admit():
            raise RuntimeError("model failed")
    assert admission.in_flight == 0


def test_the_limit_follows_what_the_model_apps_can_take():
    one = {"belle2": AppCapacity(1, 2, 8), "whisperx": AppCapacity(1, 2, 8)}
    two = {**one, "whisperx": AppCapacity(2, 2, 8)}
    # running slots shared among ingress replicas, plus each ingress replica's own handle queues
    assert ModelCapacity(1, one).per_ingress_replica == 2 + 2 + 8 + 8
    assert ModelCapacity(1, two).per_ingress_replica == 2 + 4 + 8 + 8
    assert ModelCapacity(2, two).per_ingress_replica == (2 + 4) // 2 + 8 + 8
    assert ModelCapacity(1, {**one, "belle2": AppCapacity(1, 2, -1)}).per_ingress_replica is None
    admission = Admission(max_in_flight=48, retry_after_s=5)
    assert admission.limit == 48  # nothing read yet
    admission.set_capacity(ModelCapacity(1, one).per_ingress_replica)
    assert admission.limit == 20
    admission.set_capacity(ModelCapacity(1, two).per_ingress_replica)
    assert admission.limit == 22  # scaling whisperx out raised it
    admission.set_capacity(0)
    assert admission.limit == 1  # nothing running and no queues: one at a time, to be told why
    admission.set_capacity(None)
    assert admission.limit == 48
    small = Admission(max_in_flight=2, retry_after_s=5)
    small.set_capacity(20)
    assert small.limit == 2  # max_in_flight stays the ceiling


def test_a_full_model_queue_without_fallback_is_503_with_retry_after():
    response = error_response_for(BackPressureError(num_queued_requests=8, max_queued_requests=8))
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    error = json.loads(response.body)["error"]
    assert error["code"] == "model_overloaded" and "max_queued_requests=8" in error["message"]
    response = error_response_for(BackPressureError(num_queued_requests=1, max_queued_requests=1, retry_after_s=2.5))
    assert response.headers["Retry-After"] == "3"


def _app(status: str, *deployments: dict, message: str = "") -> dict:
    """One application of Serve's details dict, in the shape the controller sends."""
    return {"status": status, "message": message, "deployments": {d["name"]: d for d in deployments}}


def _deployment(name: str, *replica_states: str, status: str = "HEALTHY", message: str = "", **config) -> dict:
    return {
        "name": name,
        "status": status,
        "status_trigger": "CONFIG_UPDATE_COMPLETED",
        "message": message,
        "deployment_config": {"name": name, **config},
        "replicas": [{"replica_id": f"r{i}", "state": state} for i, state in enumerate(replica_states)],
    }


def test_app_state_carries_serves_status_and_the_last_line_of_its_message():
    failed = _app(
        "DEPLOY_FAILED",
        _deployment(
            "Belle2Transcriber",
            status="DEPLOY_FAILED",
            message="The deployment failed to start 3 times in a row.\nTraceback (most recent call last):\n  File \"app.py\"\nOSError: /missing is not a folder\n",
        ),
        message="The deployments ['Belle2Transcriber'] are UNHEALTHY.",
    )
    state = _app_state(failed)
    assert not state.running and state.status == "DEPLOY_FAILED"
    assert state.reason() == "application status DEPLOY_FAILED: OSError: /missing is not a folder"
    assert _app_state(_app("RUNNING", _deployment("WhisperXTranscriber", "STARTING", "RUNNING"))) == (True, "RUNNING", "")
    # the controller's dict holds Serve's str enums: read as their values
    from ray.serve._private.common import ReplicaState
    from ray.serve.schema import ApplicationStatus

    enums = _app(ApplicationStatus.RUNNING, _deployment("WhisperXTranscriber", ReplicaState.RUNNING))
    assert _app_state(enums) == (True, "RUNNING", "")


def test_capacity_reads_serves_details_dict_with_serves_defaults():
    details = {
        "applications": {
            "transcription": _app("RUNNING", _deployment("TranscriptionIngress", "RUNNING", "RUNNING")),
            "belle2": _app("RUNNING", _deployment("Belle2Transcriber", "RUNNING", max_ongoing_requests=8, max_queued_requests=16)),
            "whisperx": _app("RUNNING", _deployment("WhisperXTranscriber", "RUNNING", "RUNNING", "STOPPING", max_ongoing_requests=4, max_queued_requests=2)),
        }
    }
    capacity = ModelCapacity.from_serve(details, "transcription", ["belle2", "whisperx", "missing"])
    assert capacity.ingress_replicas == 2
    assert capacity.apps == {"belle2": AppCapacity(1, 8, 16), "whisperx": AppCapacity(2, 4, 2), "missing": AppCapacity(0, 0, 0)}
    assert capacity.per_ingress_replica == (8 + 8) // 2 + 16 + 2
    # options left unset take Serve's defaults: an unbounded queue means no capacity limit
    details["applications"]["belle2"] = _app("RUNNING", _deployment("Belle2Transcriber", "RUNNING"))
    assert ModelCapacity.from_serve(details, "transcription", ["belle2"]).per_ingress_replica is None


# -- live ------------------------------------------------------------------------------------

ZH_SHORT = "zh_aishell1_BAC009S0724W0121.flac"
ZH_LONG = "zh_funasr_vad_example_70s.flac"


def _probe_apps(serve_cluster) -> list:
    belle2 = serve_cluster.app_config("belle2")
    belle2["name"] = "belle2-probe"
    (dep,) = belle2["deployments"]
    dep.update(max_ongoing_requests=1, max_queued_requests=1, autoscaling_config={"min_replicas": 1, "max_replicas": 1})
    dep["ray_actor_options"] = {"num_cpus": 0, "num_gpus": 0}  # the three apps hold this machine's CPUs
    probes = [belle2]
    for name, args in (
        ("probe-fallback", {}),
        ("probe-admission", {"max_in_flight": 2, "fallback_model": None}),
    ):
        ingress = serve_cluster.app_config("transcription")
        ingress.update(name=name, route_prefix=f"/{name}")
        ingress["args"].update(model_apps={"belle2": "belle2-probe", "whisperx": "whisperx"}, **args)
        ingress["deployments"][0]["ray_actor_options"] = {"num_cpus": 0}
        probes.append(ingress)
    return probes


@pytest.mark.slow
def test_status_and_capacity_read_serves_dict_without_building_its_models(serve_cluster, monkeypatch):
    """The ingress reads Serve's details in threads; building Serve's pydantic models there
    raced (see `serve_details`). On the live cluster's own dict: they read right and build none."""
    from ray import cloudpickle
    from ray.serve.schema import ServeInstanceDetails

    from serve_app.admission import serve_details

    details = serve_details()

    def no_registration(module):
        raise AssertionError(f"registered {module} for pickle by value")

    monkeypatch.setattr(cloudpickle, "register_pickle_by_value", no_registration)
    with pytest.raises(AssertionError, match="pickle by value"):
        ServeInstanceDetails(**details)  # what serve.status() does, and why it is not used
    states = {name: _app_state(app) for name, app in details["applications"].items()}
    assert {name: state.running for name, state in states.items() if name in ("transcription", "belle2", "whisperx")} == {
        "transcription": True, "belle2": True, "whisperx": True}
    expected = 0
    for name in ("belle2", "whisperx"):
        (dep,) = serve_cluster.app_config(name)["deployments"]
        expected += dep["max_ongoing_requests"] + dep["max_queued_requests"]
    assert ModelCapacity.from_serve(details, "transcription", ["belle2", "whisperx"]).per_ingress_replica == expected


def _wait_in_flight(app: str, n: int, timeout_s: float = 60) -> None:
    """Waits until the app's ingress holds exactly `n` admission slots. A request's slot is freed
    just after its answer was sent, so a client that got its answer may still find the slot held;
    and the proxy hands a new request (a stalled upload's) over later than the client sent it."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while (held := serve.get_app_handle(app).admission.remote().result(timeout_s=60)["in_flight"]) != n:
        assert time.monotonic() < deadline, f"{app} holds {held} slot(s), not {n}"
        time.sleep(0.1)


def _stalled_upload(base_url: str, path: str):
    """A socket that sent a transcription's headers and 20 bytes of its body, then nothing."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(base_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=60)
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                  "Content-Length: 10000000\r\n\r\n--x\r\nContent-Disp").encode())
    return sock


def _headers_then_wait(base_url: str, path: str, *, declared: int) -> bytes:
    """Sends a request's headers and 20 bytes of a `declared`-byte body, then reads the answer."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(base_url)
    head = (f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: {declared}\r\n\r\n--x\r\nContent-Disp")
    with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
        sock.sendall(head.encode())
        answer = b""
        while b"}}" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def _post(url: str, audio: bytes, **form) -> httpx.Response:
    return httpx.post(url, files={"file": ("zh.flac", audio)}, data={"response_format": "verbose_json", **form}, timeout=900)


@pytest.mark.slow
def test_full_queues_fall_back_or_answer_503_never_hang(serve_cluster, data_dir):
    from ray import serve

    from serve_app.audio import decode_audio

    probes = _probe_apps(serve_cluster)
    short = (data_dir / ZH_SHORT).read_bytes()
    long_audio = decode_audio((data_dir / ZH_LONG).read_bytes(), max_seconds=3600)
    serve_cluster.deploy(extra=probes)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    occupier = None
    try:
        serve_cluster.wait([p["name"] for p in probes], timeout_s=600)
        # belle2-probe's one slot: 140 s of Mandarin, long enough to outlast the checks below
        occupier = serve.get_app_handle("belle2-probe").transcribe.remote(np.tile(long_audio, 2), {"language": "zh"})
        time.sleep(3)
        queued = pool.submit(_post, f"{serve_cluster.url}/probe-fallback/v1/audio/transcriptions", short)
        waiting = pool.submit(_post, f"{serve_cluster.url}/probe-admission/v1/audio/transcriptions", short)
        time.sleep(5)  # both reach their ingress's queue for belle2-probe (decode + language ID < 1 s)

        # a full model queue: the zh request falls back to whisperx and says why
        r = _post(f"{serve_cluster.url}/probe-fallback/v1/audio/transcriptions", short)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "whisperx" and r.headers["X-KlipNote-Fallback"] == "belle2->whisperx"
        warning = body["warnings"][0]
        assert warning.startswith("belle2 could not serve this request (BackPressureError: Request dropped due to backpressure"), warning

        # a full model queue without fallback: 503 in OpenAI's shape (Serve's own handler for
        # BackPressureError, which it adds to the app, would answer in plain text)
        r = _post(f"{serve_cluster.url}/probe-admission/v1/audio/transcriptions", short, model="belle2")
        assert r.status_code == 503 and r.headers["content-type"] == "application/json", r.text
        assert r.json()["error"]["code"] == "model_overloaded" and int(r.headers["Retry-After"]) > 0

        # a full ingress (`waiting` and an upload that stalls hold its two slots): 503 at once,
        # OpenAI's body, Retry-After
        _wait_in_flight("probe-admission", 1)  # `waiting` alone
        holder = _stalled_upload(serve_cluster.url, "/probe-admission/v1/audio/transcriptions")
        try:
            _wait_in_flight("probe-admission", 2)
            r = _post(f"{serve_cluster.url}/probe-admission/v1/audio/transcriptions", short)
            assert r.status_code == 503, r.text
            assert r.headers["Retry-After"] == "5"
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == "ingress_overloaded"
            # ... before the upload is read: the answer comes while most of the body is still unsent
            raw = _headers_then_wait(f"{serve_cluster.url}", "/probe-admission/v1/audio/transcriptions", declared=10_000_000)
            assert raw.startswith(b"HTTP/1.1 503") and b'"ingress_overloaded"' in raw, raw[:300]
        finally:
            holder.close()

        # a handle caller, without fallback, gets Serve's BackPressureError for the full model queue
        with pytest.raises(BackPressureError):
            serve.get_app_handle("probe-admission").transcribe.remote(short, model="belle2").result(timeout_s=120)

        # the checks above only prove something while belle2-probe was still busy
        with pytest.raises(TimeoutError):
            occupier.result(timeout_s=0.1)

        # the queued requests are served by belle2 once it is free: a queue is a wait, not a failure
        for future in (queued, waiting):
            r = future.result(timeout=900)
            assert r.status_code == 200 and r.json()["model"] == "belle2" and r.json()["warnings"] == [], r.text
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if occupier is not None:
            occupier.cancel()
        serve_cluster.deploy()
        for p in probes:
            serve_cluster.wait_gone(p["name"])
