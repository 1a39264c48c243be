"""GGUF import: the real SmolLM2 file against transformers' own GGUF loader, tiny files built
with gguf.GGUFWriter that must round-trip exactly, and damaged files that must be refused
before anything is written."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch
from tokenizers import Tokenizer
from volunteer.models.config import ModelConfig, RopeScaling
from volunteer.models.errors import CheckpointError, ModelConfigError, UnsupportedArchitectureError
from volunteer.models.gguf_file import read_gguf
from volunteer.models.gguf_import import import_gguf

LAYERS, HIDDEN, HEADS, KV_HEADS, FFN = 2, 64, 4, 2, 256
HEAD_DIM, VOCAB = HIDDEN // HEADS, 128
Q, KV = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
# HF name -> (GGUF name, shape), spelled out here independently of the importer.
END_NAMES = {
    "model.embed_tokens.weight": ("token_embd.weight", (VOCAB, HIDDEN)),
    "model.norm.weight": ("output_norm.weight", (HIDDEN,)),
    "lm_head.weight": ("output.weight", (VOCAB, HIDDEN)),
}
BLOCK_NAMES = {
    "input_layernorm.weight": ("attn_norm.weight", (HIDDEN,)),
    "self_attn.q_proj.weight": ("attn_q.weight", (Q, HIDDEN)),
    "self_attn.k_proj.weight": ("attn_k.weight", (KV, HIDDEN)),
    "self_attn.v_proj.weight": ("attn_v.weight", (KV, HIDDEN)),
    "self_attn.q_proj.bias": ("attn_q.bias", (Q,)),  # biases: qwen2 only
    "self_attn.k_proj.bias": ("attn_k.bias", (KV,)),
    "self_attn.v_proj.bias": ("attn_v.bias", (KV,)),
    "self_attn.o_proj.weight": ("attn_output.weight", (HIDDEN, Q)),
    "post_attention_layernorm.weight": ("ffn_norm.weight", (HIDDEN,)),
    "mlp.gate_proj.weight": ("ffn_gate.weight", (FFN, HIDDEN)),
    "mlp.up_proj.weight": ("ffn_up.weight", (FFN, HIDDEN)),
    "mlp.down_proj.weight": ("ffn_down.weight", (HIDDEN, FFN)),
}
# Byte offsets of the float16 scales in one block of each K-quant (ggml-common.h).
K_QUANT_SCALE_OFFSETS = {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2)}
K_QUANT_SCALE_OFFSETS[QT.Q6_K] = (208,)
# Worst-case error of a round trip through each type, for weights in [-1, 1] (the
# symmetric 4- and 5-bit types clip the side opposite the largest value by one step).
QUANT_ATOL = {QT.F16: 1e-3, QT.BF16: 1e-2, QT.Q8_0: 1e-2, QT.Q5_0: 0.07, QT.Q5_1: 0.05}
QUANT_ATOL |= {QT.Q4_0: 0.13, QT.Q4_1: 0.1}


def hf_weights(arch: str, *, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    blocks = {f"model.layers.{i}.{n}": v for i in range(LAYERS) for n, v in BLOCK_NAMES.items()}
    shapes = {name: shape for name, (_, shape) in (END_NAMES | blocks).items()}
    if tied:
        del shapes["lm_head.weight"]
    if arch != "qwen2":
        shapes = {name: shape for name, shape in shapes.items() if not name.endswith("bias")}
    rng = np.random.default_rng(seed)
    return {name: rng.uniform(-1, 1, shape).astype(np.float32) for name, shape in shapes.items()}


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (LlamaModel.permute)."""
    rest = weight.shape[1:]
    per_head = weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *rest)
    return per_head.swapaxes(1, 2).reshape(weight.shape)


def to_gguf(hf: dict[str, np.ndarray], arch: str) -> dict[str, np.ndarray]:
    """Renames HF tensors to GGUF names, permuting q/k rows the way llama.cpp does for llama."""
    out = {}
    for name, value in hf.items():
        if name in END_NAMES:
            out[END_NAMES[name][0]] = value
            continue
        _, _, index, rest = name.split(".", 3)
        if arch == "llama" and rest.startswith(("self_attn.q_proj", "self_attn.k_proj")):
            value = llama_cpp_permute(value, HEADS if "q_proj" in rest else KV_HEADS)
        out[f"blk.{index}.{BLOCK_NAMES[rest][0]}"] = value
    return out


def metadata(arch: str) -> dict[str, Any]:
    tokens = ["<|endoftext|>", "Ġ", *(chr(c) for c in range(33, 127)), "he"]
    tokens += [f"[PAD{i}]" for i in range(VOCAB - len(tokens))]
    return {
        f"{arch}.block_count": LAYERS,
        f"{arch}.context_length": 256,
        f"{arch}.embedding_length": HIDDEN,
        f"{arch}.feed_forward_length": FFN,
        f"{arch}.attention.head_count": HEADS,
        f"{arch}.attention.head_count_kv": KV_HEADS,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["h e"],
        "tokenizer.ggml.token_type": [3] + [1] * (VOCAB - 1),
        "tokenizer.ggml.eos_token_id": 0,
    }


def write_gguf(
    path: Path,
    arch: str,
    tensors: dict[str, np.ndarray],
    *,
    qtype: QT = QT.F32,
    meta: dict[str, Any] | None = None,
    raw: dict[str, tuple[np.ndarray, QT]] | None = None,
) -> Path:
    """Writes a GGUF file; 2-D tensors as `qtype`, `raw` ones as already-encoded bytes."""
    writer, raw = gguf.GGUFWriter(path, arch), raw or {}
    for key, value in (metadata(arch) if meta is None else meta).items():
        if isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, value in tensors.items():
        if name in raw:
            writer.add_tensor(name, raw[name][0], raw_dtype=raw[name][1])
        elif value.ndim == 2 and qtype != QT.F32:
            writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """The empty folder to import into."""
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


def tiny_file(
    tmp_path: Path, arch: str = "llama", *, tied: bool = True, **kwargs: Any
) -> tuple[dict[str, np.ndarray], Path]:
    """HF weights and the GGUF file llama.cpp would make of them."""
    hf = hf_weights(arch, tied=tied)
    return hf, write_gguf(tmp_path / "m.gguf", arch, to_gguf(hf, arch), **kwargs)


@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("qwen2", True)])
def test_f32_round_trip_is_exact(tmp_path: Path, out: Path, arch: str, tied: bool) -> None:
    hf, path = tiny_file(tmp_path, arch, tied=tied)
    calls: list[tuple[int, int]] = []
    config = import_gguf(path, out, progress=lambda done, total: calls.append((done, total)))
    ours = load_file(out / "model.safetensors")
    assert sorted(ours) == sorted(hf)
    for name, value in hf.items():
        assert ours[name].dtype == np.float32
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    assert config.arch == arch and config.tie_word_embeddings is tied
    assert config.qkv_bias is (arch == "qwen2")
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    assert ModelConfig.from_hf_folder(out) == config
    assert calls == [(i, len(hf)) for i in range(len(hf) + 1)]
    encoded = Tokenizer.from_file(str(out / "tokenizer.json")).encode("he!").ids
    assert encoded == [96, 2]  # "he" merged, then "!"
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"


@pytest.mark.parametrize("qtype", list(QUANT_ATOL), ids=lambda t: t.name)
def test_quantized_matches_gguf_dequantize(tmp_path: Path, out: Path, qtype: QT) -> None:
    hf, path = tiny_file(tmp_path, tied=False, qtype=qtype)
    import_gguf(path, out)
    ours = load_file(out / "model.safetensors")
    for name, value in hf.items():
        # Blocks run along rows and the permutation only moves rows, so quantizing the HF
        # weight directly gives what the importer must return.
        expected = value  # norms stay F32
        if value.ndim == 2:
            expected = gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype)
        np.testing.assert_array_equal(ours[name], expected, err_msg=name)
        np.testing.assert_allclose(ours[name], value, atol=QUANT_ATOL[qtype], rtol=0)


def random_k_quant(shape: tuple[int, int], qtype: QT, rng: np.random.Generator) -> np.ndarray:
    block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (shape[0], shape[1] // block, type_bytes), dtype=np.uint8)
    for offset in K_QUANT_SCALE_OFFSETS[qtype]:  # finite scales: no inf * 0 warnings
        scales = rng.uniform(-0.1, 0.1, raw.shape[:2]).astype(np.float16)
        raw[:, :, offset : offset + 2] = scales[..., None].view(np.uint8)
    return raw.reshape(shape[0], -1)


@pytest.mark.parametrize("qtype", list(K_QUANT_SCALE_OFFSETS), ids=lambda t: t.name)
def test_k_quants_match_gguf_dequantize(tmp_path: Path, out: Path, qtype: QT) -> None:
    rng = np.random.default_rng(1)
    raw = [random_k_quant((HIDDEN, FFN), qtype, rng) for _ in range(LAYERS)]
    _, path = tiny_file(
        tmp_path, raw={f"blk.{i}.ffn_down.weight": (raw[i], qtype) for i in range(LAYERS)}
    )
    import_gguf(path, out)
    ours = load_file(out / "model.safetensors")
    for i in range(LAYERS):
        expected = gguf.quants.dequantize(raw[i], qtype)
        assert expected.shape == (HIDDEN, FFN)
        np.testing.assert_array_equal(ours[f"model.layers.{i}.mlp.down_proj.weight"], expected)


def test_shards_past_max_shard_bytes(tmp_path: Path, out: Path) -> None:
    hf, path = tiny_file(tmp_path, tied=False)
    import_gguf(path, out, max_shard_bytes=100_000)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1 and not (out / "model.safetensors").exists()
    assert sorted(weight_map) == sorted(hf)
    for name, value in hf.items():
        np.testing.assert_array_equal(load_file(out / weight_map[name])[name], value)


def test_failure_while_writing_removes_what_was_written(tmp_path: Path, out: Path) -> None:
    _, path = tiny_file(tmp_path)

    def progress(done: int, total: int) -> None:
        if done == 15:
            assert any(out.iterdir())  # some shards are already on disk
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_gguf(path, out, progress=progress, max_shard_bytes=50_000)
    assert list(out.iterdir()) == []


def llama_cpp_rope_freqs(factor: float = 8.0, low: float = 1.0, high: float = 4.0) -> np.ndarray:
    """The divisors llama.cpp's converter stores as rope_freqs for llama3 RoPE scaling."""
    original, divisors = 8192, []
    for i in range(0, HEAD_DIM, 2):
        wavelen = 2 * np.pi * 10000.0 ** (i / HEAD_DIM)
        if wavelen < original / high:
            divisors.append(1.0)
        elif wavelen > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    assert 1.0 < sorted(divisors)[-2] < factor  # the tiny head covers all three bands
    return np.array(divisors, dtype=np.float32)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path: Path, out: Path) -> None:
    tensors = to_gguf(hf_weights("llama", tied=True), "llama")
    tensors["rope_freqs.weight"] = llama_cpp_rope_freqs()
    config = import_gguf(write_gguf(tmp_path / "m.gguf", "llama", tensors), out)
    expected = RopeScaling("llama3", 8.0, 1.0, 4.0, original_max_position_embeddings=8192)
    assert config.rope_scaling == expected
    assert ModelConfig.from_hf_folder(out) == config
    assert not any("rope" in name for name in load_file(out / "model.safetensors"))


def test_read_gguf_gives_plain_metadata_and_torch_shapes(tmp_path: Path) -> None:
    hf, path = tiny_file(tmp_path)
    with read_gguf(path) as file:
        assert file.metadata["general.architecture"] == "llama"
        assert type(file.metadata["llama.block_count"]) is int
        assert type(file.metadata["llama.rope.freq_base"]) is float
        assert file.metadata["tokenizer.ggml.tokens"][:2] == ["<|endoftext|>", "Ġ"]
        assert file.tensors["blk.0.ffn_down.weight"].shape == (HIDDEN, FFN)
        np.testing.assert_array_equal(
            file.read_tensor("blk.1.ffn_up.weight"), hf["model.layers.1.mlp.up_proj.weight"]
        )
    with pytest.raises(CheckpointError, match="does not exist"):
        read_gguf(tmp_path / "nothing.gguf")


# ---- damaged and unsupported files: refused before anything is written -----------------


def put(data: bytearray, offset: int, fmt: str, value: int) -> bytearray:
    struct.pack_into(fmt, data, offset, value)
    return data


def after(data: bytearray, name: str) -> int:
    """Offset just past the first occurrence of `name` (a key or a tensor name)."""
    return data.index(name.encode()) + len(name)


def end_of_data(reader: gguf.GGUFReader) -> int:
    return max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)


def forged_count(key: str) -> Any:
    """Declares 2**60 items in the array stored under `key`."""
    return lambda d, r: put(d, after(d, key) + 8, "<Q", 2**60)


TOKENS, TOKEN_TYPES = "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"
NORM = "output_norm.weight"  # 1-D: then n_dims u32, ne u64, type u32 (+12), offset u64 (+16)
DUPLICATE = "blk.0.attn_q.weight"
BYTE_DAMAGE = {
    "empty file": (lambda d, r: bytearray(), "empty"),
    "cut in the header": (lambda d, r: d[: r.data_offset // 2], "needs"),
    "cut in tensor data": (lambda d, r: d[: end_of_data(r) - 1], "past the end"),
    "wrong magic": (lambda d, r: b"GGML" + d[4:], "magic"),
    "garbage": (lambda d, r: d[:8] + np.random.default_rng(0).bytes(4096), "corrupt"),
    "unknown version": (lambda d, r: put(d, 4, "<I", 99), "version 99"),
    "forged string array length": (forged_count(TOKENS), TOKENS),
    # gguf.GGUFReader alone would loop 2**60 times over the missing numbers.
    "forged number array length": (forged_count(TOKEN_TYPES), TOKEN_TYPES),
    "unknown tensor type": (lambda d, r: put(d, after(d, NORM) + 12, "<I", 200), "type 200"),
    "integer tensor type": (lambda d, r: put(d, after(d, NORM) + 12, "<I", 26), "I32"),
    "misaligned tensor": (lambda d, r: put(d, after(d, NORM) + 16, "<Q", 4), "alignment"),
    "overlapping tensors": (lambda d, r: put(d, after(d, NORM) + 16, "<Q", 0), "overlap"),
    "duplicate tensor name": (
        lambda d, r: d.replace(DUPLICATE[:-2].encode() + b"XX", DUPLICATE.encode()),
        f"duplicate tensor name '{DUPLICATE}'",
    ),
}


@pytest.mark.parametrize("case", list(BYTE_DAMAGE))
def test_damaged_bytes_are_refused(tmp_path: Path, out: Path, case: str) -> None:
    edit, message = BYTE_DAMAGE[case]
    tensors = to_gguf(hf_weights("llama", tied=True), "llama")
    if case == "duplicate tensor name":  # GGUFWriter refuses duplicates; rename one after
        tensors[DUPLICATE[:-2] + "XX"] = tensors[DUPLICATE]
    good = write_gguf(tmp_path / "good.gguf", "llama", tensors)
    reader = gguf.GGUFReader(good)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(edit(bytearray(good.read_bytes()), reader)))
    del reader
    with pytest.raises(CheckpointError, match=message) as caught:
        import_gguf(bad, out)
    assert str(bad) in str(caught.value)
    assert list(out.iterdir()) == []


K1, V0, ROWS_64 = "blk.1.attn_k.weight", "blk.0.attn_v.weight", np.zeros((HIDDEN, HIDDEN))
NOT_LLAMA3 = np.full(HEAD_DIM // 2, 2.0, np.float32)
# (arch, tensors or metadata keys to set (None: remove), error, message), by case.
BAD_FILES = {
    "unsupported architecture": ("gpt2", {}, UnsupportedArchitectureError, "'gpt2'"),
    "missing block tensor": ("llama", {K1: None}, CheckpointError, f"lacks .*{K1}"),
    "wrong shape": ("llama", {V0: ROWS_64}, CheckpointError, rf"{V0}' has shape \[64, 64\]"),
    "a block too many": ("llama", {"blk.2.ffn_norm.weight": ROWS_64[0]}, CheckpointError, "blk.2"),
    "missing metadata": ("llama", {"llama.block_count": None}, ModelConfigError, "block_count"),
    "forged block count": ("llama", {"llama.block_count": 2**31}, CheckpointError, "claims"),
    "float for integer": ("llama", {"llama.block_count": 2.0}, ModelConfigError, "block_count"),
    "list for float": ("llama", {"llama.rope.freq_base": [1.0]}, ModelConfigError, "malformed"),
    "qwen2 without biases": ("qwen2", {}, CheckpointError, "blk.0.attn_k.bias"),
    "rope_freqs not llama3": ("llama", {"rope_freqs.weight": NOT_LLAMA3}, CheckpointError, "rope"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_unusable_files_are_refused(tmp_path: Path, out: Path, case: str) -> None:
    arch, changes, error, message = BAD_FILES[case]
    tensors = to_gguf(hf_weights("llama", tied=True), "llama") | changes
    meta = metadata(arch)
    meta = {key: changes.get(key, value) for key, value in meta.items()}
    path = write_gguf(
        tmp_path / "bad.gguf",
        arch,
        {k: v.astype(np.float32) for k, v in tensors.items() if isinstance(v, np.ndarray)},
        meta={key: value for key, value in meta.items() if value is not None},
    )
    with pytest.raises(error, match=message):
        import_gguf(path, out)
    assert list(out.iterdir()) == []


# ---- the real model --------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_import(
    smollm2_import: tuple[ModelConfig, Path], hf_smollm2_model: torch.nn.Module
) -> None:
    config, out = smollm2_import
    reference = hf_smollm2_model.state_dict()
    ours = load_torch(out / "model.safetensors")
    assert "lm_head.weight" not in ours  # tied: the head reuses the embedding
    assert sorted(ours) == sorted(set(reference) - {"lm_head.weight"})
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, reference[name]), name
    assert torch.equal(reference["lm_head.weight"], ours["model.embed_tokens.weight"])
    assert config.tie_word_embeddings and hf_smollm2_model.config.tie_word_embeddings


@pytest.mark.slow
def test_smollm2_config_round_trips(smollm2_import: tuple[ModelConfig, Path]) -> None:
    config, out = smollm2_import
    assert ModelConfig.from_hf_folder(out) == config
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.vocab_size) == (9, 3, 49152)
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == pytest.approx(1e-5)
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))
