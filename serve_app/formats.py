"""Rendering a transcription as json, text, srt, vtt or verbose_json."""

from __future__ import annotations

from typing import Dict, List, Optional

from fastapi.responses import JSONResponse, PlainTextResponse, Response

# Languages written without spaces between words: segments are joined as they are.
_UNSPACED = {"zh", "ja", "th", "lo", "my", "yue", "bo"}


def text_separator(language: Optional[str]) -> str:
    """What goes between two segments' text: nothing for languages written without spaces."""
    return "" if (language or "") in _UNSPACED else " "


def join_text(segments: List[dict], language: Optional[str]) -> str:
    return text_separator(language).join(s["text"].strip() for s in segments if s["text"].strip())


def _timestamp(seconds: float, decimal: str) -> str:
    ms = max(int(round(seconds * 1000)), 0)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{decimal}{ms:03d}"


def to_srt(segments: List[dict]) -> str:
    blocks = [
        f"{i}\n{_timestamp(s['start'], ',')} --> {_timestamp(s['end'], ',')}\n{s['text'].strip()}\n"
        for i, s in enumerate(segments, start=1)
    ]
    return "\n".join(blocks)


def to_vtt(segments: List[dict]) -> str:
    blocks = [
        f"{_timestamp(s['start'], '.')} --> {_timestamp(s['end'], '.')}\n{s['text'].strip()}\n" for s in segments
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def verbose_json(body: dict, segments: List[dict], *, words: bool) -> dict:
    """OpenAI's verbose_json plus KlipNote's fields (model, warnings, language_probability, languages;
    each segment's language and model)."""
    out_segments = []
    for i, s in enumerate(segments):
        seg = {"id": i, "start": s["start"], "end": s["end"], "text": s["text"]}
        if words and s.get("words"):
            seg["words"] = s["words"]
        if s.get("speaker"):
            seg["speaker"] = s["speaker"]
        for key in ("language", "model"):  # per segment: a mixed-language recording is served by runs
            if s.get(key):
                seg[key] = s[key]
        out_segments.append(seg)
    out = {**body, "segments": out_segments}
    if words:
        out["words"] = [w for s in segments for w in s.get("words", ())]
    return out


def server_timing(timings: Dict[str, float]) -> str:
    """The `Server-Timing` header (milliseconds per stage), e.g. `decode;dur=4.1, langid;dur=120.3`."""
    return ", ".join(f"{stage};dur={seconds * 1000:.1f}" for stage, seconds in timings.items())


def render(fmt: str, body: dict, segments: List[dict], *, words: bool, headers: dict) -> Response:
    """The HTTP response for `fmt`; `body` holds task, language, duration, text, model, warnings."""
    if fmt == "json":
        return JSONResponse({"text": body["text"]}, headers=headers)
    if fmt == "text":
        return PlainTextResponse(body["text"], headers=headers)
    if fmt == "srt":
        return PlainTextResponse(to_srt(segments), headers=headers)
    if fmt == "vtt":
        return PlainTextResponse(to_vtt(segments), media_type="text/vtt", headers=headers)
    return JSONResponse(verbose_json(body, segments, words=words), headers=headers)
