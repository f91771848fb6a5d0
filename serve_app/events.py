"""A transcription as OpenAI's streaming events (server-sent events over HTTP, dicts over a handle).

OpenAI's own: `transcript.text.delta` (`delta`) as text becomes final and `transcript.text.done`
(`text`) at the end; `transcript.text.segment` with the fields of the `openai` SDK's segment event
(`id`, `start`, `end`, `text`, `speaker`, null unless diarized) for each output segment (a subtitle
cue by default). KlipNote's own: `transcript.progress` (`done_seconds`, `total_seconds`, null when
the container does not state its length; `model`; the result's `warnings` so far) after each piece. The done event also carries the
verbose_json fields but segments (`language`, `duration`, `model`, `warnings`...). An error after
the first event arrives as `{"type": "error", "error": {...}}`, OpenAI's error shape, and ends the
stream; the `openai` SDK raises it as an `APIError`.
"""

from __future__ import annotations

import json
import logging
from typing import AsyncIterator

from serve_app import metrics
from serve_app.errors import error_body
from serve_app.transcription import Finished, PieceDone, Transcription

logger = logging.getLogger(__name__)


async def stream_events(transcription: Transcription) -> AsyncIterator[dict]:
    """The events of a started transcription, errors included as an `error` event."""
    segment_id = 0
    try:
        async for event in transcription.events():
            if isinstance(event, PieceDone):
                if event.delta:
                    yield {"type": "transcript.text.delta", "delta": event.delta}
                for seg in event.segments:
                    out = {"type": "transcript.text.segment", "id": f"seg_{segment_id}", "start": seg["start"], "end": seg["end"],
                           "text": seg["text"], "speaker": seg.get("speaker"), "language": seg.get("language")}
                    if seg.get("words"):
                        out["words"] = seg["words"]
                    segment_id += 1
                    yield out
                yield {"type": "transcript.progress", "done_seconds": round(event.done_s, 3),
                       "total_seconds": None if event.total_s is None else round(event.total_s, 3), "model": event.model,
                       "warnings": event.warnings}
            elif isinstance(event, Finished):
                metrics.note_result(event.body)
                yield {"type": "transcript.text.done", **event.body, "fallback": event.fallback}
    except Exception as e:  # the answer has started: the error becomes the last event
        logger.warning("A streamed transcription failed after it started: %s", e)
        error = error_body(e)
        metrics.note_error(error["code"])
        yield {"type": "error", "error": error}


async def sse_stream(transcription: Transcription) -> AsyncIterator[bytes]:
    """`stream_events` as server-sent events (`data: {...}` and a blank line each)."""
    async for event in stream_events(transcription):
        yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()
