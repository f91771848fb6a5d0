"""Throughput under many users: 1-16 concurrent clients against the model cores called directly,
one clip after another, in one run.

    .venvs/ingress/bin/python bench/concurrency.py [--record] [--clients 1 2 4 8 16]

Starts its own cluster (the local config, as `make serve` deploys it). Clients send real clips
over HTTP with `model=auto` and no language (decoding, language ID and routing included):

- short: 3-10 s clips, six Mandarin (BELLE-2) and five in English, German, Spanish, French and
  Japanese (WhisperX); each client goes over all eleven once, starting at its own offset;
- long: a 70 s Mandarin and a 68 s German recording, each client sends both.

Per client count: aggregate real-time factor (audio seconds / wall seconds), its ratio to the
direct figure, p50/p95 latency, errors, and the batch sizes each model app ran (from its
`batches()` counters). "Direct" is each model's own core (`bench/direct_core.py`, in its venv,
same args and model files as the replica) transcribing the same clips one after another; a
second direct row runs 8 threads on one core (the batcher without Serve).

`--compare-off` also runs the service with `batch_across_requests: false` (each request batched
only with its own windows, as before cross-request batching), for latency and throughput against
the same clients in the same run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, md_table, percentile, record, run_direct  # noqa: E402
from gpu_speed import base_config  # noqa: E402

from runtime_envs.local_cluster import LocalServeCluster  # noqa: E402

DATA = ROOT / "tests" / "data"
SHORT = {
    "belle2": ["zh_aishell1_BAC009S0724W0121.flac", "zh_funasr_asr_example.flac", "zh_paddlespeech_zh.flac",
               "zh_aishell3_SSB00050015.flac", "zh_funasr_regression_sample.flac", "zh_cosyvoice_zero_shot_prompt.flac"],
    "whisperx": ["en_librispeech_1995-1837-0001.flac", "de_picovoice_test_de.flac", "es_picovoice_test_es.flac",
                 "fr_picovoice_test_fr.flac", "ja_picovoice_test_ja.flac"],
}
LONG = {"belle2": ["zh_funasr_vad_example_70s.flac"], "whisperx": ["de_librivox_simplicissimus.flac"]}
CORES = {"belle2": "deployments.belle2.core:Belle2Core", "whisperx": "deployments.whisperx.core:WhisperXCore"}
APPS = ("transcription", "belle2", "whisperx")


def clip_seconds(name: str) -> float:
    rows = [json.loads(line) for line in (DATA / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return next(float(r["duration_s"]) for r in rows if r["file"] == name)


@contextlib.contextmanager
def serving(across_requests: bool = True) -> Iterator[tuple]:
    """(base URL, local config) of a cluster this script starts."""
    with LocalServeCluster(log_to_driver=False) as cluster:
        config, _ = base_config(cluster.http_port)
        for app in config["applications"]:
            if app["name"] in CORES:
                app["args"]["batch_across_requests"] = across_requests
        cluster.deploy_applications(config)
        cluster.wait(APPS, timeout_s=1200)
        yield cluster.url, config


def batch_counts() -> Dict[str, dict]:
    from ray import serve

    return {model: serve.get_app_handle(model).batches.remote().result(timeout_s=60) for model in CORES}


def sizes_since(before: dict, after: dict) -> str:
    """'size x count' of the batches run in between, e.g. '1x4 3x2'."""
    counts = {k: v - before.get("sizes", {}).get(k, 0) for k, v in after.get("sizes", {}).items()}
    return " ".join(f"{k}x{v}" for k, v in sorted(counts.items(), key=lambda kv: int(kv[0])) if v)


def load(url: str, clips: List[str], clients: int) -> dict:
    """`clients` threads, each sending every clip once, starting at its own offset."""
    audio = {c: (DATA / c).read_bytes() for c in clips}
    latencies: List[float] = []
    errors: List[str] = []

    def client(index: int) -> float:
        order = clips[index % len(clips):] + clips[: index % len(clips)]
        seconds = 0.0
        with httpx.Client(timeout=1800) as http:
            for clip in order:
                started = time.perf_counter()
                r = http.post(f"{url}/v1/audio/transcriptions", files={"file": (clip, audio[clip])}, data={"response_format": "json"})
                latencies.append(time.perf_counter() - started)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:120]}")
                else:
                    seconds += clip_seconds(clip)
        return seconds

    before = batch_counts()
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
        audio_s = sum(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    after = batch_counts()
    return {
        "clients": clients,
        "requests": len(latencies),
        "audio_s": audio_s,
        "wall_s": wall,
        "rtf": audio_s / wall,
        "p50_s": percentile(latencies, 50),
        "p95_s": percentile(latencies, 95),
        "errors": len(errors),
        "belle2_batches": sizes_since(before["belle2"], after["belle2"]),
        "whisperx_batches": sizes_since(before["whisperx"], after["whisperx"]),
        "error_examples": errors[:3],
    }


def direct(config: dict, clips: Dict[str, List[str]], clients: int = 1) -> dict:
    """Each model's core on its own clips, `clients` threads (1: one clip after another)."""
    audio_s = wall_s = 0.0
    latencies: List[float] = []
    sizes = []
    for model, names in clips.items():
        app = next(a for a in config["applications"] if a["name"] == model)
        out = run_direct(model, "direct_core.py", [
            "--core", CORES[model], "--args", json.dumps(app["args"]), "--clients", str(clients), "--language-from-name",
            "--files", *[str(DATA / n) for n in names],
        ])
        summary = next(line for line in out if line.get("summary"))
        audio_s += summary["audio_s"]
        wall_s += summary["wall_s"]  # the models one after the other, as one process would
        latencies += [line["wall_s"] for line in out if not line.get("summary")]
        sizes.append(f"{model}: " + " ".join(f"{k}x{v}" for k, v in sorted(summary["batch_sizes"].items(), key=lambda kv: int(kv[0]))))
    return {"audio_s": audio_s, "wall_s": wall_s, "rtf": audio_s / wall_s, "p50_s": percentile(latencies, 50),
            "p95_s": percentile(latencies, 95), "batches": "; ".join(sizes)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--long-clients", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--compare-off", action="store_true", help="Also run with batch_across_requests: false.")
    parser.add_argument("--record", action="store_true", help="Add the tables to bench/RESULTS.md.")
    args = parser.parse_args(argv)

    short_clips = [c for names in SHORT.values() for c in names]
    long_clips = [c for names in LONG.values() for c in names]
    tables: Dict[str, List[dict]] = {}
    configs = [True, False] if args.compare_off else [True]
    for across in configs:
        label = "across requests" if across else "per request only"
        with serving(across) as (url, config):
            # warm: each clip once (first requests pay for lazy initialisation)
            load(url, short_clips + long_clips, 1)
            if across:
                d1, d8 = direct(config, SHORT), direct(config, SHORT, clients=8)
                dl = direct(config, LONG)
            rows = []
            for clients in args.clients:
                row = load(url, short_clips, clients)
                print(json.dumps(row), flush=True)
                rows.append({"clips": "short", **row, "vs_direct": row["rtf"] / d1["rtf"]})
            for clients in args.long_clients:
                row = load(url, long_clips, clients)
                print(json.dumps(row), flush=True)
                rows.append({"clips": "long", **row, "vs_direct": row["rtf"] / dl["rtf"]})
            tables[label] = rows
    columns = ["clips", "clients", "requests", "audio_s", "wall_s", "rtf", "vs_direct", "p50_s", "p95_s", "errors", "belle2_batches", "whisperx_batches"]
    direct_rows = [
        {"run": "short, one clip after another", **d1},
        {"run": "short, 8 threads on one core (batcher, no Serve)", **d8},
        {"run": "long, one clip after another", **dl},
    ]
    body = [
        "Aggregate real-time factor (audio s / wall s) of N concurrent clients over HTTP (`model=auto`, language ID "
        "included), against each model's own core called directly on the same clips one after another "
        "(`vs_direct`). Batches: `size x count` each model app ran.",
        "",
        "Direct (bench/direct_core.py):",
        "",
        md_table(direct_rows, ["run", "audio_s", "wall_s", "rtf", "p50_s", "p95_s", "batches"]),
    ]
    for label, rows in tables.items():
        body += ["", f"Service, batching {label}:", "", md_table(rows, columns)]
    text = "\n".join(body)
    print(text)
    if args.record:
        record("Concurrent clients: cross-request batching against the direct cores", text,
               command="python bench/concurrency.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
