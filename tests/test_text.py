"""The BELLE-2 app's text stages: the repetition-loop guard and the Chinese script converter."""

from __future__ import annotations

import pytest

import numpy as np

from deployments.text import ScriptConverter, TextPostProcessor, collapse_repetitions, has_repetition_loop

# Degenerate Whisper output seen in the wild: a unit repeated until the token budget runs out.
LOOPS = [
    ("谢" * 80, "谢谢"),
    ("我们来看一下" * 12, "我们来看一下我们来看一下"),
    ("好的，我知道了。" + "嗯" * 60, "好的，我知道了。嗯嗯"),
    ("大家好" + "，然后" * 20 + "我们开始吧", "大家好，然后，然后我们开始吧"),
    ("the end of the line " * 10, "the end of the line the end of the line "),
]

# Legitimate repetition that must survive untouched.
KEPT = [
    "哈哈哈",
    "哈哈哈哈哈哈",  # a long laugh is still speech
    "no no no",
    "no, no, no, no!",
    "对对对，就是这样。",
    "谢谢谢谢大家",
    "一步一步来",
    "看看看看",
    "好好学习，天天向上",
    "我最喜欢夏天，满地的鲜花，这里一朵，那里一朵，真比天上的星星还多。",
    "",
]


@pytest.mark.parametrize("text,expected", LOOPS, ids=range(len(LOOPS)))
def test_real_loops_are_collapsed(text, expected):
    out, changed = collapse_repetitions(text)
    assert changed
    assert out == expected
    assert has_repetition_loop(text)
    assert not has_repetition_loop(out)


@pytest.mark.parametrize("text", KEPT, ids=range(len(KEPT)))
def test_legitimate_repeats_are_kept(text):
    assert collapse_repetitions(text) == (text, False)
    assert not has_repetition_loop(text)


def test_two_loops_in_one_segment_are_both_collapsed():
    out, changed = collapse_repetitions("啊" * 30 + "中间的话" + "对不起" * 10)
    assert changed
    assert out == "啊啊中间的话对不起对不起"


def test_whitespace_runs_are_not_loops():
    assert collapse_repetitions("a" + " " * 50 + "b") == ("a" + " " * 50 + "b", False)


def test_script_converter_both_ways():
    convert = ScriptConverter()
    assert convert("欢迎大家来体验语音识别模型", "traditional") == "歡迎大家來體驗語音識別模型"
    assert convert("歡迎大家來體驗語音識別模型", "simplified") == "欢迎大家来体验语音识别模型"
    assert convert("砸自己的脚", "simplified") == "砸自己的脚"


def test_every_segment_with_chinese_script_is_converted_whatever_language_the_call_settled_on():
    # A Mandarin stretch inside a call decoded as English kept its own script before: one result mixed scripts.
    process = TextPostProcessor()
    segments = [{"start": 0.0, "end": 2.0, "text": "歡迎大家來體驗", "words": [{"word": "歡迎", "start": 0.0, "end": 1.0}]},
                {"start": 2.0, "end": 4.0, "text": "Welcome, everyone."}]
    for language in ("zh", "en", None):
        out = process(segments, language=language, script="simplified", warnings=[])
        assert [s["text"] for s in out] == ["欢迎大家来体验", "Welcome, everyone."], language
        assert out[0]["words"][0]["word"] == "欢迎"
    # Japanese kanji are not Chinese script: 学 must not become 學.
    kanji = [{"start": 0.0, "end": 2.0, "text": "大学で勉強する"}]
    assert process(kanji, language="ja", script="traditional", warnings=[])[0]["text"] == "大学で勉強する"
    assert process(kanji, language="zh", script="traditional", warnings=[])[0]["text"] == "大學で勉強する"


@pytest.mark.parametrize("path", ["deployments.whisperx.core:WhisperXCore", "deployments.belle2.core:Belle2Core", "deployments.fasterwhisper.core:FasterWhisperCore"])
def test_every_model_core_guards_repetitions_and_converts_script(path):
    # The guard and OpenCC are the shared base's (ModelCore.envelope): no plug-in may go around them.
    from deployments.core import Decoded, DecodeEvents, DecodeRequest, ModelCore, import_core
    from deployments.contract import TranscribeOptions

    core_class = import_core(path)
    assert core_class.envelope is ModelCore.envelope and core_class.transcribe is ModelCore.transcribe
    core = core_class.__new__(core_class)  # the envelope needs no model: no torch in this env
    core.args, core.device, core.load_time_s, core._compute_type = core_class.Args.model_validate({"model": "m"}), "cpu", 0.0, "float32"
    core.text = TextPostProcessor(convert_script=core.model_spec().script_choice)
    core.events = DecodeEvents()
    request = DecodeRequest(np.zeros(16000, dtype=np.float32), TranscribeOptions())
    looping = Decoded(segments=[{"start": 0.0, "end": 1.0, "text": "thank you " * 12}, {"start": 1.0, "end": 2.0, "text": "歡迎"}], language="en")
    result = core.envelope(request, looping)
    assert [s["text"] for s in result["segments"]] == ["thank you thank you ", "欢迎"]
    assert any("repetition loop" in w for w in result["warnings"])
    assert core.events.counts == {DecodeEvents.REPETITION_COLLAPSES: 1}  # what the replica's metric counts
