"""Direct runner: whisperx (or plain faster-whisper) called in-process, without Serve.

Runs in the whisperx venv and follows the direct runner protocol of bench/ (see bench/common.py):

    .venvs/whisperx/bin/python bench/direct_whisperx.py --engine whisperx \\
        --model models/faster-whisper-base --files tests/data/en_jfk.flac --repeat 3 --language en

`--engine whisperx` calls `whisperx.load_model(...).transcribe(...)`: pyannote VAD from the wheel,
VAD chunks of at most 30 s decoded in batches. `--engine faster-whisper` calls faster-whisper's
`WhisperModel.transcribe` (sequential 30 s windows, no VAD, the generator read to the end).

Matched to the whisperx app (deployments/whisperx/core.py, runtime_envs/local.yaml): CPU, compute
type float32, CTranslate2 threads (`--threads`, the app's cpu_threads), batch size (whisperx),
beam 5 with best_of 5 and temperatures 0.0-1.0 in steps of 0.2, compression-ratio 2.4,
log-prob -1.0, no-speech 0.6, no conditioning on previous text, VAD onset 0.5 / offset 0.363,
chunk size 30 s, OMP_NUM_THREADS=1 (the service env's). Audio is decoded with PyAV (faster_whisper.decode_audio) before timing, as the
app receives decoded samples.

GPU and random weights (bench/gpu_speed.py): `--device cuda` (compute type float16 unless
`--compute-type`), and `--pinned-decode-tokens N` wraps the CTranslate2 model in the app's own
`deployments.pinned_decode.PinnedLengthWhisper`, so each VAD chunk decodes exactly N tokens, as in
the app with `pinned_decode_tokens: N` (whisperx engine only: faster-whisper's sequential
decoding seeks by predicted timestamps, which random weights make arbitrary). Each file's line
then also carries `window_tokens` (the tokens each chunk decoded in the last run).

Prints one JSON line per file and a last summary line on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# As the service's env (runtime_envs/local.yaml env_vars): torch (VAD) on one OpenMP thread;
# CTranslate2 takes --threads. With the default (one per core) OpenMP threads spin against the
# decoder's on a busy machine and the direct run comes out several times slower than the app.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from deployments.pinned_decode import PinnedLengthWhisper, counting_window_tokens  # noqa: E402
from deployments.core import process_memory  # noqa: E402

logger = logging.getLogger("direct_whisperx")

SAMPLE_RATE = 16_000
TEMPERATURES = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
VAD_ONSET, VAD_OFFSET, CHUNK_SIZE = 0.5, 0.363, 30


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("whisperx", "faster-whisper"), default="whisperx")
    parser.add_argument("--model", required=True, help="CTranslate2 model directory or size name.")
    parser.add_argument("--files", nargs="+", required=True)
    parser.add_argument("--repeat", type=int, default=3, help="Timed runs per file.")
    parser.add_argument("--language", default=None, help="ISO 639-1 code; detected when absent.")
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4, help="whisperx: VAD chunks per batch (the local app's 4).")
    parser.add_argument("--threads", type=int, default=2, help="CTranslate2 CPU threads (the local app's cpu_threads).")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--compute-type", default=None, help="CTranslate2 compute type; default float16 on cuda, float32 on cpu.")
    parser.add_argument("--pinned-decode-tokens", type=int, default=None, help="Benchmark mode for random weights: each VAD chunk decodes exactly this many tokens (whisperx engine).")
    args = parser.parse_args(argv)
    if args.compute_type is None:
        args.compute_type = "float16" if args.device == "cuda" else "float32"
    if args.pinned_decode_tokens and args.engine != "whisperx":
        parser.error("--pinned-decode-tokens needs --engine whisperx (see the docstring).")
    return args


def load_whisperx(args) -> Callable:
    import whisperx

    model = whisperx.load_model(
        args.model,
        device=args.device,
        compute_type=args.compute_type,
        asr_options={
            "beam_size": args.beam_size,
            "best_of": 5,
            "temperatures": TEMPERATURES,
            "compression_ratio_threshold": 2.4,
            "log_prob_threshold": -1.0,
            "no_speech_threshold": 0.6,
            "condition_on_previous_text": False,
        },
        language=args.language,
        vad_method="pyannote",
        vad_options={"chunk_size": CHUNK_SIZE, "vad_onset": VAD_ONSET, "vad_offset": VAD_OFFSET},
        threads=args.threads,
        local_files_only=True,
    )
    if args.pinned_decode_tokens:
        whisper = model.model
        whisper.model = PinnedLengthWhisper(
            whisper.model, args.pinned_decode_tokens, end_of_text=whisper.hf_tokenizer.token_to_id("<|endoftext|>")
        )

    def run(audio) -> Tuple[str, str]:
        result = model.transcribe(audio, batch_size=args.batch_size, language=args.language, chunk_size=CHUNK_SIZE)
        return " ".join(s["text"].strip() for s in result["segments"]), result["language"]

    return run


def load_faster_whisper(args) -> Callable:
    from faster_whisper import WhisperModel

    model = WhisperModel(args.model, device=args.device, compute_type=args.compute_type, cpu_threads=args.threads, local_files_only=True)

    def run(audio) -> Tuple[str, str]:
        segments, info = model.transcribe(
            audio,
            language=args.language,
            beam_size=args.beam_size,
            best_of=5,
            temperature=TEMPERATURES,
            compression_ratio_threshold=2.4,
            log_prob_threshold=-1.0,
            no_speech_threshold=0.6,
            condition_on_previous_text=False,
        )
        return " ".join(s.text.strip() for s in segments), info.language

    return run


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    from faster_whisper import decode_audio

    started = time.perf_counter()
    run = (load_whisperx if args.engine == "whisperx" else load_faster_whisper)(args)
    load_s = time.perf_counter() - started
    logger.info("Loaded %s (%s) in %.1f s.", args.model, args.engine, load_s)
    audios = {path: decode_audio(path, sampling_rate=SAMPLE_RATE) for path in args.files}
    run(audios[args.files[0]])  # untimed warm-up
    for path, audio in audios.items():
        walls, text, language = [], "", None
        for _ in range(args.repeat):
            with counting_window_tokens() as window_tokens:
                t0 = time.perf_counter()
                text, language = run(audio)
                walls.append(time.perf_counter() - t0)
        logger.info("%s: min %.2f s over %d runs", path, min(walls), len(walls))
        line = {"file": path, "audio_s": audio.size / SAMPLE_RATE, "wall_s": walls, "text": text, "language": language}
        if args.pinned_decode_tokens:
            line["window_tokens"] = window_tokens
        print(json.dumps(line), flush=True)
    print(json.dumps({"summary": {"load_s": load_s, "peak_rss_bytes": process_memory()["peak_rss_bytes"]}}), flush=True)


if __name__ == "__main__":
    main()
