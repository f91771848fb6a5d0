"""The whisperx app's speed against whisperx called directly, and its memory on long audio.

    make serve && .venvs/ingress/bin/python bench/whisperx_app.py [--address 127.0.0.1:6379] [--repeat 3] [--long-minutes 10] [--no-record]

1. Speed (audio seconds / wall seconds) of the whisperx application called through its
   DeploymentHandle (this script attaches to the `make serve` cluster as a Ray driver and calls
   `serve.get_app_handle("whisperx").transcribe` with decoded samples, one request at a time; no
   HTTP, decoding or language ID, so the figure is the app's own), against whisperx called
   directly on the same clips in the same run (`bench/direct_whisperx.py --engine whisperx` in the
   whisperx venv, with the app's local settings: model, batch size, threads, float32, beam 5).
   Both are given the language. Each figure is the minimum over `--repeat` runs; the ratio
   app / direct is what travels between machines.
2. Peak RSS of the whisperx replica on one long input (a real German recording tiled to
   `--long-minutes`), from the app's `memory()`: the peak is reset just before the request, so
   it is the peak of that request, next to the replica's RSS before it.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import List

import numpy as np
import yaml

from common import ROOT, attach, md_table, record, run_direct

DATA = ROOT / "tests" / "data"
SR = 16_000
# (file, language): an English clip and a longer German one, both licence-checked fixtures
CLIPS = [("en_jfk.flac", "en"), ("de_librivox_simplicissimus.flac", "de")]
LONG_SOURCE = ("de_librivox_simplicissimus.flac", "de")


def local_whisperx_args() -> dict:
    """The whisperx app's args as `make serve` deploys them (runtime_envs/local.yaml)."""
    overlay = yaml.safe_load((ROOT / "runtime_envs" / "local.yaml").read_text())
    args = overlay["applications"]["whisperx"]["args"]
    return {k: (v.replace("{root}", str(ROOT)) if isinstance(v, str) else v) for k, v in args.items()}


def decode(path) -> np.ndarray:
    from faster_whisper import decode_audio  # PyAV, in the ingress env for language ID

    return decode_audio(str(path), sampling_rate=SR)


def app_speed(handle, repeat: int) -> List[dict]:
    rows = []
    for name, language in CLIPS:
        audio = decode(DATA / name)
        handle.transcribe.remote(audio, {"language": language}).result()  # warm (first request of a clip)
        walls = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            handle.transcribe.remote(audio, {"language": language}).result()
            walls.append(time.perf_counter() - t0)
        rows.append({"file": name, "audio_s": audio.size / SR, "app_wall_s": min(walls)})
    return rows


def direct_speed(args: dict, repeat: int) -> dict:
    out = {}
    for name, language in CLIPS:
        lines = run_direct("whisperx", "direct_whisperx.py", [
            "--engine", "whisperx", "--model", args["model"], "--files", str(DATA / name),
            "--repeat", str(repeat), "--language", language,
            "--batch-size", str(args["batch_size"]), "--threads", str(args["cpu_threads"]),
        ])
        out[name] = min(next(line for line in lines if "file" in line)["wall_s"])
    return out


def long_audio_memory(handle, minutes: float) -> dict:
    name, language = LONG_SOURCE
    audio = np.resize(decode(DATA / name), int(minutes * 60 * SR)).astype(np.float32)
    before = handle.memory.remote(reset_peak=True).result()
    t0 = time.perf_counter()
    result = handle.transcribe.remote(audio, {"language": language}).result(timeout_s=7200)
    wall = time.perf_counter() - t0
    after = handle.memory.remote().result()
    return {
        "input": f"{name} tiled to {minutes:g} min",
        "audio_s": audio.size / SR,
        "wall_s": wall,
        "segments": len(result["segments"]),
        "rss_before_mib": before["rss_bytes"] / 2**20,
        "peak_during_mib": after["peak_rss_bytes"] / 2**20,
        "rss_after_mib": after["rss_bytes"] / 2**20,
        "input_mib": audio.nbytes / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:6379", help="GCS address of the `make serve` Ray cluster")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--long-minutes", type=float, default=10.0)
    parser.add_argument("--no-record", action="store_true", help="print only; leave bench/RESULTS.md alone")
    opts = parser.parse_args()

    import ray
    from ray import serve

    args = local_whisperx_args()
    attach(opts.address)
    try:
        handle = serve.get_app_handle("whisperx")
        app_rows = app_speed(handle, opts.repeat)
        memory = long_audio_memory(handle, opts.long_minutes)
    finally:
        ray.shutdown()
    direct = direct_speed(args, opts.repeat)
    for row in app_rows:
        row["direct_wall_s"] = direct[row["file"]]
        row["app_speed"] = row["audio_s"] / row["app_wall_s"]
        row["direct_speed"] = row["audio_s"] / row["direct_wall_s"]
        row["app/direct"] = row["app_speed"] / row["direct_speed"]

    speed_table = md_table(app_rows, ["file", "audio_s", "app_wall_s", "direct_wall_s", "app_speed", "direct_speed", "app/direct"])
    memory_table = md_table([memory])
    settings = (
        f"Settings (app and direct): model `{os.path.relpath(args['model'], ROOT)}`, CPU float32, "
        f"batch size {args['batch_size']}, {args['cpu_threads']} CTranslate2 threads, beam 5, language given; "
        f"minimum of {opts.repeat} runs. Speed = audio seconds / wall seconds."
    )
    body = f"{settings}\n\n### Speed, app (DeploymentHandle) vs whisperx direct\n\n{speed_table}\n\n" \
           f"### Whisperx replica memory on a long input\n\n{memory_table}\n"
    print(body)
    if not opts.no_record:
        record("whisperx app vs whisperx direct; replica memory on long audio", body,
               command=".venvs/ingress/bin/python bench/whisperx_app.py" + (f" --repeat {opts.repeat}" if opts.repeat != 3 else "")
               + (f" --long-minutes {opts.long_minutes:g}" if opts.long_minutes != 10 else ""))


if __name__ == "__main__":
    main()
