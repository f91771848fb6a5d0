"""Shortcuts around transformers' Whisper `generate` (same tokens, less work).

Profiled on CPU (whisper base, beam 5): on a 5 s clip `generate` spent about a third of its
time on a second pass of the whole model (encoder and decoder) over the prompt, only to read
the no-speech probability, and a further fifth projecting five identical copies of the encoder
output (one per beam) to cross-attention keys and values; on a 70 s batch most of its time went
on copying those caches between beams, and a further sixth on reading all five copies every
step. None of this changes an output token (checked on every Mandarin clip in tests/data and the
87 s concatenation, and by tests/test_belle2.py), so it is skipped here. Plain Python/stdlib at
import; torch/transformers objects come from the caller.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from types import SimpleNamespace
from typing import Any, Iterator, Optional


class _ThreadSwitch:
    """`with switch():` turns it on for the calling thread; `switch.on` reads it."""

    def __init__(self):
        self._local = threading.local()

    @property
    def on(self) -> bool:
        return getattr(self._local, "on", False)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        self._local.on = True
        try:
            yield
        finally:
            self._local.on = False


class SelfAttentionOnlyReorder:
    """`reorder_self_attention_only` inside `active()`, the cache's own reorder outside it.

    Installed as the model's `_reorder_cache`; outside `active()` it does what transformers does
    for a model without one (`GenerationMixin._beam_search`: `cache.reorder_cache(beam_idx)`).
    """

    def __init__(self, model: Any):
        self.active = _ThreadSwitch()
        model._reorder_cache = self

    def __call__(self, cache: Any, beam_idx: Any) -> Any:
        if self.active.on:
            return reorder_self_attention_only(cache, beam_idx)
        cache.reorder_cache(beam_idx)
        return cache


def reorder_self_attention_only(cache: Any, beam_idx: Any) -> Any:
    """Beam-search cache reordering that leaves the cross-attention cache in place.

    Installed as the model's `_reorder_cache` (which `GenerationMixin._beam_search` prefers to
    the cache's own `reorder_cache`). Beam search only ever picks among the beams of one input,
    and those beams share one encoder output, so their cross-attention keys and values are
    identical rows: reordering them (an `index_select` of beams x 1500 frames per layer per step)
    copies data onto equal data. With `SharedCrossAttention` the cross-attention cache holds one
    row per input, which a reorder by beam would not fit.
    """
    self_attention = getattr(cache, "self_attention_cache", None)
    if self_attention is None:
        cache.reorder_cache(beam_idx)
    else:
        self_attention.reorder_cache(beam_idx)
    return cache


class SharedCrossAttention:
    """Cross-attention that projects, caches and reads each input's encoder states once for all its beams.

    During beam search transformers copies the encoder output once per beam, so the five beams of
    one window carry five identical copies of it, and its cross-attention projects every copy to
    keys and values at the prompt pass (on CPU, with the no-speech pass gone, the largest single
    cost of a short clip after the encoder), caches all copies, and reads all of them at every
    step (memory-bound on CPU: about a quarter of decoding time on a 70 s clip).

    Here each decoder layer's cross-attention runs, inside `active()`, with one row per input:
    once per encoder output, the rows that are *verified* identical (consecutive, as the beams of
    one input are) are counted; the prompt pass projects one row per input and caches those keys
    and values (inputs x heads x frames x dim, not one per beam); every step attends each input's
    beams' queries, stacked along the query axis, to that input's keys and values. Each query
    still attends to the same keys and values, so the attention is the same up to float rounding.
    Anything else (self-attention, an attention mask, attention weights asked for, rows that
    differ) runs transformers' own forward. The cross-attention cache then has fewer rows than the
    beams, so it must not be reordered by beam: `reorder_self_attention_only` leaves it alone (a
    reorder would fail on the row count, not pass silently). Thread-local state, dropped when the
    block exits.
    """

    def __init__(self, model: Any):
        import torch
        from transformers.cache_utils import EncoderDecoderCache

        self._sdpa = torch.nn.functional.scaled_dot_product_attention
        self._cache_type = EncoderDecoderCache
        self._local = threading.local()
        self.projection_hits = self.attention_hits = 0
        for layer in model.get_decoder().layers:
            attention = layer.encoder_attn
            attention.forward = functools.partial(self._forward, attention, attention.forward)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self._local.groups = (None, 1)
        try:
            yield
        finally:
            self._local.groups = None

    def _forward(self, module, transformers_forward, hidden_states, key_value_states=None, past_key_values=None,
                 attention_mask=None, output_attentions=False, **kwargs):
        def as_transformers():
            return transformers_forward(
                hidden_states, key_value_states=key_value_states, past_key_values=past_key_values,
                attention_mask=attention_mask, output_attentions=output_attentions, **kwargs,
            )

        if (
            getattr(self._local, "groups", None) is None
            or key_value_states is None
            or attention_mask is not None
            or output_attentions
            or not isinstance(past_key_values, self._cache_type)
        ):
            return as_transformers()
        layer = module.layer_idx
        cross = past_key_values.cross_attention_cache
        if past_key_values.is_updated.get(layer):
            keys, values = cross.layers[layer].keys, cross.layers[layer].values
        else:
            groups = self._row_groups(key_value_states)
            if groups == 1:
                return as_transformers()
            self.projection_hits += 1
            unique = key_value_states[::groups]
            shape = (unique.shape[0], -1, module.num_heads, module.head_dim)
            keys = module.k_proj(unique).view(shape).transpose(1, 2).contiguous()
            values = module.v_proj(unique).view(shape).transpose(1, 2).contiguous()
            keys, values = cross.update(keys, values, layer)
            past_key_values.is_updated[layer] = True
        rows, q_len = hidden_states.shape[:2]
        inputs = keys.shape[0]
        if inputs == rows:  # cached by transformers' own forward: one row per beam
            return as_transformers()
        self.attention_hits += 1
        groups, heads, dim = rows // inputs, module.num_heads, module.head_dim
        # As transformers' WhisperAttention: scaled before the product, which then has scale 1.
        query = (module.q_proj(hidden_states) * module.scaling).view(rows, q_len, heads, dim).transpose(1, 2)
        stacked = query.reshape(inputs, groups, heads, q_len, dim).transpose(1, 2).reshape(inputs, heads, groups * q_len, dim)
        out = self._sdpa(stacked, keys, values, scale=1.0)
        out = out.view(inputs, heads, groups, q_len, dim).permute(0, 2, 3, 1, 4).reshape(rows, q_len, heads * dim)
        return module.out_proj(out), None

    def _row_groups(self, states) -> int:
        """`_identical_row_groups` of the encoder output, once per output (all layers share it)."""
        known, groups = self._local.groups
        if known is not states:
            groups = 1 if states.dim() != 3 or states.shape[0] == 1 else _identical_row_groups(states)
            self._local.groups = (states, groups)
        return groups


def _identical_row_groups(tensor) -> int:
    """How many consecutive rows (first axis) form each group of identical rows; 1 if they do not."""
    rows = tensor.shape[0]
    groups = 1
    while groups < rows and tensor[groups].equal(tensor[0]):
        groups += 1
    if groups == 1 or rows % groups:
        return 1
    unique = tensor[::groups]
    inputs = rows // groups
    if not tensor.reshape(inputs, groups, -1).equal(unique.reshape(inputs, 1, -1).expand(inputs, groups, -1)):
        return 1
    return groups


class NoSpeechFromPrefill:
    """Reads the no-speech probability from the prompt pass that `generate` has already run.

    transformers' `WhisperNoSpeechDetection` gets the probability of <|nospeech|> at the
    start-of-transcript position by calling the whole model on the prompt again at the first
    decoding step (`generation/logits_process.py`): a second decoder pass that fills a second
    set of cross-attention caches. The prefill just before it fed the decoder the same prompt
    over the same encoder output, and Whisper's forward returns logits for every prompt
    position, so they are kept (per thread, inside `active()`) and handed to the detector in
    place of that call. The detector checks nothing else; when the prompt it asks about is not
    the one recorded, the real model is called as before.
    """

    def __init__(self, model: Any, *, enabled: bool = True):
        self._model = model
        self._local = threading.local()
        self.hits = 0
        if enabled:
            model.register_forward_hook(self._record, with_kwargs=True)
            model._retrieve_logit_processors = self._wrap(model._retrieve_logit_processors)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self._local.active, self._local.prefill = True, None
        try:
            yield
        finally:
            self._local.active, self._local.prefill = False, None

    def _record(self, module, args, kwargs, output) -> None:
        ids = kwargs.get("decoder_input_ids")
        if getattr(self._local, "active", False) and ids is not None and ids.shape[1] > 1:
            self._local.prefill = (ids, output.logits)

    def _wrap(self, retrieve):
        from transformers.generation.logits_process import WhisperNoSpeechDetection

        @functools.wraps(retrieve)
        def retrieve_logit_processors(*args, **kwargs):
            processors = retrieve(*args, **kwargs)
            for processor in processors or ():
                if isinstance(processor, WhisperNoSpeechDetection):
                    processor.set_model(_PrefillLogitsModel(self._model, self._prefill_logits))
            return processors

        return retrieve_logit_processors

    def _prefill_logits(self, decoder_input_ids) -> Optional[Any]:
        """The recorded prompt logits, one row per input, if they are for these prompts."""
        recorded = getattr(self._local, "prefill", None)
        if recorded is None or decoder_input_ids is None:
            return None
        ids, logits = recorded
        rows = decoder_input_ids.shape[0]
        if ids.shape[1] != decoder_input_ids.shape[1] or ids.shape[0] % rows:
            return None
        per_input = ids.shape[0] // rows  # beams: rows of one input are consecutive
        if not ids[::per_input].equal(decoder_input_ids.to(ids.device)):
            return None
        self.hits += 1
        return logits[::per_input]


class _PrefillLogitsModel:
    """Stands in for the model inside `WhisperNoSpeechDetection` (see `NoSpeechFromPrefill`)."""

    def __init__(self, model: Any, prefill_logits):
        self._model = model
        self._prefill_logits = prefill_logits

    def __getattr__(self, name: str) -> Any:  # prepare_inputs_for_generation, forward, ...
        return getattr(self._model, name)

    def __call__(self, **inputs):
        logits = self._prefill_logits(inputs.get("decoder_input_ids"))
        return self._model(**inputs) if logits is None else SimpleNamespace(logits=logits)


class SuppressionMaskCache:
    """Token suppression that builds its vocabulary mask once per `generate` call, not every step.

    transformers' `SuppressTokensLogitsProcessor` and `SuppressTokensAtBeginLogitsProcessor`
    compute `isin(arange(vocab), tokens)` (a sort of the 51,865-entry vocabulary) at every
    decoding step, and the begin-suppression computes it even at the steps where it then does
    nothing: about a seventh of the time of a 70 s clip on CPU. Their instances are swapped, in
    the list Whisper's `generate` builds (`_retrieve_logit_processors`), for subclasses that keep
    the mask and do the same masking (-inf at the same tokens, a new tensor, as before).
    """

    def __init__(self, model: Any, *, enabled: bool = True):
        self.hits = 0
        self.active = _ThreadSwitch()
        if enabled:
            model._retrieve_logit_processors = self._wrap(model._retrieve_logit_processors)

    def _wrap(self, retrieve):
        from transformers.generation.logits_process import (
            SuppressTokensAtBeginLogitsProcessor,
            SuppressTokensLogitsProcessor,
        )

        class CachedSuppressTokens(SuppressTokensLogitsProcessor):
            def __call__(self, input_ids, scores):
                return scores.masked_fill(_vocabulary_mask(self, self.suppress_tokens, scores), -float("inf"))

        class CachedSuppressTokensAtBegin(SuppressTokensAtBeginLogitsProcessor):
            def __call__(self, input_ids, scores):
                if input_ids.shape[-1] != self.begin_index:
                    return scores
                return scores.masked_fill(_vocabulary_mask(self, self.begin_suppress_tokens, scores), -float("inf"))

        def cached(processor):
            if type(processor) is SuppressTokensLogitsProcessor:
                swapped = CachedSuppressTokens.__new__(CachedSuppressTokens)
            elif type(processor) is SuppressTokensAtBeginLogitsProcessor:
                swapped = CachedSuppressTokensAtBegin.__new__(CachedSuppressTokensAtBegin)
            else:
                return processor
            swapped.__dict__.update(processor.__dict__)
            self.hits += 1
            return swapped

        @functools.wraps(retrieve)
        def retrieve_logit_processors(*args, **kwargs):
            processors = retrieve(*args, **kwargs)
            if processors is None or not self.active.on:
                return processors
            return [cached(p) for p in processors]

        return retrieve_logit_processors


def _vocabulary_mask(owner: Any, tokens: Any, scores: Any) -> Any:
    """`isin(arange(vocab), tokens)` for `scores`' vocabulary and device, kept on `owner`."""
    import torch

    key = (scores.shape[-1], scores.device)
    cached = owner.__dict__.get("_vocabulary_mask")
    if cached is None or cached[0] != key:
        vocabulary = torch.arange(scores.shape[-1], device=scores.device)
        cached = owner.__dict__["_vocabulary_mask"] = (key, torch.isin(vocabulary, tokens.to(scores.device)))
    return cached[1]
