"""A hostile peer of the credit protocol, written with hivemind directly: it hands
servers forged receipts and publishes credit summaries its receipts do not support.

It runs its own p2p daemon and DHT node (under its own RSA key, which is its peer id and
owns its DHT records) on a background loop, as a stranger's machine would.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P
from hivemind.utils.crypto import RSAPrivateKey

from volunteer.client.loop_thread import LoopThread
from volunteer.swarm.dht_records import encode_p2p_identity, make_validator, owner_marker
from volunteer.transport.commitment import PeerSigner
from volunteer.trust.credit_exchange import (
    MAX_ANSWER_BYTES,
    PROOF_HANDLE,
    RECEIPT_HANDLE,
    ask,
    pack_proofs,
    serve,
    unpack_draws,
)
from volunteer.trust.credit_summary import Summary, publish_on_node
from volunteer.trust.credit_tree import Leaf, SumTree, weight
from volunteer.trust.receipts import Receipt, sign_receipt


class HostileCreditPeer:
    def __init__(self, join: str, model: str) -> None:
        self.key = RSAPrivateKey()
        self.signer = PeerSigner(self.key)
        self.model = model
        self.loop = LoopThread(name="hostile-credit")
        self.tree = SumTree([])
        self.shown_receipt = b""
        """The receipt it answers every draw with (someone else's, for another server)."""
        self.draws_answered = 0
        self._folder = Path(tempfile.mkdtemp(prefix="hostile-"))
        self.p2p, self.node = self.loop.run(self._join(join), timeout_s=60)

    @property
    def peer_id(self) -> str:
        return self.signer.peer_id

    async def _join(self, join: str) -> tuple[P2P, DHTNode]:
        path = self._folder / "identity.key"
        path.write_bytes(encode_p2p_identity(self.key))
        p2p = await P2P.create(
            host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[join], identity_path=str(path)
        )
        node = await DHTNode.create(
            p2p=p2p, initial_peers=[join], record_validator=make_validator(self.key)
        )
        await p2p.add_binary_stream_handler(
            PROOF_HANDLE, serve(self._prove, max_request_bytes=1024)
        )
        return p2p, node

    async def _prove(self, peer: str, body: bytes) -> bytes:
        """Answers any draw with the leaf it falls on in its tree and a receipt that is
        not behind that leaf."""
        _, weights, points = unpack_draws(body)
        proven = []
        for point in points:
            index = self.tree.index_at(weights, min(point, weight(self.tree.sums, weights) - 1))
            proven.append((self.tree.leaves[index], self.tree.prove(index), self.shown_receipt))
        self.draws_answered += len(points)
        return pack_proofs(proven)

    def send_receipt(self, server: str, body: bytes) -> str:
        """The server's answer to a receipt: "" when kept, else why not."""
        answer = self.loop.run(
            ask(self.p2p, server, RECEIPT_HANDLE, body, max_answer_bytes=MAX_ANSWER_BYTES,
                timeout_s=10),
        )  # fmt: skip
        return answer.decode()

    def own_receipt(self, server: str, tokens: int) -> bytes:
        """A receipt in its own name for work `server` never did for it."""
        now = time.time()
        receipt = Receipt(
            model=self.model, server=server, client=self.peer_id, session_id=os.urandom(8).hex(),
            kind="inference", start=0, end=15, tokens=tokens, opened_s=now - 10, closed_s=now,
        )  # fmt: skip
        return sign_receipt(self.signer, receipt).to_bytes()

    def publish(self, leaves: list[Leaf], receipts: int) -> None:
        """Publishes a summary over `leaves` (which need not be backed by anything)."""
        self.tree = SumTree(leaves)
        summary = Summary(
            model=self.model, as_of_s=time.time(), receipts=receipts, root=self.tree.root,
            sums=self.tree.sums,
        )  # fmt: skip
        stored = self.loop.run(
            publish_on_node(self.node, summary, owner=owner_marker(self.key), timeout_s=10)
        )
        assert stored, "the hostile summary was not stored"

    def close(self) -> None:
        async def leave() -> None:
            await self.node.shutdown()
            await self.p2p.shutdown()

        try:
            self.loop.run(leave(), timeout_s=15)
        finally:
            self.loop.close()
