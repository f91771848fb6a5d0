"""Mixed Mandarin and English recordings: a language per stretch against one language per recording,
in one run, next to the same clips transcribed alone.

    .venvs/ingress/bin/python bench/mixed_languages.py [--record]

Starts its own cluster (as `make serve` deploys it) with a second ingress beside the real one,
`/one-language`, whose `language_id.per_stretch` is off: today's behaviour before per-stretch
routing. The recordings are real clips of the shared corpus (`../shared/corpus`) with references,
joined with 0.8 s of silence, so each clip's span and text are known:

- alternating: Mandarin and English clips in turn (a meeting switching language);
- zh_talk_en_qa: a Mandarin talk, then English questions;
- en_smalltalk_zh_meeting: English small talk, then a Mandarin meeting.

Per recording and mode: the error rate per language (CER for zh, WER for en; the text of the
segments whose middle lies in the clips of that language, joined in order, against those clips'
references joined), the same clips transcribed alone (the goal: within 0.05 of it), the share of segments labelled with
the language of the clip they lie in, and the share of cues inside their clip's span plus 0.5 s
(the worst overshoot too). Then single-language recordings: per-stretch routing must cost little
time and no accuracy (wall time and error, both modes). Word times (`timestamp_granularities[]=word`)
are measured on both kinds of recording, for their cost and for cue times.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import error_rate  # noqa: E402
from common import CORPUS_MANIFEST, load_manifest, md_table, record  # noqa: E402
from gpu_speed import base_config  # noqa: E402

from runtime_envs.local_cluster import LocalServeCluster  # noqa: E402
from tests.mixed import Clip, mixed_recording  # noqa: E402
from tests.test_long_audio import wav_bytes  # noqa: E402

APPS = ("transcription", "belle2", "whisperx", "one-language")
PAUSE_S = 0.8
MARGIN_S = 0.5
RECORDINGS = {
    "alternating": [
        "zh_aishell1_BAC009S0724W0121.flac", "en_jfk.flac", "zh_aishell3_SSB00050015.flac",
        "en_librispeech_1995-1837-0001.flac", "zh_cosyvoice_zero_shot_prompt.flac", "en_picovoice_librispeech_quilter.flac",
        "zh_funasr_regression_sample.flac", "en_picovoice_diarization_3spk.flac", "zh_funasr_asr_example.flac",
        "en_fasterwhisper_stereo_2spk.flac", "zh_paddlespeech_zh.flac",
    ],
    "zh_talk_en_qa": [
        "zh_cosyvoice_laoxu.flac", "zh_funasr_asr_example.flac", "zh_paddlespeech_zh.flac", "zh_aishell1_BAC009S0724W0121.flac",
        "en_jfk.flac", "en_librispeech_1995-1837-0001.flac", "en_picovoice_librispeech_quilter.flac",
    ],
    "en_smalltalk_zh_meeting": [
        "en_jfk.flac", "en_picovoice_librispeech_quilter.flac",
        "zh_cosyvoice_laoxu.flac", "zh_funasr_regression_sample.flac", "zh_cosyvoice_zero_shot_prompt.flac", "zh_aishell3_SSB00050015.flac",
    ],
}
SINGLE_LANGUAGE = ["zh_concat_referenced_clips.flac", "en_librivox_shakespeare_sonnets_1-3.flac", "fr_whispertimestamped_smartphone_178s.flac"]


@contextlib.contextmanager
def serving() -> Iterator[str]:
    """The base URL of a cluster this script starts: the local config plus `/one-language`."""
    with LocalServeCluster(log_to_driver=False) as cluster:
        local, _ = base_config(cluster.http_port)
        ingress = next(a for a in local["applications"] if a["name"] == "transcription")
        one = {**ingress, "name": "one-language", "route_prefix": "/one-language", "args": {**ingress["args"]}}
        one["args"]["language_id"] = {**ingress["args"].get("language_id", {}), "per_stretch": False}
        one["deployments"] = [{**ingress["deployments"][0], "ray_actor_options": {"num_cpus": 0}}]
        local["applications"].append(one)
        cluster.deploy_applications(local)
        cluster.wait(APPS, timeout_s=1200)
        yield cluster.url


MODES = (("per stretch", "", {}), ("one language", "/one-language", {}), ("per stretch, word times", "", {"timestamp_granularities[]": "word"}))


def transcribe(client: httpx.Client, url: str, name: str, data: bytes, **form) -> dict:
    started = time.perf_counter()
    r = client.post(f"{url}/v1/audio/transcriptions", files={"file": (name, data)}, data={"response_format": "verbose_json", **form})
    r.raise_for_status()
    return {**r.json(), "wall_s": time.perf_counter() - started}


def by_clip(segments: List[dict], clips: List[Clip]) -> Dict[str, List[dict]]:
    """Each segment to the clip (plus half the pause either side) its middle lies in."""
    out: Dict[str, List[dict]] = {c.file: [] for c in clips}
    out[""] = []
    for seg in segments:
        middle = (seg["start"] + seg["end"]) / 2
        clip = next((c for c in clips if c.start_s - PAUSE_S / 2 <= middle <= c.end_s + PAUSE_S / 2), None)
        out[clip.file if clip else ""].append(seg)
    return out


def score(body: dict, clips: List[Clip], references: Dict[str, str]) -> dict:
    placed = by_clip(body["segments"], clips)
    row: dict = {}
    for language in ("zh", "en"):
        mine = [c for c in clips if c.language == language]
        row[f"{language}_error"] = joined_error(language, [references[c.file] for c in mine], [s["text"] for c in mine for s in placed[c.file]])
    spans = {c.file: c for c in clips}
    labelled = [s.get("language") == spans[f].language for f, segs in placed.items() if f for s in segs] + [False] * len(placed[""])
    overshoot = [max(spans[f].start_s - s["start"], s["end"] - spans[f].end_s, 0.0) for f, segs in placed.items() if f for s in segs]
    row["right_language"] = sum(labelled) / len(labelled) if labelled else None
    row["cues_in_span"] = sum(o <= MARGIN_S for o in overshoot) / len(overshoot) if overshoot else None
    row["worst_overshoot_s"] = max(overshoot, default=0.0)
    row["clips_without_text"] = sum(not placed[c.file] for c in clips)
    row["cues_outside_clips"] = len(placed[""])
    row["models"] = "+".join(sorted({s.get("model", body["model"]) for s in body["segments"]}))
    return row


def alone(client: httpx.Client, url: str, clips: List[Clip], references: Dict[str, str], corpus: Path, cache: Dict[str, str]) -> dict:
    row = {}
    for language in ("zh", "en"):
        mine = [c for c in clips if c.language == language]
        for c in mine:
            if c.file not in cache:
                cache[c.file] = transcribe(client, url, c.file, (corpus / c.file).read_bytes())["text"]
        row[f"{language}_error"] = joined_error(language, [references[c.file] for c in mine], [cache[c.file] for c in mine])
    return row


def joined_error(language: str, references: List[str], texts: List[str]) -> float:
    """The error of `texts` joined in order against `references` joined: a segment that spans
    two clips of one language (WhisperX joins speech into chunks of up to 30 s) is not an error."""
    joiner = "" if language == "zh" else " "
    return error_rate(language, [joiner.join(references)], [joiner.join(texts)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)

    manifest = {r["file"]: r for r in load_manifest(CORPUS_MANIFEST)}
    corpus = CORPUS_MANIFEST.parent
    references = {f: r["reference"] for f, r in manifest.items()}
    mixed_rows, single_rows = [], []
    alone_cache: Dict[str, str] = {}
    with serving() as url, httpx.Client(timeout=3600) as client:
        transcribe(client, url, "warm.flac", (corpus / "en_jfk.flac").read_bytes())
        for name, files in RECORDINGS.items():
            audio, clips = mixed_recording([corpus / f for f in files], [manifest[f]["language"] for f in files], PAUSE_S)
            upload = wav_bytes(audio)
            seconds = audio.size / 16_000
            base = {"recording": name, "audio_s": round(seconds, 1), "clips": len(clips)}
            rows = [{**base, "mode": "clips alone", **alone(client, url, clips, references, corpus, alone_cache)}]
            for mode, prefix, form in MODES:
                body = transcribe(client, f"{url}{prefix}", f"{name}.wav", upload, **form)
                rows.append({**base, "mode": mode, **score(body, clips, references), "rtf": round(seconds / body["wall_s"], 2),
                             "languages": ", ".join(f"{x['language']} {x['share']:.2f}" for x in body.get("languages", []))})
            for row in rows:
                print(row, flush=True)
            mixed_rows += rows
        for file in SINGLE_LANGUAGE:
            data = (corpus / file).read_bytes()
            language = manifest[file]["language"]
            for mode, prefix, form in MODES:
                body = transcribe(client, f"{url}{prefix}", file, data, **form)
                row = {"recording": file, "mode": mode, "audio_s": manifest[file]["duration_s"], "wall_s": round(body["wall_s"], 2),
                       "rtf": round(manifest[file]["duration_s"] / body["wall_s"], 2), "model": body["model"],
                       "error": error_rate(language, [references[file]], [body["text"]]) if references.get(file) else None,
                       "languages": ", ".join(f"{x['language']} {x['share']:.2f}" for x in body.get("languages", []))}
                print(row, flush=True)
                single_rows.append(row)
    for stretch, one, words in zip(single_rows[::3], single_rows[1::3], single_rows[2::3]):
        stretch["time_vs_one_language"] = round(stretch["wall_s"] / one["wall_s"], 3)
        words["time_vs_one_language"] = round(words["wall_s"] / one["wall_s"], 3)
    text = "\n\n".join([
        f"Recordings of corpus clips joined with {PAUSE_S} s pauses, transcribed with `model=auto` (verbose_json, subtitle "
        "cues). `per stretch` is the service as deployed; `one language` is an ingress beside it with "
        "`language_id.per_stretch: false` (one language per recording, the behaviour before); `clips alone` sends each "
        "clip as its own request. Errors: CER for zh, WER for en, of the text of the segments whose middle lies in the clips of a language, joined, against their references joined. "
        f"`cues_in_span`: share of cues inside their clip's span plus {MARGIN_S} s.",
        "### Mixed recordings\n\n" + md_table(mixed_rows, ["recording", "mode", "audio_s", "zh_error", "en_error", "right_language",
                                                            "cues_in_span", "worst_overshoot_s", "clips_without_text", "cues_outside_clips", "models", "rtf", "languages"]),
        "### Single-language recordings (per-stretch cost)\n\n" + md_table(single_rows, ["recording", "mode", "audio_s", "wall_s", "rtf", "time_vs_one_language", "error", "model", "languages"]),
    ])
    print(text)
    if args.record:
        record("Mixed Mandarin and English recordings", text, command="python bench/mixed_languages.py --record")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
