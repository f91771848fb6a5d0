"""Model specs, the options check, and routing built from config and specs (fast: no cluster)."""

from __future__ import annotations

import json
import pickle

import pytest
from pydantic import ValidationError

from deployments.contract import (
    ModelFailedError,
    ModelSpec,
    ModelUnavailableError,
    TranscribeOptions,
    UnsupportedOptionError,
    unhonoured_options,
    without_options,
)
from serve_app.config import IngressSettings
from serve_app.errors import error_response_for
from serve_app.routing import UnknownModelError, choose_model

BELLE2 = ModelSpec("belle2", languages=("zh",), options=frozenset({"initial_prompt", "temperature", "beam_size", "script"}))
WHISPERX = ModelSpec("whisperx", tasks=("transcribe", "translate"), detects_language=True,
                     options=frozenset({"initial_prompt", "temperature", "beam_size", "word_timestamps", "script"}))
SPECS = {"belle2": BELLE2, "whisperx": WHISPERX}


def test_a_spec_crosses_envs_as_builtins_and_comes_back_equal():
    data = WHISPERX.to_dict()
    blob = pickle.dumps(data)
    assert b"deployments" not in blob
    assert ModelSpec.from_dict(json.loads(json.dumps(data))) == WHISPERX
    assert data["capabilities"] == {"word_timestamps": True, "speakers": False, "script_choice": True}


def test_the_plugins_declare_only_options_that_exist():
    from deployments.belle2.core import Belle2Core
    from deployments.fasterwhisper.core import FasterWhisperCore
    from deployments.whisperx.core import WhisperXCore

    fields = set(TranscribeOptions.__dataclass_fields__)
    for core in (Belle2Core, WhisperXCore, FasterWhisperCore):
        assert core.spec.options <= fields, core
        assert core.spec.name and core.spec.tasks


@pytest.mark.parametrize(
    "options,spec,expected",
    [
        ({}, BELLE2, []),
        ({"language": "zh", "beam_size": 2, "script": "traditional"}, BELLE2, []),
        ({"word_timestamps": True}, BELLE2, ["word_timestamps"]),
        ({"language": "en"}, BELLE2, ["language"]),
        ({"task": "translate", "diarize": True}, BELLE2, ["task", "diarize"]),
        ({"diarize": True, "max_speakers": 2}, WHISPERX, ["diarize", "max_speakers"]),
        ({"language": "de", "task": "translate", "word_timestamps": True}, WHISPERX, []),
    ],
)
def test_unhonoured_options_are_exactly_the_ones_the_spec_lacks(options, spec, expected):
    opts = TranscribeOptions.from_dict(options)
    found = unhonoured_options(spec, opts)
    assert [u.option for u in found] == expected
    assert all(spec.name in u.reason for u in found)
    assert unhonoured_options(spec, without_options(opts, [u.option for u in found])) == []


def test_config_names_each_model_once_and_checks_every_reference():
    settings = IngressSettings(model_apps=["belle2", "whisperx", "fasterwhisper"], routes={"FR": "fasterwhisper"})
    assert settings.model_apps["fasterwhisper"] == "fasterwhisper" and settings.route("fr") == "fasterwhisper"
    for bad, match in [
        ({"routes": {"fr": "fasterwhisperz"}}, "'fasterwhisperz' for routes\\['fr'\\]"),
        ({"default_model": "nosuch"}, "'nosuch' for default_model"),
        ({"model_apps": ["belle2", "auto"]}, "cannot name a model"),
        ({"model_apps": []}, "no model_apps"),
    ]:
        with pytest.raises(ValidationError, match=match):
            IngressSettings(**bad)


def test_translation_goes_to_a_model_that_translates():
    settings = IngressSettings()
    assert choose_model(settings, SPECS, "auto", "transcribe", "zh", 0.9) == ("belle2", "language zh")
    model, reason = choose_model(settings, SPECS, "auto", "translate", "zh", 0.9)
    assert model == "whisperx" and "belle2 does not translate" in reason
    assert choose_model(settings, SPECS, "auto", "translate", "de", 0.9)[0] == "whisperx"
    assert choose_model(settings, SPECS, "belle2", "translate", "zh", None) == ("belle2", "requested")  # refused later, by spec
    with pytest.raises(ModelUnavailableError, match="No deployed model can translate"):
        choose_model(settings, {"belle2": BELLE2}, "auto", "translate", "zh", 0.9)


def test_errors_name_the_form_field_and_keep_internals_out():
    r = error_response_for(UnsupportedOptionError("Got word_timestamps=True, but belle2 does not produce word timestamps.", option="word_timestamps"))
    error = json.loads(r.body)["error"]
    assert r.status_code == 400 and error["code"] == "unsupported_option" and error["param"] == "timestamp_granularities[]"
    error = json.loads(error_response_for(UnknownModelError("Got 'x' for model")).body)["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    r = error_response_for(ModelFailedError("OutOfMemoryError: CUDA out of memory at /opt/app/deployments/belle2/core.py:88"))
    error = json.loads(r.body)["error"]
    assert r.status_code == 500 and error["code"] == "model_failed" and "/opt" not in error["message"] and "OutOfMemoryError" in error["message"]


def test_unsupported_option_error_survives_pickling():
    e = pickle.loads(pickle.dumps(UnsupportedOptionError("m", option="language")))
    assert isinstance(e, UnsupportedOptionError) and e.option == "language" and str(e) == "m"
