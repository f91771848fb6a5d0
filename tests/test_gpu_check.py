"""The GPU check (`make gpu-check`, bench/gpu_check.py) between GPU runs: its comparison logic,
and the whole command on CPU with a tiny random model, so it cannot rot while no GPU host is lent.

The dry run uses the belle2 venv as the GPU host's stand-in (torch, transformers, onnxruntime,
pydantic) and the bundle the host gets (bench/gpu_check_bundle.py); like the host, it must not
import ray, PyAV, CTranslate2 or faster-whisper (the check reports any that got imported).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402

BELLE2_PYTHON = Path(os.environ.get("KLIPNOTE_VENV_BELLE2", ROOT / ".venvs" / "belle2")) / "bin" / "python"
INGRESS_PYTHON = ROOT / ".venvs" / "ingress" / "bin" / "python"


def _recorder(steps) -> gpu_check.StepRecorder:
    rec = gpu_check.StepRecorder()
    for ids, values, indices in steps:
        rec.steps.append((np.array(ids), np.array(values, dtype=np.float32), np.array(indices)))
    return rec


def test_step_comparison_stops_where_beam_histories_part():
    a = _recorder([([[1], [1]], [[-0.1, -2.0], [-0.1, -2.0]], [[5, 6], [5, 6]]),
                   ([[1, 5], [1, 6]], [[-0.3, -1.0], [-0.2, -4.0]], [[7, 8], [9, 8]]),
                   ([[1, 5, 7], [1, 6, 9]], [[-0.5, -0.9], [-0.5, -0.9]], [[3, 4], [3, 4]])])
    b = _recorder([([[1], [1]], [[-0.1, -2.02], [-0.1, -2.0]], [[5, 6], [5, 6]]),
                   ([[1, 5], [1, 6]], [[-0.3, -1.0], [-0.2, -4.0]], [[7, 8], [8, 9]]),
                   ([[1, 5, 8], [1, 6, 9]], [[-9.0, -9.0], [-9.0, -9.0]], [[3, 4], [3, 4]])])
    out = gpu_check.compare_steps(a, b)
    # Step 2 is not compared (the histories differ), and at step 1 only tokens ranked alike count.
    assert out == {"steps_compared": 2, "histories_parted_at_step": 2, "max_abs_logprob_diff": pytest.approx(0.02, abs=1e-6)}
    assert gpu_check.compare_steps(a, b, rows=1)["histories_parted_at_step"] == 2
    assert gpu_check.compare_steps(a, a)["max_abs_logprob_diff"] == 0.0


def test_shortcut_verdict_accepts_rounding_and_refuses_more():
    floor = {"steps_compared": 10, "histories_parted_at_step": None, "max_abs_logprob_diff": 0.02}
    near = {"steps_compared": 9, "histories_parted_at_step": 9, "max_abs_logprob_diff": 0.07}
    far = {"steps_compared": 3, "histories_parted_at_step": 3, "max_abs_logprob_diff": 1.5}
    assert gpu_check.shortcut_verdict(True, far, floor, "float16")["verdict"] == "identical tokens"
    assert gpu_check.shortcut_verdict(False, near, floor, "float16")["passed"] is True
    refused = gpu_check.shortcut_verdict(False, far, floor, "float16")
    assert refused["verdict"] == "DIFFERENT" and refused["passed"] is False
    # Nothing compared (parted at the first step) proves nothing.
    none = {"steps_compared": 0, "histories_parted_at_step": 0, "max_abs_logprob_diff": 0.0}
    assert gpu_check.shortcut_verdict(False, none, floor, "float32")["passed"] is False


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple:
    tmp = tmp_path_factory.mktemp("gpu-check")
    subprocess.run([str(INGRESS_PYTHON), "bench/gpu_check_bundle.py", "--out", str(tmp / "bundle")], cwd=ROOT, check=True, timeout=300)
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--device", "cpu", "--shape", "tiny", "--quick", "--out", str(tmp / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHON": str(BELLE2_PYTHON), "GPU_CHECK_BUNDLE": str(tmp / "bundle"), "OMP_NUM_THREADS": "1"},
    )
    report = json.loads((tmp / "out" / "gpu_check.json").read_text()) if (tmp / "out" / "gpu_check.json").exists() else None
    return proc, report, tmp / "out"


def test_dry_run_passes_on_cpu_with_a_tiny_model(dry_run):
    proc, report, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["passed"] is True
    assert report["label"] == "random weights, decode pinned"
    assert "random weights, decode pinned to 4 tokens per window" in (out / "gpu_check.md").read_text()
    assert report["model"]["shape"] == "tiny" and report["model"]["parameters"] > 30e6


def test_dry_run_decodes_the_pinned_length_at_each_batch_size(dry_run):
    _, report, _ = dry_run
    assert [r["batch"] for r in report["batches"]] == [1, 2]
    for row in report["batches"]:
        assert row["windows"] >= 3 and row["tokens"] == 4 * row["windows"]
        assert row["rtfx"] > 0 and row["tokens_per_s"] > 0


def test_dry_run_compares_the_shortcuts_where_they_apply(dry_run):
    _, report, _ = dry_run
    shortcuts = report["shortcuts"]
    assert shortcuts["windows"] == 2 and shortcuts["tokens_identical"] is True
    assert shortcuts["on_vs_off"]["steps_compared"] >= 4
    # They ran: with the pin there is no no-speech check, the others must have applied.
    counters = shortcuts["counters"]
    assert counters["cross_attention_shared"] > 0 and counters["cross_projection_shared"] > 0 and counters["suppression_mask_cached"] > 0
    assert report["start_warnings"] == []  # the self-check kept them on under the pin


def test_dry_run_runs_two_processes_alone_then_together_without_host_absent_modules(dry_run):
    _, report, _ = dry_run
    memory = report["memory"]
    assert set(memory["processes"]) == {"a", "b"}
    assert set(memory["processes"]["a"]["phases"]) == {"alone", "shared"}
    assert memory["alone_rtfx"] > 0 and all(v > 0 for v in memory["shared_rtfx"].values())
    assert report["imported_absent_modules"] == []
    assert all(p["imported_absent_modules"] == [] for p in memory["processes"].values())


def test_modules_the_host_lacks_are_reported():
    # In the belle2 venv: PyAV (absent there by name) and OpenCC once it is no longer carried.
    code = (
        "import sys; sys.path.insert(0, 'bench'); import av, opencc, gpu_check\n"
        "gpu_check.CARRIED = gpu_check.CARRIED - {'opencc'}\n"
        "print(gpu_check.absent_modules_imported())"
    )
    out = subprocess.run([str(BELLE2_PYTHON), "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "'av'" in out and "opencc (" in out.lower()
    assert "numpy" not in out and "torch" not in out


def test_dry_run_places_words_with_the_alignment_heads(dry_run):
    _, report, out = dry_run
    words = report["word_times"]
    assert words["passed"] is True and words["source"] == "whisper-cross-attention"
    assert words["segments"] >= 1 and words["words"] >= words["segments"]
    assert words["wall_with_s"] > 0 and "Word times (alignment heads" in (out / "gpu_check.md").read_text()


def test_dry_run_batches_concurrent_requests_on_the_core_without_ray(dry_run):
    _, report, out = dry_run
    rows = report["concurrency"]["rows"]
    assert [r["clients"] for r in rows] == [1, 2]
    assert rows[0]["batch_sizes"] and rows[0]["shared_batches"] == 0
    assert rows[1]["shared_batches"] >= 1 and report["concurrency"]["passed"] is True
    assert all(r["tokens_per_s"] > 0 and r["requests"] == r["clients"] * rows[0]["requests"] for r in rows)
    assert "Concurrent requests on one core" in (out / "gpu_check.md").read_text()


def test_dry_run_runs_the_largest_batch_to_the_length_limit(dry_run):
    _, report, out = dry_run
    largest = report["largest_batch"]
    # batch_size windows at max_beam_size, each decoded to the decoder's limit (448 less room for the prompt)
    assert largest["batch_size"] == 2 and largest["max_beam_size"] == 8
    assert largest["sequence_tokens"] >= 440
    assert "Largest batch at start" in (out / "gpu_check.md").read_text()
