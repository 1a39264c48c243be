"""The dashboard: the daemon's state and contribution, live machine gauges."""

from __future__ import annotations

import collections
import time
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Sparkline, Static
from volunteer.tui.gauges import Gauges
from volunteer.tui.render import blocks_bar, gauge, setting_label

from volunteer.control.messages import StatusReply
from volunteer.control.training_view import training_lines

SPARK_SAMPLES = 180
"""Tokens/s samples kept for the sparkline: three minutes at one poll a second."""
GIB = 2**30
STATE_COLOURS = {
    "serving": "green",
    "rebalancing": "yellow",
    "joining": "yellow",
    "paused": "yellow",
}


class Dashboard(Vertical):
    """Shows the last status and gauges it was given (`show_status`, `show_gauges`)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._rates: collections.deque[float] = collections.deque(maxlen=SPARK_SAMPLES)
        self._last_tokens: tuple[float, int] | None = None
        self.total_blocks: int | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="empty")
        yield Static(id="state")
        yield Static(id="blocks")
        yield Static(id="counters", markup=False)
        yield Static("tokens/s served, last 3 minutes", id="spark-label")
        yield Sparkline([], id="spark")
        yield Static(id="training", markup=False)
        yield Sparkline([], id="training-spark")
        yield Static(id="gauges")

    def show_status(self, status: StatusReply | None, *, now_s: float | None = None) -> None:
        is_running = status is not None and status.state != "not_running"
        self.set_class(not is_running, "-empty")
        empty = self.query_one("#empty", Static)
        if status is None or not is_running:
            empty.update(
                Text.assemble(
                    ("No daemon is running here.", "bold"),
                    "  Press ",
                    ("s", "bold reverse"),
                    " to start one (it serves where the swarm needs it).",
                )
            )
            self._last_tokens = None
            return
        colour = STATE_COLOURS.get(status.state, "red")
        line = Text.assemble((f"● {status.state}", f"bold {colour}"))
        if status.error:
            line.append(f" ({status.error})", style="red")
        line.append(f"   model {status.swarm_model or status.model}")
        line.append(f"   up {_uptime(status.uptime_s)}")
        line.append(f"   peers {status.peers_seen}")
        if status.restart_needed:
            waiting = ", ".join(setting_label(name) for name in status.restart_needed)
            line.append(f"\nsaved settings wait for a restart: {waiting}", style="yellow")
        self.query_one("#state", Static).update(line)
        bar = blocks_bar(status.blocks, self.total_blocks)
        if status.span_reason:
            bar.append(f"\n{status.span_reason}", style="dim")
        self.query_one("#blocks", Static).update(bar)
        api = f"   API {status.api_url} ({status.api_requests:,})" if status.api_url else ""
        self.query_one("#counters", Static).update(
            f"requests {status.requests_served:,}   tokens {status.tokens_served:,}   "
            f"sessions {status.open_sessions}   chats {status.chats_answered}{api}"
        )
        self._sample_rate(status.tokens_served, now_s or time.monotonic())
        self._show_training(status)

    def _show_training(self, status: StatusReply) -> None:
        """The training role (job, stage, steps, peers, bans) and its loss curve."""
        panel = self.query_one("#training", Static)
        spark = self.query_one("#training-spark", Sparkline)
        is_training = status.training_role is not None
        panel.display = is_training
        losses = [loss for _, loss in status.training_losses]
        spark.display = is_training and len(losses) > 1
        if not is_training:
            return
        panel.update("training\n" + "\n".join(training_lines(status)))
        spark.data = losses

    def show_gauges(self, gauges: Gauges) -> None:
        lines = [
            gauge("CPU", gauges.cpu_percent / 100, f"{gauges.cpu_percent:.0f}%"),
            gauge(
                "RAM",
                gauges.ram_used_bytes / gauges.ram_total_bytes,
                f"{gauges.ram_used_bytes / GIB:.1f} of {gauges.ram_total_bytes / GIB:.1f} GiB",
            ),
        ]
        if gauges.disk_total_bytes:
            used = gauges.disk_total_bytes - (gauges.disk_free_bytes or 0)
            lines.append(
                gauge(
                    "disk",
                    used / gauges.disk_total_bytes,
                    f"{(gauges.disk_free_bytes or 0) / GIB:.0f} GiB free",
                )
            )
        for gpu in gauges.gpus:
            total, free = gpu.memory_total_bytes, gpu.memory_free_bytes
            fraction = (total - free) / total if total and free is not None else None
            readings = (
                (gpu.utilization_percent, "{:.0f}% busy"),
                (gpu.temperature_c, "{:.0f} °C"),
                (gpu.power_w, "{:.0f} W"),
            )
            extra = ", ".join(form.format(v) for v, form in readings if v is not None)
            lines.append(gauge(f"GPU{gpu.index}", fraction, f"{gpu.name or '?'} {extra}".strip()))
        if not gauges.gpus:
            lines.append(Text(f"GPU  {gauges.gpu_note}", style="dim"))
        self.query_one("#gauges", Static).update(Text("\n").join(lines))

    def _sample_rate(self, tokens: int, now_s: float) -> None:
        if self._last_tokens is not None:
            then_s, before = self._last_tokens
            if now_s > then_s:
                self._rates.append(max(tokens - before, 0) / (now_s - then_s))
        self._last_tokens = (now_s, tokens)
        spark = self.query_one("#spark", Sparkline)
        # A flat line of zeros would draw as a full bar (the scale has no height).
        is_idle = not self._rates or max(self._rates) == 0
        spark.data = [] if is_idle else list(self._rates)
        spark.display = not is_idle
        latest = self._rates[-1] if self._rates else 0.0
        self.query_one("#spark-label", Static).update(
            "tokens/s served: none in the last 3 minutes"
            if is_idle
            else f"tokens/s served, last 3 minutes (now {latest:.1f}, peak {max(self._rates):.1f})"
        )


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
