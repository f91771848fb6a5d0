"""Direct runner: plain transformers Whisper, called in-process (no Serve, no VAD windows).

Run inside the belle2 venv, e.g.:

    .venvs/belle2/bin/python bench/direct_transformers.py --model models/whisper-base-hf \
        --files tests/data/zh_paddlespeech_zh.flac --repeat 3 --language zh --threads 2

This is the baseline the BELLE-2 app improves on: `WhisperForConditionalGeneration.generate`
with transformers' own long-form handling for audio over 30 s (features not truncated, an
attention mask, sequential 30 s seeks). Matched with the belle2 app (`deployments/belle2/core.py`
`Belle2Args` defaults): language forced (default zh), task transcribe, beam 5 at temperature 0,
temperature fallback (0.0, 0.2, ..., 1.0) on compression ratio > 2.4 or average log-probability
< -1.0, no-speech threshold 0.6, no conditioning on previous text, timestamps on, float32, SDPA.
Not matched, by design: the app's VAD windows, batching and its two exact decoding shortcuts.

Prints one JSON line per file and a summary line (the bench/ "direct runner" protocol); logs go
to stderr. `--batch-size` is accepted for the protocol and ignored: each file is decoded alone.

GPU and random weights (bench/gpu_speed.py): `--device cuda` loads the model in float16 (the
app's dtype on cuda). `--pinned-decode-tokens N` decodes exactly N tokens per window with the
app's own generate arguments (`deployments.pinned_decode.transformers_generate_kwargs`: one
temperature, no fallback, no window dropped as silence). Long-form decoding seeks by predicted
timestamps, which random weights make arbitrary, so in this mode a file is cut into consecutive
30 s windows, decoded `--batch-size` at a time (the app cuts at VAD boundaries instead, so its
window count can differ: compare tokens per second). Each file's line then also carries
`window_tokens` (the tokens each window decoded in the last run).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deployments.pinned_decode import transformers_generate_kwargs, transformers_window_tokens  # noqa: E402

logger = logging.getLogger("direct_transformers")
SAMPLE_RATE = 16_000
TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def load_audio(path: str) -> np.ndarray:
    """Decodes any file PyAV (FFmpeg) reads to 16 kHz mono float32, like the service's ingress."""
    from faster_whisper.audio import decode_audio  # PyAV underneath; ships in the belle2 env

    return decode_audio(path, sampling_rate=SAMPLE_RATE)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Local transformers Whisper directory.")
    parser.add_argument("--files", nargs="+", required=True)
    parser.add_argument("--repeat", type=int, default=3, help="Timed runs per file.")
    parser.add_argument("--language", default="zh")
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1, help="Windows per batch with --pinned-decode-tokens; ignored otherwise.")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps the default.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda runs float16, cpu float32.")
    parser.add_argument("--pinned-decode-tokens", type=int, default=None, help="Benchmark mode for random weights: exactly this many tokens per 30 s window.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")

    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    started = time.perf_counter()
    processor = WhisperProcessor.from_pretrained(args.model, local_files_only=True)
    model = WhisperForConditionalGeneration.from_pretrained(
        args.model, dtype=dtype, attn_implementation="sdpa", local_files_only=True
    ).to(args.device).eval()
    load_s = time.perf_counter() - started
    logger.info("Loaded %s in %.1f s (%d torch threads).", args.model, load_s, torch.get_num_threads())

    window_tokens: list = []

    def transcribe_pinned(audio: np.ndarray) -> str:
        window_tokens.clear()
        step = 30 * SAMPLE_RATE
        windows = [audio[i : i + step] for i in range(0, audio.size, step)]
        texts = []
        for first in range(0, len(windows), args.batch_size):
            features = processor.feature_extractor(
                windows[first : first + args.batch_size], sampling_rate=SAMPLE_RATE, return_tensors="pt"
            ).input_features.to(args.device, dtype)
            with torch.inference_mode():
                out = model.generate(
                    features,
                    language=args.language,
                    task="transcribe",
                    num_beams=args.beam_size,
                    do_sample=False,
                    condition_on_prev_tokens=False,
                    return_timestamps=True,
                    return_segments=True,
                    **transformers_generate_kwargs(args.pinned_decode_tokens),
                )
            sequences = out["sequences"].tolist()
            window_tokens.extend(transformers_window_tokens(sequences, processor.tokenizer))
            texts += processor.batch_decode(sequences, skip_special_tokens=True)
        return " ".join(t.strip() for t in texts)

    def transcribe(audio: np.ndarray) -> str:
        if args.pinned_decode_tokens:
            return transcribe_pinned(audio)
        long_form = audio.size > 30 * SAMPLE_RATE
        inputs = processor.feature_extractor(
            audio,
            sampling_rate=SAMPLE_RATE,
            return_tensors="pt",
            # Long-form: keep every frame and say which are real; short-form: pad to 30 s.
            truncation=not long_form,
            padding="longest" if long_form else "max_length",
            return_attention_mask=True,
        ).to(args.device)
        with torch.inference_mode():
            out = model.generate(
                inputs.input_features.to(dtype),
                attention_mask=inputs.attention_mask,
                language=args.language,
                task="transcribe",
                num_beams=args.beam_size,
                do_sample=False,
                temperature=TEMPERATURES,
                compression_ratio_threshold=2.4,
                logprob_threshold=-1.0,
                no_speech_threshold=0.6,
                condition_on_prev_tokens=False,
                return_timestamps=True,
            )
        sequences = out["sequences"] if isinstance(out, dict) else out
        return processor.batch_decode(sequences, skip_special_tokens=True)[0].strip()

    # Untimed warm-up on real speech: on silence, the fallback runs every temperature to 448 tokens.
    transcribe(load_audio(args.files[0])[: 30 * SAMPLE_RATE])
    for path in args.files:
        audio = load_audio(path)
        walls, text = [], ""
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            text = transcribe(audio)
            walls.append(time.perf_counter() - t0)
        logger.info("%s: %.1f s audio, best %.2f s", Path(path).name, audio.size / SAMPLE_RATE, min(walls))
        line = {"file": path, "audio_s": audio.size / SAMPLE_RATE, "wall_s": walls, "text": text, "language": args.language}
        if args.pinned_decode_tokens:
            line["window_tokens"] = list(window_tokens)
        print(json.dumps(line, ensure_ascii=False), flush=True)
    peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    print(json.dumps({"summary": {"load_s": load_s, "peak_rss_bytes": peak}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
