"""The training role's status as text: `volunteer train status` prints it, the TUI's
dashboard shows it (neither imports torch)."""

from __future__ import annotations

from volunteer.control.status_messages import TrainingStatus

CURVE_POINTS = 24
MAX_SHOWN_CHARS = 300


def _plain(text: str) -> str:
    """Text from a peer (an error, a peer id) with control characters dropped."""
    return "".join(ch for ch in text if ch.isprintable())[:MAX_SHOWN_CHARS]


def training_lines(status: TrainingStatus) -> list[str]:
    """`volunteer train status` in lines; the TUI's dashboard shows the same."""
    if status.training_role is None:
        return ["not training: `volunteer train create DATA` or `volunteer train join`"]
    lines = [
        f"role      {status.training_role} ({status.training_state})",
        f"job       {status.training_job} by {status.training_creator}",
        f"steps     {status.training_step} of {status.training_steps}",
    ]
    if status.training_stage is not None and status.training_blocks is not None:
        start, end = status.training_blocks
        lines.append(f"stage     {status.training_stage} (blocks {start}:{end})")
    if status.training_stage_peers:
        lines.append("peers     " + ", ".join(
            f"stage {i}: {n}" for i, n in enumerate(status.training_stage_peers)
        ))  # fmt: skip
    if status.training_loss is not None:
        lines.append(f"loss      {status.training_loss:.4f}  {sparkline(status.training_losses)}")
    if status.training_samples_per_s is not None:
        lines.append(f"speed     {status.training_samples_per_s:.2f} sequences/s")
    if status.training_banned:
        lines.append("banned    " + ", ".join(_plain(peer) for peer in status.training_banned))
    if status.training_result:
        lines.append(f"result    {_plain(status.training_result)}")
    if status.training_error:
        lines.append(f"error     {_plain(status.training_error)}")
    return lines


def sparkline(points: list[tuple[int, float]]) -> str:
    """The latest losses as a line of block characters, low to high."""
    values = [value for _, value in points[-CURVE_POINTS:]]
    if not values:
        return ""
    low, high = min(values), max(values)
    bars = "▁▂▃▄▅▆▇█"
    span = (high - low) or 1.0
    return "".join(bars[min(7, int((v - low) / span * 8))] for v in values)
