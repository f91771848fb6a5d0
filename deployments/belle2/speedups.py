"""The BELLE-2 speed-ups behind one guard: decoding shortcuts and oneDNN linears.

Both reach into transformers' private internals (`deployments/belle2/decoding.py`) or swap its
modules (`deployments/belle2/onednn.py`), so a transformers upgrade could turn one off silently
or break every Mandarin request. Two guards, both loud (a warning in the log and in `info()`):

1. At start-up the installed transformers must be in `VERIFIED_TRANSFORMERS`, the versions the
   shortcuts were checked against; otherwise transformers runs as shipped.
2. At warm-up `self_check` decodes a real Mandarin clip, two windows with beam 2, as shipped and
   with the speed-ups; a speed-up whose tokens differ, whose counters did not rise, or that
   raised is turned off for the replica's lifetime.

Plain Python at import; torch and transformers come in with the model.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Dict, Iterator, List, Optional

from deployments.belle2.decoding import (
    NoSpeechFromPrefill,
    SelfAttentionOnlyReorder,
    SharedCrossAttention,
    SuppressionMaskCache,
)
from deployments.belle2.onednn import use_dense_linears, use_onednn_linears

logger = logging.getLogger(__name__)

VERIFIED_TRANSFORMERS = ">=5.17,<5.24"
"""transformers versions whose internals the shortcuts were verified against (the fast test
tests/test_belle2_speedups.py, and on 5.17 the GPU host's stack)."""

SHORTCUT_COUNTERS = ("no_speech_from_prefill", "suppression_mask_cached", "cross_projection_shared", "cross_attention_shared")


def transformers_verified(version: Optional[str] = None) -> bool:
    """Whether `version` (default: the installed transformers) is in `VERIFIED_TRANSFORMERS`."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if version is None:
        import transformers

        version = transformers.__version__
    return Version(version) in SpecifierSet(VERIFIED_TRANSFORMERS)


class Speedups:
    """Installs the requested speed-ups on `model` if the transformers version allows.

    Args:
        model: A transformers `WhisperForConditionalGeneration`.
        shortcuts: Install the decoding shortcuts (they apply inside `active()` once enabled).
        onednn: Move the linear layers to oneDNN (CPU, float32); done by `self_check`, after the
            as-shipped reference decode.
        warn: Called with each loud message (the core lists them in `info()`).
    """

    def __init__(self, model: Any, *, shortcuts: bool, onednn: bool, warn: Callable[[str], None]):
        import transformers

        self._model = model
        self._warn = warn
        self.shortcuts_enabled = False
        self.onednn_linears = 0
        self._want_onednn = onednn
        self._no_speech = self._suppression = self._cross = self._reorder = None
        if not (shortcuts or onednn):
            return
        if not transformers_verified():
            warn(
                f"transformers {transformers.__version__} is outside the versions the BELLE-2 speed-ups were "
                f"verified against ({VERIFIED_TRANSFORMERS}); decoding runs as transformers ships it (slower)."
            )
            self._want_onednn = False
            return
        if shortcuts:
            self._no_speech = NoSpeechFromPrefill(model)
            self._suppression = SuppressionMaskCache(model)
            self._cross = SharedCrossAttention(model)
            self._reorder = SelfAttentionOnlyReorder(model)
            self.shortcuts_enabled = True

    @property
    def needs_check(self) -> bool:
        """Speed-ups were asked for and `self_check` has not run yet."""
        return self.shortcuts_enabled or self._want_onednn

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Decoding inside this block uses the enabled shortcuts (per thread)."""
        if not self.shortcuts_enabled:
            yield
            return
        with self._no_speech.active(), self._suppression.active(), self._cross.active(), self._reorder.active():
            yield

    def counts(self) -> Dict[str, int]:
        """How often each shortcut has applied, and how many linear layers run on oneDNN."""
        cross = self._cross
        return {
            "no_speech_from_prefill": self._no_speech.hits if self._no_speech else 0,
            "suppression_mask_cached": self._suppression.hits if self._suppression else 0,
            "cross_projection_shared": cross.projection_hits if cross else 0,
            "cross_attention_shared": cross.attention_hits if cross else 0,
            "onednn_linears": self.onednn_linears,
        }

    def self_check(self, decode_tokens: Callable[[], List[List[int]]], *, expect_no_speech: bool = True) -> None:
        """Decodes as shipped, then with the speed-ups; turns off those that change a token.

        The happy path costs two decodes: as shipped, and with every speed-up at once. Only when
        they differ is each speed-up tried alone, to turn off just the one at fault.

        Args:
            decode_tokens: Decodes the check clip (inside `active()`) and returns each window's
                tokens; it must use beam search on at least two windows, or the shortcuts
                would not apply.
            expect_no_speech: The decode runs generate's no-speech check (not with a pinned
                decode length, which turns it off), so `no_speech_from_prefill` must apply.
        """
        if not self.needs_check:
            return
        shortcuts, self.shortcuts_enabled = self.shortcuts_enabled, False
        onednn, self._want_onednn = self._want_onednn, False
        try:
            reference = decode_tokens()
        except Exception as e:
            self._warn(f"BELLE-2 speed-ups turned off: the self-check clip failed to decode as shipped ({type(e).__name__}: {e}).")
            raise
        expected = [n for n in SHORTCUT_COUNTERS if expect_no_speech or n != "no_speech_from_prefill"]
        if self._try(decode_tokens, reference, expected, shortcuts=shortcuts, onednn=onednn) is None:
            return
        if shortcuts:
            problem = self._try(decode_tokens, reference, expected, shortcuts=True, onednn=False)
            if problem is not None:
                self._warn(f"BELLE-2 decoding shortcuts turned off at start-up: {problem}; decoding runs as transformers ships it.")
                shortcuts = False
                self._switch(shortcuts=False, onednn=False)
        if onednn:
            problem = self._try(decode_tokens, reference, expected, shortcuts=shortcuts, onednn=True)
            if problem is not None:
                self._warn(f"oneDNN linear layers turned off at start-up: {problem}; linear layers run on PyTorch's default kernels.")
                self._switch(shortcuts=shortcuts, onednn=False)

    def _try(self, decode_tokens, reference, expected: List[str], *, shortcuts: bool, onednn: bool) -> Optional[str]:
        """Decodes the check clip with the given speed-ups on; what went wrong, or None."""
        self._switch(shortcuts=shortcuts, onednn=onednn)
        before = self.counts()
        problem = self._compare(decode_tokens, reference)
        if problem is None and shortcuts:
            idle = [name for name in expected if self.counts()[name] == before[name]]
            if idle:
                problem = f"shortcut(s) {idle} did not apply"
        return problem

    @contextlib.contextmanager
    def switched(self, *, shortcuts: bool) -> Iterator[None]:
        """Decoding inside this block runs with the shortcuts on or off, whatever the self-check
        decided (bench/gpu_check.py compares the two); the state before comes back after."""
        before = self.shortcuts_enabled
        if shortcuts and self._no_speech is None:
            raise RuntimeError("The decoding shortcuts were not installed (turned off in the settings or by the version guard).")
        self.shortcuts_enabled = shortcuts
        try:
            yield
        finally:
            self.shortcuts_enabled = before

    def _switch(self, *, shortcuts: bool, onednn: bool) -> None:
        """Switches the speed-ups to the given state."""
        self.shortcuts_enabled = shortcuts
        if onednn and not self.onednn_linears:
            self.onednn_linears = use_onednn_linears(self._model)
        elif not onednn and self.onednn_linears:
            use_dense_linears(self._model)
            self.onednn_linears = 0

    @staticmethod
    def _compare(decode_tokens: Callable[[], List[List[int]]], reference: List[List[int]]) -> Optional[str]:
        try:
            tokens = decode_tokens()
        except Exception as e:
            logger.exception("A speed-up failed in the self-check.")
            return f"decoding raised {type(e).__name__}: {e}"
        if tokens != reference:
            differ = [i + 1 for i, (a, b) in enumerate(zip(tokens, reference)) if a != b] or ["count"]
            return f"the check clip decoded to other tokens than transformers as shipped (window(s) {differ} of {len(reference)})"
        return None
