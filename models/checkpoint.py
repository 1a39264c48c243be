"""Load exactly the tensors a role needs from a Hugging Face folder of safetensors.

Files are memory-mapped and read tensor by tensor, so loading blocks [start, end) never
materialises the other blocks. Modules are built on the meta device and the loaded
tensors are assigned in place of the meta parameters.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from volunteer.models.config import ModelConfig
from volunteer.models.errors import CheckpointError
from volunteer.models.model import BlockSpan, CausalLM, ModelEnds
from volunteer.models.rope import RotaryTable
from volunteer.models.weight_format import WeightFormat, compress_block, compress_head

# Our parameter names (inside one block) -> the HF tensors, concatenated along dim 0,
# that make them up. The one place checkpoint names are translated.
BLOCK_TENSORS: Mapping[str, tuple[str, ...]] = {
    "attn_norm.weight": ("input_layernorm.weight",),
    "attn.qkv_proj.weight": tuple(f"self_attn.{p}_proj.weight" for p in "qkv"),
    "attn.qkv_proj.bias": tuple(f"self_attn.{p}_proj.bias" for p in "qkv"),
    "attn.o_proj.weight": ("self_attn.o_proj.weight",),
    "attn.o_proj.bias": ("self_attn.o_proj.bias",),
    "mlp_norm.weight": ("post_attention_layernorm.weight",),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.gate_up_proj.bias": ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
    "mlp.down_proj.weight": ("mlp.down_proj.weight",),
    "mlp.down_proj.bias": ("mlp.down_proj.bias",),
}
END_TENSORS: Mapping[str, tuple[str, ...]] = {
    "embed_tokens.weight": ("model.embed_tokens.weight",),
    "norm.weight": ("model.norm.weight",),
    "lm_head.weight": ("lm_head.weight",),
}


def block_prefix(index: int) -> str:
    """HF name prefix of block `index`'s tensors."""
    return f"model.layers.{index}."


def hf_block_tensors(
    index: int, block: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Block `index`'s tensors (our names) under the checkpoint's HF names, fused ones
    split along dim 0 as the checkpoint's own tensors are sized (`shapes`, by HF name).

    Raises:
        CheckpointError: a tensor the checkpoint has no place for, or of another size.
    """
    prefix = block_prefix(index)
    named = {}
    for name, tensor in block.items():
        parts = [prefix + part for part in BLOCK_TENSORS.get(name, ())]
        if not parts or any(part not in shapes for part in parts):
            raise CheckpointError(f"block {index}'s {name} has no place in the checkpoint")
        sizes = [shapes[part][0] for part in parts]
        fits = all(tuple(shapes[part][1:]) == tuple(tensor.shape[1:]) for part in parts)
        if not fits or sum(sizes) != tensor.shape[0]:
            raise CheckpointError(
                f"block {index}'s {name} is {tuple(tensor.shape)}, which the checkpoint's "
                f"{' + '.join(parts)} do not make"
            )
        named.update(zip(parts, tensor.split(sizes), strict=True))
    return named


class SafetensorsFolder:
    """Tensor name -> file index of a (possibly sharded) safetensors checkpoint."""

    def __init__(
        self,
        folder: Path,
        files_by_tensor: Mapping[str, Path],
        handles: Mapping[Path, object] | None = None,
    ) -> None:
        self.folder = folder
        self.files_by_tensor = dict(files_by_tensor)
        self._handles: dict[Path, object] = dict(handles or {})

    @classmethod
    def open(cls, folder: Path) -> SafetensorsFolder:
        """Indexes `folder` from `model.safetensors.index.json` or the files' headers."""
        folder = Path(folder)
        index_path = folder / "model.safetensors.index.json"
        if index_path.exists():
            return cls(folder, _read_index(index_path))
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {folder}")
        files_by_tensor: dict[str, Path] = {}
        handles = {}
        for path in files:
            handle = handles[path] = _open_safetensors(path)
            for name in handle.keys():  # type: ignore[attr-defined]  # noqa: SIM118
                if name in files_by_tensor:
                    raise CheckpointError(f"tensor {name!r} appears twice in {folder}")
                files_by_tensor[name] = path
        # The handles opened for indexing are kept for reading: no second open per shard.
        return cls(folder, files_by_tensor, handles)

    def read(
        self, names: tuple[str, ...], *, dtype: torch.dtype, device: torch.device | str
    ) -> torch.Tensor:
        """Reads the named tensors, concatenated along dim 0, as a private copy."""
        parts = []
        for name in names:
            path = self.files_by_tensor.get(name)
            if path is None:
                raise CheckpointError(
                    f"tensor {name!r} is missing from {self.folder}; the checkpoint is "
                    f"incomplete — pull the model again"
                )
            if path not in self._handles:
                self._handles[path] = _open_safetensors(path)
            try:
                parts.append(self._handles[path].get_tensor(name))  # type: ignore[attr-defined]
            except SafetensorError as exc:
                raise CheckpointError(f"cannot read {name!r} from {path}: {exc}") from exc
        if len(parts) == 1:
            # Copy even when no conversion is needed: a view into the memory map would
            # keep the whole file mapped and its touched pages counted against us.
            return parts[0].to(device=device, dtype=dtype, copy=True)
        return torch.cat(parts, dim=0).to(device=device, dtype=dtype)


def load_span(
    folder: Path | SafetensorsFolder,
    config: ModelConfig,
    start: int,
    end: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    fmt: WeightFormat | None = None,
) -> BlockSpan:
    """Loads blocks [start, end) from a Hugging Face folder, and nothing else; in `fmt`
    if given (which then sets the dtype), each block compressed as soon as it is read,
    so that memory peaks at one block in float32 beside the compressed ones."""
    files = _indexed(folder)
    if fmt is not None:
        dtype = fmt.activation_dtype
    with torch.device("meta"):
        span = BlockSpan(config, start, end)
    for offset, index in enumerate(range(start, end)):
        names = {
            ours: tuple(block_prefix(index) + n for n in hf) for ours, hf in BLOCK_TENSORS.items()
        }
        block = span.blocks[offset]
        state = _read_module(files, block, names, "", dtype, device)
        block.load_state_dict(state, assign=True, strict=True)
        if fmt is not None:
            compress_block(block, fmt)
    span.forget_weights()
    # Built in float32, then cast: q/k/v must share the weights' dtype in attention.
    span.rotary = RotaryTable(config).to(device=device, dtype=dtype)
    return span


def load_ends(
    folder: Path | SafetensorsFolder,
    config: ModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> ModelEnds:
    """Loads the token embedding, the final norm and the LM head."""
    files = _indexed(folder)
    with torch.device("meta"):
        ends = ModelEnds(config)
    state = _read_module(files, ends, END_TENSORS, "", dtype, device)
    ends.load_state_dict(state, assign=True, strict=False)
    if config.tie_word_embeddings:
        ends.lm_head.weight = ends.embed_tokens.weight
    return ends


def load_causal_lm(
    folder: Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    fmt: WeightFormat | None = None,
) -> CausalLM:
    """Loads a whole model (every block and both ends) for local use; in `fmt` if given,
    the LM head included (it is read once per token, like a block)."""
    config = ModelConfig.from_hf_folder(folder)
    if fmt is not None:
        dtype = fmt.activation_dtype
    # Indexed once: both halves read from the same open shard files.
    files = SafetensorsFolder.open(folder)
    ends = load_ends(files, config, dtype=dtype, device=device)
    if fmt is not None:
        compress_head(ends, fmt)
    span = load_span(files, config, 0, config.num_layers, dtype=dtype, device=device, fmt=fmt)
    return CausalLM(ends, span).eval()


def _indexed(folder: Path | SafetensorsFolder) -> SafetensorsFolder:
    """An already indexed checkpoint as is, or a folder indexed now."""
    return folder if isinstance(folder, SafetensorsFolder) else SafetensorsFolder.open(folder)


def _read_module(
    files: SafetensorsFolder,
    module: torch.nn.Module,
    names: Mapping[str, tuple[str, ...]],
    state_prefix: str,
    dtype: torch.dtype,
    device: torch.device | str,
) -> dict[str, torch.Tensor]:
    """Reads every parameter `module` declares; tied weights are read once."""
    state = {}
    seen: set[int] = set()
    for param_name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        tensor = files.read(names[param_name], dtype=dtype, device=device)
        if tensor.shape != param.shape:
            raise CheckpointError(
                f"{'+'.join(names[param_name])} in {files.folder} has shape "
                f"{tuple(tensor.shape)}, but the config needs {tuple(param.shape)}"
            )
        state[state_prefix + param_name] = tensor
    return state


def _read_index(path: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors index: {exc}") from exc
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: weight_map must be an object")
    files_by_tensor = {}
    for name, file in weight_map.items():
        # The index is untrusted: each entry must name a shard file inside the folder.
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
            raise CheckpointError(f"{path}: tensor {name!r} names a bad shard file {file!r}")
        files_by_tensor[str(name)] = path.parent / file
    missing = sorted({p.name for p in files_by_tensor.values() if not p.is_file()})
    if missing:
        raise CheckpointError(
            f"{path} lists shard files that are missing: {', '.join(missing)}; pull the model again"
        )
    return files_by_tensor


def _open_safetensors(path: Path) -> object:
    # safe_open memory-maps the file and checks its header against the file size.
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({exc}); it is truncated or corrupt — "
            f"delete it and pull the model again"
        ) from exc
