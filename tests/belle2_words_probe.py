"""Run in the belle2 venv, without Ray, by tests/test_belle2_words.py: BELLE-2's word times
(deployments/belle2/words.py) on the bundled base weights, next to what transformers itself does.

    .venvs/belle2/bin/python tests/belle2_words_probe.py

Prints one JSON object (the last line of stdout):
- heads_equal: the cross-attention the hooks record equals transformers' own eager attention
  (`output_attentions=True`) for every alignment head, on a real clip;
- dtw_equal: `dtw_path` takes the same path as transformers' `_dynamic_time_warping`;
- words: per clip, the segments with their words (word times on).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deployments.belle2.core import Belle2Core  # noqa: E402
from deployments.belle2.words import dtw_path, recorded_cross_attention  # noqa: E402

MODEL = os.environ.get("KLIPNOTE_MODEL_HF", str(ROOT / "models" / "whisper-base-hf"))
CLIPS = ["zh_aishell1_BAC009S0724W0121.flac", "zh_funasr_asr_example.flac"]


def load_clip(name: str):
    from faster_whisper.audio import decode_audio  # the belle2 env has it (VAD)

    return decode_audio(str(ROOT / "tests" / "data" / name), sampling_rate=16_000)


def heads_equal(core: Belle2Core) -> bool:
    import torch
    from transformers import WhisperForConditionalGeneration

    eager = WhisperForConditionalGeneration.from_pretrained(MODEL, attn_implementation="eager").eval()
    features = core._processor.feature_extractor([load_clip(CLIPS[0])], sampling_rate=16_000, return_tensors="pt").input_features
    tokens = core._processor.tokenizer("<|startoftranscript|><|zh|><|transcribe|><|notimestamps|>广州市房地产中介协会分析", add_special_tokens=False, return_tensors="pt").input_ids
    heads = core._alignment_heads
    with torch.inference_mode(), recorded_cross_attention(eager, heads) as recorded:
        out = eager(input_features=features, decoder_input_ids=tokens, output_attentions=True, use_cache=False)
    return all(torch.allclose(recorded[(layer, head)], out.cross_attentions[layer][:, head], atol=1e-5) for layer, head in heads)


def other_threads_ignored(core: Belle2Core) -> bool:
    """A forward pass in another thread (another request's decode) records nothing."""
    import threading

    import torch

    features = core._processor.feature_extractor([load_clip(CLIPS[0])], sampling_rate=16_000, return_tensors="pt").input_features
    tokens = core._processor.tokenizer("<|startoftranscript|><|zh|><|transcribe|><|notimestamps|>广州", add_special_tokens=False, return_tensors="pt").input_ids

    def forward():
        with torch.inference_mode():
            core._model(input_features=features, decoder_input_ids=tokens, use_cache=False)

    with recorded_cross_attention(core._model, core._alignment_heads) as recorded:
        thread = threading.Thread(target=forward)
        thread.start()
        thread.join()
        ignored = not recorded
        forward()
        return ignored and len(recorded) == len(core._alignment_heads)


def dtw_equal() -> bool:
    import numpy as np
    from transformers.models.whisper.generation_whisper import _dynamic_time_warping

    rng = np.random.default_rng(0)
    for shape in [(5, 40), (12, 120), (30, 300)]:
        matrix = rng.standard_normal(shape)
        ours, theirs = dtw_path(matrix), _dynamic_time_warping(matrix)
        if not (np.array_equal(ours[0], theirs[0]) and np.array_equal(ours[1], theirs[1])):
            return False
    return True


def main() -> dict:
    core = Belle2Core({"model": MODEL, "device": "cpu", "local_files_only": True, "cpu_threads": 2, "decoder_cpu_threads": 1})
    words = {}
    for clip in CLIPS:
        result = core.transcribe(load_clip(clip), {"word_timestamps": True})
        words[clip] = {"segments": result["segments"], "word_times": result["word_times"]}
    return {"heads_equal": heads_equal(core), "dtw_equal": dtw_equal(), "other_threads_ignored": other_threads_ignored(core), "words": words,
            "spec_options": sorted(core.model_spec().options)}


if __name__ == "__main__":
    print(json.dumps(main(), ensure_ascii=False))
