"""`stop` sequences over text that comes in pieces: the text before the first stop is let
out as soon as it cannot be the start of one; the stop and all after it never are."""

from __future__ import annotations


class StopScanner:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.held = ""
        self.is_stopped = False
        """A stop sequence came: the generation should end."""

    def push(self, piece: str) -> str:
        """The text that may go out now (none once stopped)."""
        if self.is_stopped:
            return ""
        text = self.held + piece
        found = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        if found:
            self.is_stopped, self.held = True, ""
            return text[: min(found)]
        keep = max((_overlap(text, stop) for stop in self.stops), default=0)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What was held back, once the text has ended without a stop."""
        held, self.held = self.held, ""
        return "" if self.is_stopped else held


def _overlap(text: str, stop: str) -> int:
    """The longest end of `text` that begins `stop` (shorter than all of it)."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0
