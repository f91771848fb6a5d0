"""Model apps as plug-ins: declared specs, options honoured or refused, a third model with no
ingress edit (the README's "Adding a model" blocks, deployed as written with the local venv and
the small model), and the deploy that names a route to an unknown model."""

from __future__ import annotations

import copy

import httpx
import pytest
import yaml

from deployments.contract import UnsupportedOptionError
from serve_app.ready import DeployFailedError
from tests.conftest import DATA, ROOT
from tests.readme import tagged_blocks
from tests.textnorm import wer

pytestmark = pytest.mark.slow

PREFIX = "/plugins"
FR_CLIP = "fr_picovoice_test_fr.flac"
ZH_CLIP = "zh_aishell1_BAC009S0724W0121.flac"


def _post(url: str, name: str, **form) -> httpx.Response:
    with open(DATA / name, "rb") as f:
        return httpx.post(f"{url}/v1/audio/transcriptions", files={"file": (name, f)}, data={"response_format": "verbose_json", **form}, timeout=600)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# -- specs and options on the session's own apps ----------------------------------------------


def test_models_list_each_apps_declared_spec(base_url):
    models = {m["id"]: m for m in httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"]}
    assert set(models) == {"auto", "belle2", "whisperx"}
    belle2, whisperx = models["belle2"], models["whisperx"]
    assert belle2["languages"] == ["zh"] and belle2["tasks"] == ["transcribe"] and belle2["available"]
    assert belle2["capabilities"] == {"word_timestamps": True, "speakers": False, "script_choice": True}
    assert whisperx["languages"] == [] and whisperx["tasks"] == ["transcribe", "translate"]
    # no diarization_model in the local config: whisperx declares no speakers
    assert whisperx["capabilities"] == {"word_timestamps": True, "speakers": False, "script_choice": True}
    assert models["auto"]["routes"] == {"zh": "belle2", "yue": "belle2"} and "whisper-1" in models["auto"]["aliases"]


def test_an_option_the_chosen_model_does_not_honour_is_a_400_naming_both(base_url):
    error = _error(_post(base_url, ZH_CLIP, model="belle2", diarize="true"), 400)
    assert error["code"] == "unsupported_option" and error["param"] == "diarize"
    assert "belle2 does not label speakers" in error["message"], error
    error = _error(_post(base_url, ZH_CLIP, model="belle2", language="en"), 400)
    assert error["param"] == "language" and "belle2 decodes zh only" in error["message"], error
    with open(DATA / ZH_CLIP, "rb") as f:
        r = httpx.post(f"{base_url}/v1/audio/translations", files={"file": (ZH_CLIP, f)}, data={"model": "belle2"}, timeout=600)
    error = _error(r, 400)
    assert error["param"] == "model" and "belle2 does not translate" in error["message"], error
    error = _error(_post(base_url, ZH_CLIP, model="belle-3"), 400)
    assert error["code"] == "model_not_found" and error["param"] == "model"


def test_under_auto_an_unhonoured_option_is_reported_in_warnings(base_url):
    r = _post(base_url, ZH_CLIP, diarize="true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "belle2" and "X-KlipNote-Fallback" not in r.headers
    (warning,) = body["warnings"]
    assert warning.startswith("Option diarize=True was not applied: belle2 does not label speakers"), warning
    assert "language zh" in warning, warning
    assert "广州" in body["text"]


def test_script_is_honoured_by_every_model_through_the_shared_text_stage(base_url):
    for model in ("belle2", "whisperx"):
        body = _post(base_url, ZH_CLIP, model=model, language="zh", script="traditional").json()
        assert body["model"] == model and body["warnings"] == [], body
        assert "廣州" in body["text"] and "广州" not in body["text"], (model, body["text"])


def test_the_model_app_itself_refuses_what_its_spec_does_not_list(serve_cluster):
    from ray import serve

    from serve_app.audio import decode_audio

    audio = decode_audio((DATA / ZH_CLIP).read_bytes(), max_seconds=60)
    handle = serve.get_app_handle("belle2")
    assert handle.spec.remote().result(timeout_s=60)["options"] == ["beam_size", "initial_prompt", "script", "temperature", "word_timestamps"]
    with pytest.raises(UnsupportedOptionError, match="belle2 does not label speakers"):
        handle.transcribe.remote(audio, {"diarize": True}).result(timeout_s=600)


# -- a third model, as the README adds it ------------------------------------------------------


def _readme_yaml(tag: str) -> dict:
    (block,) = tagged_blocks(tag)
    return yaml.safe_load(block.code)


def _third_model_apps(serve_cluster, routes_override=None) -> list:
    """The README's two blocks, made local as runtime_envs/local.yaml makes the others."""
    (app,) = _readme_yaml("adding-a-model: app")
    whisperx = serve_cluster.app_config("whisperx")
    app = copy.deepcopy(app)
    app["runtime_env"] = whisperx["runtime_env"]  # the whisperx venv, as its image in production
    app["args"].update(model=str(ROOT / "models" / "faster-whisper-base"), device="cpu", compute_type="float32",
                       local_files_only=True, cpu_threads=1, gpu_memory_fraction=None)
    for dep in app["deployments"]:
        dep["ray_actor_options"] = {"num_cpus": 0.1, "num_gpus": 0}  # the three apps hold most of 2 CPUs
    ingress = serve_cluster.app_config("transcription")
    ingress.update(name="transcription-plugins", route_prefix=PREFIX)
    ingress["args"].update(_readme_yaml("adding-a-model: ingress"), **(routes_override or {}))
    ingress["deployments"][0]["ray_actor_options"] = {"num_cpus": 0}
    return [app, ingress]


def test_a_third_model_serves_its_route_and_falls_back_visibly_with_no_ingress_edit(serve_cluster, manifest):
    third, ingress = _third_model_apps(serve_cluster)
    name = third["name"]
    url = f"{serve_cluster.url}{PREFIX}"
    serve_cluster.deploy(extra=[third, ingress])
    try:
        serve_cluster.wait([name, ingress["name"]], timeout_s=600)
        models = {m["id"]: m for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}
        assert set(models) == {"auto", "belle2", "whisperx", name}
        assert models[name]["engine"] == "fasterwhisper" and models[name]["available"]
        assert models[name]["tasks"] == ["transcribe", "translate"] and models[name]["capabilities"]["word_timestamps"]
        assert models["auto"]["routes"]["fr"] == name

        r = _post(url, FR_CLIP)  # routed by the detected language
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == name and r.headers["X-KlipNote-Model"] == name and body["language"] == "fr"
        assert body["model_info"]["engine"] == "faster-whisper" and body["warnings"] == []
        # whisper base on this clip through whisperx: 0.27 (tests/test_whisperx.py); the same weights here
        assert wer(manifest[FR_CLIP]["reference"], body["text"]) < 0.45, body["text"]

        # its own capability, chosen by its alias: Whisper's cross-attention word times
        r = _post(url, "en_jfk.flac", model="faster-whisper", segmentation="raw", **{"timestamp_granularities[]": "word"})
        assert r.status_code == 200, r.text
        words = [w for s in r.json()["segments"] for w in s["words"]]
        assert [w["word"].lower().strip(",.") for w in words][:4] == ["and", "so", "my", "fellow"], words[:6]
        assert all(a["start"] <= b["start"] for a, b in zip(words, words[1:]))

        # gone: French falls back to whisperx, visibly
        serve_cluster.deploy(extra=[ingress])
        serve_cluster.wait_gone(name)
        r = _post(url, FR_CLIP)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "whisperx" and r.headers["X-KlipNote-Fallback"] == f"{name}->whisperx"
        assert body["warnings"][0].startswith(f"{name} could not serve this request"), body["warnings"]
        health = httpx.get(f"{url}/health", timeout=30).json()
        assert health["models"] == {"belle2": True, "whisperx": True, name: False}
    finally:
        serve_cluster.deploy()
        for app in (name, ingress["name"]):
            serve_cluster.wait_gone(app)


def test_a_route_to_an_unknown_model_fails_the_deploy_naming_it(serve_cluster):
    _, ingress = _third_model_apps(serve_cluster, {"routes": {"fr": "fasterwhisperz"}})
    serve_cluster.deploy(extra=[ingress])
    try:
        with pytest.raises(DeployFailedError) as failed:
            serve_cluster.wait([ingress["name"]], timeout_s=300)
        assert "'fasterwhisperz' for routes['fr']" in str(failed.value), str(failed.value)
    finally:
        serve_cluster.deploy()
        serve_cluster.wait_gone(ingress["name"])
