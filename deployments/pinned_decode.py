"""Pinned decode length: a benchmark-only mode for Whisper models with random weights.

A model with random weights (bench/random_whisper.py) has the size and speed of the real one,
but what it decodes is noise: it may stop after one token or run to the length limit, fall back
to every temperature, or have its windows skipped as silence. None of that is the work a trained
model does, so a throughput figure means nothing unless the decode length is fixed. With
`pinned_decode_tokens: N` (a model app arg, `ModelAppArgs`), every window decodes exactly N
tokens, once, and the result says so in its `warnings` and its model info (`pinned_decode_tokens`,
`window_tokens`: the tokens each window produced, counted from the decoder's output, so a broken
pin shows). A window is one decoder input of at most 30 s: a VAD window in the belle2 app, a VAD
chunk in whisperx's batched pipeline.

Both model apps and the direct runners (`bench/direct_*.py --pinned-decode-tokens N`) use these
helpers, so the service and the library called directly decode the same lengths. This module
imports the standard library only; the model objects are passed in.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable, Iterator, List, MutableMapping, Optional, Sequence

MAX_PINNED_DECODE_TOKENS = 224
"""The most tokens a window can be pinned to: CTranslate2 decodes at most half of Whisper's
448-token context (`max_length / 2` in its whisper.cc), as OpenAI's Whisper does."""

_window_tokens: contextvars.ContextVar[Optional[List[int]]] = contextvars.ContextVar("window_tokens", default=None)


def pinned_warning(tokens_per_window: int, window_tokens: Sequence[int]) -> str:
    """The warning a pinned result carries."""
    return (
        f"Decode length pinned to {tokens_per_window} tokens per window (benchmark mode for random "
        f"weights; the text is meaningless): {len(window_tokens)} window(s), {sum(window_tokens)} tokens decoded."
    )


def report_pinned(model_info: MutableMapping, warnings: List[str], tokens_per_window: int, window_tokens: Sequence[int]) -> None:
    """Adds the pin and the tokens each window decoded to a result's model info and warnings."""
    model_info["pinned_decode_tokens"] = tokens_per_window
    model_info["window_tokens"] = [int(n) for n in window_tokens]
    warnings.append(pinned_warning(tokens_per_window, window_tokens))


# -- transformers (the belle2 app, bench/direct_transformers.py) --------------------------------


def transformers_generate_kwargs(tokens_per_window: int) -> dict:
    """`WhisperForConditionalGeneration.generate` arguments that decode exactly N tokens per window.

    - `min_new_tokens` = `max_new_tokens` = N: end-of-text is masked until N tokens, and decoding
      stops at N.
    - `force_unique_generate_call`: one decoding per window. Otherwise generate decodes the
      window again from its last predicted timestamp pair, which random weights put anywhere.
    - One temperature and no thresholds: no fallback decoding, no window dropped as silence
      (`logprob_threshold=None` also keeps generate's dict output with `segments`).
    """
    return dict(
        min_new_tokens=tokens_per_window,
        max_new_tokens=tokens_per_window,
        force_unique_generate_call=True,
        temperature=0.0,
        compression_ratio_threshold=None,
        logprob_threshold=None,
        no_speech_threshold=None,
    )


def transformers_window_tokens(sequences: Sequence[Sequence[int]], tokenizer) -> List[int]:
    """Tokens each window generated, from generate's `sequences` (prompt included).

    The decoder prompt ends with the task token (`<|transcribe|>` or `<|translate|>`) after
    `<|startoftranscript|>`; what follows, less end-of-text and padding, was generated.

    Args:
        sequences: One row of token ids per window.
        tokenizer: The model's Whisper tokenizer.
    """
    start = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    tasks = set(tokenizer.convert_tokens_to_ids(["<|transcribe|>", "<|translate|>"]))
    end = tokenizer.eos_token_id
    counts = []
    for row in sequences:
        row = list(row)
        prompt_end = next(i for i in range(row.index(start), len(row)) if row[i] in tasks) + 1
        counts.append(sum(1 for t in row[prompt_end:] if t != end))
    return counts


# -- CTranslate2 (the whisperx app, bench/direct_whisperx.py) -----------------------------------


class PinnedLengthWhisper:
    """A CTranslate2 `Whisper` model whose `generate` decodes exactly N tokens per prompt.

    whisperx 3.8.6 calls `generate` with `max_length=448` and the request's `suppress_tokens`
    (its batched `generate_segment_batched` ignores faster-whisper's `max_new_tokens`), so the pin
    is applied where the decoding happens: end-of-text joins the suppressed tokens and
    `max_length` becomes 2 N, since CTranslate2 decodes at most `max_length / 2` tokens. Every
    other attribute is the wrapped model's. Wrap the model once, at load:
    `whisper_model.model = PinnedLengthWhisper(whisper_model.model, N, end_of_text=...)`.
    """

    def __init__(self, model, tokens_per_window: int, *, end_of_text: int):
        if not 1 <= tokens_per_window <= MAX_PINNED_DECODE_TOKENS:
            raise ValueError(f"Got {tokens_per_window} for tokens_per_window; expected 1 to {MAX_PINNED_DECODE_TOKENS}.")
        self._model = model
        self._tokens_per_window = tokens_per_window
        self._end_of_text = end_of_text

    def generate(self, features, prompts, **kwargs):
        if kwargs.get("asynchronous"):
            raise NotImplementedError("PinnedLengthWhisper counts tokens of synchronous generate calls only.")
        suppress = list(kwargs.get("suppress_tokens") or [-1])
        if self._end_of_text not in suppress:
            suppress.append(self._end_of_text)
        kwargs.update(suppress_tokens=suppress, max_length=2 * self._tokens_per_window)
        results = self._model.generate(features, prompts, **kwargs)
        counts = _window_tokens.get()
        if counts is not None:
            counts.extend(len(r.sequences_ids[0]) for r in results)
        return results

    def __getattr__(self, name):
        return getattr(self._model, name)


def count_window_tokens(counts: Iterable[int]) -> None:
    """Adds windows' token counts to this context's `counting_window_tokens` list, if any: for
    windows decoded in another thread (the cross-request batcher's), where the pin cannot see it."""
    window_tokens = _window_tokens.get()
    if window_tokens is not None:
        window_tokens.extend(int(n) for n in counts)


@contextlib.contextmanager
def counting_window_tokens(counts: Optional[List[int]] = None) -> Iterator[List[int]]:
    """Appends to `counts` the tokens of each window `PinnedLengthWhisper` decodes in this context.

    The count is per context (one request's thread), so concurrent requests keep their own.
    """
    counts = [] if counts is None else counts
    token = _window_tokens.set(counts)
    try:
        yield counts
    finally:
        _window_tokens.reset(token)
