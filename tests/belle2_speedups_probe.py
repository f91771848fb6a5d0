"""Run in the belle2 venv, without Ray, by tests/test_belle2_speedups.py: the BELLE-2 core with and
without its speed-ups on real clips, and what its guards do.

    .venvs/belle2/bin/python tests/belle2_speedups_probe.py SCENARIO [CLIP ...]

Prints one JSON object (the last line of stdout). Scenarios:
- float32: the core as served (shortcuts, oneDNN) against transformers as shipped, on the clips:
  tokens of a beam-5 batch of all clips, and each clip's segments.
- float16: the same in float16 (shortcuts only: oneDNN is float32), one model with its shortcuts
  switched off for the comparison (float16 on CPU is slow).
- version_guard: transformers treated as unverified: the speed-ups stay off, loudly.
- broken_shortcut: the cross-attention shortcut deliberately wrong: the warm-up self-check turns
  the shortcuts off, loudly, and the output is transformers' own.
- decode_events: what the core counts for the replica's metrics (`DecodeEvents`) on a clip, the
  clip reversed, a hum shaped like it and one syllable of it looped (`tests/signals.py`):
  windows, windows that decoded to no text, windows decoded again at a higher temperature,
  repetition loops collapsed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deployments.belle2 import decoding, speedups  # noqa: E402
from deployments.belle2.core import MAX_FOLLOW_UPS, Belle2Core  # noqa: E402
from deployments.contract import TranscribeOptions  # noqa: E402

MODEL = os.environ.get("KLIPNOTE_MODEL_HF", str(ROOT / "models" / "whisper-base-hf"))
BASE_ARGS = {"model": MODEL, "device": "cpu", "local_files_only": True, "cpu_threads": 2, "decoder_cpu_threads": 1, "batch_size": 4}


def load_clip(name: str):
    from faster_whisper.audio import decode_audio  # the belle2 env has it (VAD)

    return decode_audio(str(ROOT / "tests" / "data" / name), sampling_rate=16_000)


def core(**args) -> Belle2Core:
    return Belle2Core({**BASE_ARGS, **args})


def run(served: Belle2Core, plain, clips: list) -> dict:
    """`served` against `plain` (a second core as shipped) or, when None, against `served` itself
    with its shortcuts switched off."""
    audio = [load_clip(c) for c in clips]
    batch_opts = TranscribeOptions(beam_size=5)
    served_counts = served.speedup_counts()
    fast = served.generate(audio, batch_opts)["sequences"].tolist()
    segments = {c: [served.transcribe(a)["segments"]] for c, a in zip(clips, audio)}
    counts_after = served.speedup_counts()
    if plain is None:
        served.speedups.shortcuts_enabled, plain = False, served
    shipped = plain.generate(audio, batch_opts)["sequences"].tolist()
    for c, a in zip(clips, audio):
        segments[c].append(plain.transcribe(a)["segments"])
    return {
        "served_counts": served_counts,
        "served_warnings": served.start_warnings,
        "plain_counts": plain.speedup_counts() if plain is not served else None,
        "tokens_equal": fast == shipped,
        "segments": segments,
        "counts_after": counts_after,
    }


def main(scenario: str, clips: list) -> dict:
    plain_args = {"decoding_shortcuts": False, "onednn_linears": False}
    if scenario == "float32":
        return run(core(), core(**plain_args), clips)
    if scenario == "float16":
        # one model: its warm-up self-check already compared the check clip as shipped and patched
        return run(core(compute_type="float16"), None, clips)
    if scenario == "version_guard":
        speedups.VERIFIED_TRANSFORMERS = "<1.0"
        guarded = core()
        return {"counts": guarded.speedup_counts(), "warnings": guarded.info()["warnings"],
                "segments": {c: guarded.transcribe(load_clip(c))["segments"] for c in clips}}
    if scenario == "broken_shortcut":
        forward = decoding.SharedCrossAttention._forward

        def off_by_a_little(self, module, *args, **kwargs):  # wrong only where the shortcut applied
            hits = self.attention_hits
            out = forward(self, module, *args, **kwargs)
            return (out[0] * 1.5, out[1]) if self.attention_hits > hits else out

        decoding.SharedCrossAttention._forward = off_by_a_little
        broken = core(onednn_linears=False)
        before = broken.speedup_counts()
        segments = {c: broken.transcribe(load_clip(c))["segments"] for c in clips}
        return {"counts_at_start": before, "counts_after": broken.speedup_counts(), "warnings": broken.info()["warnings"],
                "shortcuts_enabled": broken.speedups.shortcuts_enabled, "segments": segments}
    if scenario == "decode_events":
        import torch

        from tests.signals import looped_syllable, reversed_speech, speech_shaped_hum

        speech = load_clip(clips[0])
        counted = core(onednn_linears=False)
        out = {}
        greedy = TranscribeOptions(temperature=(0.0,)).to_dict()
        for name, audio, opts in (("speech", speech, None), ("reversed", reversed_speech(speech), None),
                                  ("hum", speech_shaped_hum(speech), None), ("loop", looped_syllable(speech), greedy)):
            torch.manual_seed(0)  # a fallback pass samples: the same draw every run
            before = dict(counted.events.counts)
            result = counted.transcribe(audio, opts)
            out[name] = {"windows": len(counted.windows(audio)), "text": "".join(s["text"] for s in result["segments"]), "warnings": result["warnings"],
                         "counts": {k: v - before.get(k, 0) for k, v in counted.events.counts.items()}}
        out["batch_sizes"] = dict(counted.events.batch_sizes)
        out["max_follow_ups"] = MAX_FOLLOW_UPS
        return out
    raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2:]), ensure_ascii=False))
