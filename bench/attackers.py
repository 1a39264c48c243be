"""Hostile peers for `bench/adversarial.py` and `tests/adversarial/`, written with hivemind.

Run as a child process (its own event loop and CPU share, as a stranger's machine would
have): it joins the swarm, prints "ready", attacks until its stdin closes, then prints one
JSON line of counters (what it sent, and how the servers answered) and exits. It lowers
its own CPU priority first (`--nice`, 19 by default, and Linux's idle scheduling class):
on one shared machine the attacker's own CPU use would otherwise count against the honest
swarm, which across machines it would not; what the servers spend on its requests still
counts in full.

    python bench/attackers.py ATTACK --join MADDR --model NAME --server PEER:START:END ...

The attacks mirror those of `tests/adversarial/` (which this script must not import):
  dht_wipe          plain unsigned values stored under every block key, again and again
  subkey_flood      forged records under many signed and unsigned subkeys of every block key
  forged_records    validly signed ONLINE records of many Sybil keys, each claiming every
                    block at 1e6 tokens/s, a GPU and a huge cache, with the honest servers'
                    weights hash copied; none serves: some of the claimed peers are
                    reachable and serve nothing, the rest do not exist
  joining_poison    validly signed JOINING records of many Sybil keys, each claiming a third
                    of the blocks at 1e6 tokens/s (placement must not count them)
  bad_server        Sybil servers (one key each) announcing such ONLINE records, that
                    answer `info` like a fast server, admit sessions, then answer the first
                    step with NaN, a wrong shape, garbage, a frame claiming a terabyte, an
                    error, a refusal, a wrong dtype, by hanging up or with silence (in turn)
  session_flood     Sybil peers, each opening inference sessions as large as `--context`
                    until refused, keeping them alive and reopening what expires
  message_flood     Sybil peers sending forward calls of many positions without pause, each
                    with a frame whose header claims a terabyte, and garbage
  endless_messages  Sybil peers holding streams to every stream handler: half send nothing,
                    half send a legal frame header and then one byte a second, never ending
  fd_exhaustion     Sybil peers opening and holding as many streams to every stream handler
                    as they may, plus raw TCP connections to the servers' p2p daemons that
                    never complete a handshake
  push_injection    pushes with guessed session ids and secrets on many push streams

Every attacker sleeps between rounds, so that its own CPU use stays bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import os
import resource
import secrets
import sys
import tempfile
import time
import warnings
from pathlib import Path

ATTACKS = (
    "dht_wipe",
    "subkey_flood",
    "forged_records",
    "joining_poison",
    "bad_server",
    "session_flood",
    "message_flood",
    "endless_messages",
    "fd_exhaustion",
    "push_injection",
)
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
CALL_TIMEOUT_S = 30.0
"""Every call of an attacker ends by then: a hung call must not stall its loop."""
KEEPALIVE_S = 5.0
"""How often a flooding session sends a step, so that the server's idle timeout keeps it."""
SUBKEYS_PER_ROUND = 50
FLOOD_POSITIONS = 256
"""Positions per forward call of the message flood: a valid call, expensive to compute."""
HOUR_S = 3600.0
CLEANUP_TIMEOUT_S = 20.0
"""Shutting the Sybils' p2p daemons down; past it the caller kills the process group."""
OWNERS_PER_SYBIL = 4
"""Signing keys per Sybil in the record attacks: a key costs a stranger nothing."""
RECORD_ROUND_S = 10.0
"""Pause between two passes of the record attacks' stores: the records last an hour, and a
pass every 10 s stays within the store rate an honest node allows one peer."""
FAKE_RATE = 1e6
"""The claimed throughput of fake records: far above any real server, within the schema."""
DRIBBLE_FRAME_BYTES = 4096
"""What a dribbling stream's frame header declares: a legal size for every handler."""
DRIBBLE_EVERY_S = 1.0
STREAMS_PER_HANDLE = 8
"""Endless streams one Sybil holds per handler and server (the per-peer session cap)."""
FD_STREAMS_PER_SERVER = 256
"""Streams one Sybil tries to hold open to one server in the fd exhaustion."""
FD_TCP_PER_SERVER = 256
"""Raw TCP connections the fd exhaustion holds to each server's p2p daemon."""
FD_BATCH = 8
FD_PAUSE_S = 0.1
"""The fd exhaustion opens FD_BATCH streams per server and Sybil, then sleeps this long."""
PUSH_ROUND_PAUSE_S = 0.05
"""Pause after each push stream of 100 pushes: the flood stays a flood, and the attacker's
own loop gets to its other tasks."""
BAD_MODES = (
    "nan",
    "wrong shape",
    "garbage",
    "huge frame",
    "error",
    "refusal",
    "wrong dtype",
    "hang up",
    "silent",
)
"""How the bad servers answer steps, in turn over all of them: a client backs a bad server
off after its first bad answer, so the commonest faults come first."""
WATCH_BYTES = 4096
"""What a held stream keeps of the server's answer (enough for an error's text)."""


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("attack", choices=ATTACKS)
    parser.add_argument("--join", required=True, help="a multiaddr of the swarm")
    parser.add_argument("--model", required=True, help="the swarm's model name")
    parser.add_argument("--server", action="append", default=[], help="PEER_ID:START:END")
    parser.add_argument("--num-blocks", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576, help="the model's hidden size")
    parser.add_argument("--context", type=int, default=2048, help="session max_length")
    parser.add_argument("--sybils", type=int, default=4, help="peer identities to attack from")
    parser.add_argument("--nice", type=int, default=19, help="CPU niceness to add first (19)")
    return parser.parse_args(argv)


class Attack:
    def __init__(self, args: argparse.Namespace) -> None:
        from hivemind.p2p import PeerID

        self.args = args
        self.counts: collections.Counter[str] = collections.Counter()
        self.servers = []
        for spec in args.server:
            peer, start, end = spec.split(":")
            self.servers.append((PeerID.from_base58(peer), int(start), int(end)))

    def note(self, exc: BaseException | str) -> None:
        """Counts an answer by its kind: "busy:", "bad request:", or another error."""
        text = str(exc)
        kind = next((m for m in ("busy", "bad request", "expired") if m in text), "other error")
        self.counts[kind] += 1

    def most(self, name: str, value: float) -> None:
        self.counts[name] = max(self.counts[name], round(value, 1))

    async def sybils(self) -> list:
        from hivemind.p2p import P2P

        join = [self.args.join]
        return [
            await P2P.create(host_maddrs=LOOPBACK, initial_peers=join)
            for _ in range(self.args.sybils)
        ]


def _dht(attack: Attack):  # -> hivemind.DHT; imported late to keep --help instant
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import hivemind
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.utils.crypto import RSAPrivateKey

    from volunteer.swarm.dht_records import owner_marker

    key = RSAPrivateKey()
    # Plain hivemind: it signs its own marked subkeys and checks nothing of ours.
    dht = hivemind.DHT(
        initial_peers=[attack.args.join],
        start=True,
        host_maddrs=LOOPBACK,
        record_validators=[RSASignatureValidator(key)],
    )
    return dht, owner_marker(key)


async def _dht_attack(attack: Attack, ready: asyncio.Event, flood: bool) -> None:
    from hivemind.utils import get_dht_time

    from volunteer.swarm.records import ServerInfo, ServerState, block_key

    dht, marker = _dht(attack)
    args = attack.args
    fake = ServerInfo(
        state=ServerState.ONLINE,
        start=0,
        end=args.num_blocks,
        throughput=FAKE_RATE,
        dtype="float32",
        cache_tokens_left=1 << 20,
        version="0.1.0",
        model=args.model,
    ).to_wire()
    ready.set()
    try:
        while True:
            later = get_dht_time() + HOUR_S
            for index in range(args.num_blocks):
                key = block_key(args.model, index)
                if not flood:
                    stored = dht.store(key, b"x", later, return_future=True)
                    attack.counts["stored"] += 1
                else:
                    for i in range(SUBKEYS_PER_ROUND):
                        dht.store(key, fake, later, subkey=marker + b"#%d" % i, return_future=True)
                        dht.store(key, fake, later, subkey=b"x%d" % i, return_future=True)
                    stored = dht.store(key, fake, later, subkey=b"last", return_future=True)
                    attack.counts["stored"] += 2 * SUBKEYS_PER_ROUND + 1
                # One wait per key: the attacker's process handles stores in order.
                await asyncio.wait_for(asyncio.wrap_future(stored), CALL_TIMEOUT_S)
    finally:
        dht.shutdown()


def _many_owners(keys: list):  # -> RSASignatureValidator
    """A validator that signs each record with the key whose owner marker its subkey
    carries: one DHT node stores the records of many Sybil owners."""
    from hivemind.dht.crypto import RSASignatureValidator

    from volunteer.swarm.dht_records import owner_marker

    class ManyOwners(RSASignatureValidator):
        def __init__(self) -> None:
            super().__init__(keys[0])
            self.by_marker = {owner_marker(key): key for key in keys}

        def sign_value(self, record) -> bytes:
            for marker, key in self.by_marker.items():
                if marker in record.subkey:
                    signature = key.sign(self._serialize_record(record))
                    return record.value + self.SIGNATURE_FORMAT.replace(b"_value_", signature)
            return record.value

    return ManyOwners()


async def _p2p_as(key, join: str, folder: Path):  # -> hivemind.p2p.P2P
    """A p2p daemon whose peer id is the one `key`'s records name."""
    from hivemind.p2p import P2P

    from volunteer.swarm.dht_records import encode_p2p_identity

    path = folder / f"{secrets.token_hex(8)}.key"
    path.write_bytes(encode_p2p_identity(key))
    return await P2P.create(
        host_maddrs=LOOPBACK,
        initial_peers=[join],
        identity_path=str(path),
        check_if_identity_free=False,
    )


def _fake_record(attack: Attack, owner: int, kind: str, copied: dict) -> dict:
    from volunteer import __version__
    from volunteer.swarm.records import MAX_CACHE_TOKENS, ServerInfo, ServerState

    blocks = attack.args.num_blocks
    start, end = 0, blocks
    if kind == "joining_poison":  # owners spread over the blocks, a third each
        width = max(1, blocks // 3)
        start = (owner * 7) % blocks
        end = min(blocks, start + width)
    return ServerInfo(
        state=ServerState.JOINING if kind == "joining_poison" else ServerState.ONLINE,
        start=start,
        end=end,
        throughput=FAKE_RATE,
        inference_rps=FAKE_RATE,
        forward_rps=FAKE_RATE,
        dtype="float32",
        cache_tokens_left=MAX_CACHE_TOKENS,
        version=__version__,
        model=attack.args.model,
        **copied,
    ).to_wire()


async def _records_attack(attack: Attack, ready: asyncio.Event, kind: str) -> None:
    """forged_records, joining_poison and bad_server: validly signed lies, kept fresh.

    Each Sybil runs a DHT node and stores the records of its share of the owners, one
    request per block key and a pass per RECORD_ROUND_S: within the rate each honest node
    allows one peer, as a careful attacker would stay. "ready" once the first pass is in.
    """
    from hivemind.dht.node import DHTNode
    from hivemind.p2p import P2P
    from hivemind.utils.crypto import RSAPrivateKey

    from volunteer.transport.protocol import INFERENCE_HANDLE, INFO_HANDLE

    args = attack.args
    # Every bad server is one of the Sybils; forged and JOINING records come from more
    # keys than that. Of the forged owners, the Sybils are reachable and serve nothing,
    # the others name peer ids that no daemon has.
    owners = args.sybils if kind == "bad_server" else args.sybils * OWNERS_PER_SYBIL
    keys = [RSAPrivateKey() for _ in range(owners)]
    reachable = keys[: args.sybils] if kind in ("forged_records", "bad_server") else []
    peers: list[P2P] = []
    nodes: list[DHTNode] = []
    with tempfile.TemporaryDirectory(prefix="attacker-keys-") as folder:
        try:
            for index in range(args.sybils):
                if index < len(reachable):
                    peers.append(await _p2p_as(reachable[index], args.join, Path(folder)))
                else:
                    peers.append(await P2P.create(host_maddrs=LOOPBACK, initial_peers=[args.join]))
            if kind == "bad_server":
                serve = _bad_stream(attack)  # one turn of BAD_MODES over all bad servers
                for p2p in peers:
                    await p2p.add_binary_stream_handler(INFERENCE_HANDLE, serve)
                    await p2p.add_protobuf_handler(
                        INFO_HANDLE, _bad_info(attack), _expert_uid_type()
                    )
            validator = _many_owners(keys)
            for p2p in peers:
                nodes.append(
                    await DHTNode.create(
                        p2p=p2p, initial_peers=[args.join], record_validator=validator
                    )
                )
            copied = await _copied_fields(attack, nodes[0])
            records = [_fake_record(attack, owner, kind, copied) for owner in range(owners)]
            while True:
                await asyncio.gather(
                    *(
                        _store_pass(
                            attack, node, keys[index :: len(nodes)], records[index :: len(nodes)]
                        )
                        for index, node in enumerate(nodes)
                    )
                )
                ready.set()
                await asyncio.sleep(RECORD_ROUND_S)
        finally:
            for node in nodes:
                await node.shutdown()
            for p2p in peers:
                await p2p.shutdown()


async def _store_pass(attack: Attack, node, keys: list, records: list[dict]) -> None:
    """Stores each owner's record under every block key it claims, a request per key."""
    from hivemind.utils import get_dht_time

    from volunteer.swarm.dht_records import owner_marker
    from volunteer.swarm.dht_validator import MAX_RECORD_LIFETIME_S
    from volunteer.swarm.records import block_key

    # A legal lifetime: honest nodes take the records, and keep them after the attacker
    # has gone.
    later = get_dht_time() + min(HOUR_S, MAX_RECORD_LIFETIME_S / 2)
    for index in range(attack.args.num_blocks):
        mine = [
            (owner_marker(k), r) for k, r in zip(keys, records, strict=True) if _claims(r, index)
        ]
        if not mine:
            continue
        try:
            done = await asyncio.wait_for(
                node.store_many(
                    keys=[block_key(attack.args.model, index)] * len(mine),
                    values=[record for _, record in mine],
                    expiration_time=later,
                    subkeys=[marker for marker, _ in mine],
                ),
                CALL_TIMEOUT_S,
            )
        except Exception as exc:
            attack.note(exc)
            continue
        attack.counts["records stored"] += sum(1 for ok in done.values() if ok)
        attack.counts["records refused"] += sum(1 for ok in done.values() if not ok)


async def _copied_fields(attack: Attack, node) -> dict:
    """What a client checks a record against and an attacker can read in any honest
    record: the served weights' hash. Copied, so the lies pass every check but a
    measurement."""
    from volunteer.swarm.dht_records import read_snapshot_on_node
    from volunteer.swarm.records import ServerInfo

    copied = {}
    if "device_class" in ServerInfo.model_fields:
        copied["device_class"] = "gpu"  # the class with the most plausible speed
    for _ in range(30):
        with contextlib.suppress(Exception):
            snapshot = await read_snapshot_on_node(
                node, attack.args.model, attack.args.num_blocks, timeout_s=10.0
            )
            for info in snapshot.spans().values():
                if getattr(info, "weights_sha256", None):
                    return {**copied, "weights_sha256": info.weights_sha256}
        await asyncio.sleep(1.0)
    attack.counts["no honest record to copy"] += 1
    return copied


def _claims(record: dict, index: int) -> bool:
    return record["start"] <= index < record["end"]


def _expert_uid_type():
    from hivemind.proto import runtime_pb2

    return runtime_pb2.ExpertUID


def _bad_info(attack: Attack):
    """`info` answered as a fast, roomy server would: pings find the bad server well."""
    from hivemind.proto import runtime_pb2

    import volunteer.transport.protocol as wire

    reply = wire.InfoReply(
        model_name=attack.args.model,
        start=0,
        end=attack.args.num_blocks,
        hidden_size=attack.args.hidden,
        dtype="float32",
        cache_tokens_total=1 << 20,
        cache_tokens_left=1 << 20,
        max_batch=8,
        max_chunk=512,
        max_tokens=4096,
        max_length=attack.args.context,
        throughput=FAKE_RATE,
    )

    async def info(_request, _context) -> runtime_pb2.ExpertResponse:
        attack.counts["info answered"] += 1
        return runtime_pb2.ExpertResponse(metadata=wire.pack_metadata(reply))

    return info


def _bad_answer(mode: str, hidden) -> bytes:
    """A bad server's answer to a step on `hidden` (None for "hang up" and "silent")."""
    import torch
    from hivemind.p2p import P2P
    from hivemind.proto import runtime_pb2
    from hivemind.proto.p2pd_pb2 import RPCError

    import volunteer.transport.framing as framing
    import volunteer.transport.protocol as wire

    if mode == "error":
        return framing.encode_frame(RPCError(message="RuntimeError('\x1b[2Jboom')"))
    if mode == "refusal":
        return framing.encode_frame(RPCError(message="bad request: I do not like you"))
    if mode == "garbage":
        return framing.frame_bytes(b"\xff\xfe\xfd not a protobuf message")
    if mode == "huge frame":
        return P2P.MESSAGE_MARKER + (1 << 40).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER)
    if mode == "wrong shape":
        output = torch.zeros(1, 1, hidden.shape[-1] + 1)
    elif mode == "wrong dtype":
        output = hidden.to(torch.float16)
    else:  # nan
        output = torch.full_like(hidden, float("nan"))
    reply = wire.StepReply(session_id="x", length=hidden.shape[1])
    return framing.encode_frame(
        runtime_pb2.ExpertResponse(
            tensors=[framing.pack_tensor(output)], metadata=wire.pack_metadata(reply)
        )
    )


def _bad_stream(attack: Attack):
    """The inference handler of the bad servers: each stream gets the next of BAD_MODES."""
    from hivemind.proto import runtime_pb2

    import volunteer.transport.framing as framing
    import volunteer.transport.protocol as wire

    turns = itertools.cycle(BAD_MODES)

    async def serve(_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode = next(turns)
        try:
            await asyncio.wait_for(framing.read_frame(reader, max_bytes=1 << 20), CALL_TIMEOUT_S)
            ack = wire.StepReply(session_id="x", length=0)
            writer.write(
                framing.encode_frame(runtime_pb2.ExpertResponse(metadata=wire.pack_metadata(ack)))
            )
            _, body = await asyncio.wait_for(
                framing.read_frame(reader, max_bytes=1 << 24), CALL_TIMEOUT_S
            )
            request = runtime_pb2.ExpertRequest()
            request.ParseFromString(body)
            hidden = framing.unpack_tensor(request.tensors[0], max_numel=1 << 24)
            attack.counts[f"answered {mode}"] += 1
            if mode == "silent":  # holds the client's step until it gives up on us
                await _drain_until_end(reader, CALL_TIMEOUT_S)
            elif mode != "hang up":
                writer.write(_bad_answer(mode, hidden))
                await asyncio.wait_for(writer.drain(), CALL_TIMEOUT_S)
            await asyncio.sleep(0.2)  # then it goes away
        except Exception as exc:
            attack.note(exc)
        finally:
            writer.close()

    return serve


async def _drain_until_end(reader: asyncio.StreamReader, timeout_s: float) -> None:
    async def drain() -> None:
        while await reader.read(1 << 16):
            pass

    with contextlib.suppress(Exception):
        await asyncio.wait_for(drain(), timeout_s)


async def _hold_sessions(attack: Attack, p2p, peer, start: int, end: int) -> None:
    """One Sybil's sessions on one server: as many as it gets, each kept alive."""
    import torch

    from volunteer.client.remote_span import RemoteSpan

    remote = RemoteSpan(p2p=p2p, peer_id=peer, start=start, end=end)
    held: list = []
    while True:
        try:
            stream = await remote.open_inference(
                max_length=attack.args.context, batch_size=1, timeout_s=CALL_TIMEOUT_S
            )
            held.append([stream, 0])
            attack.counts["sessions opened"] += 1
            continue
        except Exception as exc:  # refused: keep what is held alive, then try again
            attack.note(exc)
        for entry in list(held):
            stream, position = entry
            try:
                hidden = torch.randn(1, 1, attack.args.hidden)
                await stream.step(hidden, position % attack.args.context, CALL_TIMEOUT_S)
                entry[1] = position + 1
            except Exception as exc:  # expired or closed by the server: reopen later
                attack.note(exc)
                held.remove(entry)
        attack.counts["sessions held"] = max(attack.counts["sessions held"], len(held))
        await asyncio.sleep(KEEPALIVE_S)


async def _flood_messages(attack: Attack, p2p, peer, start: int, end: int) -> None:
    import torch
    from hivemind.p2p import P2P

    import volunteer.transport.framing as framing
    from volunteer.client.remote_span import RemoteSpan
    from volunteer.transport.p2p_streams import open_stream
    from volunteer.transport.protocol import FORWARD_HANDLE

    remote = RemoteSpan(p2p=p2p, peer_id=peer, start=start, end=end)
    huge = P2P.MESSAGE_MARKER + (1 << 40).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER)
    while True:
        for frame in (huge + bytes(1 << 16), framing.frame_bytes(b"\xff\xfe not protobuf")):
            try:
                _, reader, writer = await open_stream(p2p, peer, FORWARD_HANDLE)
                writer.write(frame)
                await asyncio.wait_for(reader.read(1 << 16), CALL_TIMEOUT_S)
                writer.close()
                attack.counts["bad frames"] += 1
            except Exception as exc:
                attack.note(exc)
        try:
            hidden = torch.randn(1, FLOOD_POSITIONS, attack.args.hidden)
            await remote.forward(hidden, timeout_s=CALL_TIMEOUT_S)
            attack.counts["forwards computed"] += 1
        except Exception as exc:
            attack.note(exc)
            await asyncio.sleep(0.1)  # refused at once: no busy loop in this process


@dataclasses.dataclass
class Held:
    """A stream (or raw connection) the attacker holds open, and the server's answer."""

    handle: str
    writer: asyncio.StreamWriter
    answer: asyncio.Task  # the server's bytes until it closes the stream
    since: float = dataclasses.field(default_factory=time.monotonic)


async def _answer(reader: asyncio.StreamReader) -> bytes:
    """What the server sends until it closes (its first WATCH_BYTES), never more held."""
    kept = b""
    with contextlib.suppress(Exception):
        while chunk := await reader.read(1 << 16):
            kept = (kept + chunk)[:WATCH_BYTES]
    return kept


async def _hold(p2p, peer, handle: str) -> Held:
    from volunteer.transport.p2p_streams import open_stream

    _, reader, writer = await asyncio.wait_for(open_stream(p2p, peer, handle), CALL_TIMEOUT_S)
    return Held(handle, writer, asyncio.create_task(_answer(reader)))


def _prune(attack: Attack, held: list[Held]) -> list[Held]:
    """Drops the streams the server has closed, counting how and when it closed them."""
    alive = []
    for each in held:
        if not each.answer.done():
            alive.append(each)
            continue
        each.writer.close()
        attack.counts["closed by the server"] += 1
        attack.most("longest held s", time.monotonic() - each.since)
        answer = each.answer.result()
        if answer and each.handle != "tcp":  # p2pd's handshake bytes are no answer
            attack.note(answer.decode("utf-8", "replace"))
    return alive


def _stream_handles() -> tuple[str, ...]:
    import volunteer.transport.protocol as wire

    return (wire.INFERENCE_HANDLE, wire.FORWARD_HANDLE, wire.BACKWARD_HANDLE, wire.PUSH_HANDLE)


async def _endless_messages(attack: Attack, p2p, peer, start: int, end: int) -> None:
    """Streams that never finish their first message: half silent, half dribbling."""
    from hivemind.p2p import P2P

    header = P2P.MESSAGE_MARKER + DRIBBLE_FRAME_BYTES.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER)
    held: list[Held] = []
    dribbling: set[int] = set()
    try:
        while True:
            held = _prune(attack, held)
            for handle in _stream_handles():
                have = sum(1 for each in held if each.handle == handle)
                for index in range(have, STREAMS_PER_HANDLE):
                    try:
                        each = await _hold(p2p, peer, handle)
                    except Exception as exc:
                        attack.note(exc)
                        break
                    attack.counts["streams opened"] += 1
                    held.append(each)
                    if index % 2:
                        each.writer.write(header)
                        dribbling.add(id(each))
            attack.most("streams held", len(held))
            await asyncio.sleep(DRIBBLE_EVERY_S)
            for each in held:
                if id(each) in dribbling and not each.writer.is_closing():
                    each.writer.write(b"\0")
                    attack.counts["bytes dribbled"] += 1
    finally:
        for each in held:
            each.answer.cancel()
            each.writer.close()


async def _exhaust_fds(attack: Attack, p2p, peer, start: int, end: int) -> None:
    """As many streams to one server as it lets this Sybil hold, reopened as it closes them."""
    handles = itertools.cycle(_stream_handles())
    held: list[Held] = []
    try:
        while True:
            held = _prune(attack, held)
            for _ in range(min(FD_BATCH, FD_STREAMS_PER_SERVER - len(held))):
                try:
                    held.append(await _hold(p2p, peer, next(handles)))
                    attack.counts["streams opened"] += 1
                except Exception as exc:
                    attack.note(exc)
                    break
            attack.most("streams held", len(held))
            await asyncio.sleep(FD_PAUSE_S)
    finally:
        for each in held:
            each.answer.cancel()
            each.writer.close()


async def _exhaust_tcp(attack: Attack, sybil, peer) -> None:
    """Raw TCP connections to a server's p2p daemon that never start a handshake."""
    address = await _tcp_address(sybil, peer)
    attack.counts["tcp targets"] += 1
    held: list[Held] = []
    try:
        while True:
            held = _prune(attack, held)
            for _ in range(min(FD_BATCH, FD_TCP_PER_SERVER - len(held))):
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(*address), CALL_TIMEOUT_S
                    )
                except Exception as exc:
                    attack.note(exc)
                    break
                held.append(Held("tcp", writer, asyncio.create_task(_answer(reader))))
                attack.counts["tcp opened"] += 1
            attack.most("tcp held", len(held))
            await asyncio.sleep(FD_PAUSE_S)
    finally:
        for each in held:
            each.answer.cancel()
            each.writer.close()


async def _tcp_address(sybil, peer) -> tuple[str, int]:
    """The loopback TCP address of `peer`'s p2p daemon, as `sybil`'s daemon learned it."""
    while True:
        for info in await sybil.list_peers():
            if info.peer_id != peer:
                continue
            for maddr in info.addrs:
                parts = str(maddr).split("/")
                if "ip4" in parts and "tcp" in parts:
                    return parts[parts.index("ip4") + 1], int(parts[parts.index("tcp") + 1])
        await asyncio.sleep(1.0)  # not connected yet: the Sybils' streams will connect it


async def _inject_pushes(attack: Attack, p2p, peer, start: int, end: int) -> None:
    import torch
    from hivemind.proto import runtime_pb2

    import volunteer.transport.framing as framing
    import volunteer.transport.protocol as wire
    from volunteer.transport.p2p_streams import open_stream

    hostile = framing.pack_tensor(torch.full((1, 1, attack.args.hidden), 3.0))
    while True:
        try:
            *_, writer = await open_stream(p2p, peer, wire.PUSH_HANDLE)
            for step_id in range(1, 101):
                meta = wire.StepRequest(
                    session_id=secrets.token_hex(16),
                    start_pos=0,
                    step_id=step_id,
                    push_secret=secrets.token_hex(16),
                )
                request = runtime_pb2.ExpertRequest(
                    metadata=wire.pack_metadata(meta), tensors=[hostile]
                )
                writer.write(framing.encode_frame(request))
                await asyncio.wait_for(writer.drain(), CALL_TIMEOUT_S)
                attack.counts["pushes sent"] += 1
            writer.close()
            await asyncio.sleep(PUSH_ROUND_PAUSE_S)
        except Exception as exc:
            attack.note(exc)
            await asyncio.sleep(0.1)


PER_SERVER = {
    "session_flood": _hold_sessions,
    "message_flood": _flood_messages,
    "endless_messages": _endless_messages,
    "fd_exhaustion": _exhaust_fds,
    "push_injection": _inject_pushes,
}


async def _server_attack(attack: Attack, ready: asyncio.Event) -> None:
    sybils = await attack.sybils()
    run = PER_SERVER[attack.args.attack]
    tasks = [
        asyncio.create_task(run(attack, p2p, peer, start, end))
        for p2p in sybils
        for peer, start, end in attack.servers
    ]
    if attack.args.attack == "fd_exhaustion":
        tasks += [
            asyncio.create_task(_exhaust_tcp(attack, sybils[0], peer))
            for peer, _, _ in attack.servers
        ]
    ready.set()
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p2p in sybils:
            await p2p.shutdown()


async def _until_stdin_closes() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)


def _attack(attack: Attack, ready: asyncio.Event):  # -> the attack's coroutine
    name = attack.args.attack
    if name in ("dht_wipe", "subkey_flood"):
        return _dht_attack(attack, ready, flood=name == "subkey_flood")
    if name in ("forged_records", "joining_poison", "bad_server"):
        return _records_attack(attack, ready, name)
    return _server_attack(attack, ready)


async def _main(args: argparse.Namespace) -> None:
    attack = Attack(args)
    ready = asyncio.Event()
    task = asyncio.create_task(_attack(attack, ready))
    waiting = asyncio.create_task(ready.wait())
    await asyncio.wait([task, waiting], timeout=120, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    print("ready" if ready.is_set() else "not ready", flush=True)
    await asyncio.wait(
        [task, asyncio.create_task(_until_stdin_closes())],
        timeout=None,
        return_when=asyncio.FIRST_COMPLETED,
    )
    if task.done() and task.exception() is not None:
        attack.counts[f"crashed: {task.exception()!r}"[:200]] += 1
    # The counters first: the caller may kill this process group if the clean-up lags.
    print(json.dumps(dict(attack.counts)), flush=True)
    task.cancel()
    await asyncio.wait([task], timeout=CLEANUP_TIMEOUT_S)


def _lower_priority(nice: int) -> None:
    """Lowers this process's CPU priority (its p2p daemons inherit it) and raises its file
    limit to the most allowed: the fd exhaustion holds thousands of sockets."""
    if nice:
        os.nice(nice)
        # Niceness 19 still takes timeslices from a busy core: each wake-up of the honest
        # swarm's many processes (client, servers, p2pds) may wait for one. The idle class
        # runs only on a core nothing else wants, as if it were another machine.
        if hasattr(os, "SCHED_IDLE"):
            with contextlib.suppress(OSError):
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


if __name__ == "__main__":
    arguments = _parse()
    _lower_priority(arguments.nice)
    asyncio.run(_main(arguments))
