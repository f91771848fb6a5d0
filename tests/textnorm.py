"""The one text normaliser for error rates (tests and bench/ use the same)."""

from __future__ import annotations

import functools
import re
import unicodedata

import jiwer

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


@functools.lru_cache(maxsize=1)
def _t2s():
    import opencc

    return opencc.OpenCC("t2s")


def normalize(text: str) -> str:
    """NFKC, lower case, punctuation removed, Traditional -> Simplified, spaces collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _t2s().convert(text)
    text = _PUNCT.sub(" ", text)
    return " ".join(text.split())


def cer(reference: str, hypothesis: str) -> float:
    """Character error rate, ignoring spaces (for zh and ja)."""
    ref = normalize(reference).replace(" ", "")
    hyp = normalize(hypothesis).replace(" ", "")
    return jiwer.cer(ref, hyp)


def wer(reference: str, hypothesis: str) -> float:
    return jiwer.wer(normalize(reference), normalize(hypothesis))
