"""How the CLI and the TUI word the daemon's answers to control requests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def describe_reload(
    outcome: dict[str, Any], *, label: Callable[[str], str] = str, restart_how: str = ""
) -> str:
    """A `reload_config` answer in one line: what applied, what waits for a restart (and
    `restart_how`), what a flag or env variable of the daemon overrides."""
    parts = [
        ("applied now", outcome.get("applied")),
        (f"applied on restart{restart_how}", outcome.get("restart_needed")),
        ("set otherwise by a flag or VOLUNTEER_ variable the daemon started with",
         outcome.get("overridden")),
    ]  # fmt: skip
    said = [f"{what}: {', '.join(label(n) for n in names)}" for what, names in parts if names]
    return "; ".join(said) or "the daemon already runs with these settings"
