"""The BELLE-2 speed-ups against transformers as shipped, and their guards: in the belle2 venv,
without Ray or Serve (tests/belle2_speedups_probe.py on the bundled base weights, real clips).

A transformers upgrade that changes what a shortcut relies on must show here: as other tokens,
as a shortcut counter that stays at 0, or (outside the verified versions) as the speed-ups
turned off with a warning. The live app's side is tests/test_belle2.py.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
from pathlib import Path

import pytest

from deployments.belle2.speedups import SHORTCUT_COUNTERS, VERIFIED_TRANSFORMERS, transformers_verified

ROOT = Path(__file__).resolve().parents[1]
BELLE2_PYTHON = Path(os.environ.get("KLIPNOTE_VENV_BELLE2", ROOT / ".venvs" / "belle2")) / "bin" / "python"
PROBE = ROOT / "tests" / "belle2_speedups_probe.py"
# Short, long and a 1 s clip; read, spontaneous and studio Mandarin.
FLOAT32_CLIPS = ["zh_aishell1_BAC009S0724W0121.flac", "zh_funasr_regression_sample.flac", "zh_speechrecognition_chinese.flac"]
# float16 is ~6x slower than float32 on this CPU: one 1 s clip (and the self-check's own clip).
FLOAT16_CLIPS = ["zh_speechrecognition_chinese.flac"]


SCENARIOS = {
    "float32": FLOAT32_CLIPS,
    "float16": FLOAT16_CLIPS,
    "version_guard": ["zh_aishell1_BAC009S0724W0121.flac"],
    "broken_shortcut": ["zh_aishell1_BAC009S0724W0121.flac"],
    "decode_events": ["zh_paddlespeech_zh.flac"],
}


def _probe(scenario: str) -> dict:
    proc = subprocess.run([str(BELLE2_PYTHON), str(PROBE), scenario, *SCENARIOS[scenario]], capture_output=True, text=True, cwd=ROOT,
                          timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def probes():
    """Every scenario's result; two probe processes at a time (each decodes mostly on one thread)."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(_probe, name) for name in SCENARIOS}
        return {name: future.result() for name, future in futures.items()}


def test_the_verified_range_is_one_specifier_that_holds_the_gpu_hosts_version():
    assert transformers_verified("5.17.0") and transformers_verified("5.23.0")
    assert not transformers_verified("4.57.1") and not transformers_verified("6.0.0")
    assert VERIFIED_TRANSFORMERS.startswith(">=")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_speedups_give_transformers_own_tokens(probes, dtype):
    out = probes[dtype]
    assert out["served_warnings"] == [], out["served_warnings"]
    assert out["tokens_equal"], "a beam-5 batch of the clips decoded to other tokens with the speed-ups"
    for clip, (served, plain) in out["segments"].items():
        assert served == plain, clip
        assert served, clip  # real speech: something was decoded
    counts, plain_counts = out["counts_after"], out["plain_counts"]
    assert all(counts[name] > out["served_counts"][name] > 0 for name in SHORTCUT_COUNTERS), counts
    assert counts["onednn_linears"] == (97 if dtype == "float32" else 0), counts  # base: 4 per attention, 2 MLP, output
    if plain_counts is not None:
        assert set(plain_counts.values()) == {0}, plain_counts


def test_an_unverified_transformers_runs_as_shipped_and_says_so(probes):
    out = probes["version_guard"]
    assert set(out["counts"].values()) == {0}, out["counts"]
    (warning,) = out["warnings"]
    assert "outside the versions" in warning and "<1.0" in warning, warning
    (segments,) = out["segments"].values()
    assert "广州" in "".join(s["text"] for s in segments)


def test_a_broken_shortcut_is_caught_by_the_self_check_and_turned_off(probes):
    out = probes["broken_shortcut"]
    assert not out["shortcuts_enabled"]
    (warning,) = out["warnings"]
    assert warning.startswith("BELLE-2 decoding shortcuts turned off at start-up: the check clip decoded to other tokens than transformers as shipped"), warning
    assert out["counts_after"] == out["counts_at_start"], "a shortcut still applied after it was turned off"
    (segments,) = out["segments"].values()
    assert "广州" in "".join(s["text"] for s in segments)


def test_the_core_counts_windows_silence_and_temperature_retries(probes):
    """What the replica's metrics are made of, counted where transformers decides."""
    events = probes["decode_events"]
    speech, reversed_, hum, loop = events["speech"], events["reversed"], events["hum"], events["loop"]
    for run in (speech, hum, loop):
        assert run["windows"] == 1 and run["counts"]["windows"] == 1, run
    # Sampled at a higher temperature, reversed speech may end early and leave speech over for a
    # follow-up pass, which is one more window decoded (as it should be counted).
    assert reversed_["windows"] == 1 and 1 <= reversed_["counts"]["windows"] <= 1 + events["max_follow_ups"], reversed_
    assert speech["text"] and speech["counts"].get("temperature_retries", 0) == 0 and speech["counts"].get("no_speech_windows", 0) == 0, speech
    # the greedy pass over reversed speech fails the log-probability threshold: decoded again
    assert reversed_["counts"]["temperature_retries"] >= 1, reversed_
    assert hum["text"] == "" and hum["counts"]["no_speech_windows"] == 1, hum
    assert loop["counts"]["repetition_collapses"] == 1 and "Collapsed a repetition loop in 1 segment(s)." in loop["warnings"], loop
    assert speech["counts"].get("repetition_collapses", 0) == 0
    assert events["batch_sizes"] == {"1": 4}
