"""Autoscaling seen to act: whisperx scales out to a second replica under load, the second serves
requests and the ingress admits more, then it is removed once the load stops.

The session cluster's whisperx gets an overlay (min 1, max 2 replicas, short delays and look-back)
for this test only; that is a config-only update, so Serve keeps the running replica, and the
local config is deployed again at the end. Disruptive (a replica comes and goes), so collected
after the other tests (tests/conftest.py).
"""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.test_long_audio import _wait_for

pytestmark = [pytest.mark.slow, pytest.mark.disruptive]

AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 1,
    "metrics_interval_s": 1,
    "look_back_period_s": 4,
    "upscale_delay_s": 2,
    "downscale_delay_s": 10,
}
"""Production's knobs (serve_config.yaml) at test scale: scale out after 2 s above one request
per replica, back after 10 s below (production: 10 s and 300 s)."""
CLIENTS = 4
CLIP = "de_picovoice_test_de.flac"


def _replica_states(app: str = "whisperx") -> dict:
    from ray import serve

    (deployment,) = serve.status().applications[app].deployments.values()
    return {str(getattr(state, "value", state)): count for state, count in deployment.replica_states.items()}


def test_whisperx_scales_out_under_load_and_back_when_it_stops(serve_cluster, base_url, data_dir):
    from ray import serve

    whisperx = serve_cluster.app_config("whisperx")
    whisperx["deployments"][0]["autoscaling_config"] = dict(AUTOSCALING)
    ingress = serve.get_app_handle("transcription")
    admission = lambda: ingress.admission.remote().result(timeout_s=60)  # noqa: E731
    audio = (data_dir / CLIP).read_bytes()
    stop = threading.Event()
    answers: list = []

    def client():
        with httpx.Client(timeout=600) as http:
            while not stop.is_set():
                r = http.post(f"{base_url}/v1/audio/transcriptions", files={"file": (CLIP, audio)}, data={"language": "de"})
                answers.append(r.status_code)

    serve_cluster.deploy(without=["whisperx"], extra=[whisperx])
    clients = []
    try:
        serve_cluster.wait(["whisperx"])
        assert _replica_states() == {"RUNNING": 1}
        before = admission()
        assert before["capacity"]["apps"]["whisperx"]["running_replicas"] == 1

        clients = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for thread in clients:
            thread.start()
        _wait_for(lambda: _replica_states().get("RUNNING") == 2, timeout_s=420, what="a second whisperx replica to run")
        # the second replica serves: the handle reaches both, and each has served requests
        whisperx_handle = serve.get_app_handle("whisperx")
        served = {}

        def both_served():
            a = whisperx_handle.activity.remote().result(timeout_s=60)
            served[a["replica"]] = a["served"]
            return len(served) == 2 and all(served.values())

        _wait_for(both_served, timeout_s=180, what="both whisperx replicas to have served requests")
        # ... and the ingress admits more: the new replica's slots count
        scaled = admission()
        assert scaled["capacity"]["apps"]["whisperx"]["running_replicas"] == 2
        assert scaled["limit"] > before["limit"], (before, scaled)
    finally:
        stop.set()
        for thread in clients:
            thread.join(600)
    assert answers and set(answers) == {200}, answers

    try:
        _wait_for(lambda: _replica_states() == {"RUNNING": 1}, timeout_s=300, what="whisperx to scale back to one replica")
        assert admission()["limit"] == before["limit"]
    finally:
        serve_cluster.deploy()
        serve_cluster.wait()
