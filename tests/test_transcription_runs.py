"""A piece split by language, without Ray or models: the router and the detector are stand-ins
that record what was asked of them and in which order (the live side is tests/test_mixed_languages.py).

The first piece of a recording is handed over before its stretches are heard: the model starts on
it whole, as routed at the start, and that result stands when the piece is one run of that route;
a piece in two languages calls it off and goes run by run.
"""

from __future__ import annotations

import asyncio
import threading
from typing import List

import numpy as np
import pytest

from deployments.contract import SAMPLE_RATE, ModelSpec, ModelUnavailableError, TranscribeOptions
from serve_app.config import IngressSettings
from serve_app.langid import DetectedLanguage
from serve_app.pieces import Piece
from serve_app.routing import RoutedResult, choose_model
from serve_app.stretches import LanguageRun
from serve_app.transcription import Finished, Transcription

SPECS = {"belle2": ModelSpec(name="belle2", languages=("zh",)), "whisperx": ModelSpec(name="whisperx", tasks=("transcribe", "translate"), detects_language=True)}


class Router:
    """ModelRouter's surface as Transcription uses it; `transcribe` records (model, samples, language)."""

    def __init__(self, events: List[str], fail: str = ""):
        self.settings, self.events, self.calls, self.fail = IngressSettings(), events, [], fail
        self.cancelled = 0

    async def resolve(self, requested):
        return requested

    async def needs_language_id(self, requested, task):
        return True

    async def choose(self, requested, task, language, probability):
        return choose_model(self.settings, SPECS, requested, task, language, probability)

    async def spec(self, model):
        return SPECS[model]

    def check_explicit(self, model, spec, opts):
        pass

    async def transcribe(self, model, audio, opts, *, explicit, why):
        self.events.append(f"call {model} {opts.language} starts")
        self.calls.append((model, audio.size, opts.language))
        if model == self.fail:
            raise ModelUnavailableError(f"{model} has no running replica")
        try:
            await asyncio.sleep(0.3)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.events.append(f"call {model} {opts.language} ends")
        segment = {"start": 0.0, "end": audio.size / SAMPLE_RATE, "text": {"zh": "你好", "en": "Hello."}.get(opts.language, "?")}
        return RoutedResult({"segments": [segment], "language": opts.language, "language_probability": None, "model": {}, "warnings": []}, model, [], False)


class Detector:
    """First speech heard as zh; a piece's runs as given, after `wait` (the plan's work)."""

    def __init__(self, events: List[str], runs: List[LanguageRun]):
        self.events, self._runs, self.go = events, runs, threading.Event()

    def detect(self, audio):
        return DetectedLanguage("zh", 0.99)

    def runs(self, audio):
        self.events.append("plan starts")
        self.go.wait(5)  # the test lets it finish once the model call has started
        self.events.append("plan ends")
        return self._runs


@pytest.fixture(autouse=True)
def stand_in_audio_is_speech(monkeypatch):
    monkeypatch.setattr("serve_app.transcription.contains_speech", lambda audio: True)


def transcribe(runs: List[LanguageRun], fail: str = ""):
    events: List[str] = []
    router, detector = Router(events, fail), Detector(events, runs)
    audio = np.full(30 * SAMPLE_RATE, 0.1, dtype=np.float32)

    async def pieces():
        yield Piece(0, 0, audio)

    async def main():
        transcription = Transcription(router=router, detector=detector, settings=router.settings, pieces=pieces(),
                                      requested="auto", opts=TranscribeOptions(), as_subtitles=False, total_s=30.0)
        await transcription.start()

        async def release_when_called():
            while not router.calls:
                await asyncio.sleep(0.01)
            detector.go.set()

        releaser = asyncio.ensure_future(release_when_called())
        try:
            return await transcription.collect()
        finally:
            detector.go.set()
            releaser.cancel()

    return asyncio.run(main()), router, events


def test_the_model_starts_on_a_first_piece_before_its_stretches_are_heard_and_its_result_stands():
    finished, router, events = transcribe([LanguageRun(0, 30 * SAMPLE_RATE, "zh", 0.99, 25 * SAMPLE_RATE)])
    assert events.index("call belle2 zh starts") < events.index("plan ends")
    assert router.calls == [("belle2", 30 * SAMPLE_RATE, "zh")] and router.cancelled == 0
    assert isinstance(finished, Finished) and finished.body["text"] == "你好"
    assert [s["language"] for s in finished.segments] == ["zh"]


def test_a_first_piece_in_two_languages_calls_the_whole_piece_off_and_goes_run_by_run():
    runs = [LanguageRun(0, 12 * SAMPLE_RATE, "zh", 0.99, 10 * SAMPLE_RATE), LanguageRun(12 * SAMPLE_RATE, 30 * SAMPLE_RATE, "en", 0.95, 15 * SAMPLE_RATE)]
    finished, router, events = transcribe(runs)
    assert router.cancelled == 1 and "call belle2 zh ends" in events  # the run, not the whole piece
    assert router.calls[1:] == [("belle2", 12 * SAMPLE_RATE, "zh"), ("whisperx", 18 * SAMPLE_RATE, "en")]
    assert [(s["language"], s["model"], s["start"]) for s in finished.segments] == [("zh", "belle2", 0.0), ("en", "whisperx", 12.0)]
    assert finished.body["text"] == "你好 Hello." and {x["language"] for x in finished.body["languages"]} == {"zh", "en"}


def test_a_run_that_fails_raises_its_own_error_not_a_group():
    runs = [LanguageRun(0, 12 * SAMPLE_RATE, "zh", 0.99, 10 * SAMPLE_RATE), LanguageRun(12 * SAMPLE_RATE, 30 * SAMPLE_RATE, "en", 0.95, 15 * SAMPLE_RATE)]
    with pytest.raises(ModelUnavailableError, match="whisperx has no running replica"):
        transcribe(runs, fail="whisperx")
