"""What the volunteer allows: edited here, checked, written to `config.toml`. A running
daemon takes on the settings declared live at once; the rest decides what it loads, so it
applies when the daemon restarts (ctrl+r restarts it from here). The fields, their labels
and placeholders come from the settings' declarations (`volunteer.settings.fields`)."""

from __future__ import annotations

from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Input, Label, Static
from volunteer.tui.messages import DaemonActionDone
from volunteer.tui.render import setting_label

from volunteer.settings import APPLIED_LIVE, SPECS, OnScreen

FIELDS: tuple[tuple[str, OnScreen], ...] = tuple(
    (spec.name, spec.screen) for spec in SPECS if spec.screen is not None
)
"""(setting, how the screen shows it) for each editable setting, in declaration order."""


class SettingsView(VerticalScroll):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "save", "Save settings"),
        Binding("ctrl+r", "restart", "Restart daemon"),
    ]

    def compose(self) -> ComposeResult:
        for name, screen in FIELDS:
            if screen.heading:
                yield Static(screen.heading, classes="settings-heading", markup=False)
            with Horizontal(classes="setting-row"):
                yield Label(screen.title, classes="setting-title", markup=False)
                yield Input(placeholder=screen.placeholder, id=f"setting-{name}")
        yield Static(_note(), id="settings-note", markup=False)

    def show_config(self, values: dict[str, str]) -> None:
        for name, _ in FIELDS:
            self.query_one(f"#setting-{name}", Input).value = values.get(name, "")

    def edits(self) -> dict[str, str]:
        return {name: self.query_one(f"#setting-{name}", Input).value for name, _ in FIELDS}

    def action_save(self) -> None:
        self._save(self.edits())

    @work(thread=True, exclusive=True, group="settings")
    def _save(self, edits: dict[str, str]) -> None:
        try:
            said = self.app.client.save_config(edits)  # type: ignore[attr-defined]
        except Exception as exc:  # a bad value: say which, keep the form as typed
            self.post_message(SettingsSaved(f"not saved: {exc}", is_error=True))
            return
        self.post_message(SettingsSaved(said))

    def on_settings_saved(self, message: SettingsSaved) -> None:
        note = self.query_one("#settings-note", Static)
        note.update(message.said)
        note.set_class(message.is_error, "error")

    def action_restart(self) -> None:
        self.query_one("#settings-note", Static).update("restarting the daemon…")
        self._restart()

    @work(thread=True, exclusive=True, group="daemon-action")
    def _restart(self) -> None:
        try:
            said = self.app.client.restart()  # type: ignore[attr-defined]
        except Exception as exc:
            said = f"restart failed: {exc}"
        self.post_message(SettingsSaved(said))
        self.app.post_message(DaemonActionDone(said))  # the app polls the daemon again


def _note() -> str:
    """What saving does: which settings a running daemon takes on at once (a group whose
    settings all do is named by its heading)."""
    live: list[str] = []
    groups = {screen.heading: [] for _, screen in FIELDS if screen.heading}
    heading = None
    for name, screen in FIELDS:
        heading = screen.heading or heading
        if heading is None:
            live += [setting_label(name)] if name in APPLIED_LIVE else []
        else:
            groups[heading].append(name)
    live += [f"those under {h!r}" for h, names in groups.items() if set(names) <= set(APPLIED_LIVE)]
    said = ", ".join(live[:-1]) + (" and " if len(live) > 1 else "") + live[-1] if live else "none"
    return f"ctrl+s saves. The {said} apply at once; the rest when the daemon restarts (ctrl+r)."


class SettingsSaved(Message):
    """What saving (or restarting) did, for the note under the form."""

    def __init__(self, said: str, *, is_error: bool = False) -> None:
        super().__init__()
        self.said = said
        self.is_error = is_error
