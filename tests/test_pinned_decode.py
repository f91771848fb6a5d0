"""Pinned decode length (the GPU bench's mode for random weights) on both model apps, live.

The models here are random on purpose: a tiny Whisper with random weights and large-v3's 128 mel
bins (bench/random_whisper.py --shape tiny, built by a fixture into a temporary directory), the
kind bench/gpu_speed.py runs at large-v3's size. What they decode is noise; the tests check only
how much: with `pinned_decode_tokens: N`, every window decodes exactly N tokens (counted by the
app from the decoder's output), the model info lists them, and a warning says so.

Random weights seldom pick end-of-text, so they would not notice a pin that only capped the
length. The last test therefore pins the real base model, whose decoding ends well before the
pin, with the apps' own pinning helpers (deployments/pinned_decode.py).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import textwrap

import pytest

from deployments.contract import TranscribeOptions
from serve_app.audio import decode_audio
from tests.conftest import DATA, ROOT

pytestmark = pytest.mark.slow

PIN = 10  # tokens per window
APPS = ("belle2", "whisperx")
# Speech cut into several windows by both apps' VAD (measured: 3 windows in each app).
MULTI_WINDOW_CLIP = "zh_funasr_vad_example_70s.flac"


def _run(env: str, args: list, timeout_s: float = 600) -> str:
    proc = subprocess.run(
        [str(ROOT / ".venvs" / env / "bin" / "python"), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=timeout_s,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def random_tiny(tmp_path_factory) -> dict:
    """A tiny Whisper with random weights (seed 0), per app: transformers for belle2, CT2 for whisperx."""
    out = tmp_path_factory.mktemp("random-whisper")
    built = json.loads(_run("whisperx", ["bench/random_whisper.py", "--shape", "tiny", "--out", str(out)]).splitlines()[-1])
    return {"belle2": built["hf_dir"], "whisperx": built["ct2_dir"]}


@pytest.fixture(scope="module")
def pinned_apps(serve_cluster, random_tiny):
    """`belle2-pinned` and `whisperx-pinned`: the model apps with the random model, pinned to PIN tokens."""
    from ray import serve

    probes = []
    for app in APPS:
        probe = serve_cluster.app_config(app)
        probe["name"] = f"{app}-pinned"
        probe["args"].update(model=random_tiny[app], pinned_decode_tokens=PIN)
        for deployment in probe["deployments"]:
            deployment["ray_actor_options"] = {"num_cpus": 0, "num_gpus": 0}
        probes.append(probe)
    try:
        serve_cluster.deploy(extra=probes)
        serve_cluster.wait([p["name"] for p in probes], timeout_s=600)
        yield {app: serve.get_app_handle(f"{app}-pinned") for app in APPS}
    finally:
        serve_cluster.deploy()
        for probe in probes:
            serve_cluster.wait_gone(probe["name"])


@pytest.mark.parametrize("app", APPS)
def test_every_window_decodes_exactly_the_pinned_tokens(pinned_apps, app):
    audio = decode_audio((DATA / MULTI_WINDOW_CLIP).read_bytes(), max_seconds=600)
    options = TranscribeOptions(language="zh").to_dict()
    result = pinned_apps[app].transcribe.remote(audio, options).result(timeout_s=600)
    info = result["model"]
    print(app, info.get("window_tokens"), result["warnings"])
    assert info["pinned_decode_tokens"] == PIN
    windows = info["window_tokens"]
    assert len(windows) >= 2, windows  # measured: 3 in both apps
    assert windows == [PIN] * len(windows)
    pinned = [w for w in result["warnings"] if w.startswith(f"Decode length pinned to {PIN} tokens per window")]
    assert len(pinned) == 1, result["warnings"]
    assert f"{len(windows)} window(s), {PIN * len(windows)} tokens decoded" in pinned[0]


def test_unpinned_app_reports_no_pin(base_url):
    """The service's own apps (no pin) carry neither the pin fields nor the warning."""
    import httpx

    with open(DATA / "zh_paddlespeech_zh.flac", "rb") as f:
        r = httpx.post(f"{base_url}/v1/audio/transcriptions", files={"file": f},
                       data={"model": "belle2", "language": "zh", "response_format": "verbose_json"}, timeout=600)
    assert r.status_code == 200, r.text
    body = r.json()
    assert "pinned_decode_tokens" not in body["model_info"] and "window_tokens" not in body["model_info"]
    assert not any("pinned" in w for w in body["warnings"])


# With end-of-text allowed, the real base model ends these windows after 21 tokens (transformers,
# zh_paddlespeech_zh, timestamps on) and 25 (CTranslate2, en_jfk, as whisperx calls it), measured
# with greedy decoding; a pin far above that holds only if end-of-text is suppressed.
BASE_PIN = 48
_PINNED_TRANSFORMERS_BASE = textwrap.dedent(
    """
    import json, sys
    from faster_whisper.audio import decode_audio
    from transformers import WhisperForConditionalGeneration, WhisperProcessor
    from deployments.pinned_decode import transformers_generate_kwargs, transformers_window_tokens

    processor = WhisperProcessor.from_pretrained("models/whisper-base-hf", local_files_only=True)
    model = WhisperForConditionalGeneration.from_pretrained("models/whisper-base-hf", local_files_only=True).eval()
    audio = decode_audio("tests/data/zh_paddlespeech_zh.flac", sampling_rate=16000)
    features = processor.feature_extractor([audio], sampling_rate=16000, return_tensors="pt").input_features
    out = model.generate(features, language="zh", task="transcribe", num_beams=1, do_sample=False,
                         return_timestamps=True, return_segments=True,
                         **transformers_generate_kwargs(int(sys.argv[1])))
    print(json.dumps(transformers_window_tokens(out["sequences"].tolist(), processor.tokenizer)))
    """
)
# whisperx's batched decoding calls CTranslate2 with max_length=448 and suppress_tokens=[-1].
_PINNED_CT2_BASE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from faster_whisper import WhisperModel, decode_audio
    from faster_whisper.tokenizer import Tokenizer
    from deployments.pinned_decode import PinnedLengthWhisper, counting_window_tokens

    model = WhisperModel("models/faster-whisper-base", device="cpu", compute_type="float32", cpu_threads=1,
                         local_files_only=True)
    model.model = PinnedLengthWhisper(model.model, int(sys.argv[1]),
                                      end_of_text=model.hf_tokenizer.token_to_id("<|endoftext|>"))
    features = model.feature_extractor(decode_audio("tests/data/en_jfk.flac", sampling_rate=16000))
    features = np.pad(features, ((0, 0), (0, 3000 - features.shape[1])))[None]
    tokenizer = Tokenizer(model.hf_tokenizer, True, task="transcribe", language="en")
    prompt = model.get_prompt(tokenizer, [], without_timestamps=True)
    with counting_window_tokens() as counts:
        model.model.generate(model.encode(features), [prompt], beam_size=1, max_length=448, suppress_tokens=[-1])
    print(json.dumps(counts))
    """
)


def test_pin_outlasts_a_real_models_end_of_text():
    runs = {"transformers": ("belle2", _PINNED_TRANSFORMERS_BASE), "ctranslate2": ("whisperx", _PINNED_CT2_BASE)}

    def run(engine: str) -> list:
        env, script = runs[engine]
        return json.loads(_run(env, ["-c", script, str(BASE_PIN)]).splitlines()[-1])

    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        counts = dict(zip(runs, pool.map(run, runs)))
    assert counts == {engine: [BASE_PIN] for engine in runs}
