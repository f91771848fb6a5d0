"""The source passes pyflakes' checks (ruff F: unused imports and names, undefined names, ...) and
has no syntax errors (E9): every Python file of the project, tests and benchmarks included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ["deployments", "serve_app", "tests", "bench", "observability", "runtime_envs"]


def test_the_source_passes_ruff():
    ruff = Path(sys.executable).with_name("ruff")  # from the ingress lock, so it is always there
    done = subprocess.run([str(ruff), "check", "--select", "F,E9", *CHECKED], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
