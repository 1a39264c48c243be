"""Fine-tuning: pick a data file, a method, steps, a batch size and a name; start and
stop the daemon's job; watch its training loss, held-out loss and tokens/s live; when it
is done, `c` opens the chat with the new adapter.

The job runs in the daemon (closing the TUI does not stop it); this view only shows what
the app's poll of `finetune_status` found (`show_job`) and sends starts and stops from
thread workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Input, Label, Select, Sparkline, Static
from volunteer.tui.messages import ChatWithAdapter, FinetuneRefused, FinetuneUpdated

from volunteer.control.messages import FinetuneJob

METHODS = (("LoRA", "lora"), ("soft prompt", "ptune"), ("deep prompt", "deep_ptune"))
DEFAULT_STEPS = 100
DEFAULT_BATCH_SIZE = 8
ACTIVE = ("running", "stopping")
CHARTS = (
    ("losses", "training loss", "{:.4f}"),
    ("heldout", "held-out loss", "{:.4f}"),
    ("speeds", "tokens/s", "{:,.0f}"),
)
IDLE_NOTE = "no fine-tuning job yet: pick a JSONL file, a method and steps, then Start"


class FinetuneView(Vertical):
    """The form, the job's status line and its charts (see the module)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("c", "chat_with_adapter", "Chat with it"),
    ]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.job: FinetuneJob | None = None
        """The job last shown."""
        self._shown: tuple[FinetuneJob | None, str | None] | None = None

    def compose(self) -> ComposeResult:
        yield Label('Data file (JSONL: one {"messages": [...]} or {"text": ...} per line)')
        yield Input(placeholder="/path/to/data.jsonl", id="ft-data")
        with Horizontal(id="ft-options"):
            with Vertical():
                yield Label("Method")
                yield Select(METHODS, value="lora", allow_blank=False, id="ft-method")
            with Vertical():
                yield Label("Steps")
                yield Input(str(DEFAULT_STEPS), type="integer", id="ft-steps")
            with Vertical():
                yield Label("Batch size")
                yield Input(str(DEFAULT_BATCH_SIZE), type="integer", id="ft-batch")
            with Vertical():
                yield Label("Adapter name")
                yield Input(placeholder="(the file's name)", id="ft-name")
        with Horizontal(id="ft-buttons"):
            yield Button("Start", id="ft-start", variant="primary")
            yield Button("Stop", id="ft-stop", variant="error", disabled=True)
            yield Button(r"Chat with it \[c]", id="ft-chat", classes="hidden")
        yield Static(id="ft-note", markup=False)
        yield Static(IDLE_NOTE, id="ft-status", markup=False)
        for key, _, _ in CHARTS:
            yield Static(id=f"ft-{key}-label", markup=False, classes="ft-chart-label")
            yield Sparkline([], id=f"ft-{key}", classes="ft-chart")

    def on_mount(self) -> None:
        self._show_charts(None)

    def focus_first(self) -> None:
        """Focus where the next key most likely goes: `c` on a done job's chat button,
        the stop button while one runs, else the data file."""
        state = self.job.state if self.job is not None else "idle"
        target = {"done": "#ft-chat", "running": "#ft-stop"}.get(state, "#ft-data")
        self.query_one(target).focus()

    def request(self) -> dict[str, Any]:
        """The form as `finetune_start` params (the daemon checks them and names a bad
        one); the data path made absolute here, where it was typed."""
        data = self.query_one("#ft-data", Input).value.strip()
        name = self.query_one("#ft-name", Input).value.strip()
        path = Path(data).expanduser()
        return {
            "data": str(path if path.is_absolute() else Path.cwd() / path),
            "name": name or path.stem,
            "method": self.query_one("#ft-method", Select).value,
            "steps": self._number("#ft-steps", DEFAULT_STEPS),
            "batch_size": self._number("#ft-batch", DEFAULT_BATCH_SIZE),
        }

    def _number(self, selector: str, default: int) -> int:
        text = self.query_one(selector, Input).value.strip()
        return int(text) if text.isdigit() else default

    @on(Button.Pressed, "#ft-start")
    def start_job(self) -> None:
        if not self.query_one("#ft-data", Input).value.strip():
            self._note("pick a data file first (a JSONL file on this machine)", is_error=True)
            return
        self._note("starting…")
        self._act("finetune_start", self.request())

    @on(Button.Pressed, "#ft-stop")
    def stop_job(self) -> None:
        self._note("stopping after this step (the checkpoint is saved)…")
        self._act("finetune_stop")

    @on(Button.Pressed, "#ft-chat")
    def chat_button(self) -> None:
        self.action_chat_with_adapter()

    def action_chat_with_adapter(self) -> None:
        job = self.job
        if job is not None and job.state == "done" and job.adapter:
            self.post_message(ChatWithAdapter(job.adapter))

    @work(thread=True, exclusive=True, group="finetune-action")
    def _act(self, method: str, *args: Any) -> None:
        try:
            job = getattr(self.app.client, method)(*args)  # type: ignore[attr-defined]
        except Exception as exc:  # a refused start is shown; the last job stays
            self.post_message(FinetuneRefused(str(exc) or type(exc).__name__))
            return
        self.post_message(FinetuneUpdated(job))  # up to the app, as a poll's answer is

    def on_finetune_refused(self, message: FinetuneRefused) -> None:
        self._note(message.error, is_error=True)

    def show_job(self, job: FinetuneJob | None, error: str | None = None) -> None:
        """Shows a job (None with `error`: what went wrong; the last job's charts stay)."""
        if self._shown == (job, error):  # polled every second: nothing new, nothing redrawn
            return
        self._shown = (job, error)
        if job is None:
            self._say(error or IDLE_NOTE, is_error=error is not None)
            return
        note = self.query_one("#ft-note", Static)
        if not note.has_class("error") and job != self.job:  # "starting…" has its answer
            note.update("")
        self.job = job
        is_active = job.state in ACTIVE
        self.query_one("#ft-start", Button).disabled = is_active
        self.query_one("#ft-stop", Button).disabled = job.state != "running"
        self.query_one("#ft-chat", Button).set_class(job.state != "done", "hidden")
        is_idle = job.state == "idle"
        self._say(IDLE_NOTE if is_idle else status_line(job), is_error=job.state == "failed")
        self._show_charts(None if is_idle else job)

    def _say(self, text: str | Text, *, is_error: bool = False) -> None:
        status = self.query_one("#ft-status", Static)
        status.update(text)
        status.set_class(is_error, "error")

    def _note(self, text: str, *, is_error: bool = False) -> None:
        note = self.query_one("#ft-note", Static)
        note.update(text)
        note.set_class(is_error, "error")

    def _show_charts(self, job: FinetuneJob | None) -> None:
        for key, title, form in CHARTS:
            values = [value for _, value in getattr(job, key)] if job is not None else []
            spark = self.query_one(f"#ft-{key}", Sparkline)
            label = self.query_one(f"#ft-{key}-label", Static)
            # A flat line would draw as a full bar (the scale has no height): shown from
            # two different values on.
            spark.data = values
            spark.display = len(set(values)) > 1
            label.display = job is not None
            label.update(chart_label(title, form, values))


def status_line(job: FinetuneJob) -> Text:
    """The job in one line: its state, where it is and its latest figures."""
    colour = {"running": "green", "done": "green", "failed": "red"}.get(job.state, "yellow")
    line = Text.assemble((f"● {job.state}", f"bold {colour}"), f"  {job.name}")
    if job.method:
        line.append(f" ({job.method})")
    line.append(f"  step {job.step:,} of {job.steps:,}")
    if job.loss is not None:
        line.append(f"  loss {job.loss:.4f}")
    if job.heldout_loss is not None:
        line.append(f"  held-out {job.heldout_loss:.4f}")
    if job.state in ACTIVE and job.tokens_per_s:
        line.append(f"  {job.tokens_per_s:,.0f} tokens/s")
    if job.state == "done":
        line.append(f"\nsaved adapter {job.adapter}: press ", style="green")
        line.append("c", style="bold reverse")
        line.append(" to chat with it", style="green")
    elif job.state == "stopped":
        line.append("\ncheckpoint saved: Start with the same settings resumes it")
    elif job.state == "failed":
        line.append(f"\n{job.error or 'failed'}", style="red")
    return line


def chart_label(title: str, form: str, values: list[float]) -> str:
    """A chart's title with its latest, first and best (lowest; for speed: highest) value."""
    if not values:
        return f"{title}: none yet"
    is_speed = title == "tokens/s"
    best = max(values) if is_speed else min(values)
    return (
        f"{title}: now {form.format(values[-1])}, first {form.format(values[0])}, "
        f"{'peak' if is_speed else 'best'} {form.format(best)}"
    )
