"""Read a GGUF block's projections straight into our compressed weights.

GGUF's Q4_0, Q4_1 and Q8_0 cut every row into blocks of 32 inputs, each with an fp16 step
(and for Q4_1 an fp16 minimum): the group-wise form of `Q4Weight` and `Int8Weight` with
groups of 32. So a block loads compressed, without a float32 copy of the model, and
exactly but for the bfloat16 scales the CPU int4 kernel keeps. Other types are
dequantized to float32, for the caller to compress if it wants.

The ggml block layouts (ggml-common.h), 32 weights each::

    Q4_0  fp16 d, 16 bytes of nibbles           w = d * (q - 8)
    Q4_1  fp16 d, fp16 m, 16 bytes of nibbles   w = d * q + m = d * (q - 8) + (m + 8 d)
    Q8_0  fp16 d, 32 int8                       w = d * q

Byte j of the nibbles holds element j in its low half and element j + 16 in its high half.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, TypeAlias

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from volunteer.models.checkpoint import BLOCK_TENSORS, block_prefix
from volunteer.models.config import ModelConfig
from volunteer.models.errors import CheckpointError
from volunteer.models.gguf_file import GGUFFile, GGUFTensorInfo
from volunteer.models.gguf_import import (
    TENSOR_NAMES,
    expected_shapes,
    plan_tensor,
    unpermute_rope_rows,
)
from volunteer.models.int8_weight import Int8Weight
from volunteer.models.q4_weight import Q4_CENTER, Q4Weight
from volunteer.models.quant import check_group_size

QT = GGMLQuantizationType
GGUF_GROUP_SIZE = 32
"""Weights per block of Q4_0, Q4_1 and Q8_0: the group size they load compressed with."""
_HEADER_BYTES = {QT.Q4_0: 2, QT.Q4_1: 4, QT.Q8_0: 2}
"""Bytes of fp16 scales before the codes in one block: the types read compressed."""
_Q4_TYPES = frozenset({QT.Q4_0, QT.Q4_1})

BlockWeight: TypeAlias = torch.Tensor | Q4Weight | Int8Weight


class QuantParts(NamedTuple):
    """One GGUF tensor's codes and per-group scales, rows in torch order."""

    codes: torch.Tensor
    """[N, K]: uint8 codes 0..15 for Q4_0 and Q4_1, int8 for Q8_0."""
    scale: torch.Tensor
    """[N, K / 32] float32."""
    zero: torch.Tensor | None
    """[N, K / 32] float32 with w = (q - 8) * scale + zero (Q4); None for Q8_0 (w = q * scale)."""


def read_quantized(gguf_file: GGUFFile, name: str, *, rope_heads: int | None = None) -> QuantParts:
    """Decodes one Q4_0, Q4_1 or Q8_0 tensor into codes and scales, never into floats.

    Args:
        gguf_file: an open, validated file.
        name: the tensor's GGUF name, e.g. "blk.0.attn_q.weight".
        rope_heads: undo llama.cpp's q/k row interleave (see `unpermute_rope_rows`) with
            this many heads; groups lie within rows, so moving rows is exact.

    Returns:
        Fresh tensors (not views of the file's memory map).

    Raises:
        CheckpointError: no such tensor, another type, not 2-D, a byte size that does not
            match the shape, or a scale that is not finite.
    """
    info = gguf_file.tensors.get(name)
    if info is None:
        raise CheckpointError(f"{gguf_file.path} has no tensor {name!r}")
    if info.ggml_type not in _HEADER_BYTES or len(info.shape) != 2:
        raise CheckpointError(
            f"{gguf_file.path}: tensor {name!r} is {info.ggml_type.name} of shape "
            f"{list(info.shape)}; only 2-D Q4_0, Q4_1 and Q8_0 tensors load compressed"
        )
    codes, scale, zero = _decode(_blocks(gguf_file, info), info.ggml_type)
    if not (np.isfinite(scale).all() and (zero is None or np.isfinite(zero).all())):
        # ggml would turn these into inf/NaN outputs far from the cause; say where it is.
        raise CheckpointError(
            f"{gguf_file.path}: tensor {name!r} has a scale that is not finite; the file "
            "is corrupt — delete it and pull the model again"
        )
    rows, cols = info.shape
    groups = cols // GGUF_GROUP_SIZE
    codes, scale = codes.reshape(rows, cols), scale.reshape(rows, groups)
    zero = None if zero is None else zero.reshape(rows, groups)
    if rope_heads is not None:
        codes = unpermute_rope_rows(codes, rope_heads)
        scale = unpermute_rope_rows(scale, rope_heads)
        zero = None if zero is None else unpermute_rope_rows(zero, rope_heads)
    return QuantParts(
        torch.from_numpy(codes),
        torch.from_numpy(scale),
        None if zero is None else torch.from_numpy(zero),
    )


def gguf_block_weights(
    gguf_file: GGUFFile,
    config: ModelConfig,
    index: int,
    *,
    group_size: int | None,
    keep_int8: bool = True,
) -> dict[str, BlockWeight]:
    """Block `index`'s parameters under our names (`BLOCK_TENSORS`), compressed where the
    file stores them so and the caller keeps that form.

    A projection whose parts (q, k, v; gate, up) are all Q4_0/Q4_1 becomes one
    `Q4Weight`, if `group_size` is GGUF's 32 (GGUF's groups cannot be regrouped exactly;
    with another size, or None, they come back as float32 as gguf dequantizes them, for
    the caller to quantize); all Q8_0, one `Int8Weight` with groups of 32 if `keep_int8`.
    Everything else (norms, biases, F16, K-quants, mixed parts) is a float32 tensor.
    GGUF names no o_proj or MLP biases (llama and qwen2 have none), so those never appear.

    Args:
        gguf_file: an open, validated file.
        config: the model's config (from the same file's metadata).
        index: the block, 0 <= index < config.num_layers.
        group_size: the Q4 group size the caller runs with; None: no 4-bit weights.
        keep_int8: Q8_0 projections as `Int8Weight` rather than float32.

    Raises:
        CheckpointError: a tensor is missing, has the wrong shape, or is corrupt.
        QuantError: `group_size` is not one the int4 kernels take.
    """
    if group_size is not None:
        check_group_size(group_size)
    if not 0 <= index < config.num_layers:
        raise ValueError(f"block {index} is outside the model's {config.num_layers} blocks")
    expected = expected_shapes(config)
    gguf_names = _gguf_names(index)
    weights: dict[str, BlockWeight] = {}
    for ours, hf_parts in BLOCK_TENSORS.items():
        names = [gguf_names.get(block_prefix(index) + part, "") for part in hf_parts]
        if not all(name in expected for name in names):
            continue  # a bias this config lacks, or one GGUF has no name for
        infos = [_checked_info(gguf_file, name, expected[name]) for name in names]
        weights[ours] = _read_parameter(gguf_file, config, infos, group_size, keep_int8)
    return weights


def _gguf_names(index: int) -> dict[str, str]:
    """HF name -> GGUF name for block `index`: `TENSOR_NAMES`, turned around."""
    return {
        hf.format(i=index): gguf_name.format(i=index)
        for gguf_name, (hf, _) in TENSOR_NAMES.items()
        if "{i}" in gguf_name
    }


def _checked_info(gguf_file: GGUFFile, name: str, shape: tuple[int, ...]) -> GGUFTensorInfo:
    info = gguf_file.tensors.get(name)
    if info is None:
        raise CheckpointError(
            f"{gguf_file.path} lacks tensor {name!r}; the file is incomplete or corrupt"
        )
    if info.shape != shape:
        raise CheckpointError(
            f"{gguf_file.path}: tensor {name!r} has shape {list(info.shape)}, but the "
            f"config implies {list(shape)}; the file is corrupt"
        )
    return info


def _read_parameter(
    gguf_file: GGUFFile,
    config: ModelConfig,
    infos: Sequence[GGUFTensorInfo],
    group_size: int | None,
    keep_int8: bool,
) -> BlockWeight:
    """The parts of one parameter, concatenated along rows in the form they share."""
    types = {info.ggml_type for info in infos}
    is_q4 = types <= _Q4_TYPES and group_size == GGUF_GROUP_SIZE
    is_int8 = types == {QT.Q8_0} and keep_int8
    if all(len(info.shape) == 2 for info in infos) and (is_q4 or is_int8):
        parts = [
            read_quantized(gguf_file, i.name, rope_heads=_rope_heads(i, config)) for i in infos
        ]
        codes = torch.cat([p.codes for p in parts])
        scale = torch.cat([p.scale for p in parts])
        if not is_q4:
            return Int8Weight(codes, scale, group_size=GGUF_GROUP_SIZE)
        zero = torch.cat([p.zero for p in parts if p.zero is not None])
        n, k = codes.shape
        return Q4Weight.from_codes(codes, scale, zero, shape=(n, k), group_size=GGUF_GROUP_SIZE)
    arrays = []
    for info in infos:
        values, rope_heads = gguf_file.read_tensor(info.name), _rope_heads(info, config)
        arrays.append(values if rope_heads is None else unpermute_rope_rows(values, rope_heads))
    return torch.from_numpy(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))


def _rope_heads(info: GGUFTensorInfo, config: ModelConfig) -> int | None:
    """Heads to undo llama.cpp's q/k row interleave with; None: rows as stored. `plan_tensor`
    decides, so this and the float import agree on which rows are interleaved."""
    return plan_tensor(info.name, info.shape, config).rope_heads


def _blocks(gguf_file: GGUFFile, info: GGUFTensorInfo) -> np.ndarray:
    """[n_blocks, bytes per block] uint8, after checking the size against shape and type."""
    block_size, type_bytes = GGML_QUANT_SIZES[info.ggml_type]
    n_elements = math.prod(info.shape)
    expected = n_elements // block_size * type_bytes
    raw = gguf_file.raw_tensor(info.name)
    if n_elements % block_size or raw.dtype != np.uint8 or raw.size != expected:
        raise CheckpointError(
            f"{gguf_file.path}: tensor {info.name!r} holds {raw.nbytes} bytes, but "
            f"{info.ggml_type.name} of shape {list(info.shape)} takes {expected}; the file "
            "is corrupt — delete it and pull the model again"
        )
    return raw.reshape(-1, type_bytes)


def _decode(
    blocks: np.ndarray, ggml_type: GGMLQuantizationType
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Codes [n_blocks, 32], scale [n_blocks] and zero [n_blocks] (None for Q8_0)."""
    header = _HEADER_BYTES[ggml_type]
    scale = _fp16(blocks[:, 0:2])
    if ggml_type == QT.Q8_0:
        return blocks[:, header:].view(np.int8).copy(), scale, None
    nibbles = blocks[:, header:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1)  # low halves first
    if ggml_type == QT.Q4_0:
        return codes, scale, np.zeros_like(scale)
    return codes, scale, _fp16(blocks[:, 2:4]) + Q4_CENTER * scale


def _fp16(pairs: np.ndarray) -> np.ndarray:
    """[n, 2] bytes of little-endian fp16 -> [n] float32."""
    return np.ascontiguousarray(pairs).view("<f2")[:, 0].astype(np.float32)
