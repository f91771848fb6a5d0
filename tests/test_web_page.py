"""The web page at `/` in a real browser (Debian's Chromium, driven by Playwright) against the
session cluster: a Mandarin video transcribed, played from a clicked cue, edited and downloaded;
a long, mostly silent recording whose cues arrive while it runs, and which a reload of the page
picks up again with its edits; the microphone (Chromium's fake capture device playing a Mandarin
clip); a named model's language warning; an ingress at a route prefix with API keys and jobs off;
an upload that is not media, on a phone-sized screen; and the API docs rendered with no network
beyond the service. The page is audited with axe-core as it starts, with a transcript, and with an
error on a phone.

Screenshots go to `$KLIPNOTE_TEST_OUTPUT/web` (default `.test-output/web`); the README's is one
of them (docs/web-page.png).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import List
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from deployments.contract import SAMPLE_RATE
from serve_app.audio import decode_audio
from tests.conftest import DATA, ROOT
from tests.media import encode_media, wav_bytes
from tests.mixed import Clip, clip_at, mixed_recording

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OUTPUT = Path(os.environ.get("KLIPNOTE_TEST_OUTPUT", ROOT / ".test-output")) / "web"
MANDARIN = ("zh_aishell1_BAC009S0724W0121.flac", "zh_funasr_asr_example.flac", "zh_paddlespeech_zh.flac")
HAN = re.compile(r"[\u4e00-\u9fff]")
DONE_TIMEOUT_MS = 300_000
SRT_CUE = re.compile(r"(\d+)\n(\d\d:\d\d:\d\d,\d{3}) --> (\d\d:\d\d:\d\d,\d{3})\n(.*?)(?:\n\n|\n?$)", re.S)

if CHROMIUM is None:  # `make test` installs it (Makefile SYSTEM_PACKAGES); a missing browser is a failure, not a skip
    raise RuntimeError("Chromium is not installed: run `make system-packages` (Debian package `chromium`).")


def moving_gradient(width: int, height: int, frame_index: int, fps: int) -> np.ndarray:
    """A slowly changing colour picture, so the video is seen to play."""
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    phase = frame_index / (fps * 20)
    rgb = np.concatenate([40 + 60 * x + 40 * phase + 0 * y, 70 + 50 * y + 0 * x, 110 + 60 * (1 - x) + 0 * y], axis=2)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def srt_cues(text: str) -> List[tuple]:
    return [(int(n), start, end, body.strip()) for n, start, end, body in SRT_CUE.findall(text.strip() + "\n")]


def srt_time(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


@pytest.fixture(scope="module")
def mandarin() -> tuple:
    return mixed_recording([DATA / name for name in MANDARIN], ["zh"] * len(MANDARIN), pause_s=1.0)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("web-media")


@pytest.fixture(scope="module")
def browser(media_dir, mandarin):
    from playwright.sync_api import sync_playwright

    audio, _ = mandarin
    quiet = np.zeros(SAMPLE_RATE, np.float32)
    microphone = media_dir / "microphone.wav"
    microphone.write_bytes(wav_bytes(np.concatenate([quiet, audio, quiet])))
    OUTPUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",  # CI runs as root
                "--use-fake-ui-for-media-stream",  # the microphone prompt answered yes
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={microphone}",
                "--autoplay-policy=no-user-gesture-required",
            ],
        )
        try:
            yield browser
        finally:
            browser.close()


class Visit:
    """A page in a fresh browser context that records every URL it requested."""

    def __init__(self, browser, base_url: str, **context_args):
        self.context = browser.new_context(accept_downloads=True, **context_args)
        self.page = self.context.new_page()
        self.base = urlsplit(base_url)
        self.requested: List[str] = []
        self.refused_by_policy: List[str] = []  # stopped by the Content-Security-Policy: never sent
        self.page.on("request", lambda request: self.requested.append(request.url))
        self.page.on("requestfailed", lambda request: request.failure == "csp" and self.refused_by_policy.append(request.url))
        self.page.set_default_timeout(60_000)

    def elsewhere(self) -> List[str]:
        """URLs sent anywhere but the service (blob: URLs are the page's own local media)."""
        return [u for u in self.requested
                if not u.startswith("blob:") and urlsplit(u).netloc != self.base.netloc and u not in self.refused_by_policy]

    def cues(self) -> List[dict]:
        return self.page.eval_on_selector_all(
            "#cues li.cue",
            "els => els.map(e => ({index: +e.dataset.index, start: +e.dataset.start, end: +e.dataset.end, "
            "text: e.querySelector('.cue-text').textContent}))",
        )

    def media_time(self) -> float:
        return self.page.evaluate("document.querySelector('#media').currentTime")

    def wait_state(self, *states: str, timeout_ms: int = DONE_TIMEOUT_MS) -> str:
        self.page.wait_for_selector(", ".join(f"body[data-state='{s}']" for s in states), state="attached", timeout=timeout_ms)
        return self.page.evaluate("document.body.dataset.state")

    def until(self, expression: str, timeout_s: float = 60) -> None:
        """Polls `expression` until it is true. (Playwright's wait_for_function evaluates its
        predicate with eval, which the page's Content-Security-Policy refuses, rightly.)"""
        deadline = time.monotonic() + timeout_s
        while not self.page.evaluate(expression):
            if time.monotonic() > deadline:
                raise AssertionError(f"still false after {timeout_s} s: {expression}")
            time.sleep(0.1)

    def accessibility_violations(self) -> List[tuple]:
        """What axe-core (the rules of WCAG 2.x A and AA, and its best practices) finds wrong with
        the page as it stands: (rule, impact, the elements) each."""
        from axe_playwright_python.sync_playwright import Axe

        found = Axe().run(self.page).response
        assert found["passes"], found  # the audit ran: rules were checked
        return [(v["id"], v["impact"], [n["target"] for n in v["nodes"]]) for v in found["violations"]]

    def download(self, button: str) -> str:
        with self.page.expect_download() as download:
            self.page.click(button)
        return Path(download.value.path()).read_text(encoding="utf-8")

    def close(self):
        self.context.close()


@pytest.fixture
def visit(browser, base_url):
    opened = []

    def open_page(**context_args) -> Visit:
        opened.append(Visit(browser, base_url, **context_args))
        return opened[-1]

    yield open_page
    for v in opened:
        v.close()


def _within_clips(cues: List[dict], clips: List[Clip]) -> None:
    for cue in cues:
        assert clip_at(clips, cue["start"], cue["end"]) is not None, (cue, clips)
    assert [c["start"] for c in cues] == sorted(c["start"] for c in cues)


def test_a_mandarin_video_is_transcribed_played_from_a_clicked_cue_edited_and_downloaded(visit, base_url, mandarin, media_dir):
    audio, clips = mandarin
    video = media_dir / "meeting.webm"  # VP8 + Opus: what Chromium plays
    video.write_bytes(encode_media(audio, container="webm", video_codec="libvpx", audio_codec="libopus", size=(320, 180), picture=moving_gradient))
    v = visit(viewport={"width": 1280, "height": 800})
    page = v.page
    page.goto(base_url + "/")
    page.wait_for_selector("#model option[value=belle2]", state="attached")
    assert v.wait_state("idle", timeout_ms=10_000) == "idle"
    page.screenshot(path=str(OUTPUT / "page-before.png"))
    assert v.accessibility_violations() == []

    page.set_input_files("#file-input", str(video))
    assert page.eval_on_selector("#media", "m => m.tagName") == "VIDEO"  # a video is shown, not only heard
    page.check("#word-timestamps")
    page.click("#submit")
    assert v.wait_state("done", "error") == "done", page.text_content("#error")

    cues = v.cues()
    assert len(cues) >= 3 and all(HAN.search(c["text"]) for c in cues), cues
    _within_clips(cues, clips)
    assert "belle2" in page.text_content("#model-used")

    # A click on the second cue plays from its start, and the list marks it as the one playing.
    page.locator("#cues li.cue").nth(1).locator(".cue-time").click()
    assert v.media_time() == pytest.approx(cues[1]["start"], abs=1e-3)
    page.wait_for_selector("#cues li.cue.current[data-index='1'][aria-current='true']")

    # Keys: ArrowDown goes to the next cue, Space plays and pauses.
    page.locator("#cues li.cue").nth(1).focus()
    page.keyboard.press("ArrowDown")
    assert v.media_time() == pytest.approx(cues[2]["start"], abs=1e-3)
    assert page.evaluate("document.activeElement.dataset.index") == "2"
    page.keyboard.press("Space")
    v.until("!document.querySelector('#media').paused")
    page.keyboard.press("Space")
    v.until("document.querySelector('#media').paused")

    # Edit the first cue in place; the downloads carry the edit and the model's times.
    edited = "这一句是改过的字幕"
    text = page.locator("#cues li.cue").nth(0).locator(".cue-text")
    text.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(edited)
    page.keyboard.press("Escape")
    assert v.cues()[0]["text"] == edited
    srt = srt_cues(v.download("#download-srt"))
    assert [c[0] for c in srt] == list(range(1, len(cues) + 1))
    assert srt[0][3] == edited and [c[3] for c in srt[1:]] == [c["text"].strip() for c in cues[1:]]
    assert [(c[1], c[2]) for c in srt] == [(srt_time(c["start"]), srt_time(c["end"])) for c in cues]
    vtt = v.download("#download-vtt")
    assert vtt.startswith("WEBVTT") and edited in vtt and srt_time(cues[0]["start"]).replace(",", ".") in vtt
    assert v.download("#download-txt").splitlines()[0].strip() == edited
    document = json.loads(v.download("#download-json"))
    assert document["segments"][0]["text"] == edited and document["segments"][0]["start"] == pytest.approx(cues[0]["start"])
    assert document["language"] == "zh"
    # Word times came with the job's events; an edited cue's no longer match its text and are left out.
    assert "words" not in document["segments"][0]
    for segment in document["segments"][1:]:
        assert segment["words"] and all(w["word"].strip() in segment["text"] for w in segment["words"]), segment
        assert all(segment["start"] - 0.05 <= w["start"] <= w["end"] <= segment["end"] + 0.05 for w in segment["words"])

    page.locator("#cues li.cue").nth(1).locator(".cue-time").click()
    page.screenshot(path=str(OUTPUT / "page-after.png"), full_page=True)
    # The page with its video, cues, downloads and done line, for people using a screen reader or keys.
    assert v.accessibility_violations() == []
    assert v.elsewhere() == []


@pytest.fixture(scope="module")
def quiet_lecture(media_dir) -> tuple:
    """20 minutes, three Mandarin sentences in it: five 240 s pieces, each reported as it is done."""
    placed_at = (5.0, 430.0, 1010.0)
    audio = np.zeros(20 * 60 * SAMPLE_RATE, np.float32)
    clips = []
    for at, name in zip(placed_at, MANDARIN):
        clip = decode_audio((DATA / name).read_bytes(), max_seconds=60)
        start = int(at * SAMPLE_RATE)
        audio[start:start + clip.size] = clip
        clips.append(Clip(name, "zh", at, at + clip.size / SAMPLE_RATE))
    lecture = media_dir / "long-quiet-lecture.webm"  # Opus: the quiet hour is a few MB
    lecture.write_bytes(encode_media(audio, container="webm", audio_codec="libopus", rate=16000, bit_rate=24000))
    return lecture, clips


def test_a_long_mostly_silent_recording_shows_progress_and_its_cues_arrive_while_it_runs(visit, base_url, quiet_lecture):
    recording, clips = quiet_lecture
    v = visit(viewport={"width": 1280, "height": 800})
    page = v.page
    # Each cue's arrival, with the page's state and progress at that moment.
    page.add_init_script(
        """
        window.__arrivals = [];
        document.addEventListener('DOMContentLoaded', () => {
          const list = document.querySelector('#cues');
          new MutationObserver(() => {
            const p = document.querySelector('#progress');
            window.__arrivals.push({count: list.querySelectorAll('li.cue').length, state: document.body.dataset.state,
                                    value: p.value, max: p.max});
          }).observe(list, {childList: true});
        });
        """
    )
    page.goto(base_url + "/")
    page.wait_for_selector("#model option[value=belle2]", state="attached")
    page.set_input_files("#file-input", str(recording))
    page.click("#submit")
    assert v.wait_state("done", "error") == "done", page.text_content("#error")

    cues = v.cues()
    _within_clips(cues, clips)
    assert {clip_at(clips, c["start"], c["end"]).file for c in cues} == set(MANDARIN)
    arrivals = page.evaluate("window.__arrivals")
    first = next(a for a in arrivals if a["count"] >= 1)
    assert first["state"] == "running" and first["value"] < first["max"], arrivals  # arrived before the end
    assert page.evaluate("(p => p.value >= p.max)(document.querySelector('#progress'))")
    assert "20:00" in page.text_content("#status") or "20:00" in page.text_content("#progress-text, #status")
    assert v.elsewhere() == []


def test_a_reload_picks_the_transcription_up_again_with_its_edits(visit, base_url, quiet_lecture):
    recording, clips = quiet_lecture
    v = visit(viewport={"width": 1280, "height": 800})
    page = v.page
    page.goto(base_url + "/")
    page.wait_for_selector("#model option[value=belle2]", state="attached")
    page.set_input_files("#file-input", str(recording))
    page.click("#submit")
    page.wait_for_selector("#cues li.cue", state="attached", timeout=DONE_TIMEOUT_MS)
    assert page.evaluate("document.body.dataset.state") == "running"  # reloaded mid-run

    page.reload()
    page.wait_for_selector("#resumed:not([hidden])")
    assert "long-quiet-lecture.webm" in page.text_content("#resumed-text")
    assert v.wait_state("done", "error") == "done", page.text_content("#error")
    cues = v.cues()
    _within_clips(cues, clips)  # each cue once, though the events were replayed from the start
    assert {clip_at(clips, c["start"], c["end"]).file for c in cues} == set(MANDARIN)
    assert len({c["start"] for c in cues}) == len(cues)

    # An edit survives the next reload.
    edited = "重新加载后还在的字幕"
    page.locator("#cues li.cue").nth(0).locator(".cue-text").click()
    page.keyboard.press("Control+A")
    page.keyboard.type(edited)
    page.keyboard.press("Escape")
    page.reload()
    assert v.wait_state("done", "error") == "done"
    assert [c["text"] for c in v.cues()] == [edited] + [c["text"] for c in cues[1:]]
    page.wait_for_selector("#cues li.cue.edited[data-index='0']", state="attached")

    # The same file chosen again plays beside the cues; nothing is transcribed again.
    posts = []
    page.on("request", lambda request: request.method == "POST" and posts.append(request.url))
    page.set_input_files("#resumed-file", str(recording))
    v.until("!!document.querySelector('#media') && document.querySelector('#media').src.startsWith('blob:')")
    assert len(v.cues()) == len(cues) and page.evaluate("document.body.dataset.state") == "done" and posts == []
    page.locator("#cues li.cue").nth(1).locator(".cue-time").click()
    assert v.media_time() == pytest.approx(cues[1]["start"], abs=1e-3)
    assert edited in v.download("#download-srt")

    # Start over: the page forgets the job; a reload picks nothing up.
    page.click("#resumed-dismiss")
    assert v.cues() == [] and page.evaluate("localStorage.getItem('klipnote.job')") is None
    page.reload()
    page.wait_for_selector("#model option[value=belle2]", state="attached")
    assert page.evaluate("document.body.dataset.state") == "idle" and page.locator("#resumed").is_hidden()
    assert v.elsewhere() == []


def test_a_recording_from_the_microphone_is_transcribed(visit, base_url, mandarin):
    _, clips = mandarin
    v = visit(viewport={"width": 1280, "height": 800})
    page = v.page
    page.goto(base_url + "/")
    page.wait_for_selector("#model option[value=belle2]", state="attached")
    page.click("#record")
    # Chromium's fake microphone plays the Mandarin recording (1 s of quiet first).
    page.wait_for_timeout((clips[-1].end_s + 1.5) * 1000)
    page.click("#record")
    v.until("!!document.querySelector('#media') && document.querySelector('#media').src.startsWith('blob:')")
    page.click("#submit")
    assert v.wait_state("done", "error") == "done", page.text_content("#error")
    cues = v.cues()
    assert cues and sum(len(HAN.findall(c["text"])) for c in cues) >= 15, cues


def test_a_named_model_that_does_not_take_the_language_heard_is_warned_about_in_plain_words(visit, base_url, data_dir):
    english = data_dir / "en_jfk.flac"
    direct = httpx.post(f"{base_url}/v1/audio/transcriptions", files={"file": (english.name, english.read_bytes())},
                        data={"model": "belle2", "response_format": "verbose_json"}, timeout=300).json()
    assert direct["warnings"], direct  # the service warns: BELLE-2 decodes Mandarin only
    v = visit(viewport={"width": 1280, "height": 800})
    page = v.page
    page.goto(base_url + "/")
    page.wait_for_selector("#model option[value=belle2]", state="attached")
    page.select_option("#model", "belle2")
    page.set_input_files("#file-input", str(english))
    page.click("#submit")
    assert v.wait_state("done", "error") == "done", page.text_content("#error")
    shown = page.locator("#warnings li").all_text_contents()
    assert set(direct["warnings"]) <= set(shown), (direct["warnings"], shown)
    assert page.locator("#warnings").is_visible() and "belle2" in page.text_content("#model-used")


KEY = "sk-page-test"
KEYED_PREFIX = "/page-keyed"


@pytest.fixture(scope="module")
def keyed_url(serve_cluster):
    """An ingress at a route prefix, with API keys and jobs turned off, beside the main one."""
    # a copy of the ingress has no job runner: jobs are off
    with serve_cluster.beside(serve_cluster.ingress_variant("page-keyed", route_prefix=KEYED_PREFIX, api_keys=[KEY])) as url:
        yield url


def test_under_a_route_prefix_with_api_keys_and_no_jobs_the_page_asks_for_the_key_and_streams(visit, keyed_url, data_dir):
    v = visit(viewport={"width": 1280, "height": 800})
    page = v.page
    sent = []
    page.on("request", lambda request: request.url.startswith("blob:") or sent.append((urlsplit(request.url).path, request.headers.get("authorization"))))
    page.goto(keyed_url)  # no trailing slash: the page's <base> keeps its URLs under the prefix
    # The page and its files are open; the API is not: the page says so and opens its settings.
    page.wait_for_selector("#error:not([hidden])")
    assert "API key" in page.text_content("#error") and page.evaluate("document.querySelector('#settings').open")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#model option[value=belle2]", state="attached")
    assert page.locator("#error").is_hidden()

    page.set_input_files("#file-input", str(data_dir / "zh_funasr_asr_example.flac"))
    page.click("#submit")
    assert v.wait_state("done", "error") == "done", page.text_content("#error")
    assert any(HAN.search(c["text"]) for c in v.cues())
    api_calls = [(path, auth) for path, auth in sent if "/v1/" in path]
    # Everything stayed under the prefix; with jobs off the page streamed a plain transcription.
    assert all(path == KEYED_PREFIX or path.startswith(KEYED_PREFIX + "/") for path, _ in sent), sent
    assert (f"{KEYED_PREFIX}/v1/audio/transcriptions", f"Bearer {KEY}") in api_calls, api_calls
    assert v.elsewhere() == []


def test_an_upload_that_is_not_media_shows_the_apis_message_on_a_phone_screen(visit, base_url):
    notes = b"Minutes of the meeting, typed by hand.\n" * 50
    expected = httpx.post(f"{base_url}/v1/audio/transcriptions/jobs", files={"file": ("notes.txt", notes, "text/plain")}).json()["error"]
    assert expected["code"] == "unsupported_media", expected
    v = visit(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    page = v.page
    page.goto(base_url + "/")
    page.wait_for_selector("#model option[value=belle2]", state="attached")
    page.set_input_files("#file-input", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": notes}])
    page.click("#submit")
    assert v.wait_state("error", "done") == "error"
    error = page.locator("#error")
    assert error.is_visible() and expected["message"] in error.text_content()
    # Nothing wider than the phone's screen: no sideways scrolling.
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    box = page.locator("#submit").bounding_box()
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375
    page.screenshot(path=str(OUTPUT / "page-phone-error.png"), full_page=True)
    assert v.accessibility_violations() == []
    assert v.elsewhere() == []


@pytest.mark.parametrize("path, operation", [
    ("/docs", ".opblock-summary-path[data-path='/v1/audio/transcriptions/jobs']"),  # Swagger UI
    ("/redoc", "h2:has-text('Create Transcription')"),  # ReDoc
])
def test_the_api_docs_render_their_operations_with_no_network_beyond_the_service(visit, base_url, path, operation):
    v = visit(viewport={"width": 1280, "height": 800})
    # As on an offline network: anything not on the service fails.
    v.context.route(lambda url: urlsplit(url).netloc != v.base.netloc and not url.startswith(("blob:", "data:")), lambda route: route.abort())
    v.page.goto(base_url + path)
    v.page.locator(operation).first.wait_for(state="visible", timeout=60_000)
    assert v.elsewhere() == []
