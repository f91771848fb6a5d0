"""Serve's health check means the model decodes: each model core on its bundled base weights, in
its own venv without Ray (tests/health_probe.py), then with its weights broken under it."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "health_probe.py"


def _probe(env: str) -> dict:
    python = ROOT / ".venvs" / env / "bin" / "python"
    proc = subprocess.run([str(python), str(PROBE), env], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def probes() -> dict:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {env: pool.submit(_probe, env) for env in ("belle2", "whisperx")}
        return {env: future.result() for env, future in futures.items()}


@pytest.mark.parametrize("env", ["belle2", "whisperx"])
def test_the_health_check_decodes_only_when_nothing_else_did_and_fails_when_decoding_fails(probes, env):
    result = probes[env]
    # a check after start decodes; one right after, or after a request's decode, does not;
    # nor does one within the interval after the model broke (the last decode vouches for it)
    assert result["decodes"] == [1, 1, 1, 1], result
    # once the interval passed, the check's own decode fails, and it says so
    assert result["error"] is not None and result["error"].startswith(f"{env} cannot decode: "), result
