"""Direct runner: a model app's own core (`ModelCore`), called in-process without Ray or Serve.

Run inside the model's venv, e.g.:

    .venvs/belle2/bin/python bench/direct_core.py --core deployments.belle2.core:Belle2Core \
        --args '{"model": "models/whisper-base-hf", "device": "cpu", ...}' --files tests/data/zh_*.flac

The baseline for what Serve adds or gains: the same decoding, settings and model files as the
app's replica, one clip after another (`--clients 1`). With `--clients N`, N threads call the
one core at once, each over the whole list starting at its own offset, so the cross-request
batcher (deployments/batching.py) works without Serve (the GPU host has no Ray).

Prints one JSON line per timed request and a summary line with the batcher's counters (the
bench/ "direct runner" protocol); logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deployments.batching import REQUEST_ID  # noqa: E402
from deployments.core import import_core  # noqa: E402

SAMPLE_RATE = 16_000


def load_audio(path: str):
    """16 kHz mono float32 through PyAV (FFmpeg), as the service's ingress decodes."""
    from faster_whisper.audio import decode_audio  # PyAV underneath; both model envs have it

    return decode_audio(path, sampling_rate=SAMPLE_RATE)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--core", required=True, help="package.module:CoreClass")
    parser.add_argument("--args", required=True, help="The app's args as JSON (the Serve config's `args:`).")
    parser.add_argument("--files", nargs="+", required=True)
    parser.add_argument("--options", default="{}", help="TranscribeOptions as JSON, for every request.")
    parser.add_argument("--language-from-name", action="store_true",
                        help="Give each file's language (its name's prefix, as in tests/data: en_jfk.flac is en), as the service's routing does.")
    parser.add_argument("--clients", type=int, default=1, help="Threads calling the core at once.")
    parser.add_argument("--rounds", type=int, default=1, help="Times each client goes over the list.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    core = import_core(args.core)(json.loads(args.args))
    options = json.loads(args.options)
    audio = {f: load_audio(f) for f in args.files}
    for f in args.files:  # warm: first calls pay for lazy initialisation
        core.transcribe(audio[f], {**options, "language": Path(f).name.split("_")[0]} if args.language_from_name else options)
    before = core.batcher.stats.to_dict() if core.batcher is not None else {}
    lines = []
    lock = threading.Lock()

    def client(index: int) -> None:
        order = args.files[index % len(args.files):] + args.files[: index % len(args.files)]
        for round_ in range(args.rounds):
            for f in order:
                REQUEST_ID.set(f"c{index}-r{round_}-{Path(f).name}")
                started = time.perf_counter()
                opts = {**options, "language": Path(f).name.split("_")[0]} if args.language_from_name else options
                result = core.transcribe(audio[f], opts)
                wall = time.perf_counter() - started
                with lock:
                    lines.append({"file": Path(f).name, "client": index, "seconds": audio[f].size / SAMPLE_RATE,
                                  "wall_s": wall, "segments": len(result["segments"]), "text": " ".join(s["text"] for s in result["segments"])})

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = time.perf_counter() - started
    for line in lines:
        print(json.dumps(line, ensure_ascii=False))
    after = core.batcher.stats.to_dict() if core.batcher is not None else {}
    sizes = {k: v - before.get("sizes", {}).get(k, 0) for k, v in after.get("sizes", {}).items()}
    print(json.dumps({"summary": True, "clients": args.clients, "wall_s": total, "audio_s": sum(line["seconds"] for line in lines),
                      "batch_sizes": {k: v for k, v in sizes.items() if v}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
