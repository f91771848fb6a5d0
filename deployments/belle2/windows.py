"""Cutting long audio into <= 30 s decoding windows at speech boundaries (pure numpy/stdlib)."""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence


class Window(NamedTuple):
    """A slice of the input, in samples, decoded as one Whisper window."""

    start: int
    end: int


def plan_windows(
    speech: Sequence[dict],
    *,
    total_samples: int,
    max_samples: int,
    pad_samples: int = 0,
) -> List[Window]:
    """Groups speech spans into windows no longer than `max_samples`.

    Consecutive spans share a window while the window, from the first span's start to the last
    span's end, fits; a window is cut only between spans, so no word is split unless a single
    span is longer than a window (the VAD is asked to split those at its quietest point first).

    Args:
        speech: Speech spans as {"start": sample, "end": sample}, sorted, not overlapping.
        total_samples: Length of the audio.
        max_samples: Longest window.
        pad_samples: Context added on each side where room allows: never past the window limit,
            the audio's bounds, or half the silence shared with a neighbouring window.

    Returns:
        Windows in order; empty when there is no speech.
    """
    groups: List[List[int]] = []
    for span in speech:
        start, end = int(span["start"]), int(span["end"])
        while end - start > max_samples:  # the VAD could not split this span: cut it hard
            groups.append([start, start + max_samples])
            start += max_samples
        if groups and end - groups[-1][0] <= max_samples:
            groups[-1][1] = end
        else:
            groups.append([start, end])
    windows: List[Window] = []
    for i, (start, end) in enumerate(groups):
        room = max_samples - (end - start)
        # Neighbours share the silence between them: this window may pad into the first half of
        # the gap after it and the second half of the gap before it, so windows never overlap.
        gap_before = start - groups[i - 1][1] if i else start
        gap_after = groups[i + 1][0] - end if i + 1 < len(groups) else total_samples - end
        before = min(pad_samples, room // 2, gap_before if i == 0 else gap_before // 2)
        after = min(pad_samples, room - before, gap_after if i + 1 == len(groups) else gap_after - gap_after // 2)
        windows.append(Window(max(start - before, 0), min(end + after, total_samples)))
    return windows


def remaining_window(
    window: Window,
    decoded_until: int,
    speech: Sequence[dict],
    *,
    min_speech_samples: int,
) -> Optional[Window]:
    """The part of a decoded window whose speech the decoder never reached, if any.

    Whisper sometimes ends a window early (an end-of-text after a pause, or a new speaker), and
    its own long-form loop then moves on to the next 30 s, dropping what was left. With the VAD's
    spans at hand, the speech left after the last decoded segment is known; when there is at
    least `min_speech_samples` of it, that remainder is decoded again as a window of its own.

    Args:
        window: The window that was decoded.
        decoded_until: End of its last decoded segment, in samples (absolute).
        speech: The VAD's speech spans, as for `plan_windows`.
        min_speech_samples: Less speech than this left over is not worth another decode.

    Returns:
        The window to decode next, always starting after `decoded_until` and so shorter than
        `window` (repeated calls end), or None.
    """
    start = max(decoded_until, window.start)
    left = [
        (max(int(s["start"]), start), min(int(s["end"]), window.end))
        for s in speech
        if int(s["end"]) > start and int(s["start"]) < window.end
    ]
    if sum(b - a for a, b in left) < min_speech_samples or start <= window.start:
        return None
    # From where decoding stopped, not from the next span: the VAD misses soft or distant speech
    # (a poem read quietly lost 22 s that way), and the decoder judges silence itself.
    return Window(start, window.end)
