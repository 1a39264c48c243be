"""What one setting's declaration says, and the parsers that check its values.

A setting is a field of `Settings` whose default is `setting(...)`: the `SettingSpec` it
stores in the field's metadata is the only place that names its flag, env variable, help,
range (in its parser), label, place on the settings screen and whether a running daemon
takes it on live. Everything else (the CLI's flags, the config file, the env, the
settings screen, `APPLIED_LIVE`) is read from these specs.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable
from typing import Any, Literal

from volunteer.errors import SettingsError
from volunteer.faults import NO_FAULTS, Faults, parse_faults
from volunteer.scheduler.owner_rules import RuleError, parse_schedule

ENV_PREFIX = "VOLUNTEER_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
VERIFY_MODES = ("off", "sample", "all")
"""How this daemon's chats check servers' steps (`volunteer.client.verification`)."""
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")
_SPEC_KEY = "volunteer.setting"


@dataclasses.dataclass(frozen=True)
class Source:
    """One value as given, with the words that name where it came from."""

    raw: Any
    where: str
    is_text: bool = True
    """Env vars and flags are text to parse; the file's TOML values must have the type."""


Parser = Callable[[Source], Any]


@dataclasses.dataclass(frozen=True)
class OnScreen:
    """How the TUI's settings screen shows an editable setting."""

    title: str
    """The label above its input."""
    placeholder: str
    """Shown while it is left at its default."""
    heading: str | None = None
    """Starts a group of settings on the screen under this heading."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SettingSpec:
    """One setting, as declared next to its field of `Settings`."""

    parse: Parser
    """Checks a value from any source (its range included) and returns it typed."""
    help: str
    """The `volunteer start` flag's help."""
    metavar: str | None = None
    """The flag's value in `--help`; None for a switch."""
    flag_kind: Literal["value", "append", "switch"] = "value"
    """`value`: `--flag=V`; `append`: repeatable, collected in a list; `switch`: no value."""
    flag_override: str | None = None
    """The flag when it is not the name with dashes (`--start-timeout`)."""
    label: str | None = None
    """The setting's name in the TUI's messages; None: the name with spaces."""
    screen: OnScreen | None = None
    """Set for the settings the TUI's settings screen edits, in field order."""
    is_live: bool = False
    """Whether a running daemon takes a new value on when it reloads its config; the rest
    wait for a restart (they decide which blocks it loads and how much memory they take)."""
    excludes: str | None = None
    """The setting this one excludes: giving both in one source is an error, and a higher
    source choosing one clears the other chosen by a lower source."""
    to_file: Callable[[Any], Any] | None = None
    """The value as written into `config.toml` when it is not TOML-native."""
    name: str = ""
    """The field's name; filled in from the field (`specs_of`)."""
    default: Any = None
    """The field's default; filled in from the field (`specs_of`)."""

    @property
    def flag(self) -> str:
        """The CLI flag: `num_blocks` -> `--num-blocks`."""
        return self.flag_override or f"--{self.name.replace('_', '-')}"

    @property
    def env_name(self) -> str:
        """The environment variable: `num_blocks` -> `VOLUNTEER_NUM_BLOCKS`."""
        return f"{ENV_PREFIX}{self.name.upper()}"

    @property
    def screen_label(self) -> str:
        """The setting as the TUI names it in messages."""
        return self.label or self.name.replace("_", " ")

    @property
    def is_editable(self) -> bool:
        """Whether the TUI's settings screen edits it."""
        return self.screen is not None


def setting(*, default: Any, **declaration: Any) -> Any:
    """A field of `Settings` with its declaration (the keyword arguments of `SettingSpec`).

    Returns:
        A `dataclasses.field`; typed `Any` so the field keeps its annotated type.
    """
    spec = SettingSpec(**declaration, default=default)
    return dataclasses.field(default=default, metadata={_SPEC_KEY: spec})


def specs_of(cls: type) -> tuple[SettingSpec, ...]:
    """The declarations of a dataclass's `setting(...)` fields: its own fields first, in
    their order, then its bases' (so the settings screen shows the class's own first)."""
    inherited = {
        name for base in cls.__mro__[1:] for name in getattr(base, "__dataclass_fields__", ())
    }
    fields = sorted(dataclasses.fields(cls), key=lambda field: field.name in inherited)
    return tuple(
        dataclasses.replace(field.metadata[_SPEC_KEY], name=field.name)
        for field in fields
        if _SPEC_KEY in field.metadata
    )


def _is_text(source: Source) -> bool:
    return source.is_text and isinstance(source.raw, str)


def _fail(source: Source, problem: str) -> SettingsError:
    return SettingsError(f"{source.where}: {problem} (got {source.raw!r})")


def whole_number(minimum: int, maximum: int | None = None, *, is_auto_ok: bool = False) -> Parser:
    """A parser of whole numbers in `[minimum, maximum]`; with `is_auto_ok`, "" or "auto"
    (text) mean None."""

    def parse(source: Source) -> int | None:
        if is_auto_ok and _is_text(source) and source.raw.strip().lower() in ("", "auto"):
            return None
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

    return parse


def seconds(
    low: float,
    high: float,
    *,
    is_low_open: bool = False,
    low_means: str = "",
    unit: str = "seconds",
) -> Parser:
    """A parser of seconds (or another `unit`) in `[low, high]` (`(low, high]` with
    `is_low_open`); `low_means` says in the error what the lowest value does, e.g.
    " (never)"."""

    def parse(source: Source) -> float:
        value = _number(source)
        if value is None or value > high or value < low or (is_low_open and value == low):
            raise _fail(source, f"expected {unit} between {low:g}{low_means} and {high:g}")
        return value

    return parse


def share(high: float) -> Parser:
    """A parser of a share of something in `[0, high]`."""

    def parse(source: Source) -> float:
        value = _number(source)
        if value is None or not 0.0 <= value <= high:
            raise _fail(source, f"expected a share between 0 and {high:g}")
        return value

    return parse


def parse_gib(source: Source) -> float | None:
    """GiB above 0 (at most a PiB); "" or "auto" (text) mean None."""
    if _is_text(source) and source.raw.strip().lower() in ("", "auto"):
        return None
    value = _number(source)
    if value is None or not 0 < value <= 1 << 20:
        raise _fail(source, "expected GiB above 0, e.g. 6 or 0.5")
    return value


def parse_bool(source: Source) -> bool:
    """true/false in the file; 1/0, true/false, yes/no, on/off as text."""
    if isinstance(source.raw, bool):
        return source.raw
    if _is_text(source) and source.raw.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
        return source.raw.strip().lower() in _TRUE_WORDS
    raise _fail(source, "expected true or false")


def parse_text(source: Source) -> str:
    """A non-empty string, stripped."""
    if not isinstance(source.raw, str) or not source.raw.strip():
        raise _fail(source, "expected a non-empty string")
    return source.raw.strip()


def parse_blocks(source: Source) -> tuple[int, int]:
    """`START:END` -> (START, END), with 0 <= START < END."""
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


def parse_join(source: Source) -> tuple[str, ...]:
    """A list of multiaddrs that name their peer (`/p2p/<peer id>`)."""
    raw = source.raw
    # From the environment: one string, several addresses split by commas or spaces.
    items = raw.replace(",", " ").split() if _is_text(source) else raw
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise _fail(source, "expected a list of multiaddrs")
    for item in items:
        if not item.startswith("/") or "/p2p/" not in item:
            raise _fail(source, f"{item!r} is not a multiaddr like /ip4/1.2.3.4/tcp/31337/p2p/Qm…")
    return tuple(items)


def parse_host(source: Source) -> str:
    """An IP address (v4 or v6), not a host name."""
    text = parse_text(source)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise _fail(source, "expected an IP address such as 127.0.0.1 or 0.0.0.0") from None
    return text


def parse_api_address(source: Source) -> str | None:
    """`[HOST:]PORT` (an IPv6 host in brackets: `[::1]:8000`), HOST an IP address,
    127.0.0.1 when left out; "" or "off" mean None (no API). Kept as "HOST:PORT"."""
    text = str(source.raw).strip() if isinstance(source.raw, (str, int)) else None
    if text is None or isinstance(source.raw, bool):
        raise _fail(source, "expected [HOST:]PORT such as 8000 or 127.0.0.1:8000")
    if text.lower() in ("", "off"):
        return None
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]") or "127.0.0.1"
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise _fail(source, "expected [HOST:]PORT such as 8000 or 127.0.0.1:8000") from None
    if not 1 <= number <= 65535:
        raise _fail(source, "expected a port between 1 and 65535")
    return f"[{host}]:{number}" if ":" in host else f"{host}:{number}"


def split_api_address(address: str) -> tuple[str, int]:
    """A checked `HOST:PORT` (see `parse_api_address`) as host and port."""
    host, _, port = address.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def parse_public_name(source: Source) -> str:
    """At most 64 printable characters."""
    text = parse_text(source)
    if len(text) > 64 or not text.isprintable():
        raise _fail(source, "expected at most 64 printable characters")
    return text


def parse_verify(source: Source) -> str:
    """`off`, `sample` or `all`, any case."""
    text = parse_text(source).lower()
    if text not in VERIFY_MODES:
        raise _fail(source, f"expected one of {', '.join(VERIFY_MODES)}")
    return text


WEIGHT_FORMATS = ("auto", "fp32", "bf16", "int8", "q4", "q4g32", "q4g64", "q4g128")
"""What `dtype` takes: `volunteer.models.weight_format` reads all but `auto`."""


def parse_weight_format(source: Source) -> str:
    """One of `WEIGHT_FORMATS`, any case."""
    text = parse_text(source).lower()
    if text not in WEIGHT_FORMATS:
        raise _fail(source, f"expected one of {', '.join(WEIGHT_FORMATS)}")
    return text


def parse_log_level(source: Source) -> str:
    """One of `LOG_LEVELS`, any case."""
    text = parse_text(source).upper()
    if text not in LOG_LEVELS:
        raise _fail(source, f"expected one of {', '.join(LOG_LEVELS)}")
    return text


def _number(source: Source) -> float | None:
    """A float from a number (file) or text (env, flag); None when it is neither."""
    raw = source.raw
    if isinstance(raw, bool) or not (isinstance(raw, (int, float)) or _is_text(source)):
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value == value else None  # NaN is no number here


def parse_optional_path(source: Source) -> str | None:
    """A file's path; "" (text) means None."""
    if not isinstance(source.raw, str):
        raise _fail(source, "expected a file's path")
    return source.raw.strip() or None


def percent(*, low: float = 0.0) -> Parser:
    """A parser of a percentage above `low` (at least it, where `low` > 0) and at most 100."""

    def parse(source: Source) -> float:
        value = _number(source)
        if value is None or not (low < value if low == 0 else low <= value) or value > 100:
            above = "above 0" if low == 0 else f"at least {low:g}"
            raise _fail(source, f"expected a percentage {above} and at most 100")
        return value

    return parse


def percent_or_off(source: Source) -> float | None:
    """A percentage in (0, 100]; "off" or "" (text) mean None: the rule is off."""
    if _is_text(source) and source.raw.strip().lower() in ("", "off"):
        return None
    return percent()(source)


def mbps_or_off(source: Source) -> float | None:
    """A rate in megabits per second, from 0.1 to 100000; "off" or "" (text) mean None."""
    if _is_text(source) and source.raw.strip().lower() in ("", "off"):
        return None
    value = _number(source)
    if value is None or not 0.1 <= value <= 100_000:
        raise _fail(source, "expected megabits per second between 0.1 and 100000, or off")
    return value


def parse_schedule_setting(source: Source) -> str:
    """Daily windows such as "22:00-07:00" or "12:00-13:30, 22:00-07:00"; "" for always."""
    if not isinstance(source.raw, str):
        raise _fail(source, "expected daily windows such as 22:00-07:00")
    try:
        windows = parse_schedule(source.raw)
    except RuleError as exc:
        raise _fail(source, str(exc)) from None
    return ", ".join(map(str, windows))


def parse_faults_setting(source: Source) -> Faults:
    """Drill faults (see `volunteer.faults`); "" or "none" for none."""
    if not isinstance(source.raw, str):
        raise _fail(source, "expected a list of faults such as perturb:0.05:0.05")
    if source.raw.strip().lower() in ("", "none"):
        return NO_FAULTS
    try:
        return parse_faults(source.raw)
    except SettingsError as exc:
        raise _fail(source, str(exc)) from None
