"""The daemon's block server: load a span of the model, serve it, keep it announced.

Start: find the model (fetching it if needed), choose the span (`--blocks`, or
`--num-blocks` / as many blocks as fit in memory, placed where the swarm is weakest:
`volunteer.daemon.span_plan`), load it, measure its speed, register the RPC handlers on
the DHT service's P2P, and announce ONLINE. While serving, the record is re-announced
every period with a TTL of a few periods, so a server that dies silently drops out of
the swarm on its own. Stop: announce OFFLINE first (clients stop routing here at once),
then unregister the handlers.

A stop (or pause) of the only server of some blocks hands them over first
(`volunteer.daemon.hand_over`). Rebalancing (unless the span was set with `--blocks`)
is decided in `volunteer.daemon.rebalancer`, at once where the swarm has a hole
(`volunteer.daemon.hole_watch`); when it moves, `serve_moved` here swaps the span in,
announces the new blocks ONLINE and the blocks it left OFFLINE; sessions already open
finish on the old blocks, which are freed after them.

`--num-blocks 0` serves nothing: the daemon is then a DHT peer (a bootstrap node) and a
client for chat.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import time
from pathlib import Path
from typing import Any

from hivemind.p2p import P2P

from volunteer import __version__
from volunteer.control.messages import ServingStatus
from volunteer.control.server import ControlServer
from volunteer.daemon.dht_service import DHTService
from volunteer.daemon.hand_over import hand_over
from volunteer.daemon.hole_watch import HoleWatch
from volunteer.daemon.liveness import Liveness
from volunteer.daemon.offload_check import check_offloaded_span, keep_lifetime_calibration
from volunteer.daemon.ram_room import ram_room
from volunteer.daemon.rebalancer import Rebalancer
from volunteer.daemon.serving_control import ServingControl
from volunteer.daemon.span_loading import close_span, load_served_span, offload_folder
from volunteer.daemon.span_plan import SpanPlan, auto_cache_tokens, plan_span
from volunteer.errors import VolunteerError
from volunteer.machine.cpu_sharing import in_passing_thread
from volunteer.machine.microbench import choose_decode_threads
from volunteer.machine.owner_sensors import OwnerSensors
from volunteer.machine.weight_choice import resolve_format
from volunteer.model_cache.served_model import ServedModel, open_model
from volunteer.model_cache.weights_hash import weights_hash
from volunteer.models.model import BlockSpan
from volunteer.models.offload import OffloadedSpan
from volunteer.models.weight_format import WeightFormat
from volunteer.paths import Paths
from volunteer.server.caps import ServerCaps
from volunteer.server.drill import Drill
from volunteer.server.handler import BlockHandler
from volunteer.server.work_log import ServeStats
from volunteer.settings import Settings
from volunteer.swarm.dht_records import (
    announce_on_node,
    peer_id_from_owner,
    read_snapshot_on_node,
    record_ttl_s,
)
from volunteer.swarm.records import ServerInfo, ServerState, SwarmSnapshot
from volunteer.transport.commitment import PeerSigner
from volunteer.transport.local_link import LocalListener, this_boot
from volunteer.transport.protocol import INFERENCE_HANDLE, PUSH_HANDLE

logger = logging.getLogger(__name__)

ANNOUNCE_PERIOD_S = 30.0
"""How often the record is refreshed; it lives `record_ttl_s` of this."""
DHT_TIMEOUT_S = 10.0
ANNOUNCE_ATTEMPTS = 3
PING_TIMEOUT_S = 5.0
SPEED_BUDGET_S = 0.2
"""Time spent at start measuring the span's decode speed (the throughput announced)."""
HAND_OVER_SLACK_S = 3.0
"""What a hand-over's last look (its pings) may take beyond the grace."""
DEVICE_CLASS = "cpu"
"""What the blocks compute on, as records state it (`ServerInfo.device_class`)."""


class BlockService:
    """Serves a span of the model's blocks to the swarm (see the module docstring), with
    the running `dht`; `owner` is `owner_marker` of this peer's key (its records' subkey),
    `rng` randomises tie-breaks and check intervals (seeded by the caller in tests)."""

    def __init__(
        self,
        settings: Settings,
        paths: Paths,
        dht: DHTService,
        *,
        owner: bytes,
        announce_period_s: float = ANNOUNCE_PERIOD_S,
        rng: random.Random | None = None,
        signer: PeerSigner | None = None,
    ) -> None:
        self.settings = settings
        self._paths = paths
        self._dht = dht
        self.owner = owner
        self._signer = signer
        """This peer's key, which commits to the steps the blocks serve (None: no)."""
        self._period_s = announce_period_s
        self._rng = rng or random.Random()
        self.model: ServedModel | None = None
        self.handler: BlockHandler | None = None
        self.stats = ServeStats()
        """What every handler of this run served (one stats kept across moves)."""
        self.plan: SpanPlan | None = None
        self.rebalancer: Rebalancer | None = None
        self.info: ServerInfo | None = None
        """The record announced for the served blocks (None: serving none)."""
        self.weights_hash: str | None = None
        """`weights_hash` of the served model's files (None: serving none)."""
        self._local: LocalListener | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._decode_single_measured = False
        """One thread decoded as fast as all of them at start (so it keeps doing so)."""
        self.hole_watch: HoleWatch | None = None
        sensors = OwnerSensors(Path(settings.owner_sensors) if settings.owner_sensors else None)
        self.control = ServingControl(self, sensors)
        self.liveness = Liveness(lambda: self._dht.p2p)
        """Which peers named by records answer pings (hole watch and hand-over)."""
        self.leave_now = asyncio.Event()
        """Set when the volunteer wants it gone now: no hand-over grace."""
        self.pausing: asyncio.Task[None] | None = None
        """A pause waiting for the hand-over of its blocks (`serving_control`)."""

    @property
    def p2p(self) -> P2P:
        return self._dht.p2p

    @property
    def stop_grace_s(self) -> float:
        """The longest its stop may take beyond the usual: the hand-over's grace."""
        return self.settings.leave_grace_s

    def hurry(self) -> None:
        """Cuts a hand-over short: the volunteer asked to leave now."""
        self.leave_now.set()

    @functools.cached_property
    def fmt(self) -> WeightFormat:
        """The form the weights are held in (the `dtype` setting): by the served blocks,
        and by the servers this daemon's chats route through. Resolving `auto` times
        the forms once (a second or so): reach it off the event loop first."""
        return resolve_format(self.settings.dtype)

    async def start(self) -> None:
        settings = self.settings
        if settings.num_blocks == 0:
            logger.info("serving no blocks (--num-blocks 0): a DHT peer and chat client only")
            return
        began = time.monotonic()
        self.model = model = await asyncio.to_thread(
            open_model, settings.model, self._paths.models_dir
        )
        self.weights_hash = await asyncio.to_thread(weights_hash, model.folder)
        fmt = await asyncio.to_thread(lambda: self.fmt)
        room = await asyncio.to_thread(ram_room, settings)
        available = room.available_bytes
        # Our own records from before a restart must not count as another server.
        snapshot = None
        if settings.blocks is None:
            me = peer_id_from_owner(self.owner)
            snapshot = (await self.placement_snapshot()).without(me)
        self.plan = plan = plan_span(
            model.config,
            settings,
            model_name=model.swarm_name,
            available_bytes=available,
            snapshot=snapshot,
            fmt=fmt,
        )
        reason = f"{plan.reason}; weights in {fmt.label}" + (f"; {room.note}" if room.note else "")
        self.plan = plan = dataclasses.replace(plan, reason=reason)
        start, end = plan.start, plan.end
        logger.info("serving %s: %s", model.swarm_name, plan.reason)
        offload_to = None
        if end - start > plan.capacity.num_blocks:  # set by --blocks, larger than the RAM
            me = peer_id_from_owner(self.owner)
            offload_to = await asyncio.to_thread(offload_folder, self._paths.cache_dir, me)
            reason = f"{plan.reason}; their weights stream from disk, within the RAM limit"
            self.plan = plan = dataclasses.replace(plan, reason=reason)
        span = await self.load_span(start, end, offload_to=offload_to)
        decode_threads, throughput = await in_passing_thread(
            choose_decode_threads, span, settings.thread_count, SPEED_BUDGET_S
        )
        self._decode_single_measured = decode_threads == 1 < settings.thread_count
        if isinstance(span, OffloadedSpan):
            check = await in_passing_thread(
                check_offloaded_span, span, decode_threads, self._paths.cache_dir,
                f"blocks {start}:{end} in {fmt.label}",
            )  # fmt: skip
            if check is not None:
                self.plan = plan = dataclasses.replace(
                    plan, reason=f"{plan.reason}; {check.describe()}"
                )
        cache_tokens = settings.cache_tokens or auto_cache_tokens(
            model.config, settings, end - start, available, fmt
        )
        self.handler = await BlockHandler.create(
            p2p=self._dht.p2p,
            span=span,
            model_name=model.swarm_name,
            cache_tokens=cache_tokens,
            throughput=throughput,
            threads=settings.thread_count,
            decode_threads=decode_threads,
            cpu_cap=settings.cpu_cap_cores,
            upload_mbps=settings.max_upload_mbps,
            caps=ServerCaps.from_settings(settings),
        )
        self.handler.signer = self._signer
        self.handler.stats = self.stats
        if settings.faults:
            logger.warning("DRILL: the served blocks answer wrong on purpose (%s)", settings.faults)
            self.handler.drill = Drill(settings.faults)
        local_socket = await self._listen_locally(self.handler)
        self.info = ServerInfo(
            state=ServerState.ONLINE,
            start=start,
            end=end,
            throughput=throughput,
            dtype=fmt.label,
            cache_tokens_left=cache_tokens,
            version=__version__,
            public_name=settings.public_name,
            model=model.swarm_name,
            local_socket=local_socket,
            boot_id=this_boot() if local_socket is not None else None,
            weights_sha256=self.weights_hash,
            device_class=DEVICE_CLASS,
        )
        for attempt in range(ANNOUNCE_ATTEMPTS):
            if await self.announce(self.info):
                break
            # A peer that just died may still sit in the routing table: try again.
            logger.warning("announce attempt %d failed", attempt + 1)
            await asyncio.sleep(1.0)
        else:
            raise VolunteerError("could not announce the served blocks in the DHT")
        self._tasks.append(asyncio.create_task(self._announce_forever(), name="announce"))
        self._tasks.append(asyncio.create_task(self.control.rules.run(), name="owner rules"))
        if settings.blocks is None and settings.rebalance_period_s > 0:
            self.rebalancer = Rebalancer(self, rng=self._rng)
            self._tasks.append(asyncio.create_task(self.rebalancer.run(), name="rebalance"))
            self.hole_watch = HoleWatch(self, rng=self._rng)
            self._tasks.append(asyncio.create_task(self.hole_watch.run(), name="holes"))
        logger.info(
            "serving blocks %d:%d of %s (%.1f tokens/s per block, decoding on %d of %d "
            "threads, %d cache tokens) %.2f s after start",
            start, end, model.swarm_name, throughput, decode_threads, settings.thread_count,
            cache_tokens, time.monotonic() - began,
        )  # fmt: skip

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        if self.pausing is not None:
            tasks.append(self.pausing)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.handler is not None and not self.handler.is_paused:
            grace_s = self.settings.leave_grace_s
            try:
                # Bounded: the runner gives this stop only SERVICE_STOP_TIMEOUT_S beyond
                # the grace, and the OFFLINE announce below must fit in it.
                await asyncio.wait_for(
                    hand_over(self, grace_s, self.leave_now), grace_s + HAND_OVER_SLACK_S
                )
            except (TimeoutError, VolunteerError, OSError) as exc:
                why = str(exc) or "out of time"
                logger.warning("handing the blocks over failed: %s; leaving now", why)
        if self.info is not None:
            offline = self.info.model_copy(update={"state": ServerState.OFFLINE})
            if await self.announce(offline):
                logger.info("announced OFFLINE for blocks %d:%d", offline.start, offline.end)
            self.info = None
        if self._local is not None:
            local, self._local = self._local, None
            await local.close()
        if self.handler is not None:
            handler, self.handler = self.handler, None
            await handler.shutdown()
            keep_lifetime_calibration(handler.span, self._paths.cache_dir)
            close_span(handler.span)

    async def _listen_locally(self, handler: BlockHandler) -> str | None:
        """Serves the handler's streams on a Unix socket for processes of this machine
        (`volunteer.transport.local_link`); its path, or None where that cannot be."""
        if not self.settings.local_links or this_boot() is None:
            return None
        listener = LocalListener(
            self._dht.p2p.peer_id.to_base58(),
            {
                INFERENCE_HANDLE: handler.serve_inference_stream,
                PUSH_HANDLE: handler.serve_push_stream,
            },
        )
        try:
            await listener.start()
        except OSError as exc:
            logger.warning("no local socket (%s): local peers go through p2p", exc)
            return None
        self._local = listener
        return str(listener.path)

    def status(self) -> ServingStatus:
        """The blocks served, the work done, and why these blocks."""
        handler = self.handler
        if handler is None:
            return ServingStatus()
        rebalancer, watch = self.rebalancer, self.hole_watch
        last_check = rebalancer.last_check if rebalancer is not None else None
        return ServingStatus(
            blocks=(handler.span.start, handler.span.end),
            swarm_model=handler.model_name,
            requests_served=handler.stats.requests,
            tokens_served=handler.stats.tokens,
            steps_batched=handler.batcher.batched_steps,
            largest_batch=handler.batcher.largest,
            open_sessions=len(handler.sessions),
            local_links=self._local.links_served if self._local is not None else None,
            cache_tokens_total=handler.sessions.cache_tokens_total,
            cache_tokens_left=handler.sessions.cache_tokens_left,
            throughput=handler.throughput,
            threads=handler.compute.threads,
            decode_threads=handler.compute.decode_threads,
            span_reason=self.plan.reason if self.plan is not None else None,
            is_paused=handler.is_paused,
            pause_reason=self.control.paused_by,
            owner_rules=self.control.describe_rules(),
            rebalancing=rebalancer is not None and rebalancer.is_moving,
            moves=rebalancer.moves if rebalancer is not None else 0,
            hole_moves=watch.moves if watch is not None else 0,
            swarm_hole=f"{watch.hole[0]}:{watch.hole[1]}" if watch and watch.hole else None,
            leaving=self.info is not None and self.info.state is ServerState.LEAVING,
            last_rebalance_check=last_check.reason if last_check is not None else None,
        )

    async def apply_settings(self, settings: Settings) -> None:
        """Takes on the settings a running server can change (`APPLIED_LIVE`): a new public
        name is announced at once, a thread count applies from the next computation."""
        before, self.settings = self.settings, settings
        if self.handler is not None:
            self.handler.compute.cpu_cap = settings.cpu_cap_cores  # max_cpu_percent, at once
            self.handler.upload.set_rate(settings.max_upload_mbps)
        if settings.thread_count != before.thread_count:
            if self.handler is not None:
                compute = self.handler.compute
                compute.threads = settings.thread_count
                # Decoding stays on one thread where more were measured to gain nothing.
                single = self._decode_single_measured
                compute.decode_threads = 1 if single else settings.thread_count
            logger.info("computing on %d threads", settings.thread_count)
        if settings.public_name != before.public_name and self.info is not None:
            self.info = self.info.model_copy(update={"public_name": settings.public_name})
            if not await self.announce(self.info):
                logger.warning("announcing the new public name failed; the next announce retries")

    def register_control(self, control: ControlServer) -> None:
        """Adds the control methods `swarm`, `pause` and `resume`."""
        self.control.register(control)

    async def describe_swarm(self) -> dict[str, Any]:
        """The model's records now, as `SwarmSnapshot.to_json` gives them."""
        await self.served_model()
        return (await self.read_snapshot()).to_json()

    async def served_model(self) -> ServedModel:
        """The model of the swarm, opened here if this daemon serves none of it."""
        if self.model is None:
            self.model = await asyncio.to_thread(
                open_model, self.settings.model, self._paths.models_dir
            )
        return self.model

    async def placement_snapshot(self) -> SwarmSnapshot:
        """The swarm as span choice and rebalancing count it: only the servers of the
        same weights, since others cannot share a route with ours."""
        assert self.weights_hash is not None
        return (await self.read_snapshot()).with_weights(self.weights_hash, self.fmt.label)

    async def read_snapshot(self) -> SwarmSnapshot:
        assert self.model is not None
        config = self.model.config
        return await read_snapshot_on_node(
            self._dht.node, self.model.swarm_name, config.num_layers, timeout_s=DHT_TIMEOUT_S
        )

    async def load_span(self, start: int, end: int, *, offload_to: Path | None = None) -> BlockSpan:
        """Loads blocks `[start, end)` of the served model, off the event loop (see
        `load_served_span` for `offload_to`)."""
        assert self.model is not None
        model, threads, fmt = self.model, self.settings.thread_count, self.fmt
        return await in_passing_thread(
            load_served_span, model, start, end, threads=threads, fmt=fmt, offload_to=offload_to
        )

    async def serve_moved(self, span: BlockSpan, reason: str) -> None:
        """Serves `span` instead of the blocks served now (open sessions finish on those)
        and announces it; the blocks it leaves are announced OFFLINE."""
        handler, info = self.handler, self.info
        assert handler is not None and info is not None
        start, end = span.start, span.end
        handler.swap_span(span)
        moved = info.model_copy(update={"start": start, "end": end})
        self.info = moved
        await self.announce(moved)
        left = [i for i in range(info.start, info.end) if not start <= i < end]
        if left:
            offline = info.model_copy(update={"state": ServerState.OFFLINE})
            await self.announce(offline, blocks=range(left[0], left[-1] + 1))
        if self.plan is not None:
            reason = f"moved from {info.start}:{info.end}: {reason}"
            self.plan = dataclasses.replace(self.plan, start=start, end=end, reason=reason)
        logger.info("moved from blocks %d:%d to %d:%d", info.start, info.end, start, end)

    async def announce(self, info: ServerInfo, blocks: range | None = None) -> bool:
        return await announce_on_node(
            self._dht.node,
            info,
            owner=self.owner,
            expiration_s=record_ttl_s(self._period_s),
            timeout_s=DHT_TIMEOUT_S,
            blocks=blocks,
        )

    async def _announce_forever(self) -> None:
        while True:
            await asyncio.sleep(self._period_s)
            handler, info = self.handler, self.info
            if handler is None or info is None:
                return
            info = info.model_copy(update={"cache_tokens_left": handler.sessions.cache_tokens_left})
            if not await self.announce(info):
                logger.warning("re-announce failed; retrying in %g s", self._period_s)
