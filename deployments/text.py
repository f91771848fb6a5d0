"""Text stages every model app shares: repetition-loop guard and Chinese script conversion.

The replica base (`deployments/core.py`) runs `TextPostProcessor` on every model's segments, so
a new model gets both without code of its own. Pure Python plus OpenCC, no model.
"""

from __future__ import annotations

import re
from typing import Callable, List, Optional, Tuple

# A unit of 1-30 characters repeated back to back; Whisper's degenerate loops look like this
# ("谢谢谢谢谢谢…", "我们来看一下我们来看一下…").
_REPEAT = re.compile(r"(.{1,30}?)\1{3,}", re.DOTALL)


def _min_repeats(unit: str) -> int:
    # Short units repeat legitimately ("哈哈哈", "no no no"); demand more of them.
    return 8 if len(unit) == 1 else 5 if len(unit) <= 3 else 4


def collapse_repetitions(text: str) -> Tuple[str, bool]:
    """Cuts runs of a repeated unit down to two occurrences.

    Args:
        text: Decoded text of one segment.

    Returns:
        The text with every loop collapsed, and whether anything was collapsed.
    """
    changed = False

    def fold(match: "re.Match[str]") -> str:
        nonlocal changed
        unit = match.group(1)
        if not unit.strip() or len(match.group(0)) // len(unit) < _min_repeats(unit):
            return match.group(0)
        changed = True
        return unit * 2

    out = _REPEAT.sub(fold, text)
    return out, changed


def has_repetition_loop(text: str) -> bool:
    """True when `text` contains a loop that `collapse_repetitions` would cut."""
    return collapse_repetitions(text)[1]


class ScriptConverter:
    """Converts Chinese text to Simplified or Traditional script with OpenCC."""

    _CONFIGS = {"simplified": "t2s", "traditional": "s2t"}

    def __init__(self):
        import opencc

        self._converters = {name: opencc.OpenCC(cfg) for name, cfg in self._CONFIGS.items()}

    def __call__(self, text: str, script: str) -> str:
        return self._converters[script].convert(text)


KEEP_HAN_LANGUAGES = frozenset({"ja", "ko"})
"""Languages whose Han characters are not Chinese script: Japanese kanji (and Korean hanja) keep
their own forms (OpenCC would turn 学 into 學)."""
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")


class TextPostProcessor:
    """The repetition guard for every segment, then OpenCC's script conversion for Chinese.

    Every segment with Han characters is converted unless the result is Japanese or Korean, not
    only results whose language is Chinese: a Mandarin stretch inside a call decoded as English
    (or any language Whisper settled on) still came out in its own script, and one result must
    not mix scripts.

    Args:
        convert_script: Load OpenCC; without it `script` is not honoured (and the model spec
            must not list it).
    """

    def __init__(self, *, convert_script: bool = True):
        self._script = ScriptConverter() if convert_script else None

    def __call__(
        self, segments: List[dict], *, language: Optional[str], script: str, warnings: List[str], on_collapse: Optional[Callable[[int], None]] = None
    ) -> List[dict]:
        """Cleaned copies of `segments` (words included); a warning when a loop was collapsed,
        and `on_collapse` told how many segments had one."""
        convert = self._script is not None and (language or "") not in KEEP_HAN_LANGUAGES
        looped = 0
        out = []
        for seg in segments:
            text, collapsed = collapse_repetitions(seg["text"])
            looped += collapsed
            converts = convert and _HAN.search(text) is not None
            seg = {**seg, "text": self._script(text, script) if converts else text}
            if converts and seg.get("words"):
                seg["words"] = [{**w, "word": self._script(w["word"], script)} for w in seg["words"]]
            out.append(seg)
        if looped:
            warnings.append(f"Collapsed a repetition loop in {looped} segment(s).")
            if on_collapse is not None:
                on_collapse(looped)
        return out
