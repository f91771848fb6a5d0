"""The README's runnable examples, run as written against the test cluster.

Every block tagged `<!-- runnable -->` runs from the repository root: shell blocks with bash,
Python blocks with the ingress venv's Python, attached to the test cluster (RAY_ADDRESS) with
its token auth. The one edit is the port: the README's 8000 becomes the test cluster's.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import ROOT
from tests.readme import tagged_blocks

pytestmark = pytest.mark.slow

RUNNABLE = tagged_blocks("runnable")
PYTHON = ROOT / ".venvs" / "ingress" / "bin" / "python"


def test_the_readme_has_runnable_shell_and_python_examples():
    assert {b.lang for b in RUNNABLE} == {"bash", "python"}, RUNNABLE
    assert any("get_app_handle" in b.code for b in RUNNABLE), "the DeploymentHandle example is not tagged runnable"


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"README.md:{b.line}" for b in RUNNABLE])
def test_readme_example_runs_as_written(serve_cluster, block):
    import ray

    code = block.code.replace("127.0.0.1:8000", f"127.0.0.1:{serve_cluster.http_port}")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    command = ["bash", "-euo", "pipefail", "-c", code] if block.lang == "bash" else [str(PYTHON), "-c", code]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"README.md:{block.line} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.strip(), f"README.md:{block.line} printed nothing"
    if "zh_paddlespeech_zh" in code:
        assert "身体健康" in proc.stdout, proc.stdout[-2000:]
    if "en_jfk" in code:
        assert "ask not what your country can do for you" in proc.stdout.lower(), proc.stdout[-2000:]
