"""The finetune tab: with a scripted daemon (the form's request, start and stop, a refused
start, the live charts, a failed job, `c` to the chat with the new adapter, a snapshot),
and against a real daemon serving the real SmolLM2: a short run from the tab, then a
chat answered with the adapter it saved."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Button, Input, Select, Sparkline, Static, TabbedContent
from volunteer.tui.app import VolunteerApp
from volunteer.tui.chat_view import ChatView
from volunteer.tui.client import ControlDaemonClient

from tests.daemon.homes import ROOT, one_daemon
from tests.tui.fakes import FIXED_GAUGES, FakeDaemon
from tests.tui.pilot import WAIT_S, run, settle
from tests.tui.waiting import until
from volunteer.control.endpoint import ControlError, use_tcp
from volunteer.control.messages import AdapterRow, AdaptersReply, FinetuneJob
from volunteer.paths import Paths

TEACH = ROOT / "tests" / "finetune" / "data" / "teach.jsonl"
DONE = FinetuneJob(
    name="teach",
    state="done",
    method="lora",
    data="/data/teach.jsonl",
    step=30,
    steps=30,
    loss=0.3,
    heldout_loss=0.52,
    tokens_per_s=812.0,
    losses=[(step, 3.0 - 0.09 * step) for step in range(1, 31)],
    heldout=[(10, 2.1), (20, 1.0), (30, 0.52)],
    speeds=[(step, 780.0 + step % 5 * 10) for step in range(1, 31)],
    adapter="teach",
)


class FinetuneDaemon(FakeDaemon):
    """The scripted daemon, with a fine-tuning job and adapters."""

    def __init__(self, job: FinetuneJob | None = None) -> None:
        super().__init__()
        self.job = job or FinetuneJob()
        self.requests: list[dict[str, Any]] = []
        self.stops = 0
        self.refusal: str | None = None
        self.rows = [
            AdapterRow(name="old", method="ptune", steps=50, heldout_loss=1.2),
            AdapterRow(name="broken", is_broken=True, reason="adapter.json is damaged"),
        ]

    def finetune_start(self, params: dict[str, Any]) -> FinetuneJob:
        if self.refusal is not None:
            raise ControlError(self.refusal)
        self.requests.append(params)
        self.job = FinetuneJob(name=params["name"], state="running", method=params["method"],
                               steps=params["steps"], data=params["data"])  # fmt: skip
        return self.job

    def finetune_status(self) -> FinetuneJob:
        return self.job

    def finetune_stop(self) -> FinetuneJob:
        self.stops += 1
        self.job = self.job.model_copy(update={"state": "stopping"})
        return self.job

    def adapters(self) -> AdaptersReply:
        rows = list(self.rows)
        if self.job.adapter:  # the daemon lists what its job saved
            rows.append(AdapterRow(name=self.job.adapter, method=self.job.method))
        return AdaptersReply(adapters=rows)


def text_of(app: VolunteerApp, selector: str) -> str:
    return str(app.query_one(selector, Static).render())


async def show_the_tab(app: VolunteerApp, pilot: Any) -> None:
    app.refresh_status()  # finds the daemon, which fetches its job and adapters
    await settle(app, pilot)
    await pilot.press("6")
    await settle(app, pilot)


async def pilot_click_again(pilot: Any, selector: str) -> None:
    """Clicks a button once it takes clicks again: a button ignores those of the 0.2 s
    it shows that it was pressed (faster than people click, not than a pilot does)."""
    buttons = list(pilot.app.query(Button))
    await until(pilot, lambda: not any(b.has_class("-active") for b in buttons), "", WAIT_S)
    await pilot.click(selector)


def test_6_and_f6_show_the_finetune_tab_ready_for_a_data_file() -> None:
    async def scenario(app: VolunteerApp, pilot: Any) -> None:
        await show_the_tab(app, pilot)
        assert app.query_one(TabbedContent).active == "finetune"
        assert app.query_one("#ft-data", Input).has_focus
        assert "no fine-tuning job yet" in text_of(app, "#ft-status")
        await pilot.press("f2", "f6")  # even from the chat's prompt
        assert app.query_one(TabbedContent).active == "finetune"

    run(scenario, FinetuneDaemon())


def test_start_sends_the_form_and_stop_asks_the_job_to_stop() -> None:
    daemon = FinetuneDaemon()

    async def scenario(app: VolunteerApp, pilot: Any) -> None:
        await show_the_tab(app, pilot)
        app.query_one("#ft-data", Input).value = "teach.jsonl"
        app.query_one("#ft-method", Select).value = "ptune"
        app.query_one("#ft-steps", Input).value = "30"
        await pilot.click("#ft-start")
        await settle(app, pilot)
        assert daemon.requests == [
            {"data": str(Path.cwd() / "teach.jsonl"), "name": "teach", "method": "ptune",
             "steps": 30, "batch_size": 8}
        ]  # fmt: skip
        assert "● running  teach (ptune)  step 0 of 30" in text_of(app, "#ft-status")
        assert app.query_one("#ft-start", Button).disabled
        await pilot_click_again(pilot, "#ft-stop")
        await settle(app, pilot)
        assert daemon.stops == 1 and "● stopping" in text_of(app, "#ft-status")
        assert app.query_one("#ft-stop", Button).disabled

    run(scenario, daemon)


def test_a_refused_start_is_shown_and_a_start_needs_a_file() -> None:
    daemon = FinetuneDaemon()
    daemon.refusal = "finetune_start: a fine-tuning job (other, step 3 of 100) is running"

    async def scenario(app: VolunteerApp, pilot: Any) -> None:
        await show_the_tab(app, pilot)
        await pilot.click("#ft-start")
        assert "pick a data file first" in text_of(app, "#ft-note")
        app.query_one("#ft-data", Input).value = "/data/x.jsonl"
        await pilot_click_again(pilot, "#ft-start")
        await settle(app, pilot)
        note = app.query_one("#ft-note", Static)
        assert "job (other, step 3 of 100) is running" in str(note.render())
        assert note.has_class("error")

    run(scenario, daemon)


def test_the_charts_follow_the_job_and_c_opens_the_chat_with_its_adapter() -> None:
    daemon = FinetuneDaemon(DONE)

    async def scenario(app: VolunteerApp, pilot: Any) -> None:
        await show_the_tab(app, pilot)
        assert list(app.query_one("#ft-losses", Sparkline).data or []) == [
            value for _, value in DONE.losses
        ]
        assert list(app.query_one("#ft-heldout", Sparkline).data or []) == [2.1, 1.0, 0.52]
        losses = text_of(app, "#ft-losses-label")
        assert losses == "training loss: now 0.3000, first 2.9100, best 0.3000"
        assert text_of(app, "#ft-speeds-label") == "tokens/s: now 780, first 790, peak 820"
        status = text_of(app, "#ft-status")
        assert "● done  teach (lora)  step 30 of 30  loss 0.3000  held-out 0.5200" in status
        assert "saved adapter teach: press c to chat with it" in status
        assert app.query_one("#ft-chat", Button).has_focus
        await pilot.press("c")
        await settle(app, pilot)
        assert app.query_one(TabbedContent).active == "chat"
        select = app.query_one("#adapter", Select)
        assert select.value == "teach"
        assert {v for _, v in select._options if isinstance(v, str)} == {"old", "teach"}
        prompt = app.query_one("#prompt", Input)
        prompt.value = "What is the password?"
        await pilot.press("enter")
        await settle(app, pilot)
        assert daemon.chat_requests[-1]["adapter"] == "teach"
        select.clear()
        prompt.value = "And now?"
        await pilot.press("enter")
        await settle(app, pilot)
        assert "adapter" not in daemon.chat_requests[-1]

    run(scenario, daemon)


def test_a_failed_job_says_why() -> None:
    error = "/data/teach.jsonl:3: not valid JSON: Expecting value at column 1"
    failed = FinetuneJob(name="teach", state="failed", method="lora", steps=30, error=error)

    async def scenario(app: VolunteerApp, pilot: Any) -> None:
        await show_the_tab(app, pilot)
        status = app.query_one("#ft-status", Static)
        assert "● failed" in str(status.render()) and error in str(status.render())
        assert status.has_class("error")
        assert not app.query_one("#ft-start", Button).disabled

    run(scenario, FinetuneDaemon(failed))


def test_the_finetune_tab_snapshot(snap_compare: Any) -> None:
    async def load(pilot: Pilot[Any]) -> None:
        app = pilot.app
        assert isinstance(app, VolunteerApp)
        await show_the_tab(app, pilot)
        app.set_focus(None)  # no blinking cursor in the picture
        await pilot.pause()

    app = VolunteerApp(FinetuneDaemon(DONE), gauges=lambda: FIXED_GAUGES, poll=False)
    assert snap_compare(app, terminal_size=(110, 40), run_before=load)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, smollm2_folder: Path) -> Iterator[Paths]:
    with one_daemon(tmp_path_factory.mktemp("tui-finetune"), smollm2_folder) as (homes, home):
        yield Paths.resolve(home=home, env=homes.env)


@pytest.mark.slow
@pytest.mark.skipif(use_tcp(), reason="daemon tests use the Unix-socket path")
def test_a_short_run_from_the_tab_then_a_chat_with_its_adapter(daemon: Paths) -> None:
    async def main() -> None:
        app = VolunteerApp(ControlDaemonClient(daemon))
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: app.daemon_seen, "the daemon", 60)
            await pilot.press("6")
            app.query_one("#ft-data", Input).value = str(TEACH)
            app.query_one("#ft-method", Select).value = "ptune"
            app.query_one("#ft-steps", Input).value = "2"
            app.query_one("#ft-batch", Input).value = "2"
            await pilot.click("#ft-start")

            def status() -> str:
                return text_of(app, "#ft-status")

            await until(pilot, lambda: "● done" in status() or "● failed" in status(), "", 120)
            assert "● done" in status(), status()
            assert len(app.query_one("#ft-losses", Sparkline).data or []) == 2
            assert "saved adapter teach" in text_of(app, "#ft-status")
            await pilot.press("c")
            assert app.query_one("#adapter", Select).value == "teach"
            app.query_one("#max-tokens", Input).value = "3"
            app.query_one("#prompt", Input).value = "What is the password?"
            await pilot.press("enter")
            view = app.query_one(ChatView)
            await until(pilot, lambda: len(view.messages) == 2, "the answer", 120)
            stats = [str(w.render()) for w in app.query("#messages .stats")]
            assert stats and stats[-1].startswith("done"), stats

    asyncio.run(main())
