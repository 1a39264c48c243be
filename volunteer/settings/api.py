"""`ApiSettings`: the OpenAI-compatible endpoint's settings, a base of `Settings`
(declared as its other fields are: `volunteer.settings.spec`)."""

from __future__ import annotations

import dataclasses

from volunteer.settings import spec as s
from volunteer.settings.spec import setting


@dataclasses.dataclass(frozen=True, kw_only=True)
class ApiSettings:
    """Where the daemon serves the OpenAI API (`volunteer.api`), and how much of it."""

    api: str | None = setting(
        default=None,
        parse=s.parse_api_address,
        help="serve the OpenAI API on [HOST:]PORT (default: off; host 127.0.0.1 unless given)",
        metavar="[HOST:]PORT",
        to_file=str,
    )
    """The OpenAI-compatible endpoint's address, "HOST:PORT"; None: none. Every request
    needs the bearer token `volunteer api-token` shows, unless `api_open_on_loopback`."""
    api_max_requests: int = setting(
        default=4,
        parse=s.whole_number(1, 1024),
        help="API requests generated at once; more wait in line (4)",
        metavar="N",
    )
    """Generations under way at once through the API; a request past them waits for
    `api_queue_timeout_s`, then is answered 429 with Retry-After."""
    api_queue_timeout_s: float = setting(
        default=30.0,
        parse=s.seconds(0, 3600, low_means=" (refuse at once)"),
        help="longest an API request waits for its turn before a 429 (30)",
        metavar="SECONDS",
        flag_override="--api-queue-timeout",
    )
    api_open_on_loopback: bool = setting(
        default=False,
        parse=s.parse_bool,
        help="let requests from this machine (127.0.0.1, ::1) in without the token (no)",
        metavar="YES|NO",
    )
    """Only for an API bound to loopback: any local program (and user) may then use it."""
