"""Sync announce/read over a `hivemind.DHT` (its node runs in a child process), for tests.

The daemon and the client run a `DHTNode` on their own loop and use the `*_on_node`
coroutines of `volunteer.swarm.dht_records`; these wrappers let a test drive the same
records from plain threads. Records are fetched raw in hivemind's child process and
checked here, so the drops are logged in the test's process, where `caplog` sees them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import hivemind
from hivemind.dht.node import DHTNode
from hivemind.utils.crypto import RSAPrivateKey

from volunteer.machine.atomic import write_file_atomic
from volunteer.swarm.dht_records import (
    RawRecords,
    announce_on_node,
    encode_p2p_identity,
    fetch_raw,
    make_validator,
    record_ttl_s,
    snapshot_from_raw,
)
from volunteer.swarm.records import ServerInfo, ServerState, SwarmSnapshot, check_model_name

logger = logging.getLogger(__name__)

PIPE_SLACK_S = 5.0
"""Extra wait for hivemind's child process to pick up and answer a request over its pipe."""
# Before Python 3.11 these three were different classes.
_TIMEOUTS = (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError)


@contextlib.contextmanager
def owned_main_loop() -> Iterator[None]:
    """An event loop of ours as the main thread's, for the life of `hivemind.DHT`s made
    in it, closed after.

    A `hivemind.DHT`'s futures in this process take the main thread's event loop, and
    create one when none is set. Left behind, that loop is dropped by the next
    `asyncio.run` (or Textual app) of the main thread and collected unclosed: its
    ResourceWarnings then fail whichever later test the collector happens to run in.
    """
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        yield
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def make_dht(
    *,
    identity_key: RSAPrivateKey,
    identity_path: Path,
    initial_peers: Sequence[str],
    host_maddrs: Sequence[str],
) -> hivemind.DHT:
    """A started hivemind DHT whose peer id and record signatures both come from `identity_key`.

    Args:
        identity_key: this peer's RSA key (see `volunteer.daemon.identity`).
        identity_path: where the libp2p key file for hivemind is written.
        initial_peers: multiaddrs of peers already in the swarm; empty for a new swarm.
        host_maddrs: where to listen, e.g. `["/ip4/127.0.0.1/tcp/0"]`.
    """
    write_file_atomic(identity_path, encode_p2p_identity(identity_key))
    return hivemind.DHT(
        initial_peers=list(initial_peers),
        start=True,
        record_validators=[make_validator(identity_key)],
        host_maddrs=list(host_maddrs),
        identity_path=str(identity_path),
    )


def announce(
    dht: hivemind.DHT, info: ServerInfo, *, owner: bytes, expiration_s: float, timeout_s: float
) -> bool:
    """`announce_on_node` through a `hivemind.DHT` (blocks the calling thread).

    Returns:
        Whether every block's record was stored.
    """
    coro = functools.partial(
        _announce_in_dht, info=info, owner=owner, expiration_s=expiration_s, timeout_s=timeout_s
    )
    future = dht.run_coroutine(coro, return_future=True)
    try:
        return bool(future.result(timeout=timeout_s + PIPE_SLACK_S))
    except _TIMEOUTS:
        future.cancel()
        logger.warning("the DHT process did not answer an announce of %s", info.model)
        return False


def announce_offline(
    dht: hivemind.DHT, info: ServerInfo, *, owner: bytes, expiration_s: float, timeout_s: float
) -> bool:
    """Marks the span of `info` OFFLINE, as a server does on a graceful stop."""
    offline = info.model_copy(update={"state": ServerState.OFFLINE})
    return announce(dht, offline, owner=owner, expiration_s=expiration_s, timeout_s=timeout_s)


def reannounce(
    dht: hivemind.DHT, info: ServerInfo, *, owner: bytes, period_s: float, timeout_s: float
) -> bool:
    """One beat of a periodic announce: the record lives `record_ttl_s(period_s)`."""
    return announce(
        dht, info, owner=owner, expiration_s=record_ttl_s(period_s), timeout_s=timeout_s
    )


def read_snapshot(
    dht: hivemind.DHT, model: str, num_blocks: int, *, timeout_s: float
) -> SwarmSnapshot:
    """`read_snapshot_on_node` through a `hivemind.DHT` (blocks the calling thread).

    Raises:
        RecordError: `model` is not a valid model name (checked before the network).
        TimeoutError: the DHT did not answer within `timeout_s` (plus pipe slack).
    """
    check_model_name(model)
    future = dht.run_coroutine(
        functools.partial(_fetch_in_dht, model=model, num_blocks=num_blocks, timeout_s=timeout_s),
        return_future=True,
    )
    try:
        raw = future.result(timeout=timeout_s + PIPE_SLACK_S)
    except _TIMEOUTS:
        future.cancel()
        raw = None
    if raw is None:
        raise TimeoutError(f"reading the swarm of {model} took over {timeout_s:g} s")
    return snapshot_from_raw(model, num_blocks, raw)


async def _announce_in_dht(
    _dht: hivemind.DHT,
    node: DHTNode,
    *,
    info: ServerInfo,
    owner: bytes,
    expiration_s: float,
    timeout_s: float,
) -> bool:
    return await announce_on_node(
        node, info, owner=owner, expiration_s=expiration_s, timeout_s=timeout_s
    )


async def _fetch_in_dht(
    _dht: hivemind.DHT, node: DHTNode, *, model: str, num_blocks: int, timeout_s: float
) -> RawRecords | None:
    # Runs in hivemind's child process; returns plain data so checks and logs stay with us.
    return await fetch_raw(node, model, num_blocks, timeout_s=timeout_s)


@contextlib.asynccontextmanager
async def two_nodes(
    key_a: RSAPrivateKey, key_b: RSAPrivateKey
) -> AsyncIterator[tuple[DHTNode, DHTNode]]:
    """Two `DHTNode`s on the caller's loop (as the daemon runs its node), on 127.0.0.1,
    each signing with its key, the second joined through the first; both shut down
    after."""
    loopback = ["/ip4/127.0.0.1/tcp/0"]
    node_a = await DHTNode.create(record_validator=make_validator(key_a), host_maddrs=loopback)
    node_b = None
    try:
        maddrs = [str(addr) for addr in await node_a.get_visible_maddrs()]
        node_b = await DHTNode.create(
            initial_peers=maddrs, record_validator=make_validator(key_b), host_maddrs=loopback
        )
        yield node_a, node_b
    finally:
        for node in (node_b, node_a):
            if node is not None:
                await node.shutdown()
                await node.p2p.shutdown()
