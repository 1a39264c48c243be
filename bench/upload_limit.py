"""`max_upload_mbps` under load: what a server really sends through p2p, against its cap.

A block server (a small random model's blocks, its real handler on a real hivemind P2P
daemon on loopback) answers forward calls from `--clients` concurrent client loops, each
sending hidden states whose reply is about `--reply-kib` KiB, for `--seconds` per cap. The
replies' bytes that came back over that window give the rate; the first row (no cap) is
the reference: loopback's rate through the p2p daemons, far above any cap. Beside each
cap: the measured rate, its ratio to the cap (target: at most 1 + a second's burst over
the window, and near 1 when the load can fill it), and the time writers were held back.

    python bench/upload_limit.py [--caps 0,40,10,2] [--seconds 10] [--clients 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import torch
from hivemind.p2p import P2P
from volunteer.models.config import ModelConfig
from volunteer.models.model import BlockSpan

from volunteer.client.remote_span import RemoteSpan
from volunteer.server.handler import BlockHandler
from volunteer.transport.protocol import PeerUnavailableError
from volunteer.transport.upload_limit import BURST_S

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
HIDDEN = 256


def _config() -> ModelConfig:
    return ModelConfig(
        arch="llama",
        vocab_size=97,
        hidden_size=HIDDEN,
        intermediate_size=512,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=HIDDEN // 4,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
    )


async def _load(remote: RemoteSpan, hidden: torch.Tensor, until: float) -> tuple[int, int]:
    """Bytes of the replies received, and the calls that failed (counted, not fatal: a
    rare reply cut short through the p2p daemons happens with or without a cap)."""
    received = failed = 0
    while time.monotonic() < until:
        try:
            output = await remote.forward(hidden, timeout_s=120)
        except PeerUnavailableError:
            failed += 1
            continue
        received += output.numel() * output.element_size()
    return received, failed


async def run(caps: list[float], seconds: float, clients: int, reply_kib: int) -> list[dict]:
    span = BlockSpan(_config(), 0, 1).eval()
    server = await P2P.create(host_maddrs=LOOPBACK)
    handler = await BlockHandler.create(
        p2p=server, span=span, model_name="bench", cache_tokens=256, max_batch=64,
        max_chunk=1024, max_tokens=64 * 1024, idle_timeout_s=120,
    )  # fmt: skip
    maddrs = await server.get_visible_maddrs()
    client = await P2P.create(host_maddrs=LOOPBACK, initial_peers=maddrs)
    positions = max(1, reply_kib * 1024 // (HIDDEN * 4))
    hidden = torch.randn(1, positions, HIDDEN)
    remote = RemoteSpan(p2p=client, peer_id=server.peer_id, start=0, end=1)
    rows = []
    try:
        await remote.forward(hidden, timeout_s=60)  # warm: the stream and the compute
        for cap in caps:
            handler.upload.set_rate(cap or None)
            handler.upload.free_at = float("-inf")
            waited_before = handler.upload.waited_s
            began = time.monotonic()
            until = began + seconds
            got = await asyncio.gather(*(_load(remote, hidden, until) for _ in range(clients)))
            elapsed = time.monotonic() - began
            mbps = sum(bytes_ for bytes_, _ in got) * 8 / elapsed / 1e6
            row = {
                "cap_mbps": cap or None,
                "measured_mbps": round(mbps, 2),
                "ratio_to_cap": round(mbps / cap, 3) if cap else None,
                "bound_ratio": round((elapsed + BURST_S) / elapsed, 3) if cap else None,
                "held_back_s": round(handler.upload.waited_s - waited_before, 1),
                "seconds": round(elapsed, 1),
                "failed_calls": sum(failed for _, failed in got),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        await handler.shutdown()
        await client.shutdown()
        await server.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--caps", default="0,40,10,2", help="Mbit/s; 0: no cap (reference)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--reply-kib", type=int, default=256)
    args = parser.parse_args()
    caps = [float(cap) for cap in args.caps.split(",")]
    rows = asyncio.run(run(caps, args.seconds, args.clients, args.reply_kib))
    reference = rows[0]["measured_mbps"] if rows and rows[0]["cap_mbps"] is None else None
    print(f"{'cap Mbit/s':>11} {'measured':>9} {'/cap':>6} {'bound':>6} {'held s':>7}")
    for row in rows:
        cap = row["cap_mbps"]
        ratio = f"{row['ratio_to_cap']:.3f}" if cap else "-"
        bound = f"{row['bound_ratio']:.3f}" if cap else "-"
        print(
            f"{cap or 'none':>11} {row['measured_mbps']:>9.2f} {ratio:>6} {bound:>6} "
            f"{row['held_back_s']:>7}"
        )
    if reference:
        print(f"reference (no cap): {reference:.1f} Mbit/s through the p2p daemons on loopback")


if __name__ == "__main__":
    main()
