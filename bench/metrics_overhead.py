"""What recording metrics costs one request, against the cheapest real work a request does.

    .venvs/ingress/bin/python bench/metrics_overhead.py [--requests 2000]

Starts its own local Ray. In one Ray actor (so `ray.serve.metrics` records into Ray's metrics
agent as in service) it builds the ingress's metrics (`serve_app/metrics.py`) and a model
replica's (`deployments/metrics.py`) and times, over many rounds, every call one routed request
makes on them: the request record and its counters and histograms, a language-ID pass's, and the
model replica's request, batch and event counts. In the same actor it times a language-ID pass
on a real 5 s clip (`serve_app.langid.LanguageDetector`, base weights): the cheapest stage any
routed request runs, so the ratio printed is an upper bound of the share of a request's time
that metrics take (a whole request also decodes, and takes longer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(requests: int) -> dict:
    from deployments.core import DecodeEvents
    from deployments.metrics import ReplicaMetrics
    from serve_app.audio import decode_audio
    from serve_app.config import LanguageIdSettings
    from serve_app.langid import LanguageDetector
    from serve_app.metrics import IngressMetrics, RequestRecord, _RECORD

    ingress, replica = IngressMetrics(), ReplicaMetrics()

    def one_request() -> None:
        record = RequestRecord(route="/v1/audio/transcriptions", response_format="verbose_json", model="belle2", language="zh",
                               upload_bytes=150_000, audio_seconds=5.0, timings={"open": 0.01, "langid": 0.1, "model": 1.0})
        token = _RECORD.set(record)
        ingress.language_id_seconds.observe(0.1, tags={})
        ingress.language_id_confidence.observe(0.97, tags={})
        replica.batch(1)
        replica.count(DecodeEvents.NO_SPEECH_WINDOWS, 0)
        replica.request_done(5.0, 1.0)
        _RECORD.reset(token)
        ingress.finish(record, 200)

    for _ in range(100):  # warm
        one_request()
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(requests):
            one_request()
        rounds.append((time.perf_counter() - started) / requests)

    detector = LanguageDetector(LanguageIdSettings(model=str(ROOT / "models" / "faster-whisper-base"), local_files_only=True, cpu_threads=1))
    audio = decode_audio((ROOT / "tests" / "data" / "zh_paddlespeech_zh.flac").read_bytes(), max_seconds=3600)
    detector.detect(audio)
    langid = []
    for _ in range(5):
        started = time.perf_counter()
        detector.detect(audio)
        langid.append(time.perf_counter() - started)
    per_request = statistics.median(rounds)
    baseline = statistics.median(langid)
    return {"metrics_us_per_request": per_request * 1e6, "langid_ms": baseline * 1e3, "share_of_langid": per_request / baseline}


def main(argv=None) -> int:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args(argv)
    ray.init(address="local", include_dashboard=True, logging_level="WARNING",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}, "py_executable": sys.executable, "working_dir": str(ROOT),
                          "excludes": [".venvs", "models", ".build", ".git"]})
    try:
        result = ray.get(ray.remote(num_cpus=0)(measure).remote(args.requests))
    finally:
        ray.shutdown()
    print(json.dumps(result))
    print(f"metrics per request: {result['metrics_us_per_request']:.1f} us; one language-ID pass: {result['langid_ms']:.1f} ms; "
          f"ratio {result['share_of_langid'] * 100:.3f} % (target: under 2 % of a request)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
