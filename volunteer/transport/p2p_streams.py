"""Opening a stream to a peer's handler through the p2p daemon, without leaking on failure.

hivemind's `P2P.call_binary_stream_handler` opens a connection to the daemon, asks it for
the stream and raises when the daemon refuses (peer not found, handler not served), but
leaves that connection open: one socket per failed open, until garbage collection. The
pushes between servers and the client's failovers open streams to peers that may be
gone, so this asks the daemon itself and closes the connection on any failure.
"""

from __future__ import annotations

import asyncio

from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.p2p.p2p_daemon_bindings.utils import raise_if_failed, read_pbmsg_safe, write_pbmsg
from hivemind.proto import p2pd_pb2


async def open_stream(
    p2p: P2P, peer_id: PeerID, handle: str
) -> tuple[StreamInfo, asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream to `handle` on `peer_id`: its info, reader and writer.

    Raises:
        hivemind's ControlFailure: the daemon could not open it (nothing is left open).
        ConnectionError, asyncio.IncompleteReadError: the daemon went away.
    """
    control = p2p._client.control  # hivemind keeps its daemon client private
    reader, writer = await control.daemon_connector.open_connection()
    try:
        opening = p2pd_pb2.StreamOpenRequest(peer=peer_id.to_bytes(), proto=[handle])
        await write_pbmsg(
            writer, p2pd_pb2.Request(type=p2pd_pb2.Request.STREAM_OPEN, streamOpen=opening)
        )
        response = p2pd_pb2.Response()
        await read_pbmsg_safe(reader, response)
        raise_if_failed(response)
    except BaseException:
        writer.close()
        raise
    return StreamInfo.from_protobuf(response.streamInfo), reader, writer
