"""GPU speed with a large-v3-sized model: each model app alone on the GPU, then both sharing it.

    make bench-gpu    # on a host with one CUDA GPU; builds what is missing, records to RESULTS.md
    # or: .venvs/ingress/bin/python bench/gpu_speed.py [--decode-tokens 100] [--repeat 3] [--clients 4]

    # the whole run on CPU with a tiny shape (an end-to-end check, recorded only with --record):
    .venvs/ingress/bin/python bench/gpu_speed.py --device cpu --shape tiny --decode-tokens 8 \\
        --repeat 1 --clients 2 --requests-per-client 1 --clips en_jfk.flac zh_paddlespeech_zh.flac

Random weights, decode pinned. No trained large-v3 checkpoint is needed: bench/random_whisper.py
builds one of large-v3's size (seeded; float16; transformers format for belle2, CTranslate2 for
whisperx) and both model apps run with `pinned_decode_tokens: N`, so every window decodes
exactly N tokens, once (deployments/pinned_decode.py). The figures are throughput for that
fixed work; the transcripts mean nothing. Every response is checked to have decoded N tokens in
every window, and the output says "random weights, decode pinned to N tokens per window".

It runs its own Ray cluster (`ray.init(address="local")` on free ports, as the tests do), not the
`make serve` one, which keeps running untouched: the scenarios redeploy the model apps with
different GPU shares. Steps:

1. Direct: each model called directly in its own venv (bench/direct_transformers.py and
   bench/direct_whisperx.py --pinned-decode-tokens N), same files, device, dtype, beam 5 and
   batch size as the app, on the same clips, before the cluster starts (the GPU to itself).
   transformers directly decodes consecutive 30 s windows, the belle2 app VAD windows, so their
   window counts can differ: tokens/s is the like-for-like figure there.
2. Scenarios, each a deployment of the ingress and the model app(s) from the local config with
   the random models, one replica each, float16 on cuda, no fallback (a request fails rather than
   being served by the other model):
   - `belle2 alone`: num_gpus 1; `whisperx alone`: num_gpus 1;
   - `shared 0.5/0.5`: both at num_gpus 0.5 and gpu_memory_fraction 0.5.
   In each: (a) one request at a time per clip over HTTP with `model` and `language` given (no
   language ID, no routing), best of `--repeat` after a warm-up; in the shared scenario both
   models' loops run at once, one client each; (b) `--clients` concurrent clients per model
   (both models at once when shared), `--requests-per-client` each, cycling the clips.
3. Replica memory after each scenario: torch's peak GPU allocation (model info
   `gpu_memory_bytes`; whisperx's CTranslate2 weights are not torch allocations, so it
   undercounts there), the process's GPU memory from nvidia-smi by replica pid where the
   driver shows it, and resident memory.

Ratios: `ratio` = direct wall / service wall on the same clip (as bench/speed.py; 1.0 means no
serving cost), `tok_ratio` = service tokens/s / direct tokens/s, and `shared / alone` per model.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import httpx
import yaml

from common import ROOT, VENVS, md_table, percentile, record, run_direct

from runtime_envs.local_cluster import LocalServeCluster

DATA = ROOT / "tests" / "data"
# clip -> the language each request names (so no language ID runs; random weights ignore it)
CLIPS = {
    "en_jfk.flac": "en",
    "zh_paddlespeech_zh.flac": "zh",
    "de_librivox_simplicissimus.flac": "de",
    "zh_funasr_vad_example_70s.flac": "zh",
}
MODELS = ("belle2", "whisperx")
SCENARIOS = {
    "belle2 alone": {"belle2": 1.0},
    "whisperx alone": {"whisperx": 1.0},
    "shared 0.5/0.5": {"belle2": 0.5, "whisperx": 0.5},
}
PINNED_WARNING = "Decode length pinned to"


class PinBrokenError(RuntimeError):
    """A response decoded other than the pinned number of tokens in some window."""


# -- models and configs ------------------------------------------------------------------------


def random_models(shape: str) -> Dict[str, Path]:
    """The random model directories of `shape` per app, built (bench/random_whisper.py) if missing."""
    out = subprocess.run(
        [str(VENVS / "whisperx" / "bin" / "python"), str(ROOT / "bench" / "random_whisper.py"), "--shape", shape],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if out.returncode != 0:
        raise RuntimeError(f"bench/random_whisper.py --shape {shape} failed:\n{out.stderr[-4000:]}")
    built = json.loads(out.stdout.strip().splitlines()[-1])
    return {"belle2": Path(built["hf_dir"]), "whisperx": Path(built["ct2_dir"]), "info": built}


def base_config(http_port: int) -> tuple:
    """The local Serve config (as `make serve` and the tests deploy it) and the production one."""
    from runtime_envs.make_local_config import local_config

    production = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    overlay = yaml.safe_load((ROOT / "runtime_envs" / "local.yaml").read_text())
    return local_config(production, overlay, http_port=http_port), production


def scenario_config(
    local: dict,
    production: dict,
    shares: Dict[str, float],
    *,
    models: Dict[str, Path],
    device: str,
    decode_tokens: int,
) -> dict:
    """The Serve config of one scenario: the ingress plus the model apps in `shares`.

    Each model app gets the random model, `device`, the pin and one replica. On cuda it also
    gets its GPU share (num_gpus and gpu_memory_fraction), float16 and production's batch size
    and concurrency; on cpu it keeps the local config's.

    Args:
        local: The generated local config (runtime_envs/make_local_config.py).
        production: serve_config.yaml, parsed.
        shares: GPU share per model app deployed in this scenario.
        models: Model directory per model app.
        device: "cuda" or "cpu".
        decode_tokens: Tokens every window decodes.
    """
    config = copy.deepcopy(local)
    apps = {a["name"]: a for a in config["applications"]}
    prod_apps = {a["name"]: a for a in production["applications"]}
    ingress = apps["transcription"]
    ingress["args"]["fallback_model"] = None
    chosen = [ingress]
    for name, share in shares.items():
        app = apps[name]
        app["args"].update(
            model=str(models[name]), device=device, pinned_decode_tokens=decode_tokens, local_files_only=True
        )
        (deployment,) = app["deployments"]
        deployment["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 1}
        deployment["ray_actor_options"]["num_gpus"] = share if device == "cuda" else 0
        if device == "cuda":
            (prod_deployment,) = prod_apps[name]["deployments"]
            app["args"]["batch_size"] = prod_apps[name]["args"]["batch_size"]
            app["args"]["gpu_memory_fraction"] = share
            deployment["max_ongoing_requests"] = prod_deployment["max_ongoing_requests"]
            deployment["max_queued_requests"] = prod_deployment["max_queued_requests"]
            if name == "whisperx":
                app["args"]["compute_type"] = "float16"
        chosen.append(app)
    config["applications"] = chosen
    return config


# -- the cluster -----------------------------------------------------------------------------


def deploy_scenario(cluster: LocalServeCluster, config: dict, timeout_s: float = 1200) -> None:
    """Deploys `config` (replacing the app set) and waits until its apps run and the rest are gone."""
    names = [a["name"] for a in config["applications"]]
    removed = set(cluster.details().get("applications", {})) - set(names)
    cluster.deploy_applications(config)
    cluster.wait(names, timeout_s=timeout_s)
    for name in removed:
        cluster.wait_gone(name, timeout_s=300)


# -- requests ------------------------------------------------------------------------------------


def transcribe(client: httpx.Client, url: str, model: str, clip: str, audio: bytes, decode_tokens: int) -> tuple:
    """One request; returns (wall seconds, tokens decoded, windows, body).

    Raises:
        PinBrokenError: The response was not served by `model` with every window pinned.
    """
    started = time.perf_counter()
    r = client.post(f"{url}/v1/audio/transcriptions", files={"file": (clip, audio)},
                    data={"model": model, "language": CLIPS.get(clip, "en"), "response_format": "verbose_json",
                          "segmentation": "raw"})
    wall = time.perf_counter() - started
    r.raise_for_status()
    body = r.json()
    info = body.get("model_info", {})
    window_tokens = info.get("window_tokens")
    if (body.get("model") != model or info.get("pinned_decode_tokens") != decode_tokens or not window_tokens
            or any(n != decode_tokens for n in window_tokens)
            or not any(PINNED_WARNING in w for w in body.get("warnings", ()))):
        raise PinBrokenError(f"{model} on {clip}: served by {body.get('model')}, model info {info}, "
                             f"warnings {body.get('warnings')}; expected {decode_tokens} tokens in every window")
    return wall, sum(window_tokens), len(window_tokens), body


def sequential(url: str, model: str, clips: Dict[str, bytes], repeat: int, decode_tokens: int) -> dict:
    """Per clip, `repeat` requests one at a time after an untimed warm-up."""
    out = {}
    with httpx.Client(timeout=1800) as client:
        for clip, audio in clips.items():
            transcribe(client, url, model, clip, audio, decode_tokens)
            walls = []
            for _ in range(repeat):
                wall, tokens, windows, body = transcribe(client, url, model, clip, audio, decode_tokens)
                walls.append(wall)
            out[clip] = {"wall_s": walls, "tokens": tokens, "windows": windows, "audio_s": body["duration"],
                         "gpu_memory_bytes": body["model_info"].get("gpu_memory_bytes")}
    return out


def concurrent_load(url: str, models: List[str], clips: Dict[str, bytes], durations: Dict[str, float],
                    clients: int, requests_per_client: int, decode_tokens: int) -> Dict[str, dict]:
    """`clients` threads per model, all models at once, each sending requests back to back."""
    names = list(clips)
    lock = threading.Lock()
    stats = {m: {"latencies": [], "errors": [], "audio_s": 0.0, "tokens": 0, "end": 0.0} for m in models}

    def client_loop(model: str, index: int) -> None:
        with httpx.Client(timeout=1800) as client:
            for i in range(requests_per_client):
                clip = names[(index + i) % len(names)]
                try:
                    wall, tokens, _, _ = transcribe(client, url, model, clip, clips[clip], decode_tokens)
                except PinBrokenError:
                    raise
                except Exception as e:  # overload or timeout: counted, the run goes on
                    with lock:
                        stats[model]["errors"].append(type(e).__name__ + (f" {e.response.status_code}" if hasattr(e, "response") and e.response is not None else ""))
                    continue
                with lock:
                    stats[model]["latencies"].append(wall)
                    stats[model]["audio_s"] += durations[clip]
                    stats[model]["tokens"] += tokens
        with lock:
            stats[model]["end"] = max(stats[model]["end"], time.perf_counter())

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients * len(models)) as pool:
        futures = [pool.submit(client_loop, m, i) for m in models for i in range(clients)]
        for f in futures:
            f.result()
    out = {}
    for m, s in stats.items():
        wall = s["end"] - started
        out[m] = {"clients": clients, "requests": clients * requests_per_client, "ok": len(s["latencies"]),
                  "aggregate_rtf": s["audio_s"] / wall, "tok_s": s["tokens"] / wall,
                  "p50_s": percentile(s["latencies"], 50), "p99_s": percentile(s["latencies"], 99),
                  "errors": ", ".join(sorted(set(s["errors"]))) or "-"}
    return out


# -- memory ----------------------------------------------------------------------------------


def gpu_process_memory() -> Dict[int, int]:
    """GPU memory per process id from nvidia-smi (empty without a driver, or where pids are hidden)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    usage = {}
    for line in out.stdout.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and mib.strip().isdigit():
            usage[int(pid)] = int(mib) * 2**20
    return usage


def replica_memory(scenario: str, shares: Dict[str, float], torch_peak: Dict[str, Optional[int]]) -> List[dict]:
    from ray import serve

    by_pid = gpu_process_memory()
    rows = []
    for app, share in shares.items():
        mem = serve.get_app_handle(app).memory.remote().result(timeout_s=120)
        gib = lambda b: None if b is None else b / 2**30  # noqa: E731
        rows.append({"scenario": scenario, "app": app, "gpu_share": share, "pid": mem["pid"],
                     "torch_peak_gib": gib(torch_peak.get(app)), "nvidia_smi_gib": gib(by_pid.get(mem["pid"])),
                     "rss_gib": gib(mem["rss_bytes"]), "peak_rss_gib": gib(mem["peak_rss_bytes"])})
    return rows


# -- the run -------------------------------------------------------------------------------------


def direct_runs(models: Dict[str, Path], clips: List[str], args, batch_sizes: Dict[str, int]) -> Dict[str, dict]:
    """Each model called directly on the clips, with the pin; per model, per clip."""
    files = [str(DATA / c) for c in clips]
    same_work = ["--files", *files, "--repeat", str(args.repeat), "--device", args.device,
                 "--pinned-decode-tokens", str(args.decode_tokens), "--beam-size", "5"]
    cpu_threads = ["--threads", "2"] if args.device == "cpu" else []  # the local apps' cpu_threads
    runs = {
        "belle2": ("belle2", "direct_transformers.py", ["--model", str(models["belle2"]), "--language", "zh",
                                                        "--batch-size", str(batch_sizes["belle2"]), *cpu_threads]),
        "whisperx": ("whisperx", "direct_whisperx.py", ["--engine", "whisperx", "--model", str(models["whisperx"]),
                                                        "--language", "en", "--batch-size", str(batch_sizes["whisperx"]),
                                                        *cpu_threads]),
    }
    out = {}
    for model, (env, script, extra) in runs.items():
        if model not in batch_sizes:  # not deployed in the chosen scenarios
            continue
        lines = run_direct(env, script, [*extra, *same_work])
        per_clip = {}
        for line in lines:
            if "file" not in line:
                continue
            window_tokens = line["window_tokens"]
            if not window_tokens or any(n != args.decode_tokens for n in window_tokens):
                raise PinBrokenError(f"direct {model} on {line['file']}: windows decoded {window_tokens}")
            per_clip[Path(line["file"]).name] = {"wall_s": line["wall_s"], "tokens": sum(window_tokens),
                                                 "windows": len(window_tokens), "audio_s": line["audio_s"]}
        out[model] = per_clip
        print(f"direct {model} done", file=sys.stderr, flush=True)
    return out


def sequential_rows(scenario: str, seq: Dict[str, dict], direct: Dict[str, dict]) -> List[dict]:
    rows = []
    for model, per_clip in seq.items():
        for clip, s in per_clip.items():
            best = min(s["wall_s"])
            d = direct[model][clip]
            d_best = min(d["wall_s"])
            rows.append({"scenario": scenario, "model": model, "clip": clip, "audio_s": s["audio_s"],
                         "windows": s["windows"], "service_s": best, "service_rtf": s["audio_s"] / best,
                         "service_tok_s": s["tokens"] / best, "direct_windows": d["windows"], "direct_s": d_best,
                         "direct_rtf": d["audio_s"] / d_best, "direct_tok_s": d["tokens"] / d_best,
                         "ratio": d_best / best, "tok_ratio": (s["tokens"] / best) / (d["tokens"] / d_best)})
    return rows


def shared_vs_alone(seq_rows: List[dict], load_rows: List[dict]) -> List[dict]:
    """Per model: the shared scenario's throughput over the same model's alone."""
    rows = []
    for model in MODELS:
        alone, shared = f"{model} alone", "shared 0.5/0.5"

        def seq_rtf(scenario):
            part = [r for r in seq_rows if r["scenario"] == scenario and r["model"] == model]
            return sum(r["audio_s"] for r in part) / sum(r["service_s"] for r in part) if part else None

        def load(scenario, key):
            part = [r for r in load_rows if r["scenario"] == scenario and r["model"] == model]
            return part[0][key] if part else None

        a, s = seq_rtf(alone), seq_rtf(shared)
        la, ls = load(alone, "tok_s"), load(shared, "tok_s")
        if a and s:
            rows.append({"model": model, "one_at_a_time_rtf_alone": a, "one_at_a_time_rtf_shared": s,
                         "one_at_a_time_shared_over_alone": s / a,
                         "load_tok_s_alone": la, "load_tok_s_shared": ls,
                         "load_shared_over_alone": (ls / la) if la and ls else None})
    return rows


def run_scenario(cluster: LocalServeCluster, scenario: str, config: dict, audio: Dict[str, bytes], direct: Dict[str, dict],
                 args) -> Dict[str, List[dict]]:
    """Deploys one scenario and measures it: one request at a time, concurrent clients, memory."""
    shares = SCENARIOS[scenario]
    started = time.perf_counter()
    deploy_scenario(cluster, config)
    print(f"{scenario}: deployed in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    with concurrent.futures.ThreadPoolExecutor(len(shares)) as pool:  # shared: both models at once
        seq = dict(zip(shares, pool.map(lambda m: sequential(cluster.url, m, audio, args.repeat, args.decode_tokens), shares)))
    durations = {c: next(iter(seq.values()))[c]["audio_s"] for c in audio}
    load = concurrent_load(cluster.url, list(shares), audio, durations, args.clients, args.requests_per_client,
                           args.decode_tokens)
    torch_peak = {m: max((s["gpu_memory_bytes"] or 0) for s in seq[m].values()) or None for m in shares}
    print(f"{scenario}: done", file=sys.stderr, flush=True)
    return {
        "sequential": sequential_rows(scenario, seq, direct),
        "load": [{"scenario": scenario, "model": m, **row} for m, row in load.items()],
        "memory": replica_memory(scenario, shares, torch_peak),
    }


SEQUENTIAL_COLUMNS = ["scenario", "model", "clip", "audio_s", "windows", "service_s", "service_rtf", "service_tok_s",
                      "direct_windows", "direct_s", "direct_rtf", "direct_tok_s", "ratio", "tok_ratio"]
LOAD_COLUMNS = ["scenario", "model", "clients", "requests", "ok", "aggregate_rtf", "tok_s", "p50_s", "p99_s", "errors"]
MEMORY_COLUMNS = ["scenario", "app", "gpu_share", "pid", "torch_peak_gib", "nvidia_smi_gib", "rss_gib", "peak_rss_gib"]


def report(tables: Dict[str, List[dict]], args, info: dict, batch_sizes: Dict[str, int], pinned: str) -> str:
    """The results as Markdown: what ran, then one table per measurement."""
    dtype = "float16" if args.device == "cuda" else "float32"
    return "\n\n".join([
        f"**{pinned.capitalize()}**: bench/random_whisper.py shape `{args.shape}` ({info['parameters'] / 1e9:.2f} B "
        f"parameters, seed {info['seed']}, {dtype}), so these are throughput figures for a fixed amount of decoding; "
        f"the transcripts mean nothing. Device: {args.device} ({gpu_name()}). Clips: {', '.join(args.clips)}; "
        f"beam 5; batch sizes {batch_sizes}.",
        f"### One request at a time over HTTP (best of {args.repeat}), next to the model called directly in the same run"
        "\n\nratio = direct wall / service wall (1.0: no serving cost); tok_ratio = service tokens/s / direct tokens/s "
        "(transformers directly decodes consecutive 30 s windows, the app VAD windows). In the shared scenario both "
        "models' loops run at once.\n\n" + md_table(tables["sequential"], SEQUENTIAL_COLUMNS),
        f"### Concurrent clients ({args.clients} per model, {args.requests_per_client} requests each, cycling the "
        "clips)\n\n" + md_table(tables["load"], LOAD_COLUMNS),
        "### Shared 0.5/0.5 over alone\n\n" + md_table(shared_vs_alone(tables["sequential"], tables["load"])),
        "### Replica memory after each scenario (GiB)\n\ntorch_peak: torch.cuda.max_memory_allocated (whisperx's "
        "CTranslate2 model is outside it); nvidia_smi: the replica process's GPU memory, where the driver shows "
        "pids.\n\n" + md_table(tables["memory"], MEMORY_COLUMNS),
    ])


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "no GPU"
    except (OSError, subprocess.TimeoutExpired):
        return "no GPU"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--shape", choices=("large-v3", "tiny"), default="large-v3", help="random model shape (bench/random_whisper.py)")
    parser.add_argument("--decode-tokens", type=int, default=100,
                        help="tokens every window decodes (about what 30 s of English speech decodes to)")
    parser.add_argument("--repeat", type=int, default=3, help="timed requests per clip, one at a time")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients per model")
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--clips", nargs="+", default=list(CLIPS), help="files in tests/data")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--record", action="store_true", help="record a --device cpu run too (labelled as a CPU smoke run)")
    parser.add_argument("--no-record", action="store_true", help="do not add the results to bench/RESULTS.md")
    args = parser.parse_args(argv)

    from deployments.pinned_decode import MAX_PINNED_DECODE_TOKENS

    if not 1 <= args.decode_tokens <= MAX_PINNED_DECODE_TOKENS:
        parser.error(f"--decode-tokens must be 1 to {MAX_PINNED_DECODE_TOKENS}")
    if args.device == "cuda" and gpu_name() == "no GPU":
        parser.error("no CUDA GPU here (nvidia-smi found none); --device cpu --shape tiny runs the smoke test")
    pinned = f"random weights, decode pinned to {args.decode_tokens} tokens per window"
    print(f"GPU speed bench: {pinned} (throughput only; the transcripts mean nothing).", flush=True)

    built = random_models(args.shape)
    models = {m: built[m] for m in MODELS}
    audio = {c: (DATA / c).read_bytes() for c in args.clips}

    cluster = LocalServeCluster(log_to_driver=False)
    local, production = base_config(cluster.http_port)
    configs = {name: scenario_config(local, production, shares, models=models, device=args.device,
                                     decode_tokens=args.decode_tokens)
               for name, shares in SCENARIOS.items() if name in args.scenarios}
    batch_sizes = {a["name"]: a["args"]["batch_size"] for c in configs.values() for a in c["applications"] if a["name"] in MODELS}
    # Direct first, before Ray starts, with the GPU to itself.
    direct = direct_runs(models, args.clips, args, batch_sizes)
    tables: Dict[str, List[dict]] = {"sequential": [], "load": [], "memory": []}
    with cluster:
        for scenario, config in configs.items():
            for key, rows in run_scenario(cluster, scenario, config, audio, direct, args).items():
                tables[key] += rows
    body = report(tables, args, built["info"], batch_sizes, pinned)
    print(body)
    command = " ".join(["python bench/gpu_speed.py", *(sys.argv[1:] if argv is None else argv)])
    if args.device == "cuda" and not args.no_record:
        record(f"GPU speed: {args.shape}-sized model, {pinned}", body, command=command)
    elif args.record and not args.no_record:
        record(f"CPU smoke run of bench/gpu_speed.py (not a GPU figure): {args.shape} shape, {pinned}", body,
               command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
