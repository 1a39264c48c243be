"""GGUF Q4_0/Q4_1/Q8_0 tensors read straight into Q4Weight/Int8Weight: tiny files written
with gguf.GGUFWriter against gguf's own dequantize, the real SmolLM2 file against our
float32 import of it, and damaged tensors that must be refused."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT
from volunteer.models.checkpoint import BLOCK_TENSORS, SafetensorsFolder, block_prefix, load_span
from volunteer.models.config import ModelConfig
from volunteer.models.errors import CheckpointError
from volunteer.models.gguf_compressed import gguf_block_weights, read_quantized
from volunteer.models.gguf_file import GGUFFile, read_gguf
from volunteer.models.gguf_span import load_span_gguf
from volunteer.models.int8_weight import Int8Weight
from volunteer.models.q4_weight import Q4Weight
from volunteer.models.weight_format import WeightFormat

GROUP = 32
CONFIG = ModelConfig(
    arch="llama",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
)
Q, KV = CONFIG.q_size, CONFIG.kv_size
# GGUF name in block 0 -> (HF name after "model.layers.0.", shape, type it is stored as).
# Spelled out here, independently of the importer's tables.
BLOCK_FILE = {
    "attn_norm.weight": ("input_layernorm.weight", (64,), QT.F32),
    "attn_q.weight": ("self_attn.q_proj.weight", (Q, 64), QT.Q4_1),
    "attn_k.weight": ("self_attn.k_proj.weight", (KV, 64), QT.Q4_0),
    "attn_v.weight": ("self_attn.v_proj.weight", (KV, 64), QT.Q4_1),
    "attn_q.bias": ("self_attn.q_proj.bias", (Q,), QT.F32),  # biases: qwen2 only
    "attn_k.bias": ("self_attn.k_proj.bias", (KV,), QT.F32),
    "attn_v.bias": ("self_attn.v_proj.bias", (KV,), QT.F32),
    "attn_output.weight": ("self_attn.o_proj.weight", (64, Q), QT.Q8_0),
    "ffn_norm.weight": ("post_attention_layernorm.weight", (64,), QT.F32),
    "ffn_gate.weight": ("mlp.gate_proj.weight", (96, 64), QT.Q4_0),  # mixed with Q8_0 up:
    "ffn_up.weight": ("mlp.up_proj.weight", (96, 64), QT.Q8_0),  # comes back as float32
    "ffn_down.weight": ("mlp.down_proj.weight", (64, 96), QT.F16),
}


def q4_tolerance(weight: Q4Weight) -> torch.Tensor:
    """[N, K] bound on |dequantize() - GGUF's value|. The CPU kernel keeps scale and zero
    in bfloat16, whose unit roundoff is 2**-8, and |q - 8| <= 8: so a weight moves by at
    most 2**-8 * (|zero| + 8 |scale|). The factor 1 + 2**-6 covers bounding with the
    rounded scales and float32 arithmetic (about 2**-23 of the same)."""
    scale, zero = weight.scales()
    per_group = 2**-8 * (1 + 2**-6) * (zero.abs() + 8 * scale.abs())
    n, k = weight.shape
    return per_group.repeat_interleave(weight.group_size, dim=1)[:n, :k]


def assert_matches(weight: object, reference: np.ndarray, what: str) -> None:
    """Int8 and float exactly; Q4 within `q4_tolerance`."""
    expected = torch.from_numpy(reference)
    if isinstance(weight, Q4Weight):
        excess = (weight.dequantize() - expected).abs() - q4_tolerance(weight)
        assert excess.max() <= 0, f"{what}: off by {excess.max():.3g} past the bound"
    elif isinstance(weight, Int8Weight):
        assert torch.equal(weight.dequantize(), expected), what
    else:
        assert isinstance(weight, torch.Tensor) and weight.dtype == torch.float32, what
        assert torch.equal(weight, expected), what


def encode(value: np.ndarray, qtype: QT) -> np.ndarray:
    """The tensor's bytes (or values) as GGUF stores them."""
    if qtype == QT.F32:
        return value
    if qtype == QT.F16:
        return value.astype(np.float16)
    return gguf.quants.quantize(value, qtype)


def decoded(value: np.ndarray, qtype: QT) -> np.ndarray:
    """What gguf's own dequantize makes of `value` stored as `qtype`."""
    if qtype in (QT.F32, QT.F16):
        return encode(value, qtype).astype(np.float32)
    return gguf.quants.dequantize(encode(value, qtype), qtype)


def write_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, QT]]) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    for name, (value, qtype) in tensors.items():
        raw_dtype = qtype if qtype in (QT.Q4_0, QT.Q4_1, QT.Q8_0) else None
        writer.add_tensor(name, encode(value, qtype), raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (LlamaModel.permute)."""
    per_head = weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight.shape)


def random_weight(shape: tuple[int, ...], seed: int) -> np.ndarray:
    # Off-centre, so that Q4_1's minima (and our zeros) are far from 0.
    return np.random.default_rng(seed).normal(0.3, 1.0, shape).astype(np.float32)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0], ids=lambda t: t.name)
def test_tensor_matches_gguf_dequantize(tmp_path: Path, qtype: QT) -> None:
    # 40 rows: not a multiple of the int4 kernel's 16, so Q4Weight pads.
    value = random_weight((40, 96), seed=0)
    reference = decoded(value, qtype)
    with read_gguf(write_gguf(tmp_path / "t.gguf", "llama", {"w": (value, qtype)})) as file:
        parts = read_quantized(file, "w")
    assert parts.codes.shape == (40, 96) and parts.scale.shape == (40, 3)
    scale = parts.scale.repeat_interleave(GROUP, dim=1)
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    expected = F.linear(x, torch.from_numpy(reference))
    if qtype == QT.Q8_0:
        assert parts.zero is None and parts.codes.dtype == torch.int8
        weight = Int8Weight(parts.codes, parts.scale, group_size=GROUP)
        assert torch.equal(parts.codes.float() * scale, torch.from_numpy(reference))
        assert_matches(weight, reference, qtype.name)
        assert torch.equal(weight.linear(x, None), expected)
        return
    assert parts.zero is not None and parts.codes.dtype == torch.uint8
    assert int(parts.codes.max()) <= 15
    zero = parts.zero.repeat_interleave(GROUP, dim=1)
    # The codes and float32 scales alone: as exact as float32 sums allow (a wrong nibble
    # order is off by whole scales).
    exact = (parts.codes.float() - 8) * scale + zero
    bound = 2**-20 * (zero.abs() + 8 * scale.abs())
    assert ((exact - torch.from_numpy(reference)).abs() <= bound).all()
    weight = Q4Weight.from_codes(*parts, shape=(40, 96), group_size=GROUP)
    assert_matches(weight, reference, qtype.name)
    # The kernel also rounds the input and output to bfloat16 (2**-8 each) on top of the
    # weights' own bound.
    bound = x.abs() @ (2 * 2**-8 * torch.from_numpy(reference).abs() + q4_tolerance(weight)).T
    assert ((weight.linear(x, None) - expected).abs() <= bound * (1 + 2**-6)).all()


def block_file(tmp_path: Path, arch: str) -> tuple[Path, dict[str, np.ndarray]]:
    """A GGUF file of block 0 as llama.cpp would write it, and each HF tensor as gguf's
    dequantize reads it back."""
    tensors, references = {}, {}
    for seed, (name, (hf_name, shape, qtype)) in enumerate(BLOCK_FILE.items()):
        if name.endswith("bias") and arch != "qwen2":
            continue
        value = random_weight(shape, seed)
        references[hf_name] = decoded(value, qtype)
        if arch == "llama" and name.startswith(("attn_q", "attn_k")):
            # Quant blocks lie within rows, so permuting before quantizing is exact.
            value = llama_cpp_permute(value, 4 if name.startswith("attn_q") else 2)
        tensors[f"blk.0.{name}"] = (value, qtype)
    return write_gguf(tmp_path / "block.gguf", arch, tensors), references


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_block_weights_take_each_stored_form(tmp_path: Path, arch: str) -> None:
    path, references = block_file(tmp_path, arch)
    config = dataclasses.replace(CONFIG, arch=arch, qkv_bias=arch == "qwen2")
    with read_gguf(path) as file:
        weights = gguf_block_weights(file, config, 0, group_size=GROUP)
        regrouped = gguf_block_weights(file, config, 0, group_size=64)
    expected_names = set(BLOCK_TENSORS) - {"attn.o_proj.bias", "mlp.gate_up_proj.bias"}
    expected_names -= {"mlp.down_proj.bias"} | (
        {"attn.qkv_proj.bias"} if arch == "llama" else set()
    )
    assert set(weights) == set(regrouped) == expected_names
    assert isinstance(weights["attn.qkv_proj.weight"], Q4Weight)
    assert isinstance(weights["attn.o_proj.weight"], Int8Weight)
    assert isinstance(weights["mlp.gate_up_proj.weight"], torch.Tensor)  # Q4_0 + Q8_0
    assert isinstance(weights["mlp.down_proj.weight"], torch.Tensor)  # F16
    # GGUF's groups of 32 cannot be regrouped exactly: with 64 Q4 parts come back as float.
    assert isinstance(regrouped["attn.qkv_proj.weight"], torch.Tensor)
    for name, weight in [*weights.items(), *regrouped.items()]:
        reference = np.concatenate([references[part] for part in BLOCK_TENSORS[name]])
        assert_matches(weight, reference, name)


@pytest.mark.slow
def test_smollm2_blocks_match_float_import(
    smollm2_gguf: Path, smollm2_import: tuple[ModelConfig, Path]
) -> None:
    config, folder = smollm2_import
    files = SafetensorsFolder.open(folder)
    with read_gguf(smollm2_gguf) as file:
        for index in (0, config.num_layers - 1):
            weights = gguf_block_weights(file, config, index, group_size=GROUP)
            assert sum(isinstance(w, Q4Weight) for w in weights.values()) == 4
            for name, weight in weights.items():
                names = tuple(block_prefix(index) + part for part in BLOCK_TENSORS[name])
                reference = files.read(names, dtype=torch.float32, device="cpu")
                assert_matches(weight, reference.numpy(), f"block {index} {name}")


def test_truncated_tensor_is_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "t.gguf", "llama", {"w": (random_weight((8, 64), 0), QT.Q4_1)})
    with read_gguf(path) as valid:
        info = valid.tensors["w"]
    short = np.fromfile(path, dtype=np.uint8, count=info.n_bytes - 1, offset=info.offset)
    file = GGUFFile(path=path, version=3, metadata={}, tensors={"w": info}, data={"w": short})
    with pytest.raises(
        CheckpointError, match=re.escape(f"{path}: tensor 'w' holds {info.n_bytes - 1} ")
    ):
        read_quantized(file, "w")


def test_infinite_scale_is_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "t.gguf", "llama", {"w": (random_weight((8, 64), 0), QT.Q4_0)})
    with read_gguf(path) as file:
        offset = file.tensors["w"].offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 2] = np.float16(np.inf).tobytes()  # the first block's d
    path.write_bytes(bytes(data))
    with read_gguf(path) as file, pytest.raises(CheckpointError, match="'w' has a scale"):
        read_quantized(file, "w")


def test_wrong_type_or_missing_tensor_is_refused(tmp_path: Path) -> None:
    path, _ = block_file(tmp_path, "llama")
    with read_gguf(path) as file:
        with pytest.raises(CheckpointError, match=re.escape("'blk.0.ffn_down.weight' is F16")):
            read_quantized(file, "blk.0.ffn_down.weight")
        with pytest.raises(CheckpointError, match=re.escape("has no tensor 'blk.1.attn_q.weight'")):
            read_quantized(file, "blk.1.attn_q.weight")
        bigger = dataclasses.replace(CONFIG, num_layers=2)
        with pytest.raises(
            CheckpointError, match=re.escape("lacks tensor 'blk.1.attn_norm.weight'")
        ):
            gguf_block_weights(file, bigger, 1, group_size=GROUP)


def test_shape_not_matching_config_is_refused(tmp_path: Path) -> None:
    path, _ = block_file(tmp_path, "llama")
    wider = dataclasses.replace(CONFIG, intermediate_size=128)
    with read_gguf(path) as file, pytest.raises(CheckpointError, match=r"\[96, 64\].*\[128, 64\]"):
        gguf_block_weights(file, wider, 0, group_size=GROUP)


@pytest.mark.slow
@pytest.mark.parametrize("label", ["fp32", "q4", "int8"])
def test_a_span_loads_from_gguf_as_from_the_imported_folder(
    smollm2_gguf: Path, smollm2_import: tuple[ModelConfig, Path], label: str
) -> None:
    """Blocks read straight from the Q4_1 file compute exactly what the same blocks do
    loaded from the float32 import in the same format: for fp32, gguf's own
    dequantization; for q4 with groups of 32, the file's codes are the ones quantizing
    its dequantized weights finds again; int8 quantizes the same float32 weights."""
    config, folder = smollm2_import
    fmt = WeightFormat.parse(label)
    direct = load_span_gguf(smollm2_gguf, config, 3, 5, fmt=fmt)
    imported = load_span(folder, config, 3, 5, fmt=fmt)
    if label == "q4":
        assert isinstance(direct.blocks[0].mlp.down_proj.weight, Q4Weight)
    hidden = torch.randn(1, 6, config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(direct(hidden), imported(hidden))
