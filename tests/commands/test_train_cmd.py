"""`volunteer train` without a daemon, and its status text (`volunteer.control.
training_view`, which the TUI shows too)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from volunteer.control.messages import TrainCreateRequest, TrainingStatus
from volunteer.control.training_view import sparkline, training_lines

ROOT = Path(__file__).resolve().parents[2]


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "volunteer", "--home", str(home), "train", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_without_a_daemon_each_action_says_how_to_start_one(tmp_path: Path) -> None:
    actions = [["status"], ["join"], ["leave"], ["create", "data.npy", "--lora-rank", "4"]]
    actions += [["standby", "data.npy"], ["create", "data.npy", "--backup", "QmPeer"]]
    for args in actions:
        done = _cli(tmp_path, *args)
        assert done.returncode == 1
        assert "no daemon is running here: start one with `volunteer start`" in done.stderr


def test_a_bad_flag_is_refused_before_the_daemon_is_asked(tmp_path: Path) -> None:
    done = _cli(tmp_path, "create", "data.npy", "--stages", "0")
    assert done.returncode == 1 and "stages" in done.stderr


def test_the_status_text_names_the_role_steps_peers_loss_and_bans() -> None:
    assert training_lines(TrainingStatus())[0].startswith("not training")
    status = TrainingStatus(
        training_role="driver", training_state="running", training_job="0123456789abcdef",
        training_creator="QmMe", training_step=3, training_steps=10,
        training_stage_peers=[2, 3], training_losses=[(0, 4.0), (1, 3.0), (2, 2.0)],
        training_loss=2.0, training_banned=["QmBad\x1b[31m"], training_samples_per_s=1.5,
    )  # fmt: skip
    text = "\n".join(training_lines(status))
    for shown in ("driver (running)", "3 of 10", "stage 0: 2, stage 1: 3", "loss      2.0000",
                  "1.50 sequences/s", "banned    QmBad[31m"):  # fmt: skip
        assert shown in text, text
    assert "\x1b" not in text  # a peer's id cannot colour the terminal
    assert sparkline([(0, 3.0), (1, 2.0), (2, 1.0)]) == "█▅▁"
    assert TrainCreateRequest(data="/d", lora_rank=4).lora_rank == 4
