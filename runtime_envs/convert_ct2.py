"""Convert a CTranslate2 Whisper model directory into a Hugging Face transformers one.

faster-whisper ships Whisper checkpoints in CTranslate2 (CT2) format only; the
belle2 deployment runs ``transformers.WhisperForConditionalGeneration`` and
needs the same weights in Hugging Face layout. This module inverts
CTranslate2's ``WhisperLoader`` (``ctranslate2/converters/transformers.py``):

* ``model.bin`` is parsed with numpy only, following the writer in
  ``ctranslate2/specs/model_spec.py`` (``ModelSpec._serialize``) and the reader
  in ``src/models/model.cc``.
* Fused projections are split again: self-attention ``linear_0`` is
  ``concat(q, k, v)``, cross-attention ``linear_1`` is ``concat(k, v)``.
* ``config.json``, ``generation_config.json``, tokenizer and feature-extractor
  files are rebuilt from the weight shapes, CT2's ``config.json`` and
  ``tokenizer.json`` so that ``WhisperProcessor.from_pretrained`` and
  ``WhisperForConditionalGeneration.from_pretrained`` work offline.

Usage::

    python runtime_envs/convert_ct2.py SRC_CT2_DIR DST_HF_DIR [--dtype float16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

logger = logging.getLogger(__name__)

# Order of the DataType enum in include/ctranslate2/types.h (model_spec._dtype_to_type_id).
CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")

# Binary versions this reader understands; model.cc documents the differences.
SUPPORTED_BINARY_VERSIONS = range(1, 7)

# common_spec.Activation.GELU; Whisper's decoder must use exact (erf) GELU.
CT2_ACTIVATION_GELU = 3

# Whisper attention heads are always 64 wide; used when an old CT2 file did
# not store num_heads.
WHISPER_HEAD_DIM = 64

# Whisper's multilingual vocabularies have 51865 (v1/v2) or 51866 (v3)
# entries, the English-only ones 51864 (openai/whisper tokenizer.py rule).
MULTILINGUAL_MIN_VOCAB = 51865

# Audio front-end constants fixed by Whisper's training (openai/whisper audio.py).
SAMPLING_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30

TARGET_DTYPES = ("float32", "float16")

_LANG_TOKEN_RE = re.compile(r"^<\|[a-z]{2,3}\|>$")


@dataclasses.dataclass
class Ct2Model:
    """Raw content of a CTranslate2 ``model.bin``.

    Attributes:
        binary_version: File format version (6 for current CTranslate2).
        spec_name: Model specification name, e.g. ``"WhisperSpec"``.
        spec_revision: Revision of that specification.
        variables: Variable name to array; scalars are 0-d arrays.
        aliases: Alias name to the name of the variable it shares storage with.
    """

    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise ValueError(f"truncated CTranslate2 model: wanted {size} bytes, got {len(data)}")
    return data


def _read_struct(stream: BinaryIO, fmt: str) -> Any:
    # CT2 writes with native byte order; every platform it ships for is little-endian.
    fmt = "<" + fmt
    return struct.unpack(fmt, _read_exact(stream, struct.calcsize(fmt)))[0]


def _read_string(stream: BinaryIO) -> str:
    # The uint16 length counts the trailing NUL written by _write_string.
    length = _read_struct(stream, "H")
    raw = _read_exact(stream, length)
    return raw[:-1].decode("utf-8") if raw.endswith(b"\0") else raw.decode("utf-8")


def _bytes_to_array(raw: bytes, dtype_name: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype_name == "bfloat16":
        # numpy has no bfloat16: it is the upper half of a float32, so widen it.
        half = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return half.view(np.float32).reshape(shape)
    array = np.frombuffer(raw, dtype=np.dtype(dtype_name).newbyteorder("<"))
    return array.reshape(shape)


def read_ct2_model(path: str | Path) -> Ct2Model:
    """Parse a CTranslate2 ``model.bin`` with numpy only.

    Args:
        path: Path of the ``model.bin`` file.

    Returns:
        The parsed model. bfloat16 variables are returned as float32 because
        numpy cannot represent bfloat16; every other dtype is kept as stored.

    Raises:
        ValueError: If the file is truncated, has trailing bytes or an
            unsupported binary version or dtype.
    """
    variables: dict[str, np.ndarray] = {}
    aliases: dict[str, str] = {}
    with open(path, "rb") as stream:
        version = _read_struct(stream, "I")
        if version not in SUPPORTED_BINARY_VERSIONS:
            raise ValueError(f"unsupported CTranslate2 binary version {version}")
        if version >= 2:
            spec_name = _read_string(stream)
            spec_revision = _read_struct(stream, "I")
        else:
            spec_name, spec_revision = "", 1

        for _ in range(_read_struct(stream, "I")):
            name = _read_string(stream)
            rank = _read_struct(stream, "B")
            shape = tuple(_read_struct(stream, "I") for _ in range(rank))
            if version >= 4:
                type_id = _read_struct(stream, "B")
                if type_id >= len(CT2_DTYPES):
                    raise ValueError(f"{name}: unknown CTranslate2 dtype id {type_id}")
                dtype_name = CT2_DTYPES[type_id]
                num_bytes = _read_struct(stream, "I")
            else:
                # Before v4 the dtype was guessed from the item width (model.cc).
                item_size = _read_struct(stream, "B")
                dtype_name = {4: "float32", 2: "int16", 1: "int8"}[item_size]
                num_bytes = _read_struct(stream, "I") * item_size
            expected = math.prod(shape) * (2 if dtype_name == "bfloat16" else np.dtype(dtype_name).itemsize)
            if num_bytes != expected:
                raise ValueError(f"{name}: {num_bytes} bytes for shape {shape} {dtype_name}")
            variables[name] = _bytes_to_array(_read_exact(stream, num_bytes), dtype_name, shape)

        if version >= 3:
            for _ in range(_read_struct(stream, "I")):
                alias = _read_string(stream)
                aliases[alias] = _read_string(stream)

        trailing = stream.read(1)
        if trailing:
            raise ValueError(f"{path}: unexpected data after the alias table")

    return Ct2Model(version, spec_name, spec_revision, variables, aliases)


def resolve_variables(model: Ct2Model) -> dict[str, np.ndarray]:
    """Materialise aliases and undo CTranslate2 weight quantization.

    Args:
        model: A parsed CT2 model.

    Returns:
        Variable name to array with every alias present under its own name
        and int8/int16 quantized weights turned back into float32 (their
        ``*_scale`` companions are dropped).

    Raises:
        ValueError: If an alias points nowhere or the model uses a
            quantization scheme with zero points (AWQ), which has no exact
            float inverse here.
    """
    variables = dict(model.variables)
    for alias, target in model.aliases.items():
        if target not in variables:
            raise ValueError(f"alias {alias} points to missing variable {target}")
        variables[alias] = variables[target]
        # model.cc aliases the quantization scale together with the weight.
        if target + "_scale" in variables:
            variables[alias + "_scale"] = variables[target + "_scale"]

    zero_points = sorted(n for n in variables if n.endswith("_zero"))
    if zero_points:
        raise ValueError(f"zero-point quantized CTranslate2 models are not supported: {zero_points[:3]}")

    for scale_name in [n for n in variables if n.endswith("_scale")]:
        base_name = scale_name[: -len("_scale")]
        if base_name not in variables:
            continue
        scale = variables.pop(scale_name).astype(np.float32)
        value = variables[base_name].astype(np.float32)
        # Inverse of LayerSpec._quantize: int16 uses one scalar, int8 one
        # scale per output row broadcast with expand_dims(scale, 1).
        variables[base_name] = value / (scale if scale.ndim == 0 else np.expand_dims(scale, 1))
    return variables


def split_fused(array: np.ndarray, parts: int) -> list[np.ndarray]:
    """Split a fused projection along its output dimension.

    CTranslate2's ``fuse_linear`` concatenates the weights (and biases) of
    several linear layers along axis 0; this is the inverse.

    Args:
        array: Fused weight ``(parts * out, in)`` or bias ``(parts * out,)``.
        parts: Number of layers that were fused (3 for q/k/v, 2 for k/v).

    Returns:
        The per-layer arrays, in fusion order.

    Raises:
        ValueError: If axis 0 is not divisible by ``parts``.
    """
    if array.shape[0] % parts:
        raise ValueError(f"cannot split axis 0 of shape {array.shape} into {parts} equal parts")
    return list(np.split(array, parts, axis=0))


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's fixed encoder position embedding (same formula as openai/whisper and HF).

    Args:
        length: Number of positions (1500 for 30 s of audio).
        channels: Embedding width (d_model); must be even.
        max_timescale: Longest sinusoid period.

    Returns:
        float32 array of shape ``(length, channels)``: sines then cosines.
    """
    if channels % 2:
        raise ValueError(f"channels must be even, got {channels}")
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-increment * np.arange(channels // 2, dtype=np.float64))
    scaled = np.arange(length, dtype=np.float64)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


def _count_layers(variables: dict[str, np.ndarray], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    if indices != set(range(len(indices))):
        raise ValueError(f"non-contiguous {prefix} layers: {sorted(indices)}")
    return len(indices)


class _Mapper:
    """Moves CT2 variables into an HF state dict and remembers what it used."""

    def __init__(self, variables: dict[str, np.ndarray], dtype: str):
        self.variables = variables
        self.dtype = np.dtype(dtype)
        self.used: set[str] = set()
        self.state: dict[str, np.ndarray] = {}

    def take(self, name: str) -> np.ndarray:
        if name not in self.variables:
            raise KeyError(f"CTranslate2 model has no variable {name!r}")
        self.used.add(name)
        return self.variables[name]

    def put(self, hf_name: str, value: np.ndarray) -> None:
        # safetensors needs contiguous buffers; np.split returns views.
        self.state[hf_name] = np.ascontiguousarray(value.astype(self.dtype, copy=False))

    def copy(self, ct2_name: str, hf_name: str) -> None:
        self.put(hf_name, self.take(ct2_name))

    def layer_norm(self, ct2_scope: str, hf_scope: str) -> None:
        self.copy(f"{ct2_scope}/gamma", f"{hf_scope}.weight")
        self.copy(f"{ct2_scope}/beta", f"{hf_scope}.bias")

    def linear(self, ct2_scope: str, hf_scope: str) -> None:
        self.copy(f"{ct2_scope}/weight", f"{hf_scope}.weight")
        self.copy(f"{ct2_scope}/bias", f"{hf_scope}.bias")

    def fused(self, ct2_scope: str, hf_scopes: list[str]) -> None:
        weights = split_fused(self.take(f"{ct2_scope}/weight"), len(hf_scopes))
        biases = split_fused(self.take(f"{ct2_scope}/bias"), len(hf_scopes))
        for hf_scope, weight, bias in zip(hf_scopes, weights, biases):
            self.put(f"{hf_scope}.weight", weight)
            if hf_scope.endswith("k_proj"):
                # HF's k_proj has no bias; fuse_linear filled zeros for it. A
                # key bias only adds a per-query constant to the logits, which
                # softmax cancels, so dropping a non-zero one is still exact.
                if np.any(bias):
                    logger.warning("%s: dropping non-zero key bias (softmax-invariant)", ct2_scope)
                continue
            self.put(f"{hf_scope}.bias", bias)

    def attention(self, ct2_scope: str, hf_scope: str, *, cross: bool) -> None:
        q, k, v, out = (f"{hf_scope}.{p}_proj" for p in ("q", "k", "v", "out"))
        if cross:
            self.linear(f"{ct2_scope}/linear_0", q)
            self.fused(f"{ct2_scope}/linear_1", [k, v])
            self.linear(f"{ct2_scope}/linear_2", out)
        else:
            self.fused(f"{ct2_scope}/linear_0", [q, k, v])
            self.linear(f"{ct2_scope}/linear_1", out)


def ct2_to_hf_state_dict(
    variables: dict[str, np.ndarray], *, dtype: str = "float32"
) -> tuple[dict[str, np.ndarray], bool]:
    """Rename CT2 Whisper variables to ``WhisperForConditionalGeneration`` keys.

    Args:
        variables: Output of :func:`resolve_variables`.
        dtype: numpy dtype name of the returned tensors.

    Returns:
        The HF state dict and whether ``proj_out`` is tied to the decoder
        token embedding (then ``proj_out.weight`` is left out, as in the
        official checkpoints).

    Raises:
        KeyError: If an expected variable is missing.
        ValueError: If the file holds weights this mapping does not know
            (e.g. lite-whisper low-rank layers), so none are silently lost.
    """
    m = _Mapper(variables, dtype)

    m.copy("encoder/conv1/weight", "model.encoder.conv1.weight")
    m.copy("encoder/conv1/bias", "model.encoder.conv1.bias")
    m.copy("encoder/conv2/weight", "model.encoder.conv2.weight")
    m.copy("encoder/conv2/bias", "model.encoder.conv2.bias")
    d_model = variables["encoder/conv2/weight"].shape[0]
    max_source_positions = 1500
    if "encoder/position_encodings/encodings" in variables:
        m.copy("encoder/position_encodings/encodings", "model.encoder.embed_positions.weight")
    else:
        # PositionEncoderSpec.encodings is optional: CT2 then builds them at
        # load time, so regenerate Whisper's fixed sinusoids.
        logger.info("encoder position encodings not stored; regenerating sinusoids")
        m.put("model.encoder.embed_positions.weight", sinusoids(max_source_positions, d_model))
    m.layer_norm("encoder/layer_norm", "model.encoder.layer_norm")
    for i in range(_count_layers(variables, "encoder")):
        ct2, hf = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        m.attention(f"{ct2}/self_attention", f"{hf}.self_attn", cross=False)
        m.layer_norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        m.linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
        m.linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
        m.layer_norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")

    m.copy("decoder/embeddings/weight", "model.decoder.embed_tokens.weight")
    m.copy("decoder/position_encodings/encodings", "model.decoder.embed_positions.weight")
    m.layer_norm("decoder/layer_norm", "model.decoder.layer_norm")
    for i in range(_count_layers(variables, "decoder")):
        ct2, hf = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        m.attention(f"{ct2}/self_attention", f"{hf}.self_attn", cross=False)
        m.layer_norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        m.attention(f"{ct2}/attention", f"{hf}.encoder_attn", cross=True)
        m.layer_norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
        m.linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
        m.linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
        m.layer_norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")

    if "decoder/projection/bias" in variables:
        raise ValueError("decoder/projection/bias is set but HF Whisper's proj_out has no bias")
    projection = m.take("decoder/projection/weight")
    embeddings = variables["decoder/embeddings/weight"]
    # CT2 stores the tied projection as an alias of the embedding; compare
    # values anyway in case a fine-tune untied them.
    tied = projection is embeddings or (
        projection.shape == embeddings.shape and np.array_equal(projection, embeddings)
    )
    if not tied:
        m.put("proj_out.weight", projection)

    leftovers = sorted(n for n, v in variables.items() if n not in m.used and v.ndim > 0)
    if leftovers:
        raise ValueError(f"unmapped CTranslate2 weights: {leftovers[:10]}")
    return m.state, tied


def _scalar(variables: dict[str, np.ndarray], name: str) -> int | None:
    value = variables.get(name)
    return None if value is None or value.ndim else int(value)


def _check_architecture(variables: dict[str, np.ndarray], spec_name: str) -> None:
    if spec_name and spec_name != "WhisperSpec":
        raise ValueError(f"not a Whisper model: CTranslate2 spec is {spec_name!r}")
    activation = _scalar(variables, "decoder/activation")
    if activation is not None and activation != CT2_ACTIVATION_GELU:
        raise ValueError(f"decoder activation id {activation} is not GELU")
    if _scalar(variables, "decoder/pre_norm") == 0:
        raise ValueError("post-norm decoder is not a Whisper architecture")
    if _scalar(variables, "decoder/scale_embeddings"):
        raise ValueError("scaled decoder embeddings are not a Whisper architecture")


def build_config(variables: dict[str, np.ndarray], tokens: dict[str, int], tied: bool) -> dict[str, Any]:
    """Build a ``WhisperConfig`` dict from CT2 weight shapes and scalars.

    Args:
        variables: Output of :func:`resolve_variables`.
        tokens: Special token content to id (see :func:`special_token_ids`).
        tied: Whether ``proj_out`` shares the decoder embedding.

    Returns:
        A JSON-serialisable dict for ``config.json``.
    """
    conv1 = variables["encoder/conv1/weight"]
    d_model, num_mel_bins = int(conv1.shape[0]), int(conv1.shape[1])
    vocab_size = int(variables["decoder/embeddings/weight"].shape[0])
    default_heads = d_model // WHISPER_HEAD_DIM
    encoder_heads = _scalar(variables, "encoder/num_heads") or default_heads
    decoder_heads = _scalar(variables, "decoder/num_heads") or default_heads
    encoder_layers = _count_layers(variables, "encoder")
    decoder_layers = _count_layers(variables, "decoder")
    encodings = variables.get("encoder/position_encodings/encodings")
    eot = tokens["<|endoftext|>"]
    return {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "activation_function": "gelu",
        "d_model": d_model,
        "num_mel_bins": num_mel_bins,
        "vocab_size": vocab_size,
        "encoder_layers": encoder_layers,
        "encoder_attention_heads": encoder_heads,
        "encoder_ffn_dim": int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "decoder_layers": decoder_layers,
        "decoder_attention_heads": decoder_heads,
        "decoder_ffn_dim": int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "max_source_positions": int(encodings.shape[0]) if encodings is not None else 1500,
        "max_target_positions": int(variables["decoder/position_encodings/encodings"].shape[0]),
        "scale_embedding": False,
        "tie_word_embeddings": tied,
        "is_encoder_decoder": True,
        "use_cache": True,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0,
        "decoder_layerdrop": 0.0,
        "init_std": 0.02,
        "median_filter_width": 7,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": tokens["<|startoftranscript|>"],
    }


def special_token_ids(tokenizer_json: dict[str, Any]) -> dict[str, int]:
    """Map each added (special) token of a ``tokenizer.json`` to its id.

    Args:
        tokenizer_json: Parsed Hugging Face ``tokenizer.json``.

    Returns:
        Token content to id, in id order.

    Raises:
        ValueError: If a token Whisper generation needs is missing.
    """
    added = sorted(tokenizer_json.get("added_tokens", []), key=lambda t: t["id"])
    tokens = {t["content"]: int(t["id"]) for t in added}
    required = ("<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>",
                "<|startofprev|>", "<|notimestamps|>")
    missing = [t for t in required if t not in tokens]
    if missing:
        raise ValueError(f"tokenizer.json lacks Whisper special tokens {missing}")
    return tokens


def build_generation_config(
    ct2_config: dict[str, Any], tokens: dict[str, int], model_config: dict[str, Any]
) -> dict[str, Any]:
    """Build ``generation_config.json`` as ``WhisperGenerationMixin`` expects it.

    transformers reads ``lang_to_id``/``task_to_id`` for ``language=``/``task=``,
    ``no_timestamps_token_id`` for timestamps, ``is_multilingual``,
    ``alignment_heads`` for token timestamps and ``prev_sot_token_id`` for
    prompts (models/whisper/generation_whisper.py).

    Args:
        ct2_config: CT2's ``config.json`` (suppress_ids, suppress_ids_begin,
            lang_ids, alignment_heads).
        tokens: Output of :func:`special_token_ids`.
        model_config: Output of :func:`build_config`.

    Returns:
        A JSON-serialisable dict.
    """
    id_to_token = {i: t for t, i in tokens.items()}
    eot = tokens["<|endoftext|>"]
    multilingual = model_config["vocab_size"] >= MULTILINGUAL_MIN_VOCAB
    generation: dict[str, Any] = {
        "decoder_start_token_id": tokens["<|startoftranscript|>"],
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "max_length": model_config["max_target_positions"],
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin") or [220, eot]),
        "suppress_tokens": list(ct2_config.get("suppress_ids") or []),
        "no_timestamps_token_id": tokens["<|notimestamps|>"],
        "prev_sot_token_id": tokens["<|startofprev|>"],
        # openai/whisper decoding.py: first timestamp at most 1.0 s (50 x 20 ms).
        "max_initial_timestamp_index": 50,
        "is_multilingual": multilingual,
    }
    heads = ct2_config.get("alignment_heads")
    if not heads:
        # Same default as CT2's WhisperLoader: every head of the last half.
        layers, num_heads = model_config["decoder_layers"], model_config["decoder_attention_heads"]
        heads = [[layer, head] for layer in range(layers // 2, layers) for head in range(num_heads)]
    generation["alignment_heads"] = [list(map(int, pair)) for pair in heads]

    if multilingual:
        lang_ids = ct2_config.get("lang_ids") or [
            i for t, i in tokens.items() if _LANG_TOKEN_RE.match(t)
        ]
        generation["lang_to_id"] = {id_to_token[i]: int(i) for i in sorted(lang_ids)}
        generation["task_to_id"] = {
            "transcribe": tokens["<|transcribe|>"],
            "translate": tokens["<|translate|>"],
        }
        # Without a task, generate() would detect the language but append no
        # task token; the official checkpoints default to transcription via
        # forced_decoder_ids, which transformers now deprecates in favour of this.
        generation["task"] = "transcribe"
    return generation


def build_tokenizer_config(tokens: dict[str, int], max_target_positions: int) -> dict[str, Any]:
    """Build ``tokenizer_config.json`` for ``WhisperTokenizer``/``WhisperTokenizerFast``.

    Args:
        tokens: Output of :func:`special_token_ids`.
        max_target_positions: Decoder context length.

    Returns:
        A JSON-serialisable dict.
    """
    eot = "<|endoftext|>"
    return {
        "tokenizer_class": "WhisperTokenizer",
        "processor_class": "WhisperProcessor",
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "pad_token": eot,
        # In id order: WhisperTokenizer takes all_special_ids[-1] + 1 as the
        # first timestamp id when decoding offsets.
        "additional_special_tokens": [t for t in tokens if t != eot],
        "add_prefix_space": False,
        # faster-whisper decodes without HF's "clean up" (" ." -> "."), keep parity.
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": max_target_positions,
    }


def build_preprocessor_config(num_mel_bins: int) -> dict[str, Any]:
    """Build ``preprocessor_config.json`` for ``WhisperFeatureExtractor``.

    Args:
        num_mel_bins: Mel channels the encoder expects (80, or 128 for large-v3).

    Returns:
        A JSON-serialisable dict.
    """
    n_samples = CHUNK_LENGTH * SAMPLING_RATE
    return {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "processor_class": "WhisperProcessor",
        "feature_size": num_mel_bins,
        "sampling_rate": SAMPLING_RATE,
        "n_fft": N_FFT,
        "hop_length": HOP_LENGTH,
        "chunk_length": CHUNK_LENGTH,
        "n_samples": n_samples,
        "nb_max_frames": n_samples // HOP_LENGTH,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert(src: str | Path, dst: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Convert a CTranslate2 Whisper directory into a transformers Whisper directory.

    Args:
        src: CT2 model directory (``model.bin``, ``config.json``, ``tokenizer.json``),
            e.g. a faster-whisper checkpoint.
        dst: Output directory; created if needed. Files are assembled in a
            temporary sibling directory first so a failed run leaves no
            half-written model that looks complete.
        dtype: Weight dtype in ``model.safetensors``: ``"float32"`` (default;
            CT2's float16 weights widen exactly) or ``"float16"``.
        overwrite: Replace same-named files in a non-empty ``dst``.

    Returns:
        The output directory.

    Raises:
        FileNotFoundError: If a required source file is missing.
        FileExistsError: If ``dst`` is non-empty and ``overwrite`` is false.
        ValueError: If the source is not a Whisper model this converter maps
            completely, or ``dtype`` is unsupported.
    """
    from safetensors.numpy import save_file

    src, dst = Path(src), Path(dst)
    if dtype not in TARGET_DTYPES:
        raise ValueError(f"dtype must be one of {TARGET_DTYPES}, got {dtype!r}")
    for name in ("model.bin", "config.json", "tokenizer.json"):
        if not (src / name).is_file():
            raise FileNotFoundError(src / name)
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} is not empty (pass overwrite=True / --overwrite)")

    model = read_ct2_model(src / "model.bin")
    logger.info(
        "read %s: binary v%d, %s rev %d, %d variables, %d aliases",
        src / "model.bin", model.binary_version, model.spec_name, model.spec_revision,
        len(model.variables), len(model.aliases),
    )
    variables = resolve_variables(model)
    _check_architecture(variables, model.spec_name)

    ct2_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    tokenizer_json = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tokens = special_token_ids(tokenizer_json)

    state, tied = ct2_to_hf_state_dict(variables, dtype=dtype)
    for name, value in state.items():
        logger.debug("%s %s", name, value.shape)
    config = build_config(variables, tokens, tied)
    config["dtype"] = dtype
    generation = build_generation_config(ct2_config, tokens, config)
    tokenizer_config = build_tokenizer_config(tokens, config["max_target_positions"])
    special_tokens_map = {
        key: tokenizer_config[key]
        for key in ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")
    }

    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dst.name}.", dir=dst.parent) as tmp:
        staging = Path(tmp)
        # "format": "pt" is required by transformers' safetensors loader.
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        _write_json(staging / "config.json", config)
        _write_json(staging / "generation_config.json", generation)
        _write_json(staging / "preprocessor_config.json", build_preprocessor_config(config["num_mel_bins"]))
        _write_json(staging / "tokenizer_config.json", tokenizer_config)
        _write_json(staging / "special_tokens_map.json", special_tokens_map)
        shutil.copyfile(src / "tokenizer.json", staging / "tokenizer.json")
        # safetensors creates its file 0600; give it the umask-derived mode of
        # the other files so a service running as another user can read it.
        (staging / "model.safetensors").chmod((staging / "config.json").stat().st_mode & 0o777)
        dst.mkdir(exist_ok=True)
        for path in staging.iterdir():
            path.replace(dst / path.name)

    logger.info(
        "wrote %s: %d tensors (%s), d_model=%d, layers=%d+%d, heads=%d/%d, mels=%d, vocab=%d, tied=%s",
        dst, len(state), dtype, config["d_model"], config["encoder_layers"], config["decoder_layers"],
        config["encoder_attention_heads"], config["decoder_attention_heads"], config["num_mel_bins"],
        config["vocab_size"], tied,
    )
    return dst


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        Process exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="CTranslate2 Whisper model directory")
    parser.add_argument("dst", type=Path, help="output Hugging Face model directory")
    parser.add_argument("--dtype", choices=TARGET_DTYPES, default="float32", help="weight dtype (default float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace files in a non-empty DST")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        out = convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    except (OSError, ValueError, KeyError) as exc:
        logger.error("conversion failed: %s", exc)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
