"""How the CLI and the TUI word the daemon's answers to control requests."""

from __future__ import annotations

from collections.abc import Callable

from volunteer.control.messages import ReloadReply


def describe_reload(
    outcome: ReloadReply, *, label: Callable[[str], str] = str, restart_how: str = ""
) -> str:
    """A `reload_config` answer in one line: what applied, what waits for a restart (and
    `restart_how`), what a flag or env variable of the daemon overrides."""
    parts = [
        ("applied now", outcome.applied),
        (f"applied on restart{restart_how}", outcome.restart_needed),
        ("set otherwise by a flag or VOLUNTEER_ variable the daemon started with",
         outcome.overridden),
    ]  # fmt: skip
    said = [f"{what}: {', '.join(label(n) for n in names)}" for what, names in parts if names]
    return "; ".join(said) or "the daemon already runs with these settings"
