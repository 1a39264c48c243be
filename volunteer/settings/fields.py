"""`Settings`: every setting of the daemon, each declared once, as a field.

Each field's `setting(...)` is the whole declaration (see `volunteer.settings.spec`): the
`volunteer start` flags, the config file's keys, the `VOLUNTEER_*` env names, the TUI's
settings screen, `EDITABLE` and `APPLIED_LIVE` are all read from it. Adding a setting is
one field here, and then reading `settings.<name>` where it is used.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

from volunteer.errors import SettingsError
from volunteer.faults import NO_FAULTS, Faults
from volunteer.machine.atomic import write_file_atomic
from volunteer.model_cache.smollm2 import DEFAULT_MODEL
from volunteer.paths import Paths
from volunteer.settings import spec as s
from volunteer.settings.api import ApiSettings
from volunteer.settings.batching import BatchSettings
from volunteer.settings.caps import PeerCaps
from volunteer.settings.layers import layered_values, to_toml
from volunteer.settings.owner import OwnerRuleSettings
from volunteer.settings.spec import OnScreen, SettingSpec, Source, setting, specs_of


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(ApiSettings, BatchSettings, OwnerRuleSettings, PeerCaps):
    """Everything `volunteer start` can be told, validated.

    The settings screen shows its fields in declaration order: this class's own, then
    the owner's rules (`OwnerRuleSettings`); the bounds on what peers may take
    (`PeerCaps`), batching (`BatchSettings`) and the API's settings (`ApiSettings`) are
    not on it.
    """

    public_name: str | None = setting(
        default=None,
        parse=s.parse_public_name,
        help="your name on the leaderboard",
        metavar="NAME",
        label="public name",
        screen=OnScreen("Public name (leaderboard, health map)", "anonymous"),
        is_live=True,
    )
    """Name shown on the swarm's leaderboard and health pages."""
    model: str = setting(
        default=DEFAULT_MODEL,
        parse=s.parse_text,
        help=f"model to serve (default: {DEFAULT_MODEL})",
        metavar="NAME",
        screen=OnScreen("Model to serve", "the embedded SmolLM2"),
    )
    """Model to serve: a registered name, a Hugging Face repo id or a local path."""
    threads: int | None = setting(
        default=None,
        parse=s.whole_number(1, is_auto_ok=True),
        help="torch threads (default: all cores)",
        metavar="N",
        label="CPU threads",
        screen=OnScreen("CPU threads", "all cores"),
        is_live=True,
    )
    """torch thread count; None uses all cores (right for a lone daemon)."""
    max_ram_gib: float | None = setting(
        default=None,
        parse=s.parse_gib,
        help="most RAM the blocks and caches may take",
        metavar="GIB",
        label="RAM limit",
        screen=OnScreen("Most RAM for blocks and caches (GiB)", "what is free"),
    )
    """The most RAM the served blocks and their caches may take; None: what is free."""
    dtype: str = setting(
        default="auto",
        parse=s.parse_weight_format,
        help="form of the served weights: auto (the fastest here), fp32, bf16, int8 or q4 "
        "(q4g64, q4g128: larger 4-bit groups, a little smaller, much less accurate)",
        metavar="FORM",
        label="Weights",
    )
    """How the served blocks (and local chat's model) hold their weights. `auto` takes the
    fastest of fp32, bf16 and q4 on this machine (measured once per process; `volunteer
    profile` shows it): each keeps the held-out perplexity within 5% of float32. Clients
    route through servers of one form only, their own."""
    max_gpu_gib: float | None = setting(
        default=None,
        parse=s.parse_gib,
        help="most GPU memory an offloading plan may take",
        metavar="GIB",
        label="GPU memory limit",
        screen=OnScreen("Most GPU memory to plan for (GiB)", "what is free"),
    )
    """The most GPU memory an offloading policy may plan for; None: what is free."""
    cache_tokens: int | None = setting(
        default=None,
        parse=s.whole_number(1, is_auto_ok=True),
        help="attention cache budget in tokens (default: auto)",
        metavar="N",
        label="attention cache",
        screen=OnScreen("Attention cache (tokens)", "sized from memory"),
    )
    """Attention cache budget in tokens for inference sessions; None sizes it from the
    memory left after loading the blocks."""
    blocks: tuple[int, int] | None = setting(
        default=None,
        parse=s.parse_blocks,
        help="serve exactly blocks [START, END)",
        metavar="START:END",
        excludes="num_blocks",
        to_file=lambda span: f"{span[0]}:{span[1]}",
    )
    """Serve exactly the blocks `[start, end)`; None lets the scheduler choose."""
    num_blocks: int | None = setting(
        default=None,
        parse=s.whole_number(0),
        help="serve N blocks where the swarm needs them (0: none)",
        metavar="N",
    )
    """Serve this many blocks wherever the swarm needs them most (excludes `blocks`); 0
    serves none (a bootstrap peer and chat client)."""
    join: tuple[str, ...] = setting(
        default=(),
        parse=s.parse_join,
        help="a peer of the swarm to join (repeatable)",
        metavar="MULTIADDR",
        flag_kind="append",
        excludes="new_swarm",
    )
    """Multiaddrs (with `/p2p/<peer id>`) of peers already in the swarm."""
    new_swarm: bool = setting(
        default=False,
        parse=s.parse_bool,
        help="start a new swarm instead of joining one",
        flag_kind="switch",
    )
    """Start a new swarm instead of joining one (excludes `join`)."""
    host: str = setting(
        default="127.0.0.1",
        parse=s.parse_host,
        help="address to listen on (default: 127.0.0.1, this machine only)",
        metavar="IP",
    )
    """IP address to listen on. Loopback by default, so a machine is only exposed to
    others when its owner says so (`--host 0.0.0.0`)."""
    port: int = setting(
        default=0,
        parse=s.whole_number(0, 65535),
        help="TCP port to listen on (default: 0, any free port)",
        metavar="PORT",
    )
    """TCP port to listen on; 0 picks a free one."""
    local_links: bool = setting(
        default=True,
        parse=s.parse_bool,
        help="serve this machine's other swarm processes on a Unix socket, past p2pd (yes)",
        metavar="yes|no",
    )
    """Also serve the blocks' streams on a Unix socket to processes of this machine (other
    daemons, local clients), which then skip the p2p daemons (`volunteer.transport.local_link`)."""
    train: bool = setting(
        default=False,
        parse=s.parse_bool,
        help="let the daemon join a training job of its model when the swarm's inference "
        "is served well enough (see `volunteer train`)",
        flag_kind="switch",
    )
    """Allow the training role: the daemon checks every announce period whether the
    scheduler (`volunteer.scheduler.role`) prefers training, and then joins a job."""
    rebalance_period_s: float = setting(
        default=600.0,
        parse=s.seconds(0, 86400, low_means=" (never)"),
        help="mean time between checks whether to move to weaker blocks (600; 0: never)",
        metavar="SECONDS",
        flag_override="--rebalance-period",
    )
    """Mean seconds between "should this server move to other blocks?" checks (each
    interval randomised by ±50%); 0 never moves."""
    leave_grace_s: float = setting(
        default=90.0,
        parse=s.seconds(0, 3600, low_means=" (leave at once)"),
        help="longest a stopping server that alone holds some blocks keeps serving them "
        "while another server takes them over (90; 0: leave at once)",
        metavar="SECONDS",
        flag_override="--leave-grace",
    )
    """The hand-over of a stop or pause (`volunteer.daemon.hand_over`): it ends as soon as
    every served block has another live server. `volunteer stop --now` skips it."""
    repair_wait_s: float = setting(
        default=60.0,
        parse=s.seconds(0, 3600, low_means=" (fail at once)"),
        help="longest a chat waits for blocks no server holds to be served again (60; "
        "0: fail at once)",
        metavar="SECONDS",
        flag_override="--repair-wait",
    )
    """While the swarm has a hole, servers fill it (`volunteer.daemon.hole_watch`); a
    reply waits this long for that, saying which blocks it waits for."""
    announce_period_s: float = setting(
        default=30.0,
        parse=s.seconds(5, 3600),
        help="seconds between re-announces of the served blocks (30); shorter: a server "
        "that died drops out of routes sooner, longer: less DHT traffic",
        metavar="SECONDS",
        flag_override="--announce-period",
        label="announce period",
    )
    """How often the served blocks' records are announced again; they expire a few periods
    later (`volunteer.swarm.dht_records.record_ttl_s`). At least 5 s: a record must outlive
    the wait for the next announce, the period plus the DHT's timeout."""
    verify: str = setting(
        default="sample",
        parse=s.parse_verify,
        help="check servers' steps: off, sample (default: a share, more for newcomers) or all",
        metavar="MODE",
    )
    """How this daemon's chats check the servers' steps by recomputing them elsewhere:
    `off`, `sample` (a share that falls as a server's record of passed checks grows) or
    `all` (every step); `volunteer chat --verify` overrides it per chat."""
    validate_share: float = setting(
        default=0.02,
        parse=s.share(0.5),
        help="share of this machine's time spent checking other servers (0.02; 0: never)",
        metavar="SHARE",
    )
    """The validator role (`volunteer.daemon.validator`): this daemon probes other
    servers with short sessions and recomputes them itself, so that checks happen even
    when few clients verify; it rests between rounds to spend at most this share."""
    faults: Faults = setting(  # noqa: RUF009  (Faults is frozen: immutable)
        default=NO_FAULTS,
        parse=s.parse_faults_setting,
        help="DRILLS ONLY: misbehave on purpose, e.g. perturb:0.05:0.05 (see the README)",
        metavar="FAULTS",
        to_file=str,
    )
    """Faults this daemon commits on purpose (`volunteer.faults`), for tests and drills of
    the swarm's checks: its servers' outputs go wrong, it files false accusations. Said
    loudly in its log and status; never for real service."""
    owner_sensors: str | None = setting(
        default=None,
        parse=s.parse_optional_path,
        help="TESTS AND DRILLS ONLY: read the owner's rules' battery, idle time, CPU load "
        "and clock from this JSON file",
        metavar="FILE",
    )
    """Keys the file holds stand in for what `volunteer.machine.owner_sensors` measures,
    read again at every look: a test changes the machine by rewriting it."""
    log_level: str = setting(
        default="INFO",
        parse=s.parse_log_level,
        help="DEBUG, INFO (default), WARNING or ERROR",
        metavar="LEVEL",
    )
    """Level of the daemon's log file: DEBUG, INFO, WARNING or ERROR."""
    start_timeout_s: float = setting(
        default=120.0,
        parse=s.seconds(0, 3600, is_low_open=True),
        help="how long to wait for serving (120)",
        metavar="SECONDS",
        flag_override="--start-timeout",
    )
    """How long `volunteer start` waits for the daemon to serve before giving up."""

    @property
    def thread_count(self) -> int:
        """torch threads to compute with: as set, else every core; under `max_cpu_percent`,
        no more than its share of the cores can keep busy."""
        cores = os.cpu_count() or 1
        cap = self.cpu_cap_cores
        if cap is None:
            return self.threads or cores
        return min(self.threads or cores, max(1, math.ceil(cap - 1e-9)))

    @property
    def is_new_swarm(self) -> bool:
        """Whether this daemon starts its own swarm (asked for, or nobody to join)."""
        return self.new_swarm or not self.join

    @classmethod
    def build(cls, *, paths: Paths, env: Mapping[str, str], flags: Mapping[str, Any]) -> Settings:
        """Layers the sources and validates the result.

        Args:
            paths: where the config file lives (`paths.config_file`; absent is fine).
            env: the environment; only the settings' `VOLUNTEER_<NAME>` names are read.
            flags: CLI flags by setting name; None means "not given".

        Returns:
            The settings.

        Raises:
            SettingsError: a value is malformed, out of range, or an unknown config key.
        """
        values = layered_values(SPECS, config_file=paths.config_file, env=env, flags=flags)
        return cls(**values)

    def to_toml(self) -> str:
        """The settings that differ from the defaults, as `config.toml` text."""
        return to_toml(SPECS, {spec.name: getattr(self, spec.name) for spec in SPECS})


SPECS: tuple[SettingSpec, ...] = specs_of(Settings)
"""Every setting's declaration, in field order."""
SPEC_BY_NAME = {spec.name: spec for spec in SPECS}
EDITABLE = tuple(spec.name for spec in SPECS if spec.is_editable)
"""What a volunteer edits in the TUI's settings screen, in the order it shows them."""
APPLIED_LIVE = tuple(spec.name for spec in SPECS if spec.is_live)
"""Settings a running daemon takes on when asked to reload; the rest need a restart."""


def read_config(paths: Paths) -> Settings:
    """The defaults and `config.toml` alone (no env, no flags): what the file says.

    Raises:
        SettingsError: the file is malformed.
    """
    return Settings.build(paths=paths, env={}, flags={})


def save_config(paths: Paths, edits: Mapping[str, str]) -> Settings:
    """Checks text edits of `EDITABLE` fields and writes them into `config.toml` (other
    keys of the file kept; an empty text means the default). Nothing is written unless
    every edit is valid.

    Raises:
        SettingsError: an edit (or the file) is invalid; the message names the field.
    """
    changes: dict[str, Any] = {}
    for name, text in edits.items():
        if name not in EDITABLE:
            raise SettingsError(f"{name} is not a setting the settings screen edits")
        spec = SPEC_BY_NAME[name]
        if not text.strip():
            changes[name] = spec.default
            continue
        changes[name] = spec.parse(Source(text, name.replace("_", " ")))
    updated = dataclasses.replace(read_config(paths), **changes)
    write_file_atomic(paths.config_file, updated.to_toml().encode("utf-8"))
    return updated


def changed_fields(before: Settings, after: Settings) -> list[str]:
    """The names of the fields whose values differ, in field order."""
    return [spec.name for spec in SPECS if getattr(before, spec.name) != getattr(after, spec.name)]


def setting_label(name: str) -> str:
    """A setting as the TUI names it in its messages ("CPU threads" for `threads`)."""
    spec = SPEC_BY_NAME.get(name)
    return spec.screen_label if spec else name.replace("_", " ")
