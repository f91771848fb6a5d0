"""What running a recording as a job costs, against the same recording sent as one HTTP request.

    make serve
    .venvs/ingress/bin/python bench/jobs_overhead.py [--url http://127.0.0.1:8000] [--rounds 3]

For each clip, in the same run and one after the other on the idle service: `rounds` plain
requests (`POST /v1/audio/transcriptions`, verbose_json, timed to the last byte), then `rounds`
jobs (`POST .../jobs`, then GET every `--poll` seconds until it succeeded, timed from the submission to
the GET that saw the result). Prints medians, the job/request ratio, the submission's own time
(storing and checking the upload) and how long the job waited before it started. A job should
cost the request's time plus a poll interval and a few database writes per piece.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CLIPS = ("zh_funasr_vad_example_70s.flac", "en_jfk.flac")
JOBS = "/v1/audio/transcriptions/jobs"


def request_seconds(url: str, audio: bytes, name: str) -> float:
    started = time.perf_counter()
    r = httpx.post(f"{url}/v1/audio/transcriptions", files={"file": (name, audio)}, data={"response_format": "verbose_json"}, timeout=900)
    r.raise_for_status()
    return time.perf_counter() - started


def job_seconds(url: str, audio: bytes, name: str, poll_s: float) -> dict:
    started = time.perf_counter()
    r = httpx.post(f"{url}{JOBS}", files={"file": (name, audio)}, timeout=120)
    r.raise_for_status()
    submitted = time.perf_counter() - started
    job_id = r.json()["id"]
    while True:
        job = httpx.get(f"{url}{JOBS}/{job_id}", timeout=30).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(poll_s)
    total = time.perf_counter() - started
    assert job["status"] == "succeeded", job
    httpx.delete(f"{url}{JOBS}/{job_id}", timeout=30)
    return {"total": total, "submit": submitted, "waited": job["started_at"] - job["created_at"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--poll", type=float, default=0.2, help="seconds between a client's GETs of the job")
    args = parser.parse_args(argv)
    out = {}
    for clip in CLIPS:
        audio = (ROOT / "tests" / "data" / clip).read_bytes()
        request_seconds(args.url, audio, clip)  # warm: the first call of a clip pays for nothing a job would not
        direct = [request_seconds(args.url, audio, clip) for _ in range(args.rounds)]
        jobs = [job_seconds(args.url, audio, clip, args.poll) for _ in range(args.rounds)]
        med = statistics.median
        out[clip] = {
            "request_s": round(med(direct), 3),
            "job_s": round(med(j["total"] for j in jobs), 3),
            "ratio_job_to_request": round(med(j["total"] for j in jobs) / med(direct), 3),
            "submit_s": round(med(j["submit"] for j in jobs), 3),
            "queued_s (whole seconds)": med(j["waited"] for j in jobs),
        }
        print(clip, json.dumps(out[clip]), flush=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
