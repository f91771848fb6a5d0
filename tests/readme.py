"""The README's tagged code blocks, for the tests that run them (`<!-- TAG -->` on the line before)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, NamedTuple

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^<!-- (?P<tag>[^>]+?) -->\n```(?P<lang>\w+)\n(?P<code>.*?)^```", re.MULTILINE | re.DOTALL)


class Block(NamedTuple):
    tag: str
    lang: str
    code: str
    line: int


def tagged_blocks(tag: str) -> List[Block]:
    """The README's code blocks tagged `tag`, in order."""
    text = README.read_text()
    return [
        Block(m["tag"], m["lang"], m["code"], text.count("\n", 0, m.start()) + 1)
        for m in _BLOCK.finditer(text)
        if m["tag"] == tag
    ]
