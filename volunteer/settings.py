"""The daemon's settings: defaults < `config.toml` < `VOLUNTEER_*` env < CLI flags.

`Settings.build` runs once at the CLI edge and the frozen result is passed down; nothing
below reads the environment or the config file again. Every value is checked where it
enters, and a bad one raises `SettingsError` naming its source (the file's key, the env
var or the flag) and what is wrong with it.

Two pairs of options exclude each other: `blocks` / `num_blocks` and `join` /
`new_swarm`. Giving both in one source is an error; a higher source choosing one clears
the other chosen by a lower source (a `--blocks` flag overrides `num_blocks` in the file).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from volunteer.errors import SettingsError
from volunteer.machine.atomic import write_file_atomic
from volunteer.model_cache.smollm2 import DEFAULT_MODEL
from volunteer.paths import Paths

ENV_PREFIX = "VOLUNTEER_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_FLAG_NAMES = {"start_timeout_s": "--start-timeout", "rebalance_period_s": "--rebalance-period"}
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything `volunteer start` can be told, validated."""

    model: str = DEFAULT_MODEL
    """Model to serve: a registered name, a Hugging Face repo id or a local path."""
    blocks: tuple[int, int] | None = None
    """Serve exactly the blocks `[start, end)`; None lets the scheduler choose."""
    num_blocks: int | None = None
    """Serve this many blocks wherever the swarm needs them most (excludes `blocks`); 0
    serves none (a bootstrap peer and chat client)."""
    join: tuple[str, ...] = ()
    """Multiaddrs (with `/p2p/<peer id>`) of peers already in the swarm."""
    new_swarm: bool = False
    """Start a new swarm instead of joining one (excludes `join`)."""
    host: str = "127.0.0.1"
    """IP address to listen on. Loopback by default, so a machine is only exposed to
    others when its owner says so (`--host 0.0.0.0`)."""
    port: int = 0
    """TCP port to listen on; 0 picks a free one."""
    public_name: str | None = None
    """Name shown on the swarm's leaderboard and health pages."""
    cache_tokens: int | None = None
    """Attention cache budget in tokens for inference sessions; None sizes it from the
    memory left after loading the blocks."""
    threads: int | None = None
    """torch thread count; None uses all cores (right for a lone daemon)."""
    max_ram_gib: float | None = None
    """The most RAM the served blocks and their caches may take; None: what is free."""
    max_gpu_gib: float | None = None
    """The most GPU memory an offloading policy may plan for; None: what is free."""
    local_links: bool = True
    """Also serve the blocks' streams on a Unix socket to processes of this machine (other
    daemons, local clients), which then skip the p2p daemons (`volunteer.transport.local_link`)."""
    rebalance_period_s: float = 600.0
    """Mean seconds between "should this server move to other blocks?" checks (each
    interval randomised by ±50%); 0 never moves."""
    log_level: str = "INFO"
    """Level of the daemon's log file: DEBUG, INFO, WARNING or ERROR."""
    start_timeout_s: float = 120.0
    """How long `volunteer start` waits for the daemon to serve before giving up."""

    @property
    def thread_count(self) -> int:
        """torch threads to compute with: as set, else every core."""
        return self.threads or os.cpu_count() or 1

    @property
    def is_new_swarm(self) -> bool:
        """Whether this daemon starts its own swarm (asked for, or nobody to join)."""
        return self.new_swarm or not self.join

    @classmethod
    def build(cls, *, paths: Paths, env: Mapping[str, str], flags: Mapping[str, Any]) -> Settings:
        """Layers the sources and validates the result.

        Args:
            paths: where the config file lives (`paths.config_file`; absent is fine).
            env: the environment; only `VOLUNTEER_<FIELD>` names are read.
            flags: CLI flags by field name; None means "not given".

        Returns:
            The settings.

        Raises:
            SettingsError: a value is malformed, out of range, or an unknown config key.
        """
        values: dict[str, Any] = {}
        for layer in (_from_file(paths.config_file), _from_env(env), _from_flags(flags)):
            _overlay(values, layer)
        return cls(**values)

    def to_toml(self) -> str:
        """The settings that differ from the defaults, as `config.toml` text."""
        lines = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value == field.default or value is None:
                continue
            if field.name == "blocks":
                value = f"{value[0]}:{value[1]}"
            lines.append(f"{field.name} = {_toml_value(value)}")
        return "".join(f"{line}\n" for line in lines)


@dataclasses.dataclass(frozen=True)
class _Source:
    """One value as given, with the words that name where it came from."""

    raw: Any
    where: str
    is_text: bool = True
    """Env vars and flags are text to parse; the file's TOML values must have the type."""


def _overlay(values: dict[str, Any], layer: dict[str, _Source]) -> None:
    parsed = {name: _PARSERS[name](source) for name, source in layer.items()}
    # `new_swarm = false` or an empty join list choose nothing, so they clear nothing.
    # `is` checks: num_blocks = 0 is a choice (serve nothing), though 0 == False.
    chosen = {name for name, value in parsed.items() if not _chooses_nothing(value)}
    for a, b in (("blocks", "num_blocks"), ("join", "new_swarm")):
        if a in chosen and b in chosen:
            raise SettingsError(
                f"{layer[a].where} and {layer[b].where} exclude each other; give one of them"
            )
        for name, other in ((a, b), (b, a)):
            if name in chosen:
                values.pop(other, None)
    values.update(parsed)


def _chooses_nothing(value: Any) -> bool:
    return value is None or value is False or value == ()


def _from_file(config_file: Path) -> dict[str, _Source]:
    try:
        text = config_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        data = _toml_loads(text)
    except ValueError as exc:
        raise SettingsError(f"{config_file}: not valid TOML: {exc}") from exc
    layer = {}
    for key, raw in data.items():
        if key not in _PARSERS:
            known = ", ".join(sorted(_PARSERS))
            raise SettingsError(f"{config_file}: unknown key {key!r}; known keys: {known}")
        layer[key] = _Source(raw, f"{config_file} key {key!r}", is_text=False)
    return layer


def _from_env(env: Mapping[str, str]) -> dict[str, _Source]:
    # Unknown VOLUNTEER_* names are left alone: paths and tests use their own.
    return {
        name: _Source(env[f"{ENV_PREFIX}{name.upper()}"], f"{ENV_PREFIX}{name.upper()}")
        for name in _PARSERS
        if f"{ENV_PREFIX}{name.upper()}" in env
    }


def _from_flags(flags: Mapping[str, Any]) -> dict[str, _Source]:
    layer = {}
    for name, raw in flags.items():
        if name not in _PARSERS:
            raise SettingsError(f"unknown setting {name!r}")
        if raw is not None:
            layer[name] = _Source(raw, flag_name(name))
    return layer


EDITABLE = ("public_name", "model", "threads", "max_ram_gib", "max_gpu_gib", "cache_tokens")
"""What a volunteer edits in the TUI's settings screen."""
APPLIED_LIVE = ("public_name", "threads")
"""Settings a running daemon takes on when asked to reload; the rest need a restart
(they decide which blocks it loads and how much memory they take)."""


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
        if not text.strip():
            changes[name] = _DEFAULTS[name]
            continue
        changes[name] = _PARSERS[name](_Source(text, name.replace("_", " ")))
    updated = dataclasses.replace(read_config(paths), **changes)
    write_file_atomic(paths.config_file, updated.to_toml().encode("utf-8"))
    return updated


def changed_fields(before: Settings, after: Settings) -> list[str]:
    """The names of the fields whose values differ, in field order."""
    return [
        field.name
        for field in dataclasses.fields(Settings)
        if getattr(before, field.name) != getattr(after, field.name)
    ]


def flag_name(field: str) -> str:
    """The CLI flag of a settings field: `num_blocks` -> `--num-blocks`."""
    return _FLAG_NAMES.get(field) or f"--{field.replace('_', '-')}"


def _toml_loads(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError as exc:
            raise SettingsError(
                "reading config.toml on Python 3.10 needs the `tomli` package: pip install tomli"
            ) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(str(exc)) from exc


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    # JSON string escapes are a subset of TOML basic-string escapes.
    return json.dumps(str(value))


def _is_text(source: _Source) -> bool:
    return source.is_text and isinstance(source.raw, str)


def _fail(source: _Source, problem: str) -> SettingsError:
    return SettingsError(f"{source.where}: {problem} (got {source.raw!r})")


def _parse_int(source: _Source, *, minimum: int, maximum: int | None = None) -> int:
    raw = source.raw
    if _is_text(source):
        try:
            raw = int(raw.strip())
        except ValueError:
            raise _fail(source, "expected a whole number") from None
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise _fail(source, "expected a whole number")
    if raw < minimum or (maximum is not None and raw > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise _fail(source, f"must be at least {minimum}{upper}")
    return raw


def _parse_optional_int(source: _Source, *, minimum: int) -> int | None:
    if _is_text(source) and source.raw.strip().lower() in ("", "auto"):
        return None
    return _parse_int(source, minimum=minimum)


def _parse_bool(source: _Source) -> bool:
    if isinstance(source.raw, bool):
        return source.raw
    if _is_text(source) and source.raw.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
        return source.raw.strip().lower() in _TRUE_WORDS
    raise _fail(source, "expected true or false")


def _parse_text(source: _Source) -> str:
    if not isinstance(source.raw, str) or not source.raw.strip():
        raise _fail(source, "expected a non-empty string")
    return source.raw.strip()


def _parse_blocks(source: _Source) -> tuple[int, int]:
    text = source.raw
    if not isinstance(text, str) or text.count(":") != 1:
        raise _fail(source, "expected START:END, e.g. 0:12")
    start_text, end_text = text.split(":")
    try:
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise _fail(source, "expected START:END with whole numbers, e.g. 0:12") from None
    if start < 0 or end <= start:
        raise _fail(source, "needs 0 <= START < END (blocks [START, END) are served)")
    return start, end


def _parse_join(source: _Source) -> tuple[str, ...]:
    raw = source.raw
    # From the environment: one string, several addresses split by commas or spaces.
    items = raw.replace(",", " ").split() if _is_text(source) else raw
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise _fail(source, "expected a list of multiaddrs")
    for item in items:
        if not item.startswith("/") or "/p2p/" not in item:
            raise _fail(source, f"{item!r} is not a multiaddr like /ip4/1.2.3.4/tcp/31337/p2p/Qm…")
    return tuple(items)


def _parse_host(source: _Source) -> str:
    text = _parse_text(source)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise _fail(source, "expected an IP address such as 127.0.0.1 or 0.0.0.0") from None
    return text


def _parse_public_name(source: _Source) -> str:
    text = _parse_text(source)
    if len(text) > 64 or not text.isprintable():
        raise _fail(source, "expected at most 64 printable characters")
    return text


def _parse_log_level(source: _Source) -> str:
    text = _parse_text(source).upper()
    if text not in LOG_LEVELS:
        raise _fail(source, f"expected one of {', '.join(LOG_LEVELS)}")
    return text


def _parse_timeout(source: _Source) -> float:
    value = _parse_number(source)
    if value is None or not 0 < value <= 3600:
        raise _fail(source, "expected seconds between 0 and 3600")
    return value


def _parse_gib(source: _Source) -> float | None:
    if _is_text(source) and source.raw.strip().lower() in ("", "auto"):
        return None
    value = _parse_number(source)
    if value is None or not 0 < value <= 1 << 20:
        raise _fail(source, "expected GiB above 0, e.g. 6 or 0.5")
    return value


def _parse_period(source: _Source) -> float:
    value = _parse_number(source)
    if value is None or not 0 <= value <= 86400:
        raise _fail(source, "expected seconds between 0 (never) and 86400")
    return value


def _parse_number(source: _Source) -> float | None:
    """A float from a number (file) or text (env, flag); None when it is neither."""
    raw = source.raw
    if isinstance(raw, bool) or not (isinstance(raw, (int, float)) or _is_text(source)):
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value == value else None  # NaN is no number here


_DEFAULTS = {field.name: field.default for field in dataclasses.fields(Settings)}

_PARSERS: dict[str, Callable[[_Source], Any]] = {
    "model": _parse_text,
    "blocks": _parse_blocks,
    "num_blocks": lambda s: _parse_int(s, minimum=0),
    "join": _parse_join,
    "new_swarm": _parse_bool,
    "host": _parse_host,
    "port": lambda s: _parse_int(s, minimum=0, maximum=65535),
    "public_name": _parse_public_name,
    "cache_tokens": lambda s: _parse_optional_int(s, minimum=1),
    "threads": lambda s: _parse_optional_int(s, minimum=1),
    "max_ram_gib": _parse_gib,
    "max_gpu_gib": _parse_gib,
    "local_links": _parse_bool,
    "rebalance_period_s": _parse_period,
    "log_level": _parse_log_level,
    "start_timeout_s": _parse_timeout,
}
