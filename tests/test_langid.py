"""Language ID as the service is configured, on every real clip of at least 3 s in tests/data."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import ROOT, load_manifest

pytestmark = pytest.mark.slow  # needs the bundled model (make models), not the cluster

CLIPS = [r for r in load_manifest().values() if r["category"] == "speech" and r["duration_s"] >= 3]


@pytest.fixture(scope="module")
def detector():
    from runtime_envs.make_local_config import local_config
    from serve_app.audio import decode_audio
    from serve_app.config import IngressSettings
    from serve_app.langid import LanguageDetector

    production = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    overlay = yaml.safe_load((ROOT / "runtime_envs" / "local.yaml").read_text())
    app = next(a for a in local_config(production, overlay, http_port=8000)["applications"] if a["name"] == "transcription")
    settings = IngressSettings(**app["args"])
    detect = LanguageDetector(settings.language_id).detect
    return lambda name: detect(decode_audio((ROOT / "tests" / "data" / name).read_bytes(), max_seconds=3600)), settings


def test_every_language_in_the_fixtures_is_covered():
    assert {r["language"] for r in CLIPS} >= {"zh", "en", "de", "es", "fr", "ja"}


@pytest.mark.parametrize("row", CLIPS, ids=[r["file"] for r in CLIPS])
def test_detects_the_spoken_language(detector, row):
    detect, settings = detector
    found = detect(row["file"])
    assert found.language == row["language"], found
    # above the routing threshold, so the detected language decides the model (lowest measured: 0.90, de 68 s)
    assert found.probability >= settings.language_id.threshold, found


def test_no_speech_gives_no_language(detector):
    detect, _ = detector
    assert detect("noise_picovoice_empty.flac").language is None


def test_a_mixed_recording_is_heard_as_runs_of_its_languages(detector, data_dir):
    from serve_app.langid import LanguageDetector
    from tests.mixed import MANDARIN_ENGLISH, mixed_recording

    _, settings = detector
    audio, clips = mixed_recording([data_dir / f for f in MANDARIN_ENGLISH], [f[:2] for f in MANDARIN_ENGLISH])
    runs = LanguageDetector(settings.language_id).runs(audio)
    # the two Mandarin clips at the end are one run; each run ends in the pause after its last clip
    assert [r.language for r in runs] == ["zh", "en", "zh", "en", "zh"]
    ends = [clips[0].end_s, clips[1].end_s, clips[2].end_s, clips[3].end_s]
    for run, end_s in zip(runs, ends):
        assert end_s <= run.end / 16000 <= end_s + 0.8
    assert runs[-1].end == audio.size


@pytest.mark.parametrize("name", ["de_librivox_simplicissimus.flac", "zh_funasr_vad_example_70s.flac"])
def test_a_long_single_language_recording_is_one_run(detector, name):
    from serve_app.audio import decode_audio
    from serve_app.langid import LanguageDetector

    _, settings = detector
    audio = decode_audio((ROOT / "tests" / "data" / name).read_bytes(), max_seconds=3600)
    runs = LanguageDetector(settings.language_id).runs(audio)
    assert [(r.start, r.end, r.language) for r in runs] == [(0, audio.size, name[:2])]
