"""Builds a Whisper model with random weights, for throughput benchmarks only (not a speech model).

Run with the whisperx venv (transformers 4.x and CTranslate2's converter):

    .venvs/whisperx/bin/python bench/random_whisper.py --shape large-v3   # or: --shape tiny

Writes, under `--out` (default `models/`, git-ignored):

- `random-<shape>-hf/`: transformers format, float16 safetensors, with the tokenizer and
  generation files of `models/whisper-base-hf` and a feature extractor of the shape's mel bins
  (what the belle2 app loads);
- `random-<shape>-ct2/`: the same weights converted to CTranslate2 float16 with
  `ctranslate2.converters.TransformersConverter` (what the whisperx app loads);
- `random_weights.json` in both: the shape, seed and parameter count, so that nobody mistakes
  them for a trained model.

Shapes:

- `large-v3`: Whisper large-v3's dimensions (d_model 1280, 32 encoder + 32 decoder layers,
  20 heads, FFN 5120, 128 mel bins; about 1.54 B parameters). The vocabulary is our base
  tokenizer's (51865 tokens; the real large-v3 has 51866, one more language token), so the
  output projection has one row fewer than the real model's, which is immaterial to speed.
- `tiny`: Whisper tiny's dimensions (d_model 384, 4 + 4 layers, 6 heads, FFN 1536) with
  large-v3's 128 mel bins, so that a CPU smoke run takes the same feature path as the GPU run.

Random weights make the decoder's output meaningless: the model apps only give comparable
timings with `pinned_decode_tokens` set (each window decodes exactly that many tokens).
The weights are drawn from `--seed` with transformers' own initialisation (normal, std 0.02).

Prints one JSON line: the directories, parameter count, and file sizes.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_HF = ROOT / "models" / "whisper-base-hf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

logger = logging.getLogger("random_whisper")

# Dimensions of the published checkpoints (openai/whisper model cards and config.json).
SHAPES = {
    "large-v3": dict(d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20,
                     decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120, num_mel_bins=128),
    "tiny": dict(d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
                 decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536, num_mel_bins=128),
}


def model_dirs(shape: str, out: Path = ROOT / "models") -> tuple:
    """The (transformers, CTranslate2) directories of a random model of `shape`."""
    return out / f"random-{shape}-hf", out / f"random-{shape}-ct2"


def build_hf(shape: str, hf_dir: Path, *, seed: int, base: Path = BASE_HF, device: str = "cpu") -> int:
    """Writes the random transformers model; returns its parameter count.

    Args:
        base: A Whisper model directory whose tokenizer, generation and feature-extractor files
            (and vocabulary size and special token ids) the random model takes.
        device: Where the weights are drawn ("cuda" is much faster for large-v3; the draws then
            differ from the CPU's for the same seed).
    """
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    dims = SHAPES[shape]
    base_config = json.loads((base / "config.json").read_text())
    config = WhisperConfig(
        **dims,
        vocab_size=base_config["vocab_size"],
        max_source_positions=1500,
        max_target_positions=448,
        bos_token_id=base_config["bos_token_id"],
        eos_token_id=base_config["eos_token_id"],
        pad_token_id=base_config["pad_token_id"],
        decoder_start_token_id=base_config["decoder_start_token_id"],
        torch_dtype="float16",
    )
    torch.manual_seed(seed)
    # Built directly in float16: large-v3 in float32 would take 6 GB of RAM for nothing.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            model = WhisperForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    # The base model's language and task token ids, suppress lists and timestamp settings; the
    # alignment heads are the base model's layers, so replace them with Whisper's own default
    # for a model without a tuned list (every head of the second half of the decoder).
    generation = GenerationConfig.from_pretrained(base)
    layers, heads = dims["decoder_layers"], dims["decoder_attention_heads"]
    generation.alignment_heads = [[layer, head] for layer in range(layers // 2, layers) for head in range(heads)]
    model.generation_config = generation
    hf_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(hf_dir, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()

    for name in TOKENIZER_FILES:
        shutil.copy2(base / name, hf_dir / name)
    preprocessor = json.loads((base / "preprocessor_config.json").read_text())
    preprocessor["feature_size"] = dims["num_mel_bins"]
    (hf_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return params


def convert_ct2(hf_dir: Path, ct2_dir: Path) -> None:
    """Converts the transformers model to CTranslate2 float16 (tokenizer and mel bins copied)."""
    from ctranslate2.converters import TransformersConverter

    converter = TransformersConverter(
        str(hf_dir), copy_files=["tokenizer.json", "preprocessor_config.json"], load_as_float16=True
    )
    converter.convert(str(ct2_dir), quantization="float16", force=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "models", help="Parent directory of the two model directories.")
    parser.add_argument("--overwrite", action="store_true", help="Rebuild even if both directories exist.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")

    hf_dir, ct2_dir = model_dirs(args.shape, args.out)
    marker = "random_weights.json"
    if not args.overwrite and (hf_dir / marker).exists() and (ct2_dir / marker).exists():
        logger.info("%s and %s exist; --overwrite rebuilds them.", hf_dir, ct2_dir)
        info = json.loads((hf_dir / marker).read_text())
    else:
        started = time.perf_counter()
        for d in (hf_dir, ct2_dir):
            shutil.rmtree(d, ignore_errors=True)
        params = build_hf(args.shape, hf_dir, seed=args.seed)
        logger.info("Wrote %s (%.1f M parameters) in %.0f s.", hf_dir, params / 1e6, time.perf_counter() - started)
        convert_ct2(hf_dir, ct2_dir)
        logger.info("Converted to %s in %.0f s in all.", ct2_dir, time.perf_counter() - started)
        info = {
            "random_weights": True,
            "note": "Random weights for throughput benchmarks; not a speech model. Decode with pinned_decode_tokens.",
            "shape": args.shape,
            "dims": SHAPES[args.shape],
            "vocab_size": json.loads((hf_dir / "config.json").read_text())["vocab_size"],
            "seed": args.seed,
            "parameters": params,
            "built_by": "bench/random_whisper.py",
        }
        for d in (hf_dir, ct2_dir):
            (d / marker).write_text(json.dumps(info, indent=2) + "\n")
    files = {str(p.relative_to(args.out)): p.stat().st_size for d in (hf_dir, ct2_dir) for p in sorted(d.iterdir())}
    print(json.dumps({"hf_dir": str(hf_dir), "ct2_dir": str(ct2_dir), "parameters": info["parameters"],
                      "seed": info["seed"], "files": files}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
