"""The daemon's log, tailed (toggled with `l`)."""

from __future__ import annotations

from pathlib import Path

from textual.widgets import RichLog

TAIL_BYTES = 16_384
"""How much of an existing log to show when the panel first opens."""


class LogTail:
    """Reads what was appended to a log file since the last read (survives rotation)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._offset: int | None = None

    def read_new(self) -> list[str]:
        if self.path is None or not self.path.exists():
            return []
        size = self.path.stat().st_size
        if self._offset is None or size < self._offset:  # first read, or rotated
            self._offset = max(size - TAIL_BYTES, 0) if self._offset is None else 0
        with self.path.open("rb") as file:
            file.seek(self._offset)
            data = file.read()
        # Keep a partial last line for the next read.
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        return complete.decode("utf-8", errors="replace").splitlines()


class LogPanel(RichLog):
    def show_lines(self, lines: list[str]) -> None:
        for line in lines:
            self.write(line)
