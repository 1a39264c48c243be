"""The training peers' messages: a msgpack header and a few raw tensors.

A message is `[header, [[dtype, shape, bytes], ...]]`. The header is a small map of
plain values; each tensor's dtype and shape are checked against its bytes before any
tensor is built, floats must be finite, and nothing is allocated beyond the frame the
transport already bounded. No pickle: a peer can send only numbers and names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgpack
import torch

from volunteer.errors import VolunteerError

MAX_TENSORS = 4096
"""Tensors in one message (a stage's optimizer state is a few per parameter)."""
MAX_DIMS = 4
_DTYPES = {"f32": torch.float32, "f64": torch.float64, "i64": torch.int64}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class WireError(VolunteerError):
    """A message that is not one, or a tensor whose header and bytes disagree."""


def pack(header: dict[str, Any], tensors: Sequence[torch.Tensor] = ()) -> bytes:
    """A message of `header` and `tensors` (float32, float64 or int64, on any device)."""
    blobs = []
    for tensor in tensors:
        name = _NAMES.get(tensor.dtype)
        if name is None:
            raise WireError(f"{tensor.dtype} does not travel; use {', '.join(_DTYPES)}")
        flat = tensor.detach().cpu().contiguous()
        blobs.append([name, list(flat.shape), flat.numpy().tobytes()])
    return msgpack.packb([header, blobs], use_bin_type=True)


def unpack(
    body: bytes, *, max_tensors: int = MAX_TENSORS
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """The header and tensors of a message.

    Raises:
        WireError: not a message; too many tensors; a tensor of another dtype, more than
            MAX_DIMS dimensions, a shape its bytes do not fill exactly, or non-finite floats.
    """
    try:
        header, blobs = msgpack.unpackb(
            body, raw=False, strict_map_key=True, max_array_len=max(max_tensors, MAX_DIMS, 3)
        )
    except Exception as exc:  # junk takes many forms
        raise WireError(f"not a training message ({type(exc).__name__})") from None
    if not isinstance(header, dict) or not isinstance(blobs, list) or len(blobs) > max_tensors:
        raise WireError(f"a training message is a header and at most {max_tensors} tensors")
    return header, [_tensor(blob, index) for index, blob in enumerate(blobs)]


def _tensor(blob: object, index: int) -> torch.Tensor:
    if not (isinstance(blob, list) and len(blob) == 3):
        raise WireError(f"tensor {index} is not [dtype, shape, bytes]")
    name, shape, raw = blob
    dtype = _DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise WireError(f"tensor {index}: dtype {name!r} is not one of {', '.join(_DTYPES)}")
    if not (
        isinstance(shape, list)
        and len(shape) <= MAX_DIMS
        and all(type(size) is int and size >= 0 for size in shape)
    ):
        raise WireError(f"tensor {index}: a shape is at most {MAX_DIMS} sizes >= 0")
    width = torch.empty((), dtype=dtype).element_size()
    if not isinstance(raw, bytes) or len(raw) != math.prod(shape) * width:
        raise WireError(f"tensor {index}: its bytes do not fill the shape {shape}")
    tensor = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    tensor = tensor.view(shape)
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise WireError(f"tensor {index} has values that are not finite")
    return tensor


def field(header: dict[str, Any], name: str, kind: type, *, low: float | None = None) -> Any:
    """`header[name]`, checked to be a `kind` (and at least `low`, for numbers).

    Raises:
        WireError: missing, of another type, or below `low`.
    """
    value = header.get(name)
    ok = type(value) is kind or (kind is float and type(value) is int)
    if not ok or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        raise WireError(f"{name!r} must be {_KIND_NAMES.get(kind, kind.__name__)}{bound}")
    return value


_KIND_NAMES = {int: "a whole number", float: "a number", str: "a string"}
