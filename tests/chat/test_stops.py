"""`stop` over streamed text: what may be the start of a stop is held back, the first stop
cuts the text, and nothing goes out after it."""

from __future__ import annotations

import pytest

from volunteer.chat.stops import StopScanner


def _run(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    scanner = StopScanner(stops)
    out = [scanner.push(piece) for piece in pieces]
    out.append(scanner.flush())
    return out, scanner.is_stopped


def test_a_stop_split_across_pieces_is_found_and_never_sent() -> None:
    out, stopped = _run([", 5"], ["1, 2", ", 3, 4,", " 5, 6", ", 7"])
    assert stopped and "".join(out) == "1, 2, 3, 4"
    assert out[1] == ", 3, 4"  # the "," that may begin ", 5" waits for the next piece


def test_held_text_goes_out_when_it_is_not_a_stop() -> None:
    out, stopped = _run(["END"], ["the E", "ND? no: the E", "nd"])
    assert stopped and "".join(out) == "the "
    out, stopped = _run(["END"], ["the E", "nd of it, E"])
    assert not stopped and "".join(out) == "the End of it, E" and out[-1] == "E"


@pytest.mark.parametrize(
    ("stops", "text"),
    [(["b", "abc"], "xa"), (["zz", "c"], "xab"), (["\n\n"], "xabc")],
)
def test_the_earliest_stop_wins(stops: list[str], text: str) -> None:
    pieces = list("xabc") if stops != ["\n\n"] else ["xabc"]
    out, _ = _run(stops, pieces)
    assert "".join(out) == text


def test_a_stop_is_seen_across_pieces_whatever_their_sizes() -> None:
    scanner = StopScanner([", 5", "THE END"])
    for piece in ["1, 2, 3, 4", ",", " 5"]:
        scanner.push(piece)
    assert scanner.is_stopped
    assert _run(["x"], ["axb"])[1]
    assert not _run([], ["anything"])[1]
