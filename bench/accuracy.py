"""Accuracy through the running service next to the same models called directly, in one run.

    make serve && make bench-accuracy
    # or: .venvs/ingress/bin/python bench/accuracy.py [--manifest PATH] [--url URL] [--no-record]

For every clip of a manifest (default `../shared/corpus/manifest.jsonl`; any manifest in that
format works), the service transcribes it over HTTP with `model=auto` and no language, exactly as
a client would: it detects the language, routes (zh -> BELLE-2 path, the rest -> WhisperX) and
answers. The baseline is the same model called directly in its own venv in the same run:
transformers (`bench/direct_transformers.py`, forced zh) for the clips the service routed to
belle2, faster-whisper (`bench/direct_whisperx.py --engine faster-whisper`, language detected by
faster-whisper itself) for the others.

Reported per language: WER (CER for zh and ja) of the service and of the direct call, corpus-level
(edits over all reference words or characters), both sides normalised by `tests/textnorm.py`
(NFKC, lower case, punctuation removed, Traditional -> Simplified); language-ID accuracy of the
service; and the transcript length on non-speech clips, which should be 0.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path
from typing import Dict, List

import httpx
import jiwer

from common import CORPUS_MANIFEST, DEFAULT_URL, ROOT, load_manifest, md_table, record, run_direct
from tests.textnorm import normalize

CHARACTER_LANGUAGES = {"zh", "ja"}  # no spaces between words: error rate over characters
CT2_MODEL = ROOT / "models" / "faster-whisper-base"
HF_MODEL = ROOT / "models" / "whisper-base-hf"


def transcribe_service(client: httpx.Client, url: str, path: str) -> dict:
    """verbose_json for one file, routed by the service (model auto, language detected)."""
    with open(path, "rb") as f:
        r = client.post(
            f"{url}/v1/audio/transcriptions",
            files={"file": (Path(path).name, f)},
            data={"model": "auto", "response_format": "verbose_json"},
        )
    r.raise_for_status()
    return r.json()


def transcribe_direct(rows: List[dict], served_by: Dict[str, str]) -> Dict[str, str]:
    """The same model the service used for each clip, called directly; text by file path."""
    by_engine: Dict[str, List[str]] = collections.defaultdict(list)
    for row in rows:
        by_engine[served_by[row["path"]]].append(row["path"])
    texts: Dict[str, str] = {}
    if by_engine.get("belle2"):
        args = ["--model", str(HF_MODEL), "--files", *by_engine["belle2"], "--repeat", "1", "--language", "zh"]
        texts.update({o["file"]: o["text"] for o in run_direct("belle2", "direct_transformers.py", args) if "file" in o})
    if by_engine.get("whisperx"):
        args = ["--engine", "faster-whisper", "--model", str(CT2_MODEL), "--files", *by_engine["whisperx"], "--repeat", "1"]
        texts.update({o["file"]: o["text"] for o in run_direct("whisperx", "direct_whisperx.py", args) if "file" in o})
    return texts


def error_rate(language: str, references: List[str], hypotheses: List[str]) -> float:
    refs = [normalize(r) for r in references]
    hyps = [normalize(h) for h in hypotheses]
    if language in CHARACTER_LANGUAGES:
        return jiwer.cer([r.replace(" ", "") for r in refs], [h.replace(" ", "") for h in hyps])
    return jiwer.wer(refs, hyps)


def summarise(rows: List[dict], service: Dict[str, dict], direct: Dict[str, str]) -> tuple:
    per_language = []
    speech = [r for r in rows if r["language"]]
    for language in sorted({r["language"] for r in speech}):
        scored = [r for r in speech if r["language"] == language and r["reference"]]
        if not scored:
            continue
        refs = [r["reference"] for r in scored]
        per_language.append({
            "language": language,
            "metric": "CER" if language in CHARACTER_LANGUAGES else "WER",
            "clips": len(scored),
            "audio_s": round(sum(r["duration_s"] for r in scored), 1),
            "service": error_rate(language, refs, [service[r["path"]]["text"] for r in scored]),
            "direct": error_rate(language, refs, [direct.get(r["path"], "") for r in scored]),
            "served_by": ", ".join(sorted({service[r["path"]]["model"] for r in scored})),
        })
    langid = [
        {"file": r["file"], "expected": r["language"], "detected": service[r["path"]]["language"],
         "probability": service[r["path"]].get("language_probability"), "seconds": r["duration_s"]}
        for r in speech
    ]
    silence = [
        {"file": r["file"], "service_chars": len(normalize(service[r["path"]]["text"])),
         "direct_chars": len(normalize(direct.get(r["path"], "")))}
        for r in rows if r["reference"] == ""
    ]
    per_file = [
        {"file": r["file"], "served_by": service[r["path"]]["model"], "detected": service[r["path"]]["language"],
         "service": error_rate(r["language"], [r["reference"]], [service[r["path"]]["text"]]),
         "direct": error_rate(r["language"], [r["reference"]], [direct.get(r["path"], "")])}
        for r in speech if r["reference"]
    ]
    return per_language, per_file, langid, silence


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=CORPUS_MANIFEST)
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--no-record", action="store_true", help="print only; do not add a section to RESULTS.md")
    args = parser.parse_args(argv)

    rows = load_manifest(args.manifest)
    service: Dict[str, dict] = {}
    started = time.perf_counter()
    with httpx.Client(timeout=1800) as client:
        for row in rows:
            service[row["path"]] = transcribe_service(client, args.url, row["path"])
            print(f"service  {row['file']}: [{service[row['path']]['model']}/{service[row['path']]['language']}] "
                  f"{service[row['path']]['text'][:80]}", file=sys.stderr)
    service_s = time.perf_counter() - started
    served_by = {path: body["model"] for path, body in service.items()}
    direct = transcribe_direct(rows, served_by)

    per_language, per_file, langid, silence = summarise(rows, service, direct)
    long_enough = [x for x in langid if x["seconds"] >= 3]
    correct = sum(x["expected"] == x["detected"] for x in long_enough)
    wrong = [x for x in langid if x["expected"] != x["detected"]]
    body = "\n\n".join([
        f"Manifest `{args.manifest.relative_to(ROOT.parent) if args.manifest.is_relative_to(ROOT.parent) else args.manifest}`, "
        f"{len(rows)} clips, {sum(r['duration_s'] for r in rows):.0f} s of audio; service pass took {service_s:.0f} s. "
        "Error rates are corpus-level over clips with a reference; `direct` is the same model called "
        "directly in the same run (transformers for the belle2 path, faster-whisper for the whisperx path).",
        "### Error rate per language\n\n" + md_table(per_language, ["language", "metric", "clips", "audio_s", "service", "direct", "served_by"]),
        "### Error rate per clip\n\n" + md_table(per_file, ["file", "served_by", "detected", "service", "direct"]),
        f"### Language ID (service)\n\n{correct}/{len(long_enough)} correct on speech clips >= 3 s; "
        f"{sum(x['expected'] == x['detected'] for x in langid)}/{len(langid)} on all speech clips.\n\n"
        + (md_table(wrong, ["file", "expected", "detected", "probability", "seconds"]) if wrong else "No errors."),
        "### Non-speech clips (transcript length after normalisation; should be 0)\n\n" + md_table(silence),
    ])
    print(body)
    if not args.no_record:
        record("accuracy: service vs direct", body, command="make bench-accuracy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
