"""Hostile peers for `bench/adversarial.py`, each written with hivemind directly.

Run as a child process (its own event loop and CPU share, as a stranger's machine would
have): it joins the swarm, prints "ready", attacks until its stdin closes, then prints one
JSON line of counters (what it sent, and how the servers answered) and exits.

    python bench/attackers.py ATTACK --join MADDR --model NAME --server PEER:START:END ...

The attacks mirror those of `tests/adversarial/` (which the bench must not import):
  dht_wipe        plain unsigned values stored under every block key, again and again
  subkey_flood    forged records under many signed and unsigned subkeys of every block key
  session_flood   Sybil peers, each opening inference sessions as large as the model's
                  context until refused, keeping them alive and reopening what expires
  message_flood   Sybil peers sending forward calls of many positions without pause, each
                  with a frame whose header claims a terabyte, and garbage
  push_injection  pushes with guessed session ids and secrets on many push streams
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import secrets
import sys
import warnings

ATTACKS = ("dht_wipe", "subkey_flood", "session_flood", "message_flood", "push_injection")
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

    def note(self, exc: BaseException) -> None:
        """Counts an answer by its kind: "busy:", "bad request:", or another error."""
        text = str(exc)
        kind = next((m for m in ("busy", "bad request", "expired") if m in text), "other error")
        self.counts[kind] += 1

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
        throughput=1e6,
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
        except Exception as exc:
            attack.note(exc)
            await asyncio.sleep(0.1)


PER_SERVER = {
    "session_flood": _hold_sessions,
    "message_flood": _flood_messages,
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


async def _main(args: argparse.Namespace) -> None:
    attack = Attack(args)
    ready = asyncio.Event()
    if args.attack in ("dht_wipe", "subkey_flood"):
        running = _dht_attack(attack, ready, flood=args.attack == "subkey_flood")
    else:
        running = _server_attack(attack, ready)
    task = asyncio.create_task(running)
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


if __name__ == "__main__":
    asyncio.run(_main(_parse()))
