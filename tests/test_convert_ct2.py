"""Tests for runtime_envs/convert_ct2.py (CTranslate2 Whisper -> transformers).

The fast tests need only numpy and run in the ingress venv. The slow test
converts the real faster-whisper checkpoint with the belle2 venv (which has
torch/transformers), transcribes with the result there, and compares with
faster-whisper on the original CT2 model in this process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONVERTER = ROOT / "runtime_envs" / "convert_ct2.py"
BELLE2_VENV = Path(os.environ.get("KLIPNOTE_VENV_BELLE2", ROOT / ".venvs" / "belle2"))
BELLE2_PYTHON = BELLE2_VENV / "bin" / "python"
CT2_MODEL = Path(os.environ.get("KLIPNOTE_MODEL_CT2", ROOT / "models" / "faster-whisper-base"))
EN_CLIP = ROOT / "tests" / "data" / "en_jfk.flac"
ZH_CLIP = ROOT / "tests" / "data" / "zh_paddlespeech_zh.flac"


def _load_converter():
    spec = importlib.util.spec_from_file_location("convert_ct2", CONVERTER)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the defining module up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cc = _load_converter()


# --- a CT2 model.bin writer, written from model_spec.ModelSpec._serialize -------------

_TYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}


def _write_string(out, text: str) -> None:
    out.write(struct.pack("H", len(text) + 1))
    out.write(text.encode("utf-8"))
    out.write(struct.pack("B", 0))


def write_ct2_model(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str],
                    spec_name: str = "WhisperSpec", revision: int = 3) -> None:
    with open(path, "wb") as out:
        out.write(struct.pack("I", 6))
        _write_string(out, spec_name)
        out.write(struct.pack("I", revision))
        out.write(struct.pack("I", len(variables)))
        for name, value in sorted(variables.items()):
            value = np.asarray(value)
            _write_string(out, name)
            out.write(struct.pack("B", value.ndim))
            for dim in value.shape:
                out.write(struct.pack("I", dim))
            out.write(struct.pack("B", _TYPE_IDS[value.dtype.name]))
            out.write(struct.pack("I", value.nbytes))
            out.write(np.ascontiguousarray(value).tobytes())
        out.write(struct.pack("I", len(aliases)))
        for alias, target in sorted(aliases.items()):
            _write_string(out, alias)
            _write_string(out, target)


def _quantize_int8(value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Same arithmetic as LayerSpec._quantize for "int8".
    amax = np.amax(np.absolute(value), axis=1)
    amax[amax == 0] = 127.0
    scale = (127.0 / amax).astype(np.float32)
    return np.rint(value * np.expand_dims(scale, 1)).astype(np.int8), scale


def make_tiny_whisper(rng: np.random.Generator, *, d: int = 8, ffn: int = 16, mels: int = 4,
                      vocab: int = 12, enc_layers: int = 1, dec_layers: int = 2, heads: int = 2):
    """Return (CT2 variables, aliases, separate q/k/v per layer) of a tiny Whisper."""

    def arr(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    v: dict[str, np.ndarray] = {
        "encoder/conv1/weight": arr(d, mels, 3), "encoder/conv1/bias": arr(d),
        "encoder/conv2/weight": arr(d, d, 3), "encoder/conv2/bias": arr(d),
        "encoder/position_encodings/encodings": cc.sinusoids(6, d),
        "encoder/layer_norm/gamma": arr(d), "encoder/layer_norm/beta": arr(d),
        "encoder/num_heads": np.int16(heads),
        "decoder/embeddings/weight": arr(vocab, d),
        "decoder/position_encodings/encodings": arr(5, d),
        "decoder/layer_norm/gamma": arr(d), "decoder/layer_norm/beta": arr(d),
        "decoder/num_heads": np.int16(heads), "decoder/activation": np.int8(3),
        "decoder/pre_norm": np.int8(1), "decoder/scale_embeddings": np.int8(0),
    }
    parts = {}

    def add_block(scope: str, cross: bool):
        q, k, val, o = arr(d, d), arr(d, d), arr(d, d), arr(d, d)
        qb, vb, ob = arr(d), arr(d), arr(d)
        parts[scope] = dict(q=q, k=k, v=val, qb=qb, vb=vb)
        zeros = np.zeros(d, np.float32)  # fuse_linear's stand-in for HF's missing k bias
        if cross:
            v[f"{scope}/linear_0/weight"], v[f"{scope}/linear_0/bias"] = q, qb
            v[f"{scope}/linear_1/weight"] = np.concatenate([k, val])
            v[f"{scope}/linear_1/bias"] = np.concatenate([zeros, vb])
            v[f"{scope}/linear_2/weight"], v[f"{scope}/linear_2/bias"] = o, ob
        else:
            v[f"{scope}/linear_0/weight"] = np.concatenate([q, k, val])
            v[f"{scope}/linear_0/bias"] = np.concatenate([qb, zeros, vb])
            v[f"{scope}/linear_1/weight"], v[f"{scope}/linear_1/bias"] = o, ob
        v[f"{scope}/layer_norm/gamma"], v[f"{scope}/layer_norm/beta"] = arr(d), arr(d)

    def add_ffn(scope: str):
        v[f"{scope}/linear_0/weight"], v[f"{scope}/linear_0/bias"] = arr(ffn, d), arr(ffn)
        v[f"{scope}/linear_1/weight"], v[f"{scope}/linear_1/bias"] = arr(d, ffn), arr(d)
        v[f"{scope}/layer_norm/gamma"], v[f"{scope}/layer_norm/beta"] = arr(d), arr(d)

    for i in range(enc_layers):
        add_block(f"encoder/layer_{i}/self_attention", cross=False)
        add_ffn(f"encoder/layer_{i}/ffn")
    for i in range(dec_layers):
        add_block(f"decoder/layer_{i}/self_attention", cross=False)
        add_block(f"decoder/layer_{i}/attention", cross=True)
        add_ffn(f"decoder/layer_{i}/ffn")
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    return v, aliases, parts


# --- fast, numpy-only tests ---------------------------------------------------------


def test_split_fused_inverts_concatenation():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((4, 3)) for _ in range(3))
    got = cc.split_fused(np.concatenate([q, k, v]), 3)
    assert len(got) == 3
    for expected, actual in zip((q, k, v), got):
        np.testing.assert_array_equal(actual, expected)
    kb, vb = cc.split_fused(np.arange(8.0), 2)
    np.testing.assert_array_equal(kb, [0, 1, 2, 3])
    np.testing.assert_array_equal(vb, [4, 5, 6, 7])
    with pytest.raises(ValueError):
        cc.split_fused(np.zeros((7, 3)), 3)


def test_reader_round_trips_ct2_binary_layout(tmp_path):
    variables = {
        "decoder/embeddings/weight": np.arange(12, dtype=np.float16).reshape(3, 4) / 8,
        "encoder/conv1/weight": np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 4, 3),
        "decoder/num_heads": np.int16(8),
        "decoder/activation": np.int8(3),
        "decoder/alignment_layer": np.int16(-1),
        "some/int32": np.array([1, -2, 3], dtype=np.int32),
    }
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    path = tmp_path / "model.bin"
    write_ct2_model(path, variables, aliases, revision=3)

    model = cc.read_ct2_model(path)
    assert (model.binary_version, model.spec_name, model.spec_revision) == (6, "WhisperSpec", 3)
    assert model.aliases == aliases
    assert sorted(model.variables) == sorted(variables)
    for name, expected in variables.items():
        actual = model.variables[name]
        assert actual.dtype == expected.dtype, name
        assert actual.shape == np.shape(expected), name
        np.testing.assert_array_equal(actual, expected)

    resolved = cc.resolve_variables(model)
    assert resolved["decoder/projection/weight"] is resolved["decoder/embeddings/weight"]


def test_reader_rejects_truncated_and_trailing_data(tmp_path):
    path = tmp_path / "model.bin"
    write_ct2_model(path, {"a/weight": np.ones((4, 4), np.float16)}, {})
    raw = path.read_bytes()
    path.write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="truncated"):
        cc.read_ct2_model(path)
    path.write_bytes(raw + b"\0")
    with pytest.raises(ValueError, match="unexpected data"):
        cc.read_ct2_model(path)


def test_int8_weights_are_dequantized_including_aliased_scale():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((6, 5)).astype(np.float32)
    qweight, scale = _quantize_int8(weight)
    model = cc.Ct2Model(6, "WhisperSpec", 3,
                        {"decoder/embeddings/weight": qweight, "decoder/embeddings/weight_scale": scale},
                        {"decoder/projection/weight": "decoder/embeddings/weight"})
    resolved = cc.resolve_variables(model)
    assert not any(name.endswith("_scale") for name in resolved)
    for name in ("decoder/embeddings/weight", "decoder/projection/weight"):
        assert resolved[name].dtype == np.float32
        # Rounding to 127 levels per row bounds the error by half a step.
        step = np.abs(weight).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(resolved[name] - weight) <= step / 2 + 1e-6), name


def test_state_dict_mapping_splits_attention_and_ties_projection():
    rng = np.random.default_rng(2)
    variables, aliases, parts = make_tiny_whisper(rng)
    model = cc.Ct2Model(6, "WhisperSpec", 3, variables, aliases)
    state, tied = cc.ct2_to_hf_state_dict(cc.resolve_variables(model))

    assert tied and "proj_out.weight" not in state
    enc = parts["encoder/layer_0/self_attention"]
    np.testing.assert_array_equal(state["model.encoder.layers.0.self_attn.q_proj.weight"], enc["q"])
    np.testing.assert_array_equal(state["model.encoder.layers.0.self_attn.k_proj.weight"], enc["k"])
    np.testing.assert_array_equal(state["model.encoder.layers.0.self_attn.v_proj.weight"], enc["v"])
    np.testing.assert_array_equal(state["model.encoder.layers.0.self_attn.q_proj.bias"], enc["qb"])
    np.testing.assert_array_equal(state["model.encoder.layers.0.self_attn.v_proj.bias"], enc["vb"])
    assert "model.encoder.layers.0.self_attn.k_proj.bias" not in state
    cross = parts["decoder/layer_1/attention"]
    np.testing.assert_array_equal(state["model.decoder.layers.1.encoder_attn.q_proj.weight"], cross["q"])
    np.testing.assert_array_equal(state["model.decoder.layers.1.encoder_attn.k_proj.weight"], cross["k"])
    np.testing.assert_array_equal(state["model.decoder.layers.1.encoder_attn.v_proj.weight"], cross["v"])
    np.testing.assert_array_equal(state["model.decoder.layers.1.encoder_attn.v_proj.bias"], cross["vb"])
    assert "model.decoder.layers.1.encoder_attn.k_proj.bias" not in state
    np.testing.assert_array_equal(state["model.encoder.conv1.weight"], variables["encoder/conv1/weight"])
    np.testing.assert_array_equal(state["model.decoder.layers.0.final_layer_norm.weight"],
                                  variables["decoder/layer_0/ffn/layer_norm/gamma"])
    np.testing.assert_array_equal(state["model.decoder.embed_positions.weight"],
                                  variables["decoder/position_encodings/encodings"])
    # 4 conv + enc pos + 2 enc ln + 15 per enc layer; tok + pos + 2 ln + 24 per dec layer.
    assert len(state) == 4 + 1 + 2 + 15 * 1 + 2 + 2 + 24 * 2
    assert all(value.dtype == np.float32 and value.flags.c_contiguous for value in state.values())

    tokens = {"<|endoftext|>": 9, "<|startoftranscript|>": 10}
    config = cc.build_config(cc.resolve_variables(model), tokens, tied)
    assert (config["d_model"], config["num_mel_bins"], config["vocab_size"]) == (8, 4, 12)
    assert (config["encoder_layers"], config["decoder_layers"]) == (1, 2)
    assert (config["encoder_attention_heads"], config["decoder_ffn_dim"]) == (2, 16)
    assert (config["max_source_positions"], config["max_target_positions"]) == (6, 5)
    assert config["decoder_start_token_id"] == 10 and config["eos_token_id"] == 9


def test_mapping_regenerates_missing_encoder_positions_and_unties_projection():
    rng = np.random.default_rng(3)
    variables, _, _ = make_tiny_whisper(rng, d=8)
    del variables["encoder/position_encodings/encodings"]
    variables["decoder/projection/weight"] = variables["decoder/embeddings/weight"] + 1
    state, tied = cc.ct2_to_hf_state_dict(variables, dtype="float16")
    assert not tied
    np.testing.assert_array_equal(state["proj_out.weight"], (variables["decoder/projection/weight"]).astype(np.float16))
    np.testing.assert_array_equal(state["model.encoder.embed_positions.weight"],
                                  cc.sinusoids(1500, 8).astype(np.float16))


def test_mapping_refuses_unknown_weights():
    rng = np.random.default_rng(4)
    variables, aliases, _ = make_tiny_whisper(rng)
    variables["encoder/layer_0/self_attention/linear_0/weight_u"] = np.ones((2, 2), np.float32)
    resolved = cc.resolve_variables(cc.Ct2Model(6, "WhisperSpec", 3, variables, aliases))
    with pytest.raises(ValueError, match="unmapped"):
        cc.ct2_to_hf_state_dict(resolved)


def _tokens(first_special: int, languages: list[str]) -> dict[str, int]:
    names = ["<|endoftext|>", "<|startoftranscript|>", *[f"<|{lang}|>" for lang in languages],
             "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
             "<|notimestamps|>"]
    return {name: first_special + i for i, name in enumerate(names)}


def test_generation_config_multilingual_and_english_only():
    tokens = _tokens(50257, ["en", "zh", "de"])
    model_config = {"vocab_size": 51865, "max_target_positions": 448, "decoder_layers": 6,
                    "decoder_attention_heads": 8}
    ct2_config = {"suppress_ids": [1, 2], "suppress_ids_begin": [220, 50257],
                  "lang_ids": [50259, 50260], "alignment_heads": [[3, 1], [5, 6]]}
    gen = cc.build_generation_config(ct2_config, tokens, model_config)
    assert gen["lang_to_id"] == {"<|en|>": 50259, "<|zh|>": 50260}
    assert gen["task_to_id"] == {"transcribe": 50263, "translate": 50262}
    assert gen["no_timestamps_token_id"] == 50267 and gen["prev_sot_token_id"] == 50265
    assert gen["decoder_start_token_id"] == 50258 and gen["eos_token_id"] == 50257
    assert gen["is_multilingual"] is True
    assert gen["suppress_tokens"] == [1, 2] and gen["begin_suppress_tokens"] == [220, 50257]
    assert gen["alignment_heads"] == [[3, 1], [5, 6]]
    assert gen["max_length"] == 448 and gen["max_initial_timestamp_index"] == 50

    english = cc.build_generation_config(
        {"suppress_ids": [1], "suppress_ids_begin": [220, 50256], "lang_ids": []},
        _tokens(50256, ["en"]), dict(model_config, vocab_size=51864, decoder_layers=4))
    assert english["is_multilingual"] is False
    assert "lang_to_id" not in english and "task_to_id" not in english
    assert english["decoder_start_token_id"] == 50257 and english["eos_token_id"] == 50256
    # CT2's default when alignment heads are unknown: all heads of the last half.
    assert english["alignment_heads"] == [[layer, head] for layer in (2, 3) for head in range(8)]


def test_tokenizer_config_lists_specials_in_id_order():
    tokens = _tokens(50257, ["en", "zh"])
    config = cc.build_tokenizer_config(tokens, 448)
    extra = config["additional_special_tokens"]
    assert extra[0] == "<|startoftranscript|>" and extra[-1] == "<|notimestamps|>"
    assert [tokens[t] for t in extra] == sorted(tokens[t] for t in extra)
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>"
    assert cc.build_preprocessor_config(128)["feature_size"] == 128


@pytest.mark.skipif(not (CT2_MODEL / "model.bin").is_file(), reason=f"no CT2 model at {CT2_MODEL}")
def test_real_checkpoint_maps_completely():
    model = cc.read_ct2_model(CT2_MODEL / "model.bin")
    variables = cc.resolve_variables(model)
    state, tied = cc.ct2_to_hf_state_dict(variables)
    assert tied
    tokens = cc.special_token_ids(json.loads((CT2_MODEL / "tokenizer.json").read_text(encoding="utf-8")))
    config = cc.build_config(variables, tokens, tied)
    d, layers = config["d_model"], config["encoder_layers"]
    assert state["model.encoder.conv1.weight"].shape == (d, config["num_mel_bins"], 3)
    assert state["model.decoder.embed_tokens.weight"].shape == (config["vocab_size"], d)
    assert state["model.encoder.layers.0.self_attn.k_proj.weight"].shape == (d, d)
    assert config["encoder_attention_heads"] * 64 == d
    assert len(state) == 4 + 1 + 2 + 15 * layers + 2 + 2 + 24 * config["decoder_layers"]
    # The stored encoder positions are Whisper's sinusoids, stored at CT2's precision.
    stored = variables["encoder/position_encodings/encodings"]
    expected = cc.sinusoids(*stored.shape).astype(stored.dtype)
    np.testing.assert_allclose(stored.astype(np.float32), expected.astype(np.float32), atol=1e-3)


# --- slow end-to-end parity test -------------------------------------------------------

# Runs in the belle2 venv: prints the transformers transcripts as JSON.
HF_TRANSCRIBE = r"""
import json, sys
import torch
from faster_whisper import decode_audio
from transformers import WhisperForConditionalGeneration, WhisperProcessor

torch.set_num_threads(2)
model_dir, en_clip, zh_clip = sys.argv[1:4]
processor = WhisperProcessor.from_pretrained(model_dir)
model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()

def features(path):
    audio = decode_audio(path, sampling_rate=16000)
    return processor(audio, sampling_rate=16000, return_tensors="pt").input_features

out = {"tokenizer": type(processor.tokenizer).__name__}
en = features(en_clip)
with torch.inference_mode():
    for beams in (1, 5):
        ids = model.generate(en, language="en", task="transcribe", num_beams=beams, do_sample=False)
        out[f"beam{beams}"] = processor.batch_decode(ids, skip_special_tokens=True)[0]
    ids = model.generate(features(zh_clip), language="zh", task="transcribe", return_timestamps=True)
    decoded = processor.tokenizer.decode(ids[0], output_offsets=True, skip_special_tokens=True)
    out["zh_text"] = decoded["text"]
    out["zh_offsets"] = [[o["timestamp"][0], o["timestamp"][1], o["text"]] for o in decoded["offsets"]]
print(json.dumps(out, ensure_ascii=False))
"""


def _belle2_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2")
    env.pop("PYTHONPATH", None)
    return env


def _faster_whisper_texts(beam_sizes: tuple[int, ...]) -> dict[int, str]:
    from faster_whisper import WhisperModel, decode_audio

    # float32 so CT2 computes at the precision the converted HF model uses.
    model = WhisperModel(str(CT2_MODEL), device="cpu", compute_type="float32", cpu_threads=2)
    audio = decode_audio(str(EN_CLIP), sampling_rate=16000)
    texts = {}
    for beam_size in beam_sizes:
        segments, _ = model.transcribe(
            audio, language="en", beam_size=beam_size, temperature=0.0, without_timestamps=True,
            condition_on_previous_text=False, vad_filter=False,
        )
        texts[beam_size] = "".join(segment.text for segment in segments)
    return texts


@pytest.mark.slow
def test_converted_model_transcribes_like_faster_whisper(tmp_path):
    if not BELLE2_PYTHON.is_file():
        pytest.skip(f"belle2 venv not found at {BELLE2_VENV} (set KLIPNOTE_VENV_BELLE2)")
    if not (CT2_MODEL / "model.bin").is_file():
        pytest.skip(f"CT2 model not found at {CT2_MODEL} (set KLIPNOTE_MODEL_CT2)")
    pytest.importorskip("faster_whisper")

    hf_dir = tmp_path / "whisper-hf"
    converted = subprocess.run(
        [str(BELLE2_PYTHON), str(CONVERTER), str(CT2_MODEL), str(hf_dir)],
        env=_belle2_env(), capture_output=True, text=True, timeout=600,
    )
    assert converted.returncode == 0, converted.stderr
    assert converted.stdout.strip() == str(hf_dir)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"):
        assert (hf_dir / name).is_file(), name

    transcribed = subprocess.run(
        [str(BELLE2_PYTHON), "-c", HF_TRANSCRIBE, str(hf_dir), str(EN_CLIP), str(ZH_CLIP)],
        env=_belle2_env(), capture_output=True, text=True, timeout=600,
    )
    assert transcribed.returncode == 0, transcribed.stderr
    hf = json.loads(transcribed.stdout.strip().splitlines()[-1])

    assert hf["tokenizer"] == "WhisperTokenizer"
    for beams, text in _faster_whisper_texts((1, 5)).items():
        expected = text.strip()
        assert expected, "faster-whisper produced no text"
        assert hf[f"beam{beams}"].strip() == expected, f"beam {beams}"

    # Timestamped multilingual decoding: segments in order inside the clip, CJK text.
    offsets = hf["zh_offsets"]
    assert offsets, hf
    assert all(0.0 <= start <= end <= 30.0 for start, end, _ in offsets)
    assert [o[0] for o in offsets] == sorted(o[0] for o in offsets)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in hf["zh_text"])
