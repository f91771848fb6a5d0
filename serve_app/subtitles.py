"""Subtitle-ready segments: split long model segments and merge short ones.

A model's segments follow its decoding windows, not a viewer's reading speed: BELLE-2 gives one
segment per timestamp pair (often 10-30 s), WhisperX one per sentence. Subtitles want cues of
`min_seconds`-`max_seconds` and at most `max_chars` characters. The stages:

1. `timed_units`: each segment becomes units (words, or CJK characters) with times. Word times
   come from the aligner where present (WhisperX with word timestamps); otherwise, and for the
   words the aligner could not place, times are interpolated by character share over the
   segment (or between the neighbouring timed words).
2. `split_units`: a segment too long or too wordy is cut, preferring sentence ends, then
   clause punctuation, then any unit boundary, so no piece is shorter than `min_seconds` where
   that can be avoided.
3. `merge_short`: a cue shorter than `min_seconds` joins its nearer neighbour (same speaker,
   small gap) when the result stays within the limits; `extend_short` then lets a still-short
   cue stay on screen into the silence around it.

Every stage keeps the text: the cues' texts joined give the segments' texts back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from serve_app.config import SubtitleSettings

# Scripts written without spaces between words: each character is a unit, cues join without a space.
_UNSPACED_CHARS = (
    "\u2e80-\u2fdf\u3040-\u30ff\u3100-\u312f\u31a0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uf900-\ufaff\U00020000-\U0002fa1f\u0e00-\u0e7f"
)
_UNIT_RE = re.compile(rf"\s*(?:[{_UNSPACED_CHARS}]|[^\s{_UNSPACED_CHARS}]+)")
_PUNCT_ONLY_RE = re.compile(r"^\s*[^\w\s]+$")
_SENTENCE_END = tuple(".!?。！？…；;")
_CLAUSE_END = tuple(",，、:：—–-)）」』\"”")
_UNSPACED_RE = re.compile(rf"[{_UNSPACED_CHARS}]")


@dataclass
class Unit:
    """The smallest piece a cue is cut at: a word, or one CJK character with its punctuation."""

    text: str
    """The text as it appears in the segment, leading whitespace included."""
    start: Optional[float] = None
    end: Optional[float] = None
    word: Optional[dict] = None
    """The model's word dict this unit came from (kept on the cue's `words`)."""


@dataclass
class Cue:
    units: List[Unit]
    speaker: Optional[str] = None
    has_words: bool = False
    start: float = 0.0
    end: float = 0.0

    def __post_init__(self) -> None:
        if self.units:
            self.start = self.units[0].start
            self.end = self.units[-1].end

    @property
    def text(self) -> str:
        return "".join(u.text for u in self.units).strip()

    @property
    def duration(self) -> float:
        return self.end - self.start


def is_compliant(segment: dict, settings: SubtitleSettings) -> bool:
    """Whether one segment meets the subtitle limits (duration and characters)."""
    duration = segment["end"] - segment["start"]
    tolerance = 1e-3  # times are rounded to milliseconds
    return (
        settings.min_seconds - tolerance <= duration <= settings.max_seconds + tolerance
        and len(segment["text"].strip()) <= settings.max_chars
    )


def compliant_share(segments: Sequence[dict], settings: SubtitleSettings) -> Optional[float]:
    """The share of `segments` within the subtitle limits; None when there are no segments."""
    if not segments:
        return None
    return sum(is_compliant(s, settings) for s in segments) / len(segments)


def subtitle_segments(
    segments: Sequence[dict],
    settings: SubtitleSettings,
    *,
    duration: Optional[float] = None,
    speech: Optional[Sequence[Tuple[float, float]]] = None,
) -> List[dict]:
    """Splits and merges model segments into subtitle-ready ones.

    Args:
        segments: The model's segments (`start`, `end`, `text`, optional `words`, `speaker`).
        settings: The limits.
        duration: The audio's length; short cues are never extended past it.
        speech: Where the audio holds speech ((start, end) seconds, in order), when known:
            words without times are placed in it, not in the pauses.

    Returns:
        New segments with `start`, `end`, `text`, and `words` / `speaker` where the input had them.
    """
    cues: List[Cue] = []
    for seg in segments:
        if not seg.get("text", "").strip():
            continue
        units = timed_units(seg, speech)
        has_words = bool(seg.get("words"))
        for piece in split_units(units, settings):
            cues.append(Cue(piece, speaker=seg.get("speaker"), has_words=has_words))
    cues = merge_short(cues, settings)
    if settings.extend_short:
        extend_short(cues, settings, duration=duration)
    return [_to_segment(c) for c in cues]


# -- stage 1: units with times ---------------------------------------------------------------


def timed_units(segment: dict, speech: Optional[Sequence[Tuple[float, float]]] = None) -> List[Unit]:
    """The segment's units with start/end times (aligned words, else character share of the
    segment's speech, or of its time when `speech` is not known)."""
    start, end, text = float(segment["start"]), float(segment["end"]), segment["text"]
    words = [w for w in segment.get("words") or () if str(w.get("word", "")).strip()]
    units = _word_units(text, words) if words else _text_units(text)
    _fill_times(units, start, max(end, start), speech)
    return units


def _word_units(text: str, words: List[dict]) -> List[Unit]:
    units: List[Unit] = []
    pos = 0
    for w in words:
        token = str(w["word"]).strip()
        found = text.find(token, pos)
        if found >= 0:
            piece, pos = text[pos : found + len(token)], found + len(token)
        else:  # the aligner's word differs from the text (normalised); rebuild the spacing
            prev = units[-1].text if units else ""
            joiner = "" if not prev or _unspaced(prev[-1]) or _unspaced(token[0]) else " "
            piece = joiner + token
        units.append(Unit(piece, _time(w.get("start")), _time(w.get("end")), word=dict(w)))
    if units and pos and pos < len(text) and text[pos:].strip():
        units[-1].text += text[pos:].rstrip()  # trailing punctuation the aligner dropped
    return units


def _text_units(text: str) -> List[Unit]:
    units: List[Unit] = []
    for m in _UNIT_RE.finditer(text):
        piece = m.group(0)
        if units and _PUNCT_ONLY_RE.match(piece) and not piece[0].isspace():
            units[-1].text += piece  # punctuation stays with the character before it
        else:
            units.append(Unit(piece))
    return units


def _time(value) -> Optional[float]:
    return None if value is None else float(value)


def _weight(unit: Unit) -> int:
    return max(len(unit.text.strip()), 1)


def _fill_times(units: List[Unit], start: float, end: float, speech: Optional[Sequence[Tuple[float, float]]] = None) -> None:
    """Gives untimed units times by character share between their timed neighbours: of the
    speech between them where it is known, else of the time.

    A WhisperX segment holds up to 30 s of speech with its pauses; shared out by time, the
    sentence after a pause started seconds early, inside the pause (bench/mixed_languages.py).
    """
    i = 0
    while i < len(units):
        if units[i].start is not None and units[i].end is not None:
            i += 1
            continue
        j = i
        while j < len(units) and (units[j].start is None or units[j].end is None):
            j += 1
        left = units[i - 1].end if i > 0 else start
        right = units[j].start if j < len(units) else end
        if right < left:
            right = left
        total = sum(_weight(u) for u in units[i:j])
        clock = _SpeechClock(left, right, speech)
        done = 0.0
        for u in units[i:j]:
            u.start = clock.at(done / total, starting=True)
            done += _weight(u)
            u.end = clock.at(done / total)
        i = j


class _SpeechClock:
    """Maps a share of the speech between `left` and `right` to a time (linear without speech)."""

    def __init__(self, left: float, right: float, speech: Optional[Sequence[Tuple[float, float]]]):
        self.left, self.right = left, right
        self.spans = [(max(a, left), min(b, right)) for a, b in speech or () if b > left and a < right]
        self.total = sum(b - a for a, b in self.spans)
        if self.total < 0.1 * (right - left):  # the VAD heard (almost) nothing here: keep time shares
            self.spans, self.total = [], 0.0

    def at(self, share: float, *, starting: bool = False) -> float:
        """The time at `share` of the speech; a unit `starting` at the end of a span starts at the next."""
        if not self.spans:
            return self.left + (self.right - self.left) * share
        wanted = self.total * min(max(share, 0.0), 1.0)
        for k, (a, b) in enumerate(self.spans):
            if wanted < b - a or (wanted <= b - a and (not starting or k == len(self.spans) - 1)):
                return a + wanted
            wanted -= b - a
        return self.spans[-1][1]


def _unspaced(char: str) -> bool:
    return bool(_UNSPACED_RE.match(char))


# -- stage 2: split --------------------------------------------------------------------------


def split_units(units: List[Unit], settings: SubtitleSettings) -> List[List[Unit]]:
    """Cuts a segment's units into pieces within `max_seconds` and `max_chars`.

    Cut points are ranked: after a sentence end, after clause punctuation, then any unit
    boundary; among the best-ranked cut points the latest is taken that leaves the first piece
    at least `min_seconds` long.
    """
    units = [p for u in units for p in _chop_long_unit(u, settings.max_chars)]
    pieces: List[List[Unit]] = []
    rest = units
    while rest:
        if _fits(rest, settings):
            pieces.append(rest)
            break
        limit = 1
        while limit < len(rest) and _fits(rest[: limit + 1], settings):
            limit += 1
        cut = _best_cut(rest[:limit], rest, settings)
        pieces.append(rest[:cut])
        rest = rest[cut:]
    return pieces


def _fits(units: Sequence[Unit], settings: SubtitleSettings) -> bool:
    text = "".join(u.text for u in units).strip()
    return units[-1].end - units[0].start <= settings.max_seconds and len(text) <= settings.max_chars


def _best_cut(head: List[Unit], all_units: List[Unit], settings: SubtitleSettings) -> int:
    """How many units of `head` (the longest piece that fits) the first piece takes."""

    def rank(i: int) -> int:  # cut after head[i - 1]
        tail = head[i - 1].text.rstrip()
        if tail.endswith(_SENTENCE_END):
            return 2
        if tail.endswith(_CLAUSE_END):
            return 1
        return 0

    def long_enough(i: int) -> bool:
        left = head[i - 1].end - head[0].start >= settings.min_seconds
        right_units = all_units[i:]
        right = not right_units or right_units[-1].end - right_units[0].start >= settings.min_seconds
        return left and right

    candidates = range(len(head), 0, -1)
    for wanted in (2, 1):
        for i in candidates:
            if rank(i) >= wanted and long_enough(i) and i >= len(head) // 2:
                return i
    return len(head)


def _chop_long_unit(unit: Unit, max_chars: int) -> Iterable[Unit]:
    """A unit longer than `max_chars` (a run of text with no space) is cut by characters."""
    if len(unit.text.strip()) <= max_chars:
        return [unit]
    text = unit.text
    parts = [text[i : i + max_chars] for i in range(0, len(text), max_chars)]
    span = (unit.end - unit.start) / len(text)
    out, offset = [], 0
    for p in parts:
        out.append(Unit(p, unit.start + offset * span, unit.start + (offset + len(p)) * span))
        offset += len(p)
    return out


# -- stage 3: merge and extend ---------------------------------------------------------------


def merge_short(cues: List[Cue], settings: SubtitleSettings) -> List[Cue]:
    """Joins each cue under `min_seconds` with its nearer neighbour when the result complies."""
    cues = list(cues)
    i = 0
    while i < len(cues):
        cue = cues[i]
        if cue.duration >= settings.min_seconds:
            i += 1
            continue
        options = []
        for j in (i - 1, i + 1):
            if 0 <= j < len(cues) and _can_merge(cues[min(i, j)], cues[max(i, j)], settings):
                gap = cues[max(i, j)].start - cues[min(i, j)].end
                options.append((gap, j))
        if not options:
            i += 1
            continue
        _, j = min(options)
        a, b = min(i, j), max(i, j)
        units = _joined(cues[a].units, cues[b].units)
        cues[a : b + 1] = [Cue(units, speaker=cues[a].speaker, has_words=cues[a].has_words or cues[b].has_words)]
        i = a  # the merged cue may still be short
    return cues


def _can_merge(a: Cue, b: Cue, settings: SubtitleSettings) -> bool:
    if a.speaker != b.speaker or b.start - a.end > settings.max_merge_gap_seconds:
        return False
    text = "".join(u.text for u in _joined(a.units, b.units)).strip()
    return b.end - a.start <= settings.max_seconds and len(text) <= settings.max_chars


def _joined(left: List[Unit], right: List[Unit]) -> List[Unit]:
    """Two cues' units as one, with a space between them unless the script has none."""
    first = right[0]
    last_char, first_char = left[-1].text.rstrip()[-1:], first.text.lstrip()[:1]
    if first.text[:1].isspace() or not last_char or _unspaced(last_char) or _unspaced(first_char):
        return left + right
    return left + [Unit(" " + first.text, first.start, first.end, first.word)] + right[1:]


def extend_short(cues: List[Cue], settings: SubtitleSettings, *, duration: Optional[float]) -> None:
    """Keeps a cue under `min_seconds` on screen longer, into the silence after (then before) it."""
    for i, cue in enumerate(cues):
        missing = settings.min_seconds - cue.duration
        if missing <= 0:
            continue
        limit = cues[i + 1].start if i + 1 < len(cues) else (duration if duration is not None else cue.end + missing)
        cue.end = max(cue.end, min(cue.end + missing, limit))
        missing = settings.min_seconds - cue.duration
        if missing > 0:
            floor = cues[i - 1].end if i > 0 else 0.0
            cue.start = min(cue.start, max(cue.start - missing, floor))


def _to_segment(cue: Cue) -> dict:
    seg = {"start": round(cue.start, 3), "end": round(cue.end, 3), "text": cue.text}
    if cue.has_words:
        seg["words"] = [u.word for u in cue.units if u.word is not None]
    if cue.speaker is not None:
        seg["speaker"] = cue.speaker
    return seg
