"""Cutting long audio into <= 30 s decoding windows at speech boundaries (pure numpy/stdlib)."""

from __future__ import annotations

from typing import List, NamedTuple, Sequence


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
