"""Convert a GGUF file, once, into the Hugging Face-format folder every later load reads.

The folder holds `config.json`, float32 safetensors under HF tensor names (one
`model.safetensors`, or numbered shards plus `model.safetensors.index.json` past
`max_shard_bytes`), `tokenizer.json` and `tokenizer_config.json`. Tensors are dequantized
one at a time and each shard is written as soon as it is full, so peak memory is about one
shard, not the whole float32 model.

Besides the names, GGUF differs from HF checkpoints in three ways:

- ggml lists dimensions fastest first; `GGUFFile` already gives torch order.
- For arch `llama`, llama.cpp's converter reorders the rows of q_proj and k_proj (and their
  biases) inside each head, from HF's "rotate half" layout (dims [0, D/2) pair with
  [D/2, D)) to adjacent pairs (its RoPE kernel rotates dims 2j and 2j+1). We undo that.
  qwen2 files are stored unpermuted.
- Llama 3.x files carry llama3 RoPE scaling as a `rope_freqs` tensor rather than metadata;
  we recognise it and put the scaling back into the config.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from volunteer.models.config import ModelConfig, RopeScaling
from volunteer.models.errors import CheckpointError, ModelConfigError
from volunteer.models.gguf_file import GGUFFile, can_dequantize, read_gguf, supported_type_names
from volunteer.models.gguf_tokenizer import tokenizer_config_from_gguf, tokenizer_json_from_gguf
from volunteer.models.rope import inverse_frequencies

# GGUF tensor name -> (HF tensor name, shape in torch order as config dimensions).
# The one place GGUF names are translated; "{i}" is the block index.
TENSOR_NAMES: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "token_embd.weight": ("model.embed_tokens.weight", ("vocab", "hidden")),
    "output_norm.weight": ("model.norm.weight", ("hidden",)),
    "output.weight": ("lm_head.weight", ("vocab", "hidden")),
    "blk.{i}.attn_norm.weight": ("model.layers.{i}.input_layernorm.weight", ("hidden",)),
    "blk.{i}.attn_q.weight": ("model.layers.{i}.self_attn.q_proj.weight", ("q", "hidden")),
    "blk.{i}.attn_k.weight": ("model.layers.{i}.self_attn.k_proj.weight", ("kv", "hidden")),
    "blk.{i}.attn_v.weight": ("model.layers.{i}.self_attn.v_proj.weight", ("kv", "hidden")),
    "blk.{i}.attn_q.bias": ("model.layers.{i}.self_attn.q_proj.bias", ("q",)),
    "blk.{i}.attn_k.bias": ("model.layers.{i}.self_attn.k_proj.bias", ("kv",)),
    "blk.{i}.attn_v.bias": ("model.layers.{i}.self_attn.v_proj.bias", ("kv",)),
    "blk.{i}.attn_output.weight": ("model.layers.{i}.self_attn.o_proj.weight", ("hidden", "q")),
    "blk.{i}.ffn_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight", ("hidden",)),
    "blk.{i}.ffn_gate.weight": ("model.layers.{i}.mlp.gate_proj.weight", ("ffn", "hidden")),
    "blk.{i}.ffn_up.weight": ("model.layers.{i}.mlp.up_proj.weight", ("ffn", "hidden")),
    "blk.{i}.ffn_down.weight": ("model.layers.{i}.mlp.down_proj.weight", ("hidden", "ffn")),
}
_QKV_BIASES = frozenset({"blk.{i}.attn_q.bias", "blk.{i}.attn_k.bias", "blk.{i}.attn_v.bias"})
# Rows llama.cpp interleaves for arch llama, and the config field counting their heads.
_PERMUTED_ROWS = {
    "blk.{i}.attn_q.weight": "num_heads",
    "blk.{i}.attn_q.bias": "num_heads",
    "blk.{i}.attn_k.weight": "num_kv_heads",
    "blk.{i}.attn_k.bias": "num_kv_heads",
}
ROPE_FREQS = "rope_freqs.weight"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_BLOCK_NAME = re.compile(r"blk\.(0|[1-9][0-9]*)\.(.+)")


@dataclasses.dataclass(frozen=True)
class _Step:
    """One tensor to convert."""

    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]
    rope_heads: int | None
    """Undo llama.cpp's row interleave with this many heads; None: copy as is."""

    @property
    def n_bytes(self) -> int:
        return 4 * int(np.prod(self.shape))


def import_gguf(
    gguf_path: Path,
    out_dir: Path,
    *,
    progress: Callable[[int, int], None] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> ModelConfig:
    """Writes the Hugging Face folder for a GGUF file into `out_dir`.

    Everything is validated before the first byte is written; should writing fail midway,
    the files written so far are removed again.

    Args:
        gguf_path: the `.gguf` file.
        out_dir: an existing, empty folder; the caller publishes it atomically.
        progress: called as `progress(done_tensors, total_tensors)`, first with 0.
        max_shard_bytes: largest safetensors file to write (a bigger single tensor gets a
            file of its own). Peak memory is about this much.

    Returns:
        The model's config, as written to `config.json`.

    Raises:
        CheckpointError: the file is corrupt, lacks tensors, has tensors of the wrong shape,
            or a tensor type we cannot dequantize.
        ModelConfigError: metadata is missing or malformed.
        UnsupportedArchitectureError: the architecture is not llama or qwen2.
        TokenizerError: the tokenizer metadata is missing or unusable.
        FileExistsError: `out_dir` is not empty.
    """
    out_dir = Path(out_dir)
    if any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} must be empty to import a GGUF file into it")
    with read_gguf(Path(gguf_path)) as gguf_file:
        config = _with_rope_freqs(gguf_file, _config(gguf_file))
        steps = _plan(gguf_file, config)
        tokenizer_json = tokenizer_json_from_gguf(gguf_file.metadata)
        tokenizer_config = tokenizer_config_from_gguf(gguf_file.metadata)
        try:
            _write_weights(gguf_file, steps, out_dir, progress, max_shard_bytes)
            _write_json(out_dir / "tokenizer.json", tokenizer_json)
            _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
            # config.json last: a folder that has it has everything.
            _write_json(out_dir / "config.json", config.to_hf_dict())
        except BaseException:
            for path in out_dir.iterdir():
                path.unlink(missing_ok=True)
            raise
    return config


def _config(gguf_file: GGUFFile) -> ModelConfig:
    tied = "output.weight" not in gguf_file.tensors
    try:
        config = ModelConfig.from_gguf_metadata(gguf_file.metadata, tie_word_embeddings=tied)
    except ModelConfigError as exc:
        raise type(exc)(f"{gguf_file.path}: {exc}") from exc
    # Forged metadata must not make us list billions of expected tensor names.
    if config.num_layers > len(gguf_file.tensors):
        raise CheckpointError(
            f"{gguf_file.path} claims {config.num_layers} blocks but holds only "
            f"{len(gguf_file.tensors)} tensors; the file is incomplete or corrupt"
        )
    return config


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's per-head RoPE row interleave of a q/k projection weight or bias.

    In each head of D rows, llama.cpp stores HF row `p * D/2 + j` at row `2j + p`.

    Args:
        weight: [n_heads * D, ...] rows as stored in the GGUF file.
        n_heads: heads the rows split into (query heads for q, key/value heads for k).

    Returns:
        A new contiguous array of the same shape, rows in HF order.
    """
    half = weight.shape[0] // n_heads // 2
    # [H*D, ...] -> [H, D/2, 2, ...] -> [H, 2, D/2, ...] -> [H*D, ...]
    pairs = weight.reshape(n_heads, half, 2, *weight.shape[1:])
    return np.ascontiguousarray(pairs.swapaxes(1, 2)).reshape(weight.shape)


def _template(gguf_name: str) -> tuple[str, int | None]:
    match = _BLOCK_NAME.fullmatch(gguf_name)
    if match is None:
        return gguf_name, None
    return "blk.{i}." + match[2], int(match[1])


def _expected_templates(config: ModelConfig) -> list[str]:
    templates = [t for t in TENSOR_NAMES if config.qkv_bias or t not in _QKV_BIASES]
    if config.tie_word_embeddings:
        templates.remove("output.weight")
    return templates


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the file must hold for this config, with its torch-order shape."""
    dims = {
        "vocab": config.vocab_size,
        "hidden": config.hidden_size,
        "q": config.q_size,
        "kv": config.kv_size,
        "ffn": config.intermediate_size,
    }
    shapes = {}
    for template in _expected_templates(config):
        shape = tuple(dims[d] for d in TENSOR_NAMES[template][1])
        indices = range(config.num_layers) if "{i}" in template else [None]
        for index in indices:
            shapes[template.format(i=index)] = shape
    return shapes


def _plan(gguf_file: GGUFFile, config: ModelConfig) -> list[_Step]:
    """Checks names, shapes and types of every tensor; lists the conversions in file order."""
    expected = expected_shapes(config)
    present = set(gguf_file.tensors) - {ROPE_FREQS}
    _require_same_names(gguf_file.path, config, expected, present)
    steps = []
    for name, info in gguf_file.tensors.items():
        if name == ROPE_FREQS:
            continue
        if info.shape != expected[name]:
            raise CheckpointError(
                f"{gguf_file.path}: tensor {name!r} has shape {list(info.shape)}, but the "
                f"metadata implies {list(expected[name])}; the file is corrupt"
            )
        if not can_dequantize(info.ggml_type):
            raise CheckpointError(
                f"{gguf_file.path}: tensor {name!r} is stored as {info.ggml_type.name}, "
                f"which we cannot dequantize (supported: {', '.join(supported_type_names())})"
            )
        steps.append(plan_tensor(name, info.shape, config))
    return steps


def _require_same_names(
    path: Path, config: ModelConfig, expected: Mapping[str, object], present: set[str]
) -> None:
    missing = sorted(set(expected) - present)
    if missing:
        raise CheckpointError(
            f"{path} lacks tensors a {config.num_layers}-block {config.arch} model needs: "
            f"{_some(missing)}; the file is incomplete or corrupt"
        )
    unexpected = sorted(present - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{path} holds tensors a {config.num_layers}-block {config.arch} model does not "
            f"have: {_some(unexpected)}; we cannot convert this model"
        )


def _some(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def plan_tensor(name: str, shape: tuple[int, ...], config: ModelConfig) -> _Step:
    template, index = _template(name)
    heads_field = _PERMUTED_ROWS.get(template) if config.arch == "llama" else None
    return _Step(
        gguf_name=name,
        hf_name=TENSOR_NAMES[template][0].format(i=index),
        shape=shape,
        rope_heads=None if heads_field is None else getattr(config, heads_field),
    )


def _with_rope_freqs(gguf_file: GGUFFile, config: ModelConfig) -> ModelConfig:
    """Turns a llama3 `rope_freqs` tensor back into the config's RoPE scaling."""
    if ROPE_FREQS not in gguf_file.tensors or config.arch != "llama":
        return config  # a stray rope_freqs in qwen2 is reported as an unexpected tensor
    if config.rope_scaling.kind != "default":
        raise CheckpointError(f"{gguf_file.path} has both RoPE scaling metadata and rope_freqs")
    divisors = gguf_file.read_tensor(ROPE_FREQS)
    original = gguf_file.metadata.get("llama.rope.scaling.original_context_length", 8192)
    # llama.cpp writes only the per-pair divisors; Llama 3.x used these band factors.
    scaling = RopeScaling(
        kind="llama3",
        factor=float(divisors.max()),
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=int(original),
    )
    plain = inverse_frequencies(config.head_dim, config.rope_theta, RopeScaling())
    scaled = inverse_frequencies(config.head_dim, config.rope_theta, scaling)
    expected = (plain / scaled).numpy()
    if divisors.shape != expected.shape or not np.allclose(divisors, expected, rtol=1e-4):
        raise CheckpointError(
            f"{gguf_file.path}: rope_freqs does not match llama3 RoPE scaling; "
            "we cannot convert this model"
        )
    return dataclasses.replace(config, rope_scaling=scaling)


def _shards(steps: list[_Step], max_shard_bytes: int) -> list[list[_Step]]:
    shards: list[list[_Step]] = [[]]
    size = 0
    for step in steps:
        if shards[-1] and size + step.n_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(step)
        size += step.n_bytes
    return shards


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def _write_weights(
    gguf_file: GGUFFile,
    steps: list[_Step],
    out_dir: Path,
    progress: Callable[[int, int], None] | None,
    max_shard_bytes: int,
) -> None:
    shards = _shards(steps, max_shard_bytes)
    names = _shard_names(len(shards))
    weight_map: dict[str, str] = {}
    done = 0
    if progress is not None:
        progress(done, len(steps))
    for shard, file_name in zip(shards, names, strict=True):
        tensors = {}
        for step in shard:
            tensors[step.hf_name] = torch.from_numpy(_convert(gguf_file, step))
            done += 1
            if progress is not None:
                progress(done, len(steps))
        # transformers refuses safetensors files without this format tag.
        save_file(tensors, out_dir / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file_name))
    if len(shards) > 1:
        total = sum(step.n_bytes for step in steps)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json(out_dir / INDEX_FILE, index)


def _convert(gguf_file: GGUFFile, step: _Step) -> np.ndarray:
    values = gguf_file.read_tensor(step.gguf_name)
    if step.rope_heads is not None:
        values = unpermute_rope_rows(values, step.rope_heads)
    return values


def _write_json(path: Path, content: object) -> None:
    text = content if isinstance(content, str) else json.dumps(content, indent=2)
    path.write_text(text, encoding="utf-8")
