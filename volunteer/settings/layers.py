"""The sources of settings, layered: defaults < `config.toml` < `VOLUNTEER_*` env < flags.

Works from the settings' declarations alone (`SettingSpec`), so a new setting is read
from each source without an edit here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from volunteer.errors import SettingsError
from volunteer.settings.spec import SettingSpec, Source


def layered_values(
    specs: Sequence[SettingSpec],
    *,
    config_file: Path,
    env: Mapping[str, str],
    flags: Mapping[str, Any],
) -> dict[str, Any]:
    """The values the sources give, checked, by setting name (defaults left out).

    Raises:
        SettingsError: a value is malformed, out of range, or an unknown config key.
    """
    by_name = {spec.name: spec for spec in specs}
    values: dict[str, Any] = {}
    layers = (
        _from_file(by_name, config_file),
        _from_env(specs, env),
        _from_flags(by_name, flags),
    )
    for layer in layers:
        _overlay(by_name, values, layer)
    return values


def to_toml(specs: Sequence[SettingSpec], values: Mapping[str, Any]) -> str:
    """The values that differ from the defaults, as `config.toml` text."""
    lines = []
    for spec in specs:
        value = values[spec.name]
        if value == spec.default or value is None:
            continue
        if spec.to_file is not None:
            value = spec.to_file(value)
        lines.append(f"{spec.name} = {_toml_value(value)}")
    return "".join(f"{line}\n" for line in lines)


def _overlay(
    specs: Mapping[str, SettingSpec], values: dict[str, Any], layer: dict[str, Source]
) -> None:
    parsed = {name: specs[name].parse(source) for name, source in layer.items()}
    # `new_swarm = false` or an empty join list choose nothing, so they clear nothing.
    # `is` checks: num_blocks = 0 is a choice (serve nothing), though 0 == False.
    chosen = {name for name, value in parsed.items() if not _chooses_nothing(value)}
    pairs = [(spec.name, spec.excludes) for spec in specs.values() if spec.excludes]
    for a, b in pairs:
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


def _from_file(specs: Mapping[str, SettingSpec], config_file: Path) -> dict[str, Source]:
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
        if key not in specs:
            known = ", ".join(sorted(specs))
            raise SettingsError(f"{config_file}: unknown key {key!r}; known keys: {known}")
        layer[key] = Source(raw, f"{config_file} key {key!r}", is_text=False)
    return layer


def _from_env(specs: Sequence[SettingSpec], env: Mapping[str, str]) -> dict[str, Source]:
    # Unknown VOLUNTEER_* names are left alone: paths and tests use their own.
    return {
        spec.name: Source(env[spec.env_name], spec.env_name)
        for spec in specs
        if spec.env_name in env
    }


def _from_flags(specs: Mapping[str, SettingSpec], flags: Mapping[str, Any]) -> dict[str, Source]:
    layer = {}
    for name, raw in flags.items():
        if name not in specs:
            raise SettingsError(f"unknown setting {name!r}")
        if raw is not None:
            layer[name] = Source(raw, specs[name].flag)
    return layer


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
