"""`dtype = auto`: the fastest of the forms that keep quality, measured here."""

from __future__ import annotations

import pytest
from volunteer.models.quant import QuantError
from volunteer.models.weight_format import WeightFormat

from volunteer.machine.weight_choice import CANDIDATES, NEAR, fastest_format, resolve_format


def test_auto_takes_the_fastest_candidate_it_timed() -> None:
    choice = fastest_format()
    assert set(choice.seconds) == set(CANDIDATES)
    assert all(seconds > 0 for seconds in choice.seconds.values())
    fastest = min(choice.seconds.values())
    chosen = CANDIDATES.index(choice.fmt.dtype)
    # Near the fastest, and no smaller form was.
    assert choice.seconds[choice.fmt.dtype] <= NEAR * fastest
    assert all(choice.seconds[label] > NEAR * fastest for label in CANDIDATES[:chosen])
    assert resolve_format("auto") == choice.fmt
    assert choice.reason.startswith(f"{choice.fmt.label}, the fastest here")


@pytest.mark.parametrize(
    ("setting", "label"),
    [("fp32", "fp32"), ("bf16", "bf16"), ("int8", "int8"), ("q4", "q4g32"), ("q4g128", "q4g128")],
)
def test_a_named_form_is_taken_as_named(setting: str, label: str) -> None:
    assert resolve_format(setting).label == label
    assert WeightFormat.parse(label) == resolve_format(setting)


def test_a_form_that_does_not_exist_is_refused_clearly() -> None:
    with pytest.raises(QuantError, match="'q3' is not a weight format"):
        resolve_format("q3")
