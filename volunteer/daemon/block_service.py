"""The daemon's block server: load a span of the model, serve it, keep it announced.

Start: find the model (fetching it if needed), choose the span (`--blocks`, or
`--num-blocks` / as many blocks as fit in memory, placed where the swarm is weakest),
load it, measure its speed, register the RPC handlers on the DHT service's P2P, and
announce ONLINE. While serving, the record is re-announced every period with a TTL of a
few periods, so a server that dies silently drops out of the swarm on its own. Stop:
announce OFFLINE first (clients stop routing here at once), then unregister the handlers.

`--num-blocks 0` serves nothing: the daemon is then a DHT peer (a bootstrap node) and a
client for chat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import psutil
import torch

from models.checkpoint import load_span
from models.config import ModelConfig
from models.model import BlockSpan
from volunteer import __version__
from volunteer.daemon.dht_service import DHTService
from volunteer.errors import SettingsError, VolunteerError
from volunteer.paths import Paths
from volunteer.served_model import ServedModel, open_model
from volunteer.server.handler import BlockHandler
from volunteer.settings import Settings
from volunteer.swarm.dht_records import announce_on_node, read_snapshot_on_node, record_ttl_s
from volunteer.swarm.records import ServerInfo, ServerState

logger = logging.getLogger(__name__)

ANNOUNCE_PERIOD_S = 30.0
"""How often the record is refreshed; it lives `record_ttl_s` of this."""
DHT_TIMEOUT_S = 10.0
ANNOUNCE_ATTEMPTS = 3
MEMORY_FRACTION = 0.8
"""Share of the memory available at start that the blocks may take."""
MEMORY_RESERVE_BYTES = 512 << 20
"""Left for the process itself, the model's ends and activations."""
CACHE_MEMORY_FRACTION = 0.25
"""Share of the memory left after loading that the attention caches may take."""
MAX_AUTO_CACHE_BYTES = 4 << 30
DTYPE = torch.float32
"""CPU inference in float32: the numerics local chat uses, so greedy output matches."""


class NotEnoughMemoryError(VolunteerError):
    """Not even one block fits in the memory this machine has free."""


class BlockService:
    """Serves a span of the model's blocks to the swarm (see the module docstring).

    Args:
        settings: model, blocks / num_blocks, cache_tokens and public_name are used.
        paths: where models are cached.
        dht: the running DHT service (started before this one).
        owner: `owner_marker` of this peer's key, the subkey of its records.
        announce_period_s: seconds between re-announces.
    """

    def __init__(
        self,
        settings: Settings,
        paths: Paths,
        dht: DHTService,
        *,
        owner: bytes,
        announce_period_s: float = ANNOUNCE_PERIOD_S,
    ) -> None:
        self._settings = settings
        self._paths = paths
        self._dht = dht
        self._owner = owner
        self._period_s = announce_period_s
        self.model: ServedModel | None = None
        self.handler: BlockHandler | None = None
        self._info: ServerInfo | None = None
        self._announcer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        settings = self._settings
        if settings.num_blocks == 0:
            logger.info("serving no blocks (--num-blocks 0): a DHT peer and chat client only")
            return
        began = time.monotonic()
        self.model = model = await asyncio.to_thread(
            open_model, settings.model, self._paths.models_dir
        )
        start, end = await self._choose_span(model)
        logger.info("loading blocks %d:%d of %s", start, end, model.swarm_name)
        span = await asyncio.to_thread(
            load_span, model.folder, model.config, start, end, dtype=DTYPE
        )
        throughput = await asyncio.to_thread(measure_throughput, span)
        cache_tokens = settings.cache_tokens or auto_cache_tokens(model.config, end - start)
        self.handler = await BlockHandler.create(
            p2p=self._dht.p2p,
            span=span,
            model_name=model.swarm_name,
            cache_tokens=cache_tokens,
            throughput=throughput,
        )
        self._info = ServerInfo(
            state=ServerState.ONLINE,
            start=start,
            end=end,
            throughput=throughput,
            dtype=str(DTYPE).removeprefix("torch."),
            cache_tokens_left=cache_tokens,
            version=__version__,
            public_name=settings.public_name,
            model=model.swarm_name,
        )
        for attempt in range(ANNOUNCE_ATTEMPTS):
            if await self._announce(self._info):
                break
            # A peer that just died may still sit in the routing table: try again.
            logger.warning("announce attempt %d failed", attempt + 1)
            await asyncio.sleep(1.0)
        else:
            raise VolunteerError("could not announce the served blocks in the DHT")
        self._announcer = asyncio.create_task(self._announce_forever(), name="announce")
        logger.info(
            "serving blocks %d:%d of %s (%.1f tokens/s per block, %d cache tokens) "
            "%.2f s after start",
            start, end, model.swarm_name, throughput, cache_tokens, time.monotonic() - began,
        )  # fmt: skip

    async def stop(self) -> None:
        if self._announcer is not None:
            self._announcer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._announcer
            self._announcer = None
        if self._info is not None:
            offline = self._info.model_copy(update={"state": ServerState.OFFLINE})
            if await self._announce(offline):
                logger.info("announced OFFLINE for blocks %d:%d", offline.start, offline.end)
            self._info = None
        if self.handler is not None:
            handler, self.handler = self.handler, None
            await handler.shutdown()

    def status(self) -> dict[str, Any]:
        handler = self.handler
        if handler is None:
            return {"blocks": None, "requests_served": 0, "tokens_served": 0}
        return {
            "blocks": [handler.span.start, handler.span.end],
            "swarm_model": handler.model_name,
            "requests_served": handler.stats.requests,
            "tokens_served": handler.stats.tokens,
            "open_sessions": len(handler.sessions),
            "cache_tokens_total": handler.sessions.cache_tokens_total,
            "cache_tokens_left": handler.sessions.cache_tokens_left,
            "throughput": handler.throughput,
        }

    async def _choose_span(self, model: ServedModel) -> tuple[int, int]:
        total = model.config.num_layers
        if self._settings.blocks is not None:
            start, end = self._settings.blocks
            if end > total:
                raise SettingsError(
                    f"--blocks {start}:{end} is outside {model.swarm_name}, which has "
                    f"{total} blocks (0:{total})"
                )
            return start, end
        fit = blocks_that_fit(model.config)
        wanted = self._settings.num_blocks or total
        count = min(wanted, fit, total)
        if count < wanted and self._settings.num_blocks is not None:
            logger.warning("only %d of the %d blocks asked for fit in memory", count, wanted)
        snapshot = await read_snapshot_on_node(
            self._dht.node, model.swarm_name, total, timeout_s=DHT_TIMEOUT_S
        )
        return snapshot.weakest_span(count)

    async def _announce(self, info: ServerInfo) -> bool:
        return await announce_on_node(
            self._dht.node,
            info,
            owner=self._owner,
            expiration_s=record_ttl_s(self._period_s),
            timeout_s=DHT_TIMEOUT_S,
        )

    async def _announce_forever(self) -> None:
        while True:
            await asyncio.sleep(self._period_s)
            handler, info = self.handler, self._info
            if handler is None or info is None:
                return
            info = info.model_copy(update={"cache_tokens_left": handler.sessions.cache_tokens_left})
            if not await self._announce(info):
                logger.warning("re-announce failed; retrying in %g s", self._period_s)


def block_bytes(config: ModelConfig, dtype: torch.dtype = DTYPE) -> int:
    """Bytes of one block's weights in `dtype`."""
    with torch.device("meta"):
        block = BlockSpan(config, 0, 1)
    return sum(p.numel() for p in block.parameters()) * dtype.itemsize


def blocks_that_fit(config: ModelConfig, dtype: torch.dtype = DTYPE) -> int:
    """How many blocks fit in the memory free now (at most all of them).

    Raises:
        NotEnoughMemoryError: not even one.
    """
    available = psutil.virtual_memory().available
    budget = available * MEMORY_FRACTION - MEMORY_RESERVE_BYTES
    size = block_bytes(config, dtype)
    count = min(config.num_layers, int(max(budget, 0) // size))
    if count < 1:
        raise NotEnoughMemoryError(
            f"one block needs {size / 2**20:.0f} MiB but only {available / 2**20:.0f} MiB "
            f"of memory is free"
        )
    return count


def auto_cache_tokens(config: ModelConfig, num_blocks: int, dtype: torch.dtype = DTYPE) -> int:
    """A cache budget from the memory left after loading: a share of it, capped."""
    per_token = 2 * num_blocks * config.num_kv_heads * config.head_dim * dtype.itemsize
    budget = min(psutil.virtual_memory().available * CACHE_MEMORY_FRACTION, MAX_AUTO_CACHE_BYTES)
    # At least one full-context session, so that a lone server can always answer one user.
    return max(int(budget // per_token), config.max_position_embeddings)


def measure_throughput(span: BlockSpan, steps: int = 3) -> float:
    """Decode tokens per second per block, timed on this span (after one warm-up step)."""
    cache = span.allocate_cache(batch_size=1, max_length=steps + 1)
    hidden = torch.zeros(1, 1, span.config.hidden_size, dtype=DTYPE)
    times = []
    with torch.inference_mode():
        for position in range(steps + 1):
            began = time.perf_counter()
            span(hidden, start_pos=position, cache=cache)
            cache.length = position + 1
            times.append(time.perf_counter() - began)
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    return span.num_blocks / max(step_s, 1e-6)
