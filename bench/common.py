"""What every bench script shares: the corpus manifest, direct-engine runs, and RESULTS.md.

Bench scripts run in the ingress venv (`.venvs/ingress/bin/python bench/<script>.py`) against
the service that `make serve` runs. A "direct" baseline runs the model library in its own venv,
as a subprocess (`bench/direct_*.py`), in the same run, so every speed figure is a ratio taken
on the same machine at the same moment.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Iterable, List, Optional

ROOT = Path(__file__).resolve().parents[1]
VENVS = ROOT / ".venvs"
RESULTS = ROOT / "bench" / "RESULTS.md"
CORPUS_MANIFEST = ROOT.parent / "shared" / "corpus" / "manifest.jsonl"
TEST_MANIFEST = ROOT / "tests" / "data" / "manifest.jsonl"
DEFAULT_URL = "http://127.0.0.1:8000"

sys.path.insert(0, str(ROOT))  # `tests.textnorm`: one normaliser for tests and bench
# `make serve` runs Ray with token auth. Ray reads this when it is imported, so it is set here,
# before any script imports ray (set later, in `attach`, it came too late for scripts that had).
os.environ.setdefault("RAY_AUTH_MODE", "token")


def load_manifest(path: Path) -> List[dict]:
    """Manifest rows (JSON lines) with `path` set to the audio file beside the manifest."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            row["path"] = str(Path(path).parent / row["file"])
            rows.append(row)
    return rows


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100), linear between points; NaN when there are none."""
    import numpy as np

    data = list(values)
    return float(np.percentile(data, q)) if data else float("nan")


def run_direct(env: str, script: str, args: List[str], timeout_s: float = 3600) -> List[dict]:
    """Runs `bench/<script>` with the `env` venv's Python; returns the JSON lines it printed.

    The direct scripts print one JSON object per line on stdout and log on stderr.
    """
    python = VENVS / env / "bin" / "python"
    cmd = [str(python), str(ROOT / "bench" / script), *args]
    env_vars = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env_vars, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def attach(address: str) -> None:
    """Connects this process to the `make serve` Ray cluster (GCS address), as a driver.

    Callers end with `ray.shutdown()`.
    """
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)


def commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def machine() -> str:
    """CPU model, cores, memory and GPU of this machine, in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = "no GPU"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            gpu = ", ".join(out.stdout.split("\n")[:-1] or [out.stdout.strip()])
    except (OSError, subprocess.TimeoutExpired):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, {gpu}"


def record(title: str, body: str, *, command: str, path: Path = RESULTS) -> None:
    """Adds a dated section to RESULTS.md, newest first, under the file's header."""
    header = "# Benchmark results\n\nNewest first. Each section names the command that produced it.\n"
    text = path.read_text() if path.exists() else header
    head, sep, rest = text.partition("\n## ")
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = (
        f"## {stamp} · {title}\n\n"
        f"- command: `{command}`\n- commit: `{commit()}`\n- machine: {machine()}\n\n{body.strip()}\n"
    )
    path.write_text(head.rstrip() + "\n\n" + section + (("\n## " + rest) if sep else ""))


def md_table(rows: List[dict], columns: Optional[List[str]] = None) -> str:
    """A Markdown table of dicts; floats to 3 significant figures."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
