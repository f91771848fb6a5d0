"""Word (and Mandarin character) times for the BELLE-2 core from Whisper's own cross-attention.

There is no wav2vec2 aligner here (and none offline for Mandarin in WhisperX either). Whisper's
alignment heads, a few cross-attention heads whose weights follow the speech, place each token
in time (openai/whisper `timing.py`; faster-whisper's `word_timestamps=True`). transformers'
`return_token_timestamps=True` does it inside `generate`, but switches the model to eager
attention and keeps every layer's attention for every beam step, and would turn the decoding
shortcuts off (deployments/belle2/decoding.py). So after decoding, one teacher-forced decoder
pass over each window's chosen tokens records only the alignment heads (forward hooks on those
layers' cross-attention), and dynamic time warping maps the tokens onto the window's frames.

torch is imported where used; the caller passes the model and tokenizer.
"""

from __future__ import annotations

import contextlib
import re
import unicodedata
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

FRAMES_PER_SECOND = 50
"""Encoder output frames per second of audio (Whisper: 1500 frames for 30 s)."""
MEDIAN_FILTER_WIDTH = 7
LARGE_V3_ALIGNMENT_HEADS = [[7, 0], [10, 17], [12, 18], [13, 12], [16, 1], [17, 14], [19, 11], [21, 4], [24, 1], [25, 6]]
"""openai/whisper's large-v3 heads (its `_ALIGNMENT_HEADS["large-v3"]`, decoded; the same list is
in openai/whisper-large-v3's generation_config.json). BELLE-2's generation_config has none; it is
large-v3 fine-tuned, so it keeps large-v3's shape (32 decoder layers of 20 heads)."""
LARGE_V3_DECODER = (32, 20)
_PUNCTUATION = re.compile(r"^[\s\W_]+$")
_CJK = re.compile(r"[\u2e80-\u2fdf\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")


def alignment_heads(model: Any) -> Tuple[Optional[List[List[int]]], Optional[str]]:
    """The model's alignment heads, and a note when they were inferred (None: none known).

    Returns:
        (heads, note): heads from the generation config; else large-v3's for a large-v3-shaped
        decoder, with a note saying so; else (None, why).
    """
    heads = getattr(model.generation_config, "alignment_heads", None)
    if heads:
        return [list(h) for h in heads], None
    shape = (model.config.decoder_layers, model.config.decoder_attention_heads)
    if shape == LARGE_V3_DECODER:
        return [list(h) for h in LARGE_V3_ALIGNMENT_HEADS], "the model's generation_config lists no alignment_heads; large-v3's are used (same decoder shape)"
    return None, f"the model's generation_config lists no alignment_heads and its decoder ({shape[0]} layers x {shape[1]} heads) is not large-v3's"


@contextlib.contextmanager
def recorded_cross_attention(model: Any, heads: Sequence[Sequence[int]]) -> Iterator[Dict[Tuple[int, int], Any]]:
    """Records, during the block, the cross-attention weights of `heads` ([layer, head] pairs).

    Yields a dict filled by the forward pass: (layer, head) -> weights [batch, tokens, frames].
    The weights are computed from the layer's own projections, as its attention does (softmax of
    scaled query-key products); tests/belle2_words_probe.py checks them against transformers'
    eager attention, so a change of the attention module fails a test rather than the times.
    Only this thread's passes are recorded: a replica decodes several requests at once on one
    model, and another request's beam steps went into the dict (a shape mismatch, and a failed
    request) before the hooks looked at the thread.
    """
    import threading

    import torch

    owner = threading.get_ident()

    by_layer: Dict[int, List[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))
    recorded: Dict[Tuple[int, int], Any] = {}
    hooks = []

    def hook_for(layer: int, wanted: List[int]):
        def hook(module, args, kwargs, output):
            if threading.get_ident() != owner:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            keys_from = kwargs.get("key_value_states")
            batch, tokens, _ = hidden.shape
            query = (module.q_proj(hidden) * module.scaling).view(batch, tokens, module.num_heads, module.head_dim)
            key = module.k_proj(keys_from).view(batch, -1, module.num_heads, module.head_dim)
            for head in wanted:
                scores = torch.einsum("btd,bsd->bts", query[:, :, head].float(), key[:, :, head].float())
                recorded[(layer, head)] = scores.softmax(dim=-1)

        return hook

    decoder = model.get_decoder()
    try:
        for layer, wanted in by_layer.items():
            hooks.append(decoder.layers[layer].encoder_attn.register_forward_hook(hook_for(layer, wanted), with_kwargs=True))
        yield recorded
    finally:
        for handle in hooks:
            handle.remove()


def dtw_path(cost: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The dynamic-time-warping path through `cost` [tokens, frames], as openai/whisper's `dtw`
    (same steps, same tie-breaking), one anti-diagonal at a time instead of cell by cell.

    Returns:
        (token indices, frame indices) along the path, from (0, 0) to the last cell.
    """
    rows, cols = cost.shape
    total = np.full((rows + 1, cols + 1), np.inf, dtype=np.float64)
    trace = np.full((rows + 1, cols + 1), -1, dtype=np.int8)
    total[0, 0] = 0.0
    for diagonal in range(2, rows + cols + 1):
        i = np.arange(max(1, diagonal - cols), min(rows, diagonal - 1) + 1)
        j = diagonal - i
        c0, c1, c2 = total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]
        step = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2)).astype(np.int8)
        total[i, j] = cost[i - 1, j - 1] + np.choose(step, [c0, c1, c2])
        trace[i, j] = step
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j = rows, cols
    tokens, frames = [], []
    while i > 0 or j > 0:
        tokens.append(i - 1)
        frames.append(j - 1)
        step = trace[i, j]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    return np.array(tokens[::-1]), np.array(frames[::-1])


def token_times(weights: Any, num_tokens: int, num_frames: int) -> np.ndarray:
    """Start time of each text token and the end of the last, in seconds.

    Args:
        weights: [heads, rows, frames] alignment-head weights, the rows being the positions that
            predict the text tokens and then end-of-text (`num_tokens` + 1 rows).
        num_frames: Encoder frames that hold audio (the rest is padding).
    """
    import torch

    frames = max(1, min(num_frames, weights.shape[-1]))
    w = weights[:, : num_tokens + 1, :frames].float()
    std, mean = torch.std_mean(w, dim=-2, keepdim=True, unbiased=False)
    w = (w - mean) / (std + 1e-10)
    if frames > MEDIAN_FILTER_WIDTH // 2:
        pad = MEDIAN_FILTER_WIDTH // 2
        w = torch.nn.functional.pad(w.unsqueeze(0), (pad, pad, 0, 0), mode="reflect").squeeze(0)
        w = w.unfold(-1, MEDIAN_FILTER_WIDTH, 1).sort()[0][..., pad]
    matrix = w.mean(dim=0).cpu().numpy()
    token_index, frame_index = dtw_path(-matrix.astype(np.float64))
    jumps = np.pad(np.diff(token_index), (1, 0), constant_values=1).astype(bool)
    return frame_index[jumps] / FRAMES_PER_SECOND


def word_units(tokens: Sequence[int], decode) -> List[Tuple[str, List[int]]]:
    """Tokens grouped into words: Chinese by character (a token may hold several, or a part of
    one: bytes are joined until they decode), other scripts by spaces; punctuation joins the word
    before it."""
    pieces: List[Tuple[str, List[int]]] = []
    current: List[int] = []
    for token in tokens:
        current.append(token)
        text = decode(current)
        if "\ufffd" in text:
            continue
        pieces.append((text, current))
        current = []
    if current:
        pieces.append((decode(current), current))
    words: List[Tuple[str, List[int]]] = []
    for text, ids in pieces:
        if words and (_PUNCTUATION.match(text) or _continues(words[-1][0], text)):
            words[-1] = (words[-1][0] + text, words[-1][1] + ids)
        else:
            words.append((text, ids))
    return words


def _continues(previous: str, text: str) -> bool:
    """Whether `text` is the rest of a word of a spaced script (no space before it)."""
    if not text or text[0].isspace() or not previous:
        return False
    return not _CJK.match(text[0]) and not _CJK.match(previous[-1]) and unicodedata.category(previous[-1])[0] in "LN"


def timed_words(tokens: Sequence[int], times: np.ndarray, decode, probabilities: Optional[Sequence[float]] = None) -> List[dict]:
    """Words with start/end (seconds in the window) from per-token times (`token_times`)."""
    out = []
    at = 0
    for text, ids in word_units(tokens, decode):
        start, end = float(times[at]), float(times[min(at + len(ids), len(times) - 1)])
        word = {"word": text, "start": round(start, 3), "end": round(max(end, start), 3)}
        if probabilities is not None:
            word["score"] = round(float(np.mean(probabilities[at : at + len(ids)])), 3)
        out.append(word)
        at += len(ids)
    return _tamed(out)


def _tamed(words: List[dict]) -> List[dict]:
    """Caps words at twice the median word length at the edges of speech (openai/whisper's and
    faster-whisper's rule): DTW gives the silence before the first word, and after the last, to them."""
    durations = [w["end"] - w["start"] for w in words if w["end"] > w["start"]]
    if not durations:
        return words
    longest = 2 * min(0.7, float(np.median(durations)))
    if words[0]["end"] - words[0]["start"] > longest:
        words[0]["start"] = round(words[0]["end"] - longest, 3)
    if words[-1]["end"] - words[-1]["start"] > longest:
        words[-1]["end"] = round(words[-1]["start"] + longest, 3)
    return words
