"""The GPU bench's pieces that need no model: its Serve configs and the pin's token counting.

The decoding itself is checked live in tests/test_pinned_decode.py; the whole bench runs on CPU
with `bench/gpu_speed.py --device cpu --shape tiny` (README, Benchmarks).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from deployments.belle2.app import Belle2Args
from deployments.pinned_decode import MAX_PINNED_DECODE_TOKENS, transformers_window_tokens
from deployments.whisperx.app import WhisperXArgs
from runtime_envs.make_local_config import local_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_speed  # noqa: E402

MODELS = {"belle2": Path("/models/random-large-v3-hf"), "whisperx": Path("/models/random-large-v3-ct2")}
ARG_MODELS = {"belle2": Belle2Args, "whisperx": WhisperXArgs}


@pytest.fixture(scope="module")
def configs() -> tuple:
    production = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    overlay = yaml.safe_load((ROOT / "runtime_envs" / "local.yaml").read_text())
    return local_config(production, overlay, http_port=18000), production


def _scenario(configs, name: str, device: str) -> dict:
    local, production = configs
    return gpu_speed.scenario_config(local, production, gpu_speed.SCENARIOS[name], models=MODELS, device=device,
                                     decode_tokens=100)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("name", list(gpu_speed.SCENARIOS))
def test_scenario_configs_are_valid_and_pinned(configs, name, device):
    config = _scenario(configs, name, device)
    ServeDeploySchema.model_validate(config)
    apps = {a["name"]: a for a in config["applications"]}
    shares = gpu_speed.SCENARIOS[name]
    assert set(apps) == {"transcription", *shares}
    assert apps["transcription"]["args"]["fallback_model"] is None  # a failure shows, never the other model
    for model, share in shares.items():
        app = apps[model]
        args = ARG_MODELS[model].model_validate(app["args"])
        assert args.pinned_decode_tokens == 100
        assert args.model == str(MODELS[model]) and args.device == device
        (deployment,) = app["deployments"]
        assert deployment["autoscaling_config"]["min_replicas"] == deployment["autoscaling_config"]["max_replicas"] == 1
        if device == "cuda":
            assert deployment["ray_actor_options"]["num_gpus"] == share
            assert args.gpu_memory_fraction == share
        else:
            assert deployment["ray_actor_options"]["num_gpus"] == 0


def test_gpu_scenarios_use_production_batches_and_float16(configs):
    local, production = configs
    prod = {a["name"]: a for a in production["applications"]}
    apps = {a["name"]: a for a in _scenario(configs, "shared 0.5/0.5", "cuda")["applications"]}
    for model in ("belle2", "whisperx"):
        assert apps[model]["args"]["batch_size"] == prod[model]["args"]["batch_size"]
    assert apps["whisperx"]["args"]["compute_type"] == "float16"


@pytest.mark.parametrize("bad", [0, MAX_PINNED_DECODE_TOKENS + 1])
def test_pin_out_of_range_is_rejected(bad):
    for args in ARG_MODELS.values():
        with pytest.raises(ValidationError, match="pinned_decode_tokens"):
            args.model_validate({"pinned_decode_tokens": bad})


class _WhisperTokens:
    """The ids `transformers_window_tokens` reads, as in Whisper's multilingual tokenizer."""

    eos_token_id = 50257
    ids = {"<|startoftranscript|>": 50258, "<|transcribe|>": 50359, "<|translate|>": 50358}

    def convert_tokens_to_ids(self, tokens):
        return self.ids[tokens] if isinstance(tokens, str) else [self.ids[t] for t in tokens]


def test_window_tokens_count_what_follows_the_prompt():
    sot, zh, transcribe, translate, eot, prev = 50258, 50260, 50359, 50358, 50257, 50361
    rows = [
        [sot, zh, transcribe, 11, 12, 13, 50364, 50414],  # 5 generated
        [sot, zh, transcribe, 11, 12, eot, eot, eot],  # ended early: 2, padding not counted
        [prev, 400, 401, sot, zh, translate, 11, 12, 13],  # an initial prompt before the start token: 3
    ]
    assert transformers_window_tokens(rows, _WhisperTokens()) == [5, 2, 3]



@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="needs a CUDA GPU")
def test_gpu_bench_runs_on_cuda_with_a_tiny_random_model():
    """The whole cuda path (float16, GPU shares, both apps at 0.5) on a tiny random model, unrecorded."""
    proc = subprocess.run(
        [str(ROOT / ".venvs" / "ingress" / "bin" / "python"), "bench/gpu_speed.py", "--device", "cuda", "--shape", "tiny",
         "--decode-tokens", "8", "--repeat", "1", "--clients", "2", "--requests-per-client", "1",
         "--clips", "en_jfk.flac", "zh_funasr_vad_example_70s.flac", "--no-record"],
        capture_output=True, text=True, cwd=ROOT, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Random weights, decode pinned to 8 tokens per window" in proc.stdout
    for scenario in gpu_speed.SCENARIOS:
        assert f"| {scenario} | " in proc.stdout, proc.stdout
