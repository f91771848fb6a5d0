"""Speed through the running service against the libraries called directly, in one run.

    make serve && make bench-speed
    # or: .venvs/ingress/bin/python bench/speed.py [--url URL] [--repeat 3] [--no-record]

1. Real-time factor (audio seconds / wall seconds) of one request at a time over HTTP
   (`model=auto`, no language: decoding, language ID, routing included), against the library
   the request ends up in, called directly on the same clip in the same run: faster-whisper and
   whisperx for the WhisperX path, transformers for the BELLE-2 path (`bench/direct_*.py`, each
   in its model's venv, same model files and decoding settings). The ratio service / direct is
   the figure that travels between machines.
2. Language-detection latency p50/p95 over every request of this run, from the service's own
   `Server-Timing: langid;dur=...` header (`bench/langid_latency.py` studies it in depth).
3. 1/2/4/8 concurrent clients cycling over a Mandarin and an English clip: aggregate real-time
   factor, p50/p99 latency, errors.
4. Resident memory (now and peak) of every replica, from each app's `memory()` through its
   DeploymentHandle (the bench attaches to the `make serve` cluster as a Ray client driver).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import re
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import httpx

from common import DEFAULT_URL, ROOT, attach, md_table, percentile, record, run_direct

DATA = ROOT / "tests" / "data"
CT2_MODEL = ROOT / "models" / "faster-whisper-base"
HF_MODEL = ROOT / "models" / "whisper-base-hf"
# (file, seconds, the path the service routes it to)
CLIPS = [
    ("en_jfk.flac", 11.0, "whisperx"),
    ("de_librivox_simplicissimus.flac", 67.989, "whisperx"),
    ("zh_paddlespeech_zh.flac", 4.997, "belle2"),
    ("zh_funasr_vad_example_70s.flac", 70.471, "belle2"),
]
CONCURRENCY_CLIPS = [("zh_paddlespeech_zh.flac", 4.997), ("en_jfk.flac", 11.0)]


LANGID_MS: List[float] = []  # every request's detection time, from Server-Timing


def post(client: httpx.Client, url: str, path: Path, **form) -> httpx.Response:
    with open(path, "rb") as f:
        r = client.post(f"{url}/v1/audio/transcriptions", files={"file": (path.name, f)},
                        data={"response_format": "verbose_json", **form})
    timing = re.search(r"langid;dur=([\d.]+)", r.headers.get("Server-Timing", ""))
    if timing:
        LANGID_MS.append(float(timing.group(1)))
    return r


def service_rtf(url: str, repeat: int) -> Dict[str, dict]:
    """Per clip: wall seconds of `repeat` sequential requests, after one warm-up each."""
    out = {}
    with httpx.Client(timeout=1800) as client:
        for name, seconds, expected in CLIPS:
            path = DATA / name
            warm = post(client, url, path)
            warm.raise_for_status()
            served = warm.json()["model"]
            walls = []
            for _ in range(repeat):
                started = time.perf_counter()
                post(client, url, path).raise_for_status()
                walls.append(time.perf_counter() - started)
            out[name] = {"seconds": seconds, "served_by": served, "expected": expected, "wall_s": walls}
    return out


def direct_rtf(repeat: int) -> Dict[str, Dict[str, List[float]]]:
    """Per engine, per clip: wall seconds of the library called directly."""
    whisperx_files = [str(DATA / n) for n, _, route in CLIPS if route == "whisperx"]
    belle2_files = [str(DATA / n) for n, _, route in CLIPS if route == "belle2"]
    runs = {
        "faster-whisper": ("whisperx", "direct_whisperx.py", ["--engine", "faster-whisper", "--model", str(CT2_MODEL), "--files", *whisperx_files]),
        "whisperx": ("whisperx", "direct_whisperx.py", ["--engine", "whisperx", "--model", str(CT2_MODEL), "--files", *whisperx_files]),
        "transformers": ("belle2", "direct_transformers.py", ["--model", str(HF_MODEL), "--language", "zh", "--files", *belle2_files]),
    }
    out = {}
    for engine, (env, script, args) in runs.items():
        lines = run_direct(env, script, [*args, "--repeat", str(repeat)])
        out[engine] = {Path(o["file"]).name: o["wall_s"] for o in lines if "file" in o}
    return out


def rtf_table(service: Dict[str, dict], direct: Dict[str, Dict[str, List[float]]]) -> List[dict]:
    rows = []
    for name, s in service.items():
        best_service = min(s["wall_s"])
        engines = ["faster-whisper", "whisperx"] if s["expected"] == "whisperx" else ["transformers"]
        for engine in engines:
            walls = direct.get(engine, {}).get(name)
            if not walls:
                continue
            rows.append({
                "clip": name, "audio_s": s["seconds"], "served_by": s["served_by"],
                "service_rtf": s["seconds"] / best_service,
                "direct": engine, "direct_rtf": s["seconds"] / min(walls),
                "ratio": min(walls) / best_service,
            })
    return rows


def concurrency(url: str, clients: int, requests_per_client: int) -> dict:
    """`clients` threads, each sending `requests_per_client` requests back to back."""
    latencies: List[float] = []
    errors: List[str] = []
    audio_s = 0.0
    lock = threading.Lock()

    def client_loop(index: int) -> None:
        nonlocal audio_s
        with httpx.Client(timeout=1800) as client:
            for i in range(requests_per_client):
                name, seconds = CONCURRENCY_CLIPS[(index + i) % len(CONCURRENCY_CLIPS)]
                started = time.perf_counter()
                r = post(client, url, DATA / name)
                took = time.perf_counter() - started
                with lock:
                    if r.status_code == 200:
                        latencies.append(took)
                        audio_s += seconds
                    else:
                        errors.append(f"{r.status_code} {r.json().get('error', {}).get('code')}")

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    wall = time.perf_counter() - started
    return {
        "clients": clients, "requests": clients * requests_per_client, "ok": len(latencies),
        "aggregate_rtf": audio_s / wall, "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
        "errors": ", ".join(sorted(set(errors))) or "-",
    }


def replica_memory(address: str) -> List[dict]:
    """RSS of each model replica, through its app's `memory()`."""
    import ray
    from ray import serve

    attach(address)
    try:
        rows = []
        for app in ("transcription", "belle2", "whisperx"):
            try:
                mem = serve.get_app_handle(app).memory.remote().result(timeout_s=60)
            except Exception as e:  # an app without memory() or not running
                rows.append({"app": app, "pid": None, "rss_mib": None, "peak_rss_mib": None, "note": type(e).__name__})
                continue
            rows.append({"app": app, "pid": mem["pid"], "rss_mib": mem["rss_bytes"] / 2**20,
                         "peak_rss_mib": mem["peak_rss_bytes"] / 2**20, "note": ""})
        return rows
    finally:
        ray.shutdown()


def langid_latency() -> str:
    if not LANGID_MS:
        return "The service sent no `Server-Timing: langid` header."
    return (f"{len(LANGID_MS)} requests: p50 {percentile(LANGID_MS, 50):.0f} ms, "
            f"p95 {percentile(LANGID_MS, 95):.0f} ms (goal: p50 <= 150 ms).")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--address", default="127.0.0.1:6379", help="GCS address of the `make serve` Ray cluster, for replica memory")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per clip and engine")
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)

    service = service_rtf(args.url, args.repeat)
    print("service done", file=sys.stderr)
    direct = direct_rtf(args.repeat)
    print("direct done", file=sys.stderr)
    rtf = rtf_table(service, direct)
    loads = [concurrency(args.url, n, args.requests_per_client) for n in (1, 2, 4, 8)]
    langid = langid_latency()
    memory = replica_memory(args.address)

    body = "\n\n".join([
        "### Real-time factor, one request at a time (best of "
        f"{args.repeat}; ratio = direct wall / service wall, 1.0 means no serving cost)\n\n"
        + md_table(rtf, ["clip", "audio_s", "served_by", "service_rtf", "direct", "direct_rtf", "ratio"]),
        "### Language detection\n\n" + langid,
        f"### Concurrent clients ({args.requests_per_client} requests each, cycling "
        + ", ".join(n for n, _ in CONCURRENCY_CLIPS) + ")\n\n"
        + md_table(loads, ["clients", "requests", "ok", "aggregate_rtf", "p50_s", "p99_s", "errors"]),
        "### Replica memory (after the runs above)\n\n" + md_table(memory, ["app", "pid", "rss_mib", "peak_rss_mib", "note"]),
    ])
    print(body)
    if not args.no_record:
        record("speed: service vs direct", body, command="make bench-speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
