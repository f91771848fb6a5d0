"""BELLE-2's word (character) times from Whisper's cross-attention, in the belle2 venv without Ray
(tests/belle2_words_probe.py on the bundled base weights and real Mandarin clips).

The alignment heads' weights are computed by hooks from each layer's own projections; if a
transformers upgrade changes the attention module, `heads_equal` (against transformers' eager
attention) fails here rather than the times going wrong quietly.
"""

from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

import pytest

from deployments.belle2.words import LARGE_V3_ALIGNMENT_HEADS, alignment_heads, word_units
from tests.test_belle2_speedups import BELLE2_PYTHON, ROOT


def model(layers: int, heads: int, alignment=None):
    return SimpleNamespace(generation_config=SimpleNamespace(alignment_heads=alignment),
                           config=SimpleNamespace(decoder_layers=layers, decoder_attention_heads=heads))


def test_alignment_heads_come_from_the_model_else_from_large_v3_for_its_shape():
    assert alignment_heads(model(6, 8, [[3, 1], [4, 2]])) == ([[3, 1], [4, 2]], None)
    heads, note = alignment_heads(model(32, 20))  # BELLE-2: large-v3 fine-tuned, no heads in its config
    assert heads == LARGE_V3_ALIGNMENT_HEADS and "large-v3" in note
    assert alignment_heads(model(6, 8))[0] is None


def test_tokens_become_characters_and_words():
    pieces = {1: "广州", 2: "\ufffd", 3: "市", 4: "，", 5: " Amer", 6: "icans", 7: " ask"}

    def decode(ids):  # 2 + 3 are one character cut in two bytes
        text = "".join(pieces[i] for i in ids)
        return text.replace("\ufffd市", "市") if 3 in ids else text

    assert word_units([1, 2, 3, 4, 5, 6, 7], decode) == [("广州", [1]), ("市，", [2, 3, 4]), (" Americans", [5, 6]), (" ask", [7])]


@pytest.mark.slow
def test_mandarin_gets_character_times_from_belle2():
    proc = subprocess.run([str(BELLE2_PYTHON), str(ROOT / "tests" / "belle2_words_probe.py")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heads_equal"] and out["dtw_equal"]
    assert out["other_threads_ignored"]  # a replica decodes several requests at once on one model
    assert "word_timestamps" in out["spec_options"]
    for clip, result in out["words"].items():
        assert result["word_times"] == "whisper-cross-attention"
        assert result["segments"], clip
        for seg in result["segments"]:
            words = seg["words"]
            assert "".join(w["word"] for w in words) == seg["text"].replace(" ", ""), seg
            times = [t for w in words for t in (w["start"], w["end"])]
            assert times == sorted(times), seg
            assert (seg["start"], seg["end"]) == (words[0]["start"], words[-1]["end"])
            assert all(0 < w["score"] <= 1 for w in words)
            # characters, not the whole segment as one word, each a plausible length of speech
            assert len(words) >= len(seg["text"]) // 3 and all(w["end"] - w["start"] <= 1.5 for w in words), seg
