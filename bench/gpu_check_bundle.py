"""Prepares what `make gpu-check` needs on the GPU host and that host cannot make itself.

    .venvs/ingress/bin/python bench/gpu_check_bundle.py [--out .gpu-check] [--wheels]

The GPU host (README "GPU check") has no network, no PyAV and no pydantic, so this machine packs,
into `--out` (git-ignored; the device call carries it):

- `tokenizer/`: the tokenizer, generation and feature-extractor files of `models/whisper-base-hf`
  (about 2 MB), which bench/random_whisper.py gives the random model;
- `clips.npz`: the Mandarin clips of tests/data decoded by the ingress's own decoder
  (`serve_app.audio.decode_audio`: 16 kHz mono float32), as the model app receives them;
- with `--wheels`: the wheels of the belle2 env's packages the host lacks (pydantic and its
  dependencies, OpenCC; at the belle2 lock's versions; about 5 MB), for CPython 3.12 x86-64.

Prints one JSON line: the files and their sizes.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))
from gpu_check import CARRIED  # noqa: E402
from serve_app.audio import decode_audio  # noqa: E402

DATA = ROOT / "tests" / "data"
BASE_HF = ROOT / "models" / "whisper-base-hf"
TOKENIZER_FILES = (
    "config.json", "generation_config.json", "preprocessor_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
)
WHEELS = sorted(CARRIED)
CLIPS = sorted(p.name for p in DATA.glob("zh_*.flac"))


def locked_versions(names, lock: Path = ROOT / "runtime_envs" / "belle2" / "requirements.lock") -> dict:
    """The versions the belle2 env locks for `names`."""
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^ \n]+)", lock.read_text(), flags=re.M))
    return {name: pins[name] for name in names}


def download_wheels(dest: Path) -> None:
    """pip (the system python3's: uv venvs have none) downloads the wheels for the host."""
    dest.mkdir(parents=True, exist_ok=True)
    specs = [f"{name}=={version}" for name, version in locked_versions(WHEELS).items()]
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
    subprocess.run(
        ["python3", "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--python-version=3.12", "--implementation=cp", *platforms, "--dest", str(dest), *specs],
        check=True,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-check")
    parser.add_argument("--wheels", action="store_true", help="also download the wheels the GPU host lacks (network)")
    args = parser.parse_args(argv)

    tokenizer = args.out / "tokenizer"
    tokenizer.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(BASE_HF / name, tokenizer / name)
    clips = {name: decode_audio((DATA / name).read_bytes(), max_seconds=600) for name in CLIPS}
    np.savez_compressed(args.out / "clips.npz", **clips)
    if args.wheels:
        shutil.rmtree(args.out / "wheels", ignore_errors=True)
        download_wheels(args.out / "wheels")
    files = {str(p.relative_to(args.out)): p.stat().st_size for p in sorted(args.out.rglob("*")) if p.is_file()}
    print(json.dumps({"out": str(args.out), "clips_seconds": round(sum(a.size for a in clips.values()) / 16000, 1),
                      "bytes": sum(files.values()), "files": files}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
