"""The daemon's settings, each declared once: defaults < `config.toml` < `VOLUNTEER_*` env
< CLI flags. Core: imports only `volunteer.errors`, `faults`, `paths`, `machine.atomic`
and `model_cache.smollm2`.

`Settings.build` runs once at the CLI edge and the frozen result is passed down; nothing
below reads the environment or the config file again. Every value is checked where it
enters, and a bad one raises `SettingsError` naming its source (the file's key, the env
var or the flag) and what is wrong with it.

Two pairs of options exclude each other: `blocks` / `num_blocks` and `join` /
`new_swarm`. Giving both in one source is an error; a higher source choosing one clears
the other chosen by a lower source (a `--blocks` flag overrides `num_blocks` in the file).

- `fields`: `Settings`, one field per setting with its whole declaration, and what is
  derived from them (`SPECS`, `EDITABLE`, `APPLIED_LIVE`, reading and saving the config).
- `spec`: what a declaration holds (`SettingSpec`) and the parsers that check values.
- `layers`: the sources, read and layered from the declarations alone.
"""

from volunteer.settings.fields import (
    APPLIED_LIVE,
    EDITABLE,
    SPECS,
    Settings,
    changed_fields,
    read_config,
    save_config,
    setting_label,
)
from volunteer.settings.spec import ENV_PREFIX, LOG_LEVELS, OnScreen, SettingSpec

__all__ = [
    "APPLIED_LIVE",
    "EDITABLE",
    "ENV_PREFIX",
    "LOG_LEVELS",
    "SPECS",
    "OnScreen",
    "SettingSpec",
    "Settings",
    "changed_fields",
    "read_config",
    "save_config",
    "setting_label",
]
