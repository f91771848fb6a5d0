"""Speed of the BELLE-2 path against the WhisperX path: same clips, same base weights, same run.

    .venvs/ingress/bin/python bench/belle2_vs_whisperx.py [--address 127.0.0.1:6379] [--repeat 3]

Calls the running `make serve` applications through their DeploymentHandles
(`serve.get_app_handle("belle2" | "whisperx").transcribe.remote(audio, options)`), so neither the
ingress nor HTTP is timed; both get the same decoded audio and the same options (language zh,
beam 5, temperatures 0.0-1.0). Under `make serve` both apps run whisper base in float32 on 2 CPU
threads (whisperx: CTranslate2 `cpu_threads: 2`; belle2: `cpu_threads: 2`, torch.set_num_threads).
What each path does beyond that is its own design: WhisperX decodes without timestamp tokens
and never falls back to higher temperatures in its batched mode; BELLE-2 decodes timestamps and
runs the fallback.

The runs alternate between the apps, file by file, so both see the same machine load; speed is
audio seconds per wall second of the fastest of `--repeat` runs (timeit's advice: the minimum is
the least disturbed). With `--direct`, plain transformers long-form decoding
(`bench/direct_transformers.py`, the belle2 venv, same weights and threads) runs in the same
invocation as the "no app" baseline. `--record` adds the tables to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import CORPUS_MANIFEST, ROOT, TEST_MANIFEST, attach, load_manifest, md_table, record, run_direct

from deployments.contract import TranscribeOptions
from tests.textnorm import cer

SAMPLE_RATE = 16_000
SHORT = [
    "zh_aishell1_BAC009S0724W0121.flac",
    "zh_aishell3_SSB00050015.flac",
    "zh_funasr_asr_example.flac",
    "zh_funasr_regression_sample.flac",
    "zh_paddlespeech_zh.flac",
    "zh_cosyvoice_zero_shot_prompt.flac",
    "zh_speechrecognition_chinese.flac",
]
LONG = ["zh_funasr_vad_example_70s.flac", "zh_concat_referenced_clips.flac"]
APPS = ("belle2", "whisperx")


def clips() -> list:
    """Manifest rows of the benchmark clips; the 87 s concatenation is read in place from the
    shared corpus (it is not in the repository) and skipped when that is absent."""
    rows = {r["file"]: r for r in load_manifest(TEST_MANIFEST)}
    if CORPUS_MANIFEST.exists():
        rows.update({r["file"]: r for r in load_manifest(CORPUS_MANIFEST) if r["file"] not in rows})
    return [dict(rows[name], kind="short" if name in SHORT else "long") for name in SHORT + LONG if name in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:6379", help="The `make serve` Ray cluster.")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--direct", action="store_true", help="Also time plain transformers long-form decoding.")
    parser.add_argument("--record", action="store_true", help="Add the results to bench/RESULTS.md.")
    parser.add_argument("--note", default="", help="A line stored with the results (what was deployed).")
    args = parser.parse_args(argv)

    from ray import serve

    from serve_app.audio import decode_audio

    attach(args.address)
    handles = {app: serve.get_app_handle(app) for app in APPS}
    info = {app: handles[app].info.remote().result(timeout_s=120) for app in APPS}
    options = TranscribeOptions(language="zh", beam_size=5).to_dict()
    rows = clips()
    audio = {r["file"]: decode_audio(Path(r["path"]).read_bytes(), max_seconds=3600) for r in rows}

    def run(app: str, name: str) -> tuple:
        t0 = time.perf_counter()
        result = handles[app].transcribe.remote(audio[name], options).result(timeout_s=1800)
        return time.perf_counter() - t0, "".join(s["text"] for s in result["segments"])

    for app in APPS:  # warm-up, untimed
        run(app, rows[0]["file"])
    table = []
    for row in rows:
        name = row["file"]
        walls = {app: [] for app in APPS}
        texts = {}
        for i in range(args.repeat):
            for app in APPS if i % 2 == 0 else APPS[::-1]:
                wall, texts[app] = run(app, name)
                walls[app].append(wall)
        audio_s = audio[name].size / SAMPLE_RATE
        out = {"file": name, "kind": row["kind"], "audio_s": audio_s}
        for app in APPS:
            out[f"{app}_s"] = min(walls[app])
            out[f"{app}_x"] = audio_s / min(walls[app])
            out[f"{app}_cer"] = cer(row["reference"], texts[app]) if row.get("reference") else None
        out["ratio"] = out["belle2_x"] / out["whisperx_x"]
        table.append(out)
        print(f"{name}: {audio_s:.1f} s audio; belle2 {out['belle2_s']:.2f} s, whisperx {out['whisperx_s']:.2f} s, "
              f"ratio {out['ratio']:.2f}", flush=True)

    direct = {}
    if args.direct:
        lines = run_direct("belle2", "direct_transformers.py", [
            "--model", str(ROOT / "models" / "whisper-base-hf"), "--files", *[r["path"] for r in rows],
            "--repeat", "1", "--language", "zh", "--beam-size", "5", "--threads", "2",
        ])
        direct = {Path(line["file"]).name: min(line["wall_s"]) for line in lines if "file" in line}
        for out in table:
            if out["file"] in direct:
                out["plain_hf_s"] = direct[out["file"]]
                out["plain_hf_ratio"] = (out["audio_s"] / direct[out["file"]]) / out["whisperx_x"]

    summary = []
    for kind in ("short", "long", "all"):
        part = [r for r in table if kind in ("all", r["kind"])]
        if not part:
            continue
        audio_s = sum(r["audio_s"] for r in part)
        line = {"clips": kind, "n": len(part), "audio_s": audio_s}
        for app in APPS:
            line[f"{app}_x"] = audio_s / sum(r[f"{app}_s"] for r in part)
        line["ratio"] = line["belle2_x"] / line["whisperx_x"]
        if all("plain_hf_s" in r for r in part) and direct:
            line["plain_hf_ratio"] = (audio_s / sum(r["plain_hf_s"] for r in part)) / line["whisperx_x"]
        summary.append(line)
        print(f"{kind}: belle2 {line['belle2_x']:.2f}x, whisperx {line['whisperx_x']:.2f}x real time, "
              f"belle2/whisperx speed ratio {line['ratio']:.2f}"
              + (f", plain HF/whisperx {line['plain_hf_ratio']:.2f}" if "plain_hf_ratio" in line else ""), flush=True)

    if args.record:
        columns = ["file", "audio_s", "belle2_s", "whisperx_s", "ratio", "belle2_cer", "whisperx_cer"]
        if direct:
            columns += ["plain_hf_s", "plain_hf_ratio"]
        body = "\n\n".join([
            (args.note + "\n") if args.note else "",
            "Through the apps' DeploymentHandles (not HTTP); speed = audio s / wall s of the fastest of "
            f"{args.repeat} alternating runs; ratio = belle2 speed / whisperx speed (goal >= 0.8).",
            f"belle2: {info['belle2']['model']} ({info['belle2']['packages'].get('transformers')}); "
            f"whisperx: {info['whisperx']['model']} ({info['whisperx']['packages'].get('ctranslate2')} ctranslate2).",
            md_table(summary),
            md_table(table, columns),
        ])
        record("BELLE-2 path vs WhisperX path: speed", body,
               command="python bench/belle2_vs_whisperx.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
