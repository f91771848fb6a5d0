"""GPU check: the BELLE-2 model core on one GPU with random large-v3-sized weights, without Ray.

    make gpu-check                      # on the GPU host; README "GPU check" says how it gets there
    bash bench/gpu_check.sh --out DIR   # the same without make
    # the dry run the test suite runs (tests/test_gpu_check.py), on CPU with a tiny shape:
    PYTHON=.venvs/belle2/bin/python bash bench/gpu_check.sh --device cpu --shape tiny --quick

It runs on the GPU host's own stack (Python 3.12, torch, transformers, numpy, onnxruntime; no
Ray, PyAV, CTranslate2 or faster-whisper) with the bundle bench/gpu_check_bundle.py packs
(tokenizer files, the Mandarin clips of tests/data decoded by the ingress's decoder, pydantic's
wheels). Steps:

1. Builds a Whisper of `--shape` (bench/random_whisper.py; large-v3: 1.54 B parameters) with
   seeded random weights, in float16 on the GPU, and saves it; nothing is downloaded.
2. Loads it with `deployments.belle2.core.Belle2Core`, the code the belle2 app serves, with
   `pinned_decode_tokens` N (every window decodes exactly N tokens: random weights decode noise,
   so only a fixed length makes a throughput figure; deployments/pinned_decode.py), beam 5.
3. Decodes the workload (the clips, `--workload-repeat` times, 0.5 s of silence between) at
   window batch sizes `--batches` through `transcribe` (VAD, windows, decoding, text): the best
   of `--repeats` walls, real-time factor (audio seconds / wall), tokens/s (tokens of the returned
   beams), torch's peak GPU memory. Every window must have decoded N tokens.
4. Decoding shortcuts on against off (deployments/belle2/decoding.py, checked on CPU float32
   only until now) on one batch of windows: the output tokens, and the log-probabilities of
   every step whose beams had the same history in both runs (teacher forcing by comparison:
   random float16 weights put near-ties everywhere, so one rounding step can flip a token and
   the runs part ways). Passes when the tokens are identical, or when the log-probabilities
   differ by no more than float rounding: 4 x the difference between two runs of the same
   code at batch 1 and at the full batch, and at least 0.05 (float16) or 1e-3 (float32).
5. Memory cap: two processes, each with `gpu_memory_fraction` 0.5 (the app's setting for a
   half card), one decoding alone, then both at once; each must stay under its half (torch's
   peak reservation), an allocation past the cap must fail, and the shared/alone throughput
   ratio is reported. On CPU the two processes run but there is no cap to check.

Writes `gpu_check.json` and `gpu_check.md` to `--out`, labelled "random weights, decode pinned",
and exits 1 when a check fails (the files say which). The modules the host lacks must not be
imported: the check fails if ray, av, ctranslate2, faster_whisper or whisperx got imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import random_whisper  # noqa: E402

from deployments.contract import SAMPLE_RATE  # noqa: E402

ABSENT_ON_HOST = ("ray", "av", "ctranslate2", "faster_whisper", "whisperx")
HOST_IMAGE = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
"""The GPU host image's Python distributions (the device tool's KINDS.md, as read on 2026-11-17)."""
CARRIED = frozenset({"pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "opencc"})
"""Distributions the host's image lacks that bench/gpu_check_bundle.py carries as wheels: pydantic
(the model settings) and OpenCC (the shared text post-processing converts Mandarin script);
typing-extensions too, as pydantic-core needs a newer one than some images have."""
LABEL = "random weights, decode pinned"
SILENCE_S = 0.5
TOP_K = 8
"""Candidates per beam row whose log-probabilities the shortcut comparison records each step."""


@dataclasses.dataclass
class Settings:
    device: str
    shape: str
    decode_tokens: int
    beam_size: int
    batches: List[int]
    repeats: int
    workload_repeat: int
    seed: int
    dtype: str = "default"

    @property
    def compute_type(self) -> str:
        if self.dtype != "default":
            return self.dtype
        return "float16" if self.device == "cuda" else "float32"


# -- the workload --------------------------------------------------------------------------------


def workload(bundle: Path, repeat: int) -> np.ndarray:
    """The bundle's clips, `repeat` times over, with 0.5 s of silence after each (16 kHz float32)."""
    with np.load(bundle / "clips.npz") as clips:
        pieces = [clips[name] for name in sorted(clips.files)]
    gap = np.zeros(int(SILENCE_S * SAMPLE_RATE), dtype=np.float32)
    return np.concatenate([part for _ in range(repeat) for clip in pieces for part in (clip, gap)])


def load_core(model_dir: Path, s: Settings, *, batch_size: int, gpu_memory_fraction: Optional[float] = None):
    from deployments.belle2.core import Belle2Args, Belle2Core

    args = Belle2Args(
        model=str(model_dir), device=s.device, compute_type=s.compute_type, batch_size=batch_size,
        pinned_decode_tokens=s.decode_tokens, local_files_only=True, gpu_memory_fraction=gpu_memory_fraction,
        cpu_threads=0,
    )
    return Belle2Core(args)


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def timed_transcribe(core, audio: np.ndarray, s: Settings) -> dict:
    """One `transcribe` of the workload: wall, tokens, windows; fails if the pin did not hold."""
    synchronize(s.device)
    started = time.perf_counter()
    result = core.transcribe(audio, {"beam_size": s.beam_size, "temperature": [0.0]})
    synchronize(s.device)
    wall = time.perf_counter() - started
    window_tokens = result["model"]["window_tokens"]
    broken = [n for n in window_tokens if n != s.decode_tokens]
    if broken:
        raise AssertionError(f"the pin did not hold: windows decoded {sorted(set(window_tokens))} tokens, not {s.decode_tokens}")
    return {"wall_s": wall, "tokens": sum(window_tokens), "windows": len(window_tokens)}


def word_times_check(core, audio: np.ndarray, s: Settings) -> dict:
    """BELLE-2's word times (deployments/belle2/words.py) on the device: the teacher-forced pass
    with the alignment-head hooks runs in this transformers and dtype, and what it costs.

    Random weights place words at random: only the mechanics are judged (every segment of the
    first 30 s gets words, in time order, inside the segment)."""
    clip = audio[: 30 * SAMPLE_RATE]
    opts = {"beam_size": s.beam_size, "temperature": [0.0]}
    core.transcribe(clip, {**opts, "word_timestamps": True})  # first use outside the timing
    walls = {}
    for name, extra in (("without", {}), ("with", {"word_timestamps": True})):
        synchronize(s.device)
        started = time.perf_counter()
        result = core.transcribe(clip, {**opts, **extra})
        synchronize(s.device)
        walls[name] = time.perf_counter() - started
    segments = result["segments"]
    ordered = all(
        seg.get("words") and seg["start"] <= seg["words"][0]["start"]
        and all(a["start"] <= a["end"] <= b["start"] + 1e-3 for a, b in zip(seg["words"], seg["words"][1:]))
        and seg["words"][-1]["end"] <= seg["end"] + 1e-3
        for seg in segments
    )
    return {"segments": len(segments), "words": sum(len(seg.get("words", ())) for seg in segments), "source": result.get("word_times"),
            "wall_without_s": round(walls["without"], 3), "wall_with_s": round(walls["with"], 3),
            "with_over_without": round(walls["with"] / walls["without"], 3),
            "passed": bool(segments) and ordered and result.get("word_times") == "whisper-cross-attention"}


def concurrency_check(core, bundle: Path, s: Settings, clients: List[int]) -> dict:
    """Cross-request batching on the device (deployments/batching.py, without Ray: the host has
    none): N threads each transcribe every bundled clip once, against the same clips one after
    another; aggregate tokens/s, p50/p95 latency and the batch sizes the batcher ran. The pin
    makes every window the same work, so the ratio is the batching's."""
    import threading

    from deployments.batching import REQUEST_ID

    with np.load(bundle / "clips.npz") as archive:
        clips = [archive[name] for name in sorted(archive.files)]
    opts = {"beam_size": s.beam_size, "temperature": [0.0]}
    rows = []
    for n in [1, *[c for c in clients if c > 1]]:
        latencies: List[float] = []
        tokens: List[int] = []
        before, shared_before = dict(core.batcher.stats.sizes), core.batcher.stats.shared

        def client(index: int) -> None:
            for k in range(len(clips)):
                REQUEST_ID.set(f"c{index}-{k}")
                started = time.perf_counter()
                result = core.transcribe(clips[(index + k) % len(clips)], opts)
                latencies.append(time.perf_counter() - started)
                tokens.append(sum(result["model"]["window_tokens"]))

        synchronize(s.device)
        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        synchronize(s.device)
        wall = time.perf_counter() - started
        sizes = {k: v - before.get(k, 0) for k, v in sorted(core.batcher.stats.sizes.items()) if v - before.get(k, 0)}
        rows.append({"clients": n, "requests": len(latencies), "wall_s": round(wall, 3), "tokens_per_s": round(sum(tokens) / wall, 1),
                     "p50_s": round(float(np.percentile(latencies, 50)), 3), "p95_s": round(float(np.percentile(latencies, 95)), 3),
                     "batch_sizes": " ".join(f"{k}x{v}" for k, v in sizes.items()), "shared_batches": core.batcher.stats.shared - shared_before})
    one = rows[0]["tokens_per_s"]
    for row in rows:
        row["vs_one_at_a_time"] = round(row["tokens_per_s"] / one, 2)
    # windows of two or more requests went through the model in one call
    return {"rows": rows, "passed": len(rows) == 1 or any(row["shared_batches"] for row in rows[1:])}


def peak_memory(device: str, reset: bool = False) -> Dict[str, int]:
    if device != "cuda":
        return {}
    import torch

    out = {"allocated_bytes": int(torch.cuda.max_memory_allocated()), "reserved_bytes": int(torch.cuda.max_memory_reserved())}
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return out


def batch_sweep(core, audio: np.ndarray, s: Settings, vad_s: float) -> List[dict]:
    """RTFx and tokens/s of the workload at each window batch size (best of `repeats`); also
    RTFx without the VAD's time (`vad_s`, CPU work the GPU waits for)."""
    seconds = audio.size / SAMPLE_RATE
    rows = []
    timed_transcribe(core, audio, s)  # first use of each kernel shape outside the timings
    for batch in s.batches:
        core.args = core.args.model_copy(update={"batch_size": batch})
        peak_memory(s.device, reset=True)
        runs = [timed_transcribe(core, audio, s) for _ in range(s.repeats)]
        best = min(runs, key=lambda r: r["wall_s"])
        mem = peak_memory(s.device)
        rows.append({
            "batch": batch, "windows": best["windows"], "tokens": best["tokens"], "audio_s": round(seconds, 1),
            "wall_s": round(best["wall_s"], 3), "rtfx": round(seconds / best["wall_s"], 2),
            "rtfx_without_vad": round(seconds / max(best["wall_s"] - vad_s, 1e-6), 2),
            "tokens_per_s": round(best["tokens"] / best["wall_s"], 1),
            "walls_s": [round(r["wall_s"], 3) for r in runs],
            "peak_allocated_gib": round(mem["allocated_bytes"] / 2**30, 2) if mem else None,
        })
        print(f"batch {batch}: {rows[-1]}", flush=True)
    return rows


# -- decoding shortcuts on against off -----------------------------------------------------------


class StepRecorder:
    """A logits processor that keeps, for every decoding step, each beam row's history and its
    top-k log-probabilities (after generate's own processors), and changes nothing."""

    def __init__(self, k: int = TOP_K):
        self.k = k
        self.steps: List[tuple] = []

    def __call__(self, input_ids, scores):
        import torch

        values, indices = torch.topk(scores.float(), self.k, dim=-1)
        self.steps.append((input_ids.cpu().numpy(), values.cpu().numpy(), indices.cpu().numpy()))
        return scores


def record_decode(core, chunks: List[np.ndarray], s: Settings, *, shortcuts: bool) -> tuple:
    """Decodes `chunks` in one batch with the shortcuts on or off: (sequences, recorder)."""
    from transformers import LogitsProcessorList

    from deployments.contract import TranscribeOptions

    recorder = StepRecorder()
    opts = TranscribeOptions(beam_size=s.beam_size, temperature=(0.0,))
    with core.speedups.switched(shortcuts=shortcuts):
        out = core.generate(chunks, opts, logits_processor=LogitsProcessorList([recorder]))
    return out["sequences"].cpu().numpy().tolist(), recorder


def compare_steps(a: StepRecorder, b: StepRecorder, rows: Optional[int] = None) -> dict:
    """Steps of two decodes compared while every beam row had the same history in both.

    Returns the steps compared, the step after which histories parted (None if never), and the
    largest difference of a top-k log-probability whose token both runs ranked at that place.
    """
    compared, parted, largest = 0, None, 0.0
    for step, ((ids_a, val_a, idx_a), (ids_b, val_b, idx_b)) in enumerate(zip(a.steps, b.steps)):
        if rows is not None:
            ids_a, val_a, idx_a = ids_a[:rows], val_a[:rows], idx_a[:rows]
            ids_b, val_b, idx_b = ids_b[:rows], val_b[:rows], idx_b[:rows]
        if ids_a.shape != ids_b.shape or not np.array_equal(ids_a, ids_b):
            parted = step
            break
        same = (idx_a == idx_b) & np.isfinite(val_a) & np.isfinite(val_b)
        if same.any():
            largest = max(largest, float(np.abs(val_a - val_b)[same].max()))
        compared += 1
    return {"steps_compared": compared, "histories_parted_at_step": parted, "max_abs_logprob_diff": largest}


def shortcut_check(core, audio: np.ndarray, s: Settings) -> dict:
    """Shortcuts on against off on the first full batch of the workload's windows."""
    batch = max(s.batches)
    chunks = [audio[w.start : w.end] for w in core.windows(audio)[:batch]]
    off, off_steps = record_decode(core, chunks, s, shortcuts=False)
    on, on_steps = record_decode(core, chunks, s, shortcuts=True)
    # The same code at batch 1 and at the full batch: how far float rounding alone moves the
    # log-probabilities of the first window (its rows come first in the batch).
    _, alone_steps = record_decode(core, chunks[:1], s, shortcuts=False)
    floor = compare_steps(off_steps, alone_steps, rows=s.beam_size)
    diff = compare_steps(off_steps, on_steps)
    return {
        "windows": len(chunks), "beam_size": s.beam_size, "compute_type": s.compute_type,
        "identical_windows": sum(x == y for x, y in zip(off, on)),
        **shortcut_verdict(off == on, diff, floor, s.compute_type),
        "counters": core.speedup_counts(),
    }


def shortcut_verdict(tokens_identical: bool, diff: dict, floor: dict, compute_type: str) -> dict:
    """Passed when the tokens are identical, or when every log-probability compared differs by
    no more than float rounding (4 x the same code's batch-1-against-batch difference, and at
    least a few float16 steps at logit scale)."""
    minimum = 0.05 if compute_type == "float16" else 1e-3
    tolerance = max(4 * floor["max_abs_logprob_diff"], minimum)
    within = diff["steps_compared"] > 0 and diff["max_abs_logprob_diff"] <= tolerance
    verdict = "identical tokens" if tokens_identical else ("within float rounding" if within else "DIFFERENT")
    return {
        "tokens_identical": tokens_identical, "on_vs_off": diff, "rounding_floor": floor, "tolerance": tolerance,
        "logprobs_within_tolerance": within, "verdict": verdict, "passed": tokens_identical or within,
    }


# -- two processes at half a card each -----------------------------------------------------------


def worker(model_dir: Path, bundle: Path, s: Settings, control: Path, name: str, phases: List[str]) -> int:
    """One of the memory check's processes: loads at `gpu_memory_fraction` 0.5, then runs the
    workload once per phase when `control/go-<phase>` appears; writes `control/<name>.json`."""
    fraction = 0.5
    core = load_core(model_dir, s, batch_size=max(s.batches), gpu_memory_fraction=fraction if s.device == "cuda" else None)
    audio = workload(bundle, s.workload_repeat)
    timed_transcribe(core, audio, s)
    (control / f"ready-{name}").touch()
    report: Dict[str, Any] = {"name": name, "pid": os.getpid(), "fraction": fraction, "phases": {}}
    for phase in phases:
        while not (control / f"go-{phase}").exists():
            time.sleep(0.02)
        runs = [timed_transcribe(core, audio, s) for _ in range(s.repeats)]
        wall = sum(r["wall_s"] for r in runs)
        report["phases"][phase] = {
            "wall_s": round(wall, 3), "rtfx": round(len(runs) * audio.size / SAMPLE_RATE / wall, 2),
            "tokens_per_s": round(sum(r["tokens"] for r in runs) / wall, 1),
        }
        (control / f"done-{name}-{phase}").touch()
    if s.device == "cuda":
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        report.update(total_bytes=int(total), **peak_memory("cuda"))
        report["under_cap"] = report["reserved_bytes"] <= fraction * total
        # One allocation that would take the process past its half must be refused.
        try:
            extra = torch.empty(int(fraction * total) - torch.cuda.memory_reserved() + 2**30, dtype=torch.uint8, device="cuda")
            del extra
            report["cap_enforced"] = False
        except torch.OutOfMemoryError:
            report["cap_enforced"] = True
    report["imported_absent_modules"] = absent_modules_imported()
    (control / f"{name}.json").write_text(json.dumps(report))
    return 0


def memory_check(model_dir: Path, bundle: Path, s: Settings, argv: List[str]) -> dict:
    """Two worker processes: `a` alone, then `a` and `b` at once."""
    control = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    procs = {}
    for name, phases in (("a", "alone,shared"), ("b", "shared")):
        cmd = [sys.executable, __file__, *argv, "--worker", name, "--phases", phases,
               "--control", str(control), "--model-dir", str(model_dir)]
        procs[name] = subprocess.Popen(cmd)

    def wait_for(*files: str) -> None:
        while not all((control / f).exists() for f in files):
            for name, proc in procs.items():
                if proc.poll() not in (None, 0):
                    raise RuntimeError(f"memory-check process {name} exited with {proc.returncode}")
            time.sleep(0.05)

    wait_for("ready-a", "ready-b")
    (control / "go-alone").touch()
    wait_for("done-a-alone")
    (control / "go-shared").touch()
    for name, proc in procs.items():
        if proc.wait() != 0:
            raise RuntimeError(f"memory-check process {name} exited with {proc.returncode}")
    reports = {name: json.loads((control / f"{name}.json").read_text()) for name in procs}
    alone = reports["a"]["phases"]["alone"]
    shared = {name: r["phases"]["shared"] for name, r in reports.items()}
    out = {
        "processes": reports,
        "alone_rtfx": alone["rtfx"],
        "shared_rtfx": {name: p["rtfx"] for name, p in shared.items()},
        "shared_over_alone_per_process": {name: round(p["rtfx"] / alone["rtfx"], 2) for name, p in shared.items()},
        "shared_total_over_alone": round(sum(p["tokens_per_s"] for p in shared.values()) / alone["tokens_per_s"], 2),
    }
    if s.device == "cuda":
        out["passed"] = all(r["under_cap"] and r["cap_enforced"] for r in reports.values())
    else:
        out["passed"] = True
        out["note"] = "CPU: no GPU memory cap to check; the two processes ran."
    return out


# -- report --------------------------------------------------------------------------------------


def absent_modules_imported() -> List[str]:
    """Imported modules that the GPU host lacks: those named in `ABSENT_ON_HOST`, and any from a
    distribution neither in its image, nor carried, nor required by one of those as installed
    here (other versions bring other dependencies), so that a dry run elsewhere catches a new
    dependency of ours before a GPU run does."""
    import importlib.metadata

    def normal(name: str) -> str:
        return name.lower().replace("_", "-").replace(".", "-")

    top = {m.split(".")[0] for m in list(sys.modules)}
    missing = top & set(ABSENT_ON_HOST)
    known = set(HOST_IMAGE | CARRIED)
    todo = list(known)
    while todo:
        try:
            requires = importlib.metadata.requires(todo.pop()) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for req in requires:
            if "extra ==" in req:
                continue
            name = normal(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0])
            if name not in known:
                known.add(name)
                todo.append(name)
    dists = importlib.metadata.packages_distributions()
    for module in top - set(sys.stdlib_module_names):
        names = dists.get(module)
        if names and not any(normal(n) in known for n in names):
            missing.add(f"{module} ({', '.join(names)})")
    return sorted(missing)


def environment(s: Settings) -> dict:
    import onnxruntime
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "device": s.device,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    if s.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return env


def markdown(report: dict) -> str:
    s, env = report["settings"], report["environment"]
    title = (f"GPU check ({LABEL} to {s['decode_tokens']} tokens per window; shape {s['shape']}, "
             f"{report['model']['parameters'] / 1e9:.2f} B parameters, {s['compute_type']}, beam {s['beam_size']})")
    where = ", ".join(f"{k} {v}" for k, v in env.items())
    lines = [f"### {title}", "", f"{report['date']}: {where}. Result: **{'passed' if report['passed'] else 'FAILED'}**.", ""]
    lines += ["| window batch | windows | audio s | wall s | RTFx | RTFx without VAD | tokens/s | peak GPU GiB |", "|---|---|---|---|---|---|---|---|"]
    for r in report["batches"]:
        peak = "n/a" if r["peak_allocated_gib"] is None else r["peak_allocated_gib"]
        lines.append(f"| {r['batch']} | {r['windows']} | {r['audio_s']} | {r['wall_s']} | {r['rtfx']} | {r['rtfx_without_vad']} | {r['tokens_per_s']} | {peak} |")
    sc = report["shortcuts"]
    lines += ["", f"Decoding shortcuts on against off ({sc['windows']} windows, {sc['compute_type']}): **{sc['verdict']}**; "
              f"{sc['identical_windows']}/{sc['windows']} windows' tokens identical; largest log-probability difference "
              f"{sc['on_vs_off']['max_abs_logprob_diff']:.4g} over {sc['on_vs_off']['steps_compared']} steps of equal histories "
              f"(batch 1 against batch {sc['windows']}, same code: {sc['rounding_floor']['max_abs_logprob_diff']:.4g}; "
              f"tolerance {sc['tolerance']:.4g})."]
    wt = report.get("word_times")
    if wt:
        lines += ["", f"Word times (alignment heads, teacher-forced pass; first 30 s): **{'passed' if wt['passed'] else 'FAILED'}**, "
                  f"{wt['words']} words in {wt['segments']} segments; {wt['wall_with_s']} s with against {wt['wall_without_s']} s "
                  f"without ({wt['with_over_without']} x)."]
    mc = report.get("memory")
    if mc:
        lines += ["", "| process (gpu_memory_fraction 0.5) | alone RTFx | shared RTFx | shared / alone | peak reserved GiB | under its half | past-cap allocation refused |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in mc["processes"].items():
            alone = r["phases"].get("alone", {}).get("rtfx", "")
            reserved = round(r["reserved_bytes"] / 2**30, 2) if "reserved_bytes" in r else "n/a"
            lines.append(f"| {name} | {alone} | {r['phases']['shared']['rtfx']} | {mc['shared_over_alone_per_process'][name]} | "
                         f"{reserved} | {r.get('under_cap', 'n/a')} | {r.get('cap_enforced', 'n/a')} |")
        lines += ["", f"Both processes together: {mc['shared_total_over_alone']} x the tokens/s of one alone."]
    lines += ["", f"Model built in {report['model']['build_s']} s, loaded in {report['load_s']} s; "
              f"VAD of the workload {report['vad_s']} s; the whole check {report['total_s']} s. "
              f"Self-check at start: {report['start_warnings'] or 'passed'}."]
    conc = report.get("concurrency")
    if conc:
        lines += ["", "Concurrent requests on one core (cross-request batching, no Ray): every bundled clip once per client.", "",
                  "| clients | requests | wall s | tokens/s | vs one at a time | p50 s | p95 s | batch sizes |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['clients']} | {r['requests']} | {r['wall_s']} | {r['tokens_per_s']} | {r['vs_one_at_a_time']} | {r['p50_s']} | "
                  f"{r['p95_s']} | {r['batch_sizes']} |" for r in conc["rows"]]
    largest = report.get("largest_batch")
    if largest:
        lines += [f"Largest batch at start ({largest['batch_size']} windows x beam {largest['max_beam_size']}, decoded to the "
                  f"length limit): peak {largest['peak_gib']} GiB, share {largest['share']} of the card."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--shape", choices=sorted(random_whisper.SHAPES), default="large-v3")
    parser.add_argument("--bundle", type=Path, default=ROOT / ".gpu-check")
    parser.add_argument("--out", type=Path, default=ROOT / ".build" / "gpu-check")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 16], help="concurrent threads of the batching check (and 1)")
    parser.add_argument("--workload-repeat", type=int, default=4, help="copies of the clips in the workload")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compute-type", choices=("default", "float16", "float32"), default="default",
                        help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--quick", action="store_true", help="the dry run's sizes: 4 tokens, beam 2, batches 1 and 2, one repeat, one copy")
    parser.add_argument("--skip-memory-check", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--phases", help=argparse.SUPPRESS)
    parser.add_argument("--control", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.decode_tokens, args.beam_size, args.batches, args.repeats, args.workload_repeat = 4, 2, [1, 2], 1, 1
        args.clients = [2]
    s = Settings(args.device, args.shape, args.decode_tokens, args.beam_size, sorted(args.batches), args.repeats,
                 args.workload_repeat, args.seed, args.compute_type)
    if args.worker:
        return worker(args.model_dir, args.bundle, s, args.control, args.worker, args.phases.split(","))

    started = time.perf_counter()
    report: Dict[str, Any] = {"label": LABEL, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "settings": {**{k: v for k, v in dataclasses.asdict(s).items() if k != "dtype"}, "compute_type": s.compute_type},
                              "environment": environment(s)}
    print(json.dumps(report["environment"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="random-whisper-") as tmp:
        model_dir = Path(tmp) / f"random-{s.shape}-hf"
        t = time.perf_counter()
        params = random_whisper.build_hf(s.shape, model_dir, seed=s.seed, base=args.bundle / "tokenizer", device=s.device)
        report["model"] = {"shape": s.shape, "parameters": params, "seed": s.seed, "build_s": round(time.perf_counter() - t, 1)}
        print(f"random {s.shape}: {params / 1e6:.0f} M parameters in {report['model']['build_s']} s", flush=True)
        gc.collect()

        t = time.perf_counter()
        core = load_core(model_dir, s, batch_size=max(s.batches))
        report["load_s"] = round(time.perf_counter() - t, 1)
        report["start_warnings"] = core.start_warnings
        # the start-up check of the largest batch against the replica's GPU share (ModelCore.check_largest_batch)
        if s.device != "cuda":  # the replica runs it on a GPU only; the dry run checks that it runs
            core.largest_batch_bytes = core.run_largest_batch()
        report["largest_batch"] = {"batch_size": core.args.batch_size, "max_beam_size": core.args.max_beam_size,
                                   "peak_gib": round(getattr(core, "largest_batch_bytes", 0) / 2**30, 2), "share": core.gpu_share,
                                   "sequence_tokens": getattr(core, "largest_batch_tokens", None)}
        audio = workload(args.bundle, s.workload_repeat)
        from deployments.vad import speech_timestamps

        speech_timestamps(audio[:SAMPLE_RATE])  # loads the VAD model outside the timing
        t = time.perf_counter()
        speech_timestamps(audio)
        report["vad_s"] = round(time.perf_counter() - t, 2)
        report["batches"] = batch_sweep(core, audio, s, report["vad_s"])
        report["shortcuts"] = shortcut_check(core, audio, s)
        print(f"shortcuts: {report['shortcuts']['verdict']}", flush=True)
        report["word_times"] = word_times_check(core, audio, s)
        print(f"word times: {report['word_times']}", flush=True)
        report["concurrency"] = concurrency_check(core, args.bundle, s, args.clients)
        print(f"concurrency: {report['concurrency']}", flush=True)
        del core
        gc.collect()
        if s.device == "cuda":
            import torch

            torch.cuda.empty_cache()
        if not args.skip_memory_check:
            report["memory"] = memory_check(model_dir, args.bundle, s, argv)
    report["imported_absent_modules"] = absent_modules_imported()
    report["total_s"] = round(time.perf_counter() - started, 1)
    report["passed"] = (
        report["shortcuts"]["passed"]
        and report["word_times"]["passed"]
        and report["concurrency"]["passed"]
        and report.get("memory", {}).get("passed", True)
        and not report["imported_absent_modules"]
        and not any(r.get("imported_absent_modules") for r in report.get("memory", {}).get("processes", {}).values())
    )
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report), flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
