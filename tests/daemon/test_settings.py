"""Settings: defaults < config.toml < VOLUNTEER_* env < flags, and each validation error."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
from volunteer.tui import render, settings_view

from volunteer.cli import build_parser
from volunteer.commands import daemon_cmd
from volunteer.errors import SettingsError
from volunteer.faults import parse_faults
from volunteer.model_cache.smollm2 import DEFAULT_MODEL
from volunteer.paths import Paths
from volunteer.settings import APPLIED_LIVE, EDITABLE, SPECS, Settings, SettingSpec

PEER = "/ip4/127.0.0.1/tcp/31337/p2p/12D3KooWGjsehKx2X7FXb5FZeC67dMVRJVfPpo18eebps8HVyJHg"


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths.resolve(home=tmp_path / "home", env={"VOLUNTEER_CACHE_DIR": str(tmp_path)})


def build(
    paths: Paths, *, toml: str | None = None, env: dict[str, str] | None = None, **flags: Any
) -> Settings:
    if toml is not None:
        paths.config_file.parent.mkdir(parents=True, exist_ok=True)
        paths.config_file.write_text(toml, encoding="utf-8")
    return Settings.build(paths=paths, env=env or {}, flags=flags)


def test_defaults_without_any_source(paths: Paths) -> None:
    settings = build(paths)
    assert settings == Settings()
    assert settings.model == DEFAULT_MODEL
    assert settings.host == "127.0.0.1"  # nothing is exposed unless the owner asks
    assert settings.port == 0
    assert settings.is_new_swarm


def test_file_then_env_then_flags(paths: Paths) -> None:
    toml = 'model = "from-file"\nport = 1000\npublic_name = "file"\nthreads = 2\n'
    env = {"VOLUNTEER_PORT": "2000", "VOLUNTEER_PUBLIC_NAME": "env"}
    settings = build(paths, toml=toml, env=env, public_name="flag", threads=None)
    assert settings.model == "from-file"
    assert settings.port == 2000
    assert settings.public_name == "flag"
    assert settings.threads == 2  # a flag left at None does not override


def test_env_values_are_parsed(paths: Paths) -> None:
    env = {
        "VOLUNTEER_BLOCKS": "3:7",
        "VOLUNTEER_JOIN": f"{PEER}, {PEER.replace('31337', '31338')}",
        "VOLUNTEER_CACHE_TOKENS": "auto",
        "VOLUNTEER_LOG_LEVEL": "debug",
        "VOLUNTEER_HOME": "/ignored/by/settings",
    }
    settings = build(paths, env=env)
    assert settings.blocks == (3, 7)
    assert len(settings.join) == 2 and not settings.is_new_swarm
    assert settings.cache_tokens is None
    assert settings.log_level == "DEBUG"


def test_memory_limit_and_rebalance_period_parse_from_every_source(paths: Paths) -> None:
    assert build(paths, toml="max_ram_gib = 4\n").max_ram_gib == 4.0
    assert build(paths, env={"VOLUNTEER_MAX_RAM_GIB": "0.5"}).max_ram_gib == 0.5
    assert build(paths, max_ram_gib="auto").max_ram_gib is None
    assert build(paths, toml="max_gpu_gib = 7.5\n").max_gpu_gib == 7.5
    assert build(paths, env={"VOLUNTEER_MAX_GPU_GIB": "2"}, max_gpu_gib="auto").max_gpu_gib is None
    with pytest.raises(SettingsError, match="--max-gpu-gib"):
        build(paths, max_gpu_gib="-1")
    assert build(paths, rebalance_period_s="0").rebalance_period_s == 0.0  # never move
    assert build(paths, env={"VOLUNTEER_REBALANCE_PERIOD_S": "90"}).rebalance_period_s == 90.0


def test_a_higher_source_choosing_one_of_a_pair_clears_the_other(paths: Paths) -> None:
    toml = f'blocks = "0:4"\njoin = ["{PEER}"]\n'
    settings = build(paths, toml=toml, num_blocks="6", new_swarm=True)
    assert (settings.blocks, settings.num_blocks) == (None, 6)
    assert (settings.join, settings.new_swarm) == ((), True)


def test_num_blocks_zero_is_a_choice_that_clears_blocks(paths: Paths) -> None:
    settings = build(paths, toml='blocks = "0:4"\n', num_blocks="0")
    assert (settings.blocks, settings.num_blocks) == (None, 0)


def test_new_swarm_false_does_not_clear_a_lower_join(paths: Paths) -> None:
    settings = build(paths, toml=f'join = ["{PEER}"]\n', env={"VOLUNTEER_NEW_SWARM": "false"})
    assert settings.join == (PEER,)


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        ({"blocks": "5:3"}, "--blocks: needs 0 <= START < END"),
        ({"blocks": "3"}, "--blocks: expected START:END"),
        ({"blocks": "a:b"}, "--blocks: expected START:END with whole numbers"),
        ({"num_blocks": "-1"}, "--num-blocks: must be at least 0"),
        ({"port": "70000"}, "--port: must be at least 0 and at most 65535"),
        ({"port": "http"}, "--port: expected a whole number"),
        ({"threads": "0"}, "--threads: must be at least 1"),
        ({"host": "example.com"}, "--host: expected an IP address"),
        ({"join": ["/ip4/1.2.3.4/tcp/1"]}, "is not a multiaddr"),
        ({"public_name": "x" * 65}, "--public-name: expected at most 64"),
        ({"log_level": "LOUD"}, "--log-level: expected one of DEBUG"),
        ({"start_timeout_s": "-1"}, "--start-timeout: expected seconds"),
        ({"max_ram_gib": "0"}, "--max-ram-gib: expected GiB above 0"),
        ({"max_ram_gib": "nan"}, "--max-ram-gib: expected GiB above 0"),
        ({"rebalance_period_s": "-5"}, "--rebalance-period: expected seconds between 0"),
        ({"validate_share": "0.9"}, "--validate-share: expected a share between 0 and 0.5"),
        ({"validate_share": "most"}, "--validate-share: expected a share"),
        ({"model": " "}, "--model: expected a non-empty string"),
        ({"blocks": "0:2", "num_blocks": "2"}, "--blocks and --num-blocks exclude each other"),
        ({"join": [PEER], "new_swarm": True}, "--join and --new-swarm exclude each other"),
    ],
)
def test_bad_flags_name_the_flag_and_the_problem(
    paths: Paths, flags: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(SettingsError, match=fragment.replace("*", r"\*")):
        build(paths, **flags)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"VOLUNTEER_PORT": "-1"}, "VOLUNTEER_PORT: must be at least 0"),
        ({"VOLUNTEER_NEW_SWARM": "maybe"}, "VOLUNTEER_NEW_SWARM: expected true or false"),
        ({"VOLUNTEER_CACHE_TOKENS": "lots"}, "VOLUNTEER_CACHE_TOKENS: expected a whole number"),
    ],
)
def test_bad_env_names_the_variable(paths: Paths, env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment):
        build(paths, env=env)


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ("prot = 80\n", "unknown key 'prot'; known keys: announce_period_s, api, api_max_requests"),
        ('port = "80"\n', "key 'port': expected a whole number"),
        ("new_swarm = 1\n", "key 'new_swarm': expected true or false"),
        ("port = true\n", "key 'port': expected a whole number"),
        (f'join = "{PEER}"\n', "key 'join': expected a list of multiaddrs"),
        ("port = = 3\n", "not valid TOML"),
        ("max_ram_gib = true\n", "key 'max_ram_gib': expected GiB"),
        ('rebalance_period_s = "soon"\n', "key 'rebalance_period_s': expected seconds"),
    ],
)
def test_bad_config_file_names_the_key(paths: Paths, toml: str, fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment) as info:
        build(paths, toml=toml)
    assert str(paths.config_file) in str(info.value)


def test_unknown_flag_is_a_programming_error_reported_clearly(paths: Paths) -> None:
    with pytest.raises(SettingsError, match="unknown setting 'colour'"):
        build(paths, colour="blue")


def test_to_toml_round_trips(paths: Paths) -> None:
    settings = Settings(
        model="org/name",
        blocks=(2, 9),
        join=(PEER,),
        host="0.0.0.0",
        port=31337,
        public_name='Ada "the" Lovelace ✓',
        cache_tokens=4096,
        threads=3,
        max_ram_gib=6.5,
        rebalance_period_s=0.0,
        log_level="DEBUG",
        start_timeout_s=30.0,
    )
    assert build(paths, toml=settings.to_toml()) == settings
    assert Settings().to_toml() == ""


def test_settings_are_frozen_and_keyword_only() -> None:
    with pytest.raises(TypeError):
        Settings("model")  # type: ignore[misc]
    with pytest.raises(AttributeError):
        Settings().port = 1  # type: ignore[misc]


def test_local_links_can_be_turned_off(paths: Paths) -> None:
    assert build(paths).local_links
    assert not build(paths, local_links="no").local_links
    assert not build(paths, env={"VOLUNTEER_LOCAL_LINKS": "false"}).local_links
    with pytest.raises(SettingsError, match="--local-links: expected true or false"):
        build(paths, local_links="maybe")


def _start_flags(*argv: str) -> dict[str, Any]:
    """The settings' flags as `volunteer start` parses them."""
    return daemon_cmd.settings_flags(build_parser().parse_args(["start", *argv]))


def test_the_announce_period_is_one_declaration_read_from_every_source(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    assert build(paths).announce_period_s == 30.0
    assert build(paths, toml="announce_period_s = 60\n").announce_period_s == 60.0
    env = {"VOLUNTEER_ANNOUNCE_PERIOD_S": "45"}
    assert build(paths, toml="announce_period_s = 60\n", env=env).announce_period_s == 45.0
    flags = _start_flags("--announce-period", "12.5")
    assert build(paths, env=env, **flags).announce_period_s == 12.5
    for out_of_range in ("4.9", "3601", "soon"):
        with pytest.raises(SettingsError, match="--announce-period: expected seconds between 5"):
            build(paths, announce_period_s=out_of_range)
    assert Settings(announce_period_s=90.0).to_toml() == "announce_period_s = 90.0\n"
    # Not on the settings screen; a changed value waits for a restart, named so.
    assert "announce_period_s" not in EDITABLE and "announce_period_s" not in APPLIED_LIVE
    assert render.setting_label("announce_period_s") == "announce period"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["start", "--help"])
    assert "--announce-period SECONDS" in capsys.readouterr().out


EXAMPLES: dict[str, tuple[Any, str]] = {
    "public_name": ("Ada", "Ada"),
    "model": ("org/name", "org/name"),
    "threads": (3, "3"),
    "max_ram_gib": (6.5, "6.5"),
    "max_gpu_gib": (2.0, "2"),
    "cache_tokens": (4096, "4096"),
    "blocks": ((2, 9), "2:9"),
    "num_blocks": (0, "0"),
    "join": ((PEER,), PEER),
    "new_swarm": (True, "true"),
    "train": (True, "true"),
    "host": ("0.0.0.0", "0.0.0.0"),
    "port": (31337, "31337"),
    "local_links": (False, "no"),
    "rebalance_period_s": (0.0, "0"),
    "leave_grace_s": (0.0, "0"),
    "repair_wait_s": (5.0, "5"),
    "announce_period_s": (10.0, "10"),
    "log_level": ("DEBUG", "debug"),
    "start_timeout_s": (30.0, "30"),
    "max_message_mib": (16, "16"),
    "max_sessions": (200, "200"),
    "max_sessions_per_peer": (3, "3"),
    "max_queued_jobs": (5, "5"),
    "max_calls_per_peer": (2, "2"),
    "forward_slice_s": (0.05, "0.05"),
    "first_message_s": (30.0, "30"),
    "max_backward_tokens": (1024, "1024"),
    "max_adapter_mib": (8, "8"),
    "max_session_s": (600.0, "600"),
    "max_push_streams_per_peer": (2, "2"),
    "verify": ("all", "ALL"),
    "dtype": ("q4g64", "Q4G64"),
    "validate_share": (0.25, "0.25"),
    "faults": (parse_faults("stale:0.5,perturb:0.1:0.05"), "stale:0.5, perturb:0.1:0.05"),
    "max_cpu_percent": (50.0, "50"),
    "run_on_battery": (True, "yes"),
    "pause_while_user_active": (True, "on"),
    "user_idle_minutes": (10.0, "10"),
    "pause_when_other_cpu_percent": (25.0, "25"),
    "schedule": ("22:00-07:00, 12:00-13:30", "22:00-07:00,12:00-13:30"),
    "owner_sensors": ("/tmp/sensors.json", "/tmp/sensors.json"),
    "max_ram_percent_in_use": (50.0, "50"),
    "max_ram_percent_idle": (90.0, "90"),
    "max_upload_mbps": (8.5, "8.5"),
    "api": ("127.0.0.1:8000", "8000"),
    "api_max_requests": (16, "16"),
    "batch_max_sessions": (1, "1"),
    "batch_max_mib": (64, "64"),
    "prefill_chunk_tokens": (0, "0"),
    "max_chats": (2, "2"),
    "api_queue_timeout_s": (5.0, "5"),
    "api_open_on_loopback": (True, "yes"),
}
"""Per setting: a value other than its default, and that value as env or flag text."""


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_every_setting_is_read_from_its_flag_env_name_and_config_key(
    paths: Paths, spec: SettingSpec
) -> None:
    value, text = EXAMPLES[spec.name]
    assert value != spec.default
    assert getattr(build(paths, env={spec.env_name: text}), spec.name) == value
    assert getattr(build(paths, toml=Settings(**{spec.name: value}).to_toml()), spec.name) == value
    # The detached child gets the flags as argv and parses them back.
    given = {"value": text, "append": [text], "switch": True}[spec.flag_kind]
    flags = _start_flags(*daemon_cmd.flags_argv({spec.name: given}))
    assert getattr(build(paths, **flags), spec.name) == value


def test_the_settings_screen_shows_the_declared_editable_settings() -> None:
    assert [name for name, _ in settings_view.FIELDS] == list(EDITABLE)
    rules = (
        "max_cpu_percent",
        "run_on_battery",
        "pause_while_user_active",
        "user_idle_minutes",
        "pause_when_other_cpu_percent",
        "max_ram_percent_in_use",
        "max_ram_percent_idle",
        "schedule",
        "max_upload_mbps",
    )
    assert tuple(EDITABLE) == (
        "public_name",
        "model",
        "threads",
        "max_ram_gib",
        "max_gpu_gib",
        "cache_tokens",
        *rules,
    )
    assert tuple(APPLIED_LIVE) == ("public_name", "threads", *rules)
    headings = [screen.heading for _, screen in settings_view.FIELDS if screen.heading]
    assert headings == ["When the owner needs the machine"]
    assert [render.setting_label(name) for name in APPLIED_LIVE[:2]] == [
        "public name",
        "CPU threads",
    ]
    assert render.setting_label("schedule") == "schedule"


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("8000", "127.0.0.1:8000"),
        ("0.0.0.0:8080", "0.0.0.0:8080"),
        ("[::1]:8000", "[::1]:8000"),
        ("off", None),
    ],
)
def test_the_api_address_is_read_as_host_and_port(
    paths: Paths, text: str, address: str | None
) -> None:
    assert build(paths, env={"VOLUNTEER_API": text}).api == address


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"VOLUNTEER_MAX_SESSIONS": "0"}, "must be at least 1"),
        ({"VOLUNTEER_MAX_MESSAGE_MIB": "5000"}, "at most 4096"),
        ({"VOLUNTEER_MAX_SESSION_S": "1"}, "expected seconds between 10"),
        ({"VOLUNTEER_SCHEDULE": "22:00-25:00"}, "not on a clock"),
        ({"VOLUNTEER_SCHEDULE": "9-17"}, "not a window like 22:00-07:00"),
        ({"VOLUNTEER_SCHEDULE": "10:00-10:00"}, "is empty"),
        ({"VOLUNTEER_PAUSE_WHEN_OTHER_CPU_PERCENT": "150"}, "at most 100"),
        ({"VOLUNTEER_USER_IDLE_MINUTES": "0"}, "expected minutes between 0.5"),
        ({"VOLUNTEER_RUN_ON_BATTERY": "sometimes"}, "expected true or false"),
        ({"VOLUNTEER_MAX_RAM_PERCENT_IDLE": "0"}, "percentage above 0"),
        ({"VOLUNTEER_MAX_UPLOAD_MBPS": "0.01"}, "megabits per second between 0.1"),
        ({"VOLUNTEER_MAX_UPLOAD_MBPS": "fast"}, "megabits per second"),
        ({"VOLUNTEER_API": "localhost:8000"}, r"expected \[HOST:\]PORT"),
        ({"VOLUNTEER_API": "70000"}, "a port between 1 and 65535"),
    ],
)
def test_server_caps_are_checked(paths: Paths, env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment):
        build(paths, env=env)


@pytest.mark.parametrize("percent", [100.0, 75.0, 50.0, 30.0, 10.0])
def test_max_cpu_percent_is_threads_then_a_duty_cycle(percent: float) -> None:
    cores = os.cpu_count() or 1
    settings = Settings(max_cpu_percent=percent)
    cap = settings.cpu_cap_cores
    if percent == 100:
        assert cap is None and settings.thread_count == cores
        assert Settings(threads=4 * cores).thread_count == 4 * cores  # no cap: as set
        return
    assert cap == pytest.approx(cores * percent / 100)
    assert settings.thread_count == max(1, math.ceil(cap - 1e-9))  # as few threads as fit
    assert Settings(max_cpu_percent=percent, threads=1).thread_count == 1  # a cap, no floor


def test_max_cpu_percent_has_a_floor() -> None:
    with pytest.raises(SettingsError, match="at least 5"):
        Settings.build(
            paths=Paths.resolve(home="/tmp/x", env={}),
            env={"VOLUNTEER_MAX_CPU_PERCENT": "1"},
            flags={},
        )
