"""Three exact shortcuts around transformers' Whisper `generate` (same tokens, less work).

Profiled on CPU (whisper base, beam 5), `generate` spent about a quarter of its time on a 5 s
clip running the encoder a second time, most of its time on a 70 s batch copying
cross-attention caches between beams, and then a further sixth reading five identical copies of
those caches every step. None of this changes an output token, so all three are skipped here.
Plain Python/stdlib at import; torch/transformers objects come from the caller.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator


class EncoderOutputMemo:
    """Runs the Whisper encoder once per batch of windows, though `generate` asks twice.

    transformers' `WhisperNoSpeechDetection` logits processor gets the no-speech probability by
    calling the whole model again, on the same input-features tensor, at the first decoding
    step (`generation/logits_process.py`), which encodes the 30 s windows a second time. Inside
    `active()`, the encoder's output is kept for the tensor it was computed from and handed back
    when the very same tensor object comes again. The memo holds that tensor, so its memory
    cannot be reused by another tensor while the entry lives; entries are per thread (a replica
    decodes concurrent requests in threads) and dropped when `active()` exits.
    """

    def __init__(self, encoder: Any, *, enabled: bool = True):
        self._forward = encoder.forward
        self._local = threading.local()
        self.hits = 0
        if enabled:
            encoder.forward = self._call

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Memoises encoder calls made by this thread until the block exits."""
        self._local.active, self._local.entry = True, None
        try:
            yield
        finally:
            self._local.active, self._local.entry = False, None

    def _call(self, input_features, attention_mask=None, **kwargs):
        plain = (
            getattr(self._local, "active", False)
            and attention_mask is None
            and not kwargs.get("output_attentions")
            and not kwargs.get("output_hidden_states")
            and kwargs.get("return_dict", True) is not False
        )
        if not plain:
            return self._forward(input_features, attention_mask=attention_mask, **kwargs)
        entry = self._local.entry
        if entry is not None and entry[0] is input_features:
            self.hits += 1
            return entry[1]
        out = self._forward(input_features, **kwargs)
        self._local.entry = (input_features, out)
        return out


def reorder_self_attention_only(cache: Any, beam_idx: Any) -> Any:
    """Beam-search cache reordering that leaves the cross-attention cache in place.

    Installed as the model's `_reorder_cache` (which `GenerationMixin._beam_search` prefers to
    the cache's own `reorder_cache`). Beam search only ever picks among the beams of one input,
    and those beams share one encoder output, so their cross-attention keys and values are
    identical rows: reordering them (an `index_select` of beams x 1500 frames per layer per step)
    copies data onto equal data.
    """
    self_attention = getattr(cache, "self_attention_cache", None)
    if self_attention is None:
        cache.reorder_cache(beam_idx)
    else:
        self_attention.reorder_cache(beam_idx)
    return cache


class SharedCrossAttention:
    """Cross-attention that reads each input's encoder keys/values once for all its beams.

    During beam search transformers copies the encoder output once per beam, so the five beams
    of one window carry five identical copies of its cross-attention keys and values, and every
    decoding step reads all of them (memory-bound on CPU: about a quarter of decoding time on a
    70 s clip). Rows of the cache that are *verified* identical (once per cache tensor) are
    attended to once, with their beams' queries stacked along the query axis. Each query still
    attends to exactly the same keys and values, so the result is the same attention; anything
    else (self-attention, masks, rows that differ) goes to transformers' SDPA unchanged.

    Registered as an attention implementation of its own (`NAME`) and used only inside
    `active()`; entries are per thread and dropped when the block exits.
    """

    NAME = "belle2_shared_cross_sdpa"

    def __init__(self, model: Any):
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        self._sdpa = sdpa_attention_forward
        self._cross = {id(layer.encoder_attn) for layer in model.get_decoder().layers}
        self._local = threading.local()
        AttentionInterface.register(self.NAME, self._attend)
        model.set_attn_implementation(self.NAME)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self._local.entries = {}
        try:
            yield
        finally:
            self._local.entries = None

    def _attend(self, module, query, key, value, attention_mask, **kwargs):
        entries = getattr(self._local, "entries", None)
        if entries is None or attention_mask is not None or id(module) not in self._cross:
            return self._sdpa(module, query, key, value, attention_mask, **kwargs)
        entry = entries.get(id(key))
        if entry is None or entry[0] is not key:
            entry = entries[id(key)] = (key, *self._dedupe(key, value))
        _, groups, unique_key, unique_value = entry
        if groups == 1:
            return self._sdpa(module, query, key, value, attention_mask, **kwargs)
        import torch

        rows, heads, q_len, dim = query.shape
        inputs = rows // groups
        stacked = query.view(inputs, groups, heads, q_len, dim).transpose(1, 2).reshape(inputs, heads, groups * q_len, dim)
        out = torch.nn.functional.scaled_dot_product_attention(
            stacked, unique_key, unique_value, scale=kwargs.get("scaling")
        )
        out = out.view(inputs, heads, groups, q_len, dim).permute(0, 2, 3, 1, 4).reshape(rows, q_len, heads, dim)
        return out, None

    @staticmethod
    def _dedupe(key, value) -> tuple:
        """(rows per group, keys, values) with consecutive identical rows kept once, or (1, None, None)."""
        rows = key.shape[0]
        groups = 1
        while groups < rows and key[groups].equal(key[0]) and value[groups].equal(value[0]):
            groups += 1
        if groups == 1 or rows % groups:
            return 1, None, None
        unique_key, unique_value = key[::groups].contiguous(), value[::groups].contiguous()
        inputs = rows // groups
        for full, unique in ((key, unique_key), (value, unique_value)):
            if not full.view(inputs, groups, -1).equal(unique.view(inputs, 1, -1).expand(inputs, groups, -1)):
                return 1, None, None
        return groups, unique_key, unique_value
