"""The platform end to end: three apps, three venvs, one real recording per model over HTTP."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import ROOT
from tests.textnorm import cer

pytestmark = pytest.mark.slow


def test_all_applications_run_healthy(serve_cluster):
    apps = serve_cluster.details()["applications"]
    for name in ("transcription", "belle2", "whisperx"):
        assert apps[name]["status"] == "RUNNING", apps[name].get("message")
        for dep in apps[name]["deployments"].values():
            assert dep["status"] == "HEALTHY"
    health = httpx.get(f"{serve_cluster.url}/health", timeout=30)
    assert health.status_code == 200
    assert health.json()["models"] == {"belle2": True, "whisperx": True}


def test_each_app_runs_in_its_own_venv(base_url, serve_cluster):
    from ray import serve

    public = httpx.get(f"{base_url}/v1/info", timeout=60).json()
    # Over HTTP: versions, no server paths.
    assert all("python_executable" not in entry for entry in public.values())
    assert str(ROOT) not in json.dumps(public)
    info = serve.get_app_handle("transcription").info.remote().result(timeout_s=60)
    belle2, whisperx, ingress = info["belle2"], info["whisperx"], info["transcription"]
    assert {app: entry["packages"] for app, entry in public.items()} == {app: entry["packages"] for app, entry in info.items()}
    assert belle2["python_executable"].startswith(str(ROOT / ".venvs" / "belle2"))
    assert whisperx["python_executable"].startswith(str(ROOT / ".venvs" / "whisperx"))
    assert ingress["python_executable"].startswith(str(ROOT / ".venvs" / "ingress"))
    # The stacks that cannot share one env, each in its own.
    assert belle2["packages"]["torch"].startswith("2.13.")
    assert belle2["packages"]["transformers"].startswith("5.")
    assert whisperx["packages"]["torch"].startswith("2.8.")
    assert whisperx["packages"]["whisperx"] == "3.8.6"
    assert whisperx["packages"]["transformers"].startswith("4.")
    assert ingress["packages"]["torch"] == "absent"
    # One Ray and one Python across the cluster.
    assert {belle2["ray"], whisperx["ray"], ingress["ray"]} == {"2.60.0"}
    assert len({belle2["python"], whisperx["python"], ingress["python"]}) == 1
    assert belle2["loaded"] and whisperx["loaded"]


def _transcribe(base_url: str, path, **form) -> httpx.Response:
    with open(path, "rb") as f:
        return httpx.post(
            f"{base_url}/v1/audio/transcriptions",
            files={"file": (path.name, f)},
            data={"response_format": "verbose_json", **form},
            timeout=600,
        )


def test_english_recording_goes_through_whisperx(base_url, data_dir):
    r = _transcribe(base_url, data_dir / "en_jfk.flac")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "whisperx"
    assert body["language"] == "en"
    assert "ask not what your country can do for you" in body["text"].lower()
    assert body["model_info"]["engine"] == "whisperx"


def test_mandarin_recording_goes_through_belle2(base_url, data_dir, manifest):
    name = "zh_paddlespeech_zh.flac"
    r = _transcribe(base_url, data_dir / name)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "belle2", body["warnings"]
    assert body["language"] == "zh"
    assert body["model_info"]["engine"] == "transformers"
    # Whisper base on this clip; measured 0.0 here (threshold leaves room for CPU numerics).
    assert cer(manifest[name]["reference"], body["text"]) < 0.15, body["text"]


def test_replica_with_other_ray_version_fails_at_start(serve_cluster):
    """Rewrite the cluster's version record, start a model replica: it must refuse to run."""
    from ray._common.usage.usage_constants import CLUSTER_METADATA_KEY
    from ray._private.ray_constants import KV_NAMESPACE_CLUSTER
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

    from serve_app.ready import DeployFailedError

    original = _internal_kv_get(CLUSTER_METADATA_KEY, namespace=KV_NAMESPACE_CLUSTER)
    meta = json.loads(original)
    probe = serve_cluster.app_config("belle2")
    probe["name"] = "version-probe"
    probe["args"]["model"] = "/nonexistent"  # never reached: the check comes first
    try:
        _internal_kv_put(
            CLUSTER_METADATA_KEY,
            json.dumps({**meta, "ray_version": "9.9.9"}).encode(),
            overwrite=True,
            namespace=KV_NAMESPACE_CLUSTER,
        )
        serve_cluster.deploy(extra=[probe])
        with pytest.raises(DeployFailedError, match=r"ray 2\.60\.0 here but 9\.9\.9 on the cluster"):
            serve_cluster.wait(["version-probe"], timeout_s=300)
    finally:
        _internal_kv_put(CLUSTER_METADATA_KEY, original, overwrite=True, namespace=KV_NAMESPACE_CLUSTER)
        serve_cluster.deploy()
        serve_cluster.wait_gone("version-probe")
    # the apps deployed before the change still serve
    assert httpx.get(f"{serve_cluster.url}/health", timeout=30).status_code == 200


def test_every_app_reports_its_replica_memory(serve_cluster):
    """bench/speed.py reads peak RSS per replica through these handles."""
    import os

    from ray import serve

    pids = set()
    for app in ("transcription", "belle2", "whisperx"):
        mem = serve.get_app_handle(app).memory.remote().result(timeout_s=60)
        assert mem["pid"] != os.getpid()
        assert 0 < mem["rss_bytes"] <= mem["peak_rss_bytes"], (app, mem)
        pids.add(mem["pid"])
    assert len(pids) == 3  # three replicas, three processes
