"""`PeerCaps`: the settings that bound what peers may take of a server, a base of
`Settings` (declared as its other fields are: `volunteer.settings.spec`)."""

from __future__ import annotations

import dataclasses

from volunteer.settings import spec as s
from volunteer.settings.spec import setting


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeerCaps:
    """How much of the server one message, stream, call or peer may hold."""

    max_message_mib: int = setting(
        default=64,
        parse=s.whole_number(1, 4096),
        help="largest message a peer may send a served block, in MiB (64)",
        metavar="MIB",
    )
    """The most bytes one forward/backward/inference/push message may declare; a larger
    one is refused ("bad request:") before its body is read. The server reads at most
    min(this, what a valid request of its limits can be) per message, one message per open
    stream: read buffers <= (2 * max_sessions + max_queued_jobs) * that."""
    max_sessions: int = setting(
        default=64,
        parse=s.whole_number(1, 100_000),
        help="most inference sessions served at once, all peers together (64)",
        metavar="N",
    )
    """Inference streams open at once, counted from the stream's first byte (so a stream
    that never opens its session holds a slot too); more are answered "busy:". Also the
    most push streams in total. Bounds the server's streams (file descriptors) for
    sessions to this, and their read buffers to this * the message bound; the caches are
    bounded apart, by the attention cache budget."""
    max_sessions_per_peer: int = setting(
        default=8,
        parse=s.whole_number(1, 100_000),
        help="most inference sessions one peer may hold at once (8)",
        metavar="N",
    )
    """One peer's share of `max_sessions`: past it that peer is answered "busy:" while
    others still get sessions."""
    max_queued_jobs: int = setting(
        default=16,
        parse=s.whole_number(1, 100_000),
        help="most forward/backward calls served or queued at once (16)",
        metavar="N",
    )
    """forward/backward calls held at once, from the stream's first byte until the reply;
    more are answered "busy:". Their inputs and outputs held: <= this * 3 * the message
    bound (a backward carries two tensors, and its reply one). Inference steps are not
    counted here: each session runs one step at a time."""
    max_calls_per_peer: int = setting(
        default=4,
        parse=s.whole_number(1, 100_000),
        help="most forward/backward calls one peer may have served or queued (4)",
        metavar="N",
    )
    """One peer's share of `max_queued_jobs`: past it that peer is answered "busy:" while
    others still get calls in."""
    forward_slice_s: float = setting(
        default=0.01,
        parse=s.seconds(0, 10, low_means=" (the smallest pieces)"),
        help="longest piece of a forward/backward call between inference steps (0.01 s)",
        metavar="SECONDS",
        flag_override="--forward-slice",
    )
    """A forward/backward call is computed as pieces each timed to take about this long
    (at least one block over one position; a backward, one block over all its positions),
    and an inference step waits for at most one piece: a long call cannot hold up the
    tokens of the people chatting. 0: the smallest pieces."""
    first_message_s: float = setting(
        default=10.0,
        parse=s.seconds(1, 600),
        help="how long a new stream may take to send its request, in seconds (10)",
        metavar="SECONDS",
        flag_override="--first-message-timeout",
    )
    """An inference, forward/backward or push stream whose first message has not come
    by then is closed with a "bad request:" error, freeing its slot (a forward/backward
    call or a push is allowed one more second per MiB its message may be)."""
    max_backward_tokens: int = setting(
        default=512,
        parse=s.whole_number(1, 1 << 20),
        help="most positions (batch * sequence) of one backward call (512)",
        metavar="N",
    )
    """A backward call of more positions is refused ("bad request:"). The memory plan
    reserves autograd activations for exactly this many positions per served block, and
    the one compute thread runs one backward at a time, so they take at most
    this * blocks * the activation bytes per position."""
    max_adapter_mib: int = setting(
        default=32,
        parse=s.whole_number(1, 4096),
        help="largest fine-tuning adapter one forward/backward call may carry, in MiB (32)",
        metavar="MIB",
    )
    """A fine-tuning client sends its deep prompts and LoRA weights for the call's blocks
    with each call (float32); larger ones are refused ("bad request:") before they are
    read. A backward holds the adapter, its gradients and their autograd state: about
    three times this per call, one call computing at a time."""
    max_session_s: float = setting(
        default=3600.0,
        parse=s.seconds(10, 7 * 86400),
        help="longest an inference session may live, in seconds (3600)",
        metavar="SECONDS",
        flag_override="--max-session",
    )
    """A session older than this ends with an "expired:" error at its next message (a
    silent one ends at its idle timeout already), and its client replays into a new one:
    nobody holds a share of the cache for longer than this plus the idle timeout."""
    max_push_streams_per_peer: int = setting(
        default=4,
        parse=s.whole_number(1, 1000),
        help="most push streams another server may keep open to this one (4)",
        metavar="N",
    )
    """A server keeps one push link per next peer; a few more cover a link being
    replaced. More are answered "busy:"; all peers together hold at most `max_sessions`."""
