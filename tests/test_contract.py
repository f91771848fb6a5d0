"""The options and results that cross between envs: builtins only, validated once."""

from __future__ import annotations

import pickle

import pytest

from deployments.contract import InvalidOptionsError, TranscribeOptions


def get_valid_options():
    return [
        {},
        {"language": "zh", "beam_size": 1, "temperature": 0.0},
        {"task": "translate", "initial_prompt": "KlipNote", "word_timestamps": True},
        {"diarize": True, "min_speakers": 1, "max_speakers": 3, "script": "traditional"},
        {"temperature": [0.0, 0.5]},
    ]


def get_invalid_options():
    return [
        ({"task": "summarize"}, "task"),
        ({"beam_size": 0}, "beam_size"),
        ({"temperature": [1.5]}, "temperature"),
        ({"temperature": []}, "temperature"),
        ({"min_speakers": 3, "max_speakers": 2}, "min_speakers"),
        ({"script": "cyrillic"}, "script"),
        ({"no_such_option": 1}, "no_such_option"),
    ]


@pytest.mark.parametrize("data", get_valid_options())
def test_valid_options_round_trip_as_builtins(data):
    opts = TranscribeOptions.from_dict(data)
    as_dict = opts.to_dict()
    assert TranscribeOptions.from_dict(as_dict) == opts
    # builtins only: must unpickle with nothing but the standard library
    blob = pickle.dumps(as_dict)
    assert b"deployments" not in blob and b"pydantic" not in blob


@pytest.mark.parametrize("data,match", get_invalid_options())
def test_invalid_options_name_the_field(data, match):
    with pytest.raises(InvalidOptionsError, match=match):
        TranscribeOptions.from_dict(data)


def test_request_options_match_the_contract():
    """The HTTP request builds exactly the options object the model apps take."""
    import io

    from fastapi import UploadFile

    from serve_app.protocol import TranscriptionRequest

    req = TranscriptionRequest.model_validate(
        {
            "file": UploadFile(io.BytesIO(b"x"), filename="a.wav"),
            "language": "ZH",
            "prompt": "会议",
            "response_format": "verbose_json",
            "timestamp_granularities[]": ["word"],
        }
    )
    opts = req.to_transcribe_options()
    assert opts == TranscribeOptions(language="zh", initial_prompt="会议", word_timestamps=True)
