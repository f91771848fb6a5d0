"""Run in a model app's venv, without Ray, by tests/test_health.py: what the core's health check
(`ModelCore.check_health`) does on the bundled base weights, and when the model stops decoding.

    .venvs/<env>/bin/python tests/health_probe.py belle2|whisperx

Prints one JSON object (the last line of stdout).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deployments.contract import ModelUnavailableError  # noqa: E402
from deployments.core import import_core, read_speech_clip  # noqa: E402

INTERVAL_S = 2.0
CORES = {
    "belle2": ("deployments.belle2.core:Belle2Core", {"model": str(ROOT / "models" / "whisper-base-hf")}),
    "whisperx": ("deployments.whisperx.core:WhisperXCore", {"model": str(ROOT / "models" / "faster-whisper-base"),
                                                             "model_cache": str(ROOT / "models" / "hf-cache"), "compute_type": "float32"}),
}


def break_model(name: str, core) -> str:
    """What a dead device looks like to the code: the weights are gone from under the model."""
    if name == "belle2":
        conv = core._model.model.encoder.conv1
        conv.weight.data = conv.weight.data[:0]  # the encoder's first weights gone: every forward pass raises
        return "encoder weights emptied"
    core._model.model.unload_model()  # CTranslate2's own unloading: generate raises from now on
    return "CTranslate2 model unloaded"


def main(name: str) -> dict:
    path, args = CORES[name]
    core = import_core(path)({**args, "device": "cpu", "local_files_only": True, "cpu_threads": 1, "batch_size": 2,
                              "health_decode_interval_s": INTERVAL_S})
    out = {"decodes": []}
    core.check_health()  # nothing decoded since start (the warm-up does not count): decodes
    out["decodes"].append(core.health_decodes)
    core.check_health()  # a decode just succeeded: nothing to do
    out["decodes"].append(core.health_decodes)
    time.sleep(INTERVAL_S + 0.1)
    core.transcribe(read_speech_clip())  # a request's decode is proof too
    core.check_health()
    out["decodes"].append(core.health_decodes)
    out["broken"] = break_model(name, core)
    core.check_health()  # within the interval: the last decode still vouches for it
    out["decodes"].append(core.health_decodes)
    time.sleep(INTERVAL_S + 0.1)
    try:
        core.check_health()
        out["error"] = None
    except ModelUnavailableError as e:
        out["error"] = str(e)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1]), ensure_ascii=False))
