"""The drill faults' grammar (`VOLUNTEER_FAULTS`): what parses, what is refused with a
clear error, and the setting as every source gives it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from volunteer.errors import SettingsError
from volunteer.faults import NO_FAULTS, Fault, parse_faults
from volunteer.paths import Paths
from volunteer.settings import Settings


def test_each_fault_parses_with_its_numbers_and_prints_back() -> None:
    text = "perturb:0.05:0.05, constant:0.5, stale, lie-accuse"
    faults = parse_faults(text)
    assert faults.faults == (
        Fault("perturb", 0.05, 0.05),
        Fault("constant", 0.5),
        Fault("stale", 1.0),
        Fault("lie-accuse", 1.0),
    )
    assert parse_faults(str(faults)) == faults
    assert faults.rate_of("lie-accuse") == 1.0
    assert faults.rate_of("perturb") == 0.05
    assert not parse_faults("") and parse_faults("") == NO_FAULTS


def test_the_training_attacks_parse_with_stale_counting_steps_above_one() -> None:
    text = "sign-flip, random-direction:0.5, label-flip, stale:3, ipm, alie:0.25"
    faults = parse_faults(text)
    assert [fault.kind for fault in faults.training_attacks()] == [
        "sign-flip",
        "random-direction",
        "label-flip",
        "stale",
        "ipm",
        "alie",
    ]
    assert Fault("stale", 1.0, steps=3) in faults.faults
    assert parse_faults(str(faults)) == faults
    # Up to 1, stale's number is the serving fault's rate (a trainer: one step late).
    assert parse_faults("stale:0.5").faults == (Fault("stale", 0.5),)
    assert parse_faults("perturb:0.1:1").training_attacks() == ()
    pipeline = parse_faults("wrong-activations, wrong-input-grads:0.5")
    assert [str(fault) for fault in pipeline.training_attacks()] == [
        "wrong-activations",
        "wrong-input-grads:0.5",
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("explode", "unknown fault 'explode'"),
        ("perturb:0.5", "expected perturb:RATE:SCALE"),
        ("perturb:1.5:0.1", "RATE must be within 0 and 1"),
        ("perturb:0.5:0", "SCALE must be above 0"),
        ("perturb:x:0.1", "could not convert"),
        ("stale:0.1:2", "expected stale[:RATE]"),
        ("constant:-1", "RATE must be within 0 and 1"),
        ("stale:2.5", "STEPS must be a whole number"),
        ("stale:20000", "STEPS must be a whole number up to 10000"),
        ("sign-flip:2", "RATE must be within 0 and 1"),
    ],
)
def test_a_bad_fault_is_refused_with_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(problem)):
        parse_faults(text)


def test_the_setting_comes_from_the_environment_flags_and_the_file(tmp_path: Path) -> None:
    paths = Paths.resolve(home=tmp_path / "home", env={"VOLUNTEER_CACHE_DIR": str(tmp_path)})
    assert Settings.build(paths=paths, env={}, flags={}).faults == NO_FAULTS
    from_env = Settings.build(paths=paths, env={"VOLUNTEER_FAULTS": "stale:0.2"}, flags={})
    assert from_env.faults == parse_faults("stale:0.2")
    flagged = Settings.build(paths=paths, env={}, flags={"faults": "constant"})
    assert str(flagged.faults) == "constant"
    paths.config_file.parent.mkdir(parents=True, exist_ok=True)
    paths.config_file.write_text(flagged.to_toml(), encoding="utf-8")
    assert Settings.build(paths=paths, env={}, flags={}).faults == flagged.faults
    with pytest.raises(SettingsError, match=r"VOLUNTEER_FAULTS.*unknown fault"):
        Settings.build(paths=paths, env={"VOLUNTEER_FAULTS": "explode"}, flags={})
