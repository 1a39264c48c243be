"""The disk tier: a span streamed from disk computes exactly what it does in memory,
fails clearly on damaged files, and keeps its memory bounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from volunteer.models.block import TransformerBlock
from volunteer.models.config import ModelConfig
from volunteer.models.errors import CheckpointError
from volunteer.models.model import BlockSpan
from volunteer.models.offload import OffloadedSpan, OnDiskWeight, offload_span
from volunteer.models.rope import RotaryTable
from volunteer.models.weight_format import WeightFormat, compress_block

FORMATS = ("fp32", "bf16", "q4", "int8")
NUM_BLOCKS = 5


def tiny_config(num_layers: int = NUM_BLOCKS) -> ModelConfig:
    """Small, with GQA and q/k/v biases (so biases stay resident beside the files)."""
    return ModelConfig(
        arch="qwen2",
        vocab_size=97,
        hidden_size=64,
        intermediate_size=160,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        qkv_bias=True,
    )


def random_block(
    config: ModelConfig, index: int, fmt: WeightFormat, device: str = "cpu"
) -> TransformerBlock:
    """Block `index` with random weights (norms and biases too), as `load_span` would hold
    it in `fmt` on `device`; the same every call."""
    torch.manual_seed(1000 + index)
    block = TransformerBlock(config)
    with torch.no_grad():
        for name, param in block.named_parameters():
            if "norm" in name or "bias" in name:
                param.normal_(1.0 if "norm" in name else 0.0, 0.2)
    block.to(device=device, dtype=fmt.activation_dtype)
    compress_block(block, fmt)
    return block.eval()


def memory_span(config: ModelConfig, fmt: WeightFormat, device: str = "cpu") -> BlockSpan:
    with torch.device("meta"):
        span = BlockSpan(config, 0, config.num_layers)
    for index in range(config.num_layers):
        span.blocks[index] = random_block(config, index, fmt, device)
    span.rotary = RotaryTable(config).to(device=device, dtype=fmt.activation_dtype)
    return span.eval()


def disk_span(
    config: ModelConfig, fmt: WeightFormat, folder: Path, device: str = "cpu", read_ahead: int = 1
) -> OffloadedSpan:
    return OffloadedSpan.build(
        config,
        0,
        config.num_layers,
        folder,
        lambda index: random_block(config, index, fmt, device),
        read_ahead=read_ahead,
    ).eval()


@pytest.fixture
def config() -> ModelConfig:
    return tiny_config()


@pytest.fixture
def fp32_pair(config: ModelConfig, tmp_path: Path) -> Iterator[tuple[BlockSpan, OffloadedSpan]]:
    fmt = WeightFormat.parse("fp32")
    offloaded = disk_span(config, fmt, tmp_path)
    yield memory_span(config, fmt), offloaded
    offloaded.close()


def hidden(config: ModelConfig, seq: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, seq, config.hidden_size, generator=generator).to(dtype)


def run_session(
    span: BlockSpan, config: ModelConfig, dtype: torch.dtype, first: int, last: int
) -> list[torch.Tensor]:
    """Outputs of a prefill of 5 tokens then 3 one-token steps through blocks
    [first, last) with a cache, and of the same 5 tokens without one."""
    outputs = []
    device = next(span.parameters()).device
    cache = span.allocate_cache(batch_size=2, max_length=16)
    cache.keys, cache.values = cache.keys[first:last], cache.values[first:last]
    with torch.inference_mode():
        for step, seq in enumerate((5, 1, 1, 1)):
            x = hidden(config, seq, dtype, seed=step).to(device)
            outputs.append(span(x, start_pos=cache.length, cache=cache, first=first, last=last))
            cache.length += seq
        x = hidden(config, 5, dtype, seed=0).to(device)
        outputs.append(span(x, first=first, last=last))
    return outputs


@pytest.mark.parametrize("label", FORMATS)
@pytest.mark.parametrize(("first", "last"), [(0, NUM_BLOCKS), (1, 4), (4, 5)])
def test_offloaded_span_equals_the_span_in_memory(
    config: ModelConfig, tmp_path: Path, label: str, first: int, last: int
) -> None:
    fmt = WeightFormat.parse(label)
    offloaded = disk_span(config, fmt, tmp_path)
    try:
        want = run_session(memory_span(config, fmt), config, fmt.activation_dtype, first, last)
        got = run_session(offloaded, config, fmt.activation_dtype, first, last)
    finally:
        offloaded.close()
    assert next(offloaded.parameters()).dtype == fmt.activation_dtype
    for got_step, want_step in zip(got, want, strict=True):
        assert got_step.dtype == fmt.activation_dtype
        assert torch.equal(got_step, want_step)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("label", FORMATS)
def test_offloaded_span_on_cuda_equals_the_span_in_memory(
    config: ModelConfig, tmp_path: Path, label: str
) -> None:
    fmt = WeightFormat.parse(label)
    offloaded = disk_span(config, fmt, tmp_path, device="cuda")
    try:
        want = run_session(memory_span(config, fmt, "cuda"), config, fmt.activation_dtype, 1, 4)
        got = run_session(offloaded, config, fmt.activation_dtype, 1, 4)
    finally:
        offloaded.close()
    assert all(g.is_cuda and torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("read_ahead", [0, 1, 3])
def test_read_ahead_depth_changes_nothing_but_timing(
    config: ModelConfig, tmp_path: Path, read_ahead: int
) -> None:
    fmt = WeightFormat.parse("q4")
    offloaded = disk_span(config, fmt, tmp_path, read_ahead=read_ahead)
    try:
        got = run_session(offloaded, config, torch.float32, 0, NUM_BLOCKS)
        stats = offloaded.stream_stats
    finally:
        offloaded.close()
    want = run_session(memory_span(config, fmt), config, torch.float32, 0, NUM_BLOCKS)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert stats.blocks_read == 5 * NUM_BLOCKS
    assert stats.wait_s > 0 and stats.read_s > 0


def test_offload_span_moves_a_loaded_span_to_disk(config: ModelConfig, tmp_path: Path) -> None:
    fmt = WeightFormat.parse("int8")
    loaded = memory_span(config, fmt)
    offloaded = offload_span(loaded, tmp_path)
    try:
        # The given span's projections left memory: the files hold the only copy.
        assert isinstance(loaded.blocks[0].attn.qkv_proj.weight, OnDiskWeight)
        with pytest.raises(RuntimeError, match="on disk"):
            loaded(hidden(config, 3, torch.float32, seed=0))
        got = run_session(offloaded, config, torch.float32, 0, NUM_BLOCKS)
    finally:
        offloaded.close()
    want = run_session(memory_span(config, fmt), config, torch.float32, 0, NUM_BLOCKS)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_stream_stats_count_every_byte_of_the_blocks_read(
    fp32_pair: tuple[BlockSpan, OffloadedSpan], config: ModelConfig, tmp_path: Path
) -> None:
    _, offloaded = fp32_pair
    with torch.inference_mode():
        offloaded(hidden(config, 3, torch.float32, seed=0), first=1, last=4)
    stats = offloaded.stream_stats
    sizes = [(tmp_path / f"block-{i:05d}.safetensors").stat().st_size for i in (1, 2, 3)]
    assert (stats.blocks_read, stats.bytes_read) == (3, sum(sizes))
    assert stats.read_bytes_per_s > 0


def test_block_files_are_safetensors_with_their_layout(config: ModelConfig, tmp_path: Path) -> None:
    fmt = WeightFormat.parse("q4")
    offloaded = disk_span(config, fmt, tmp_path)
    try:
        path = tmp_path / "block-00002.safetensors"
        tensors = load_file(path)
        header_size = int.from_bytes(path.read_bytes()[:8], "little")
        metadata = json.loads(path.read_bytes()[8 : 8 + header_size])["__metadata__"]
    finally:
        offloaded.close()
    held = random_block(config, 2, fmt).mlp.down_proj.weight.held_tensors()
    assert held.keys() == {k.split(".", 1)[1] for k in tensors if k.startswith("down_proj.")}
    assert all(torch.equal(tensors[f"down_proj.{k}"], t) for k, t in held.items())
    layout = json.loads(metadata["down_proj"])
    assert layout == {"kind": "q4", "shape": [64, 160], "group_size": 32}
    assert not list(tmp_path.glob("*.tmp"))


def _damage(path: Path, how: str) -> None:
    if how == "removed":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # same size, another header: overwritten by something else
        data = bytearray(path.read_bytes())
        data[20] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["removed", "truncated", "header"])
def test_a_damaged_block_file_raises_a_checkpoint_error_naming_it(
    fp32_pair: tuple[BlockSpan, OffloadedSpan], config: ModelConfig, tmp_path: Path, how: str
) -> None:
    _, offloaded = fp32_pair
    x = hidden(config, 1, torch.float32, seed=0)
    with torch.inference_mode():
        offloaded(x)  # whole, the first time
        path = tmp_path / "block-00003.safetensors"
        _damage(path, how)
        with pytest.raises(CheckpointError, match=str(path)):
            offloaded(x)
        offloaded(x, first=0, last=3)  # the blocks before it still run


def test_a_file_removed_during_a_forward_stops_it_clearly(
    fp32_pair: tuple[BlockSpan, OffloadedSpan], tmp_path: Path
) -> None:
    _, offloaded = fp32_pair
    stream = iter(offloaded.weights_for(0, NUM_BLOCKS))
    next(stream)  # block 0 computing, block 1 read ahead
    (tmp_path / "block-00003.safetensors").unlink()
    next(stream)
    next(stream)
    with pytest.raises(CheckpointError, match="block-00003"):
        next(stream)


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("offload-read")]


def test_close_stops_the_read_thread_and_deletes_the_files(
    config: ModelConfig, tmp_path: Path
) -> None:
    offloaded = disk_span(config, WeightFormat.parse("bf16"), tmp_path)
    stream = iter(offloaded.weights_for(0, NUM_BLOCKS))
    next(stream)  # a forward left half-way, reads still queued
    assert _reader_threads()
    offloaded.close()
    assert not _reader_threads()
    assert not list(tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="closed"):
        offloaded(hidden(config, 1, torch.bfloat16, seed=0))


def test_a_failing_build_closes_what_it_started(config: ModelConfig, tmp_path: Path) -> None:
    fmt = WeightFormat.parse("fp32")

    def load_block(index: int) -> TransformerBlock:
        if index == 3:
            raise CheckpointError("block 3 is missing")
        return random_block(config, index, fmt)

    with pytest.raises(CheckpointError, match="block 3"):
        OffloadedSpan.build(config, 0, NUM_BLOCKS, tmp_path, load_block)
    assert not list(tmp_path.iterdir())
    assert not _reader_threads()


# 12 blocks of ~58 MiB in float32 (~700 MiB), built block by block and run for a
# prefill and a decode step. Prints a block's bytes, then the resident memory after the
# imports and a warm-up, after building, and at its peak.
_BOUNDED_SCRIPT = """
import resource, sys, tempfile
import psutil, torch
from volunteer.models.block import TransformerBlock
from volunteer.models.config import ModelConfig
from volunteer.models.offload import OffloadedSpan

config = ModelConfig(
    arch="llama", vocab_size=128, hidden_size=1024, intermediate_size=4096, num_layers=12,
    num_heads=8, num_kv_heads=2, head_dim=128, max_position_embeddings=64,
)

def load_block(index):
    with torch.device("meta"):
        block = TransformerBlock(config)
    block.to_empty(device="cpu")
    for param in block.parameters():
        param.data.fill_(0.01)  # every page written, so resident (and faster than init)
    return block

torch.nn.functional.linear(torch.randn(4, 1024), torch.randn(4096, 1024))  # warm-up
rss = psutil.Process().memory_info
baseline = rss().rss
block_bytes = sum(p.numel() * 4 for p in load_block(0).parameters())
with tempfile.TemporaryDirectory() as folder:
    span = OffloadedSpan.build(config, 0, 12, folder, load_block)
    built = rss().rss
    cache = span.allocate_cache(batch_size=1, max_length=16)
    with torch.inference_mode():
        for seq in (4, 1):
            span(torch.randn(1, seq, 1024), start_pos=cache.length, cache=cache)
            cache.length += seq
    span.close()
if sys.platform == "linux":
    # ru_maxrss keeps the parent's peak across fork and exec; VmHWM is this image's own.
    with open("/proc/self/status") as status:
        peak = int(status.read().split("VmHWM:")[1].split()[0]) * 1024
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
print(block_bytes, baseline, built, peak)
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="the resource module is POSIX only")
def test_resident_memory_stays_a_few_blocks_while_streaming() -> None:
    # glibc keeps freed heap memory resident when a threshold of its own, which moves
    # with what was last freed, puts big tensors on the heap; fixed at 1 MiB, every
    # tensor freed goes back, so the numbers show what is held, not the allocator's luck.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_BOUNDED_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    block_bytes, baseline, built, peak = map(int, result.stdout.split())
    mib = f"(MiB: block {block_bytes >> 20}, baseline {baseline >> 20}, built {built >> 20}, "
    mib += f"peak {peak >> 20})"
    # Streaming holds at most 3 blocks (one computing, one done but not yet let go, one
    # read ahead), plus the activations and the cache.
    assert peak - built < 3.5 * block_bytes, mib
    assert peak - baseline < 5 * block_bytes, mib  # the whole span is 12
