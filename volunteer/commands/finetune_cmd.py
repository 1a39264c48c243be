"""`volunteer finetune`: train a soft prompt or LoRA adapter on a JSONL file.

By default the local daemon runs the job (`volunteer start`), so closing the terminal does
not stop it; `--local` trains with the whole model in this process, `--swarm` through a
swarm joined from here. Ctrl-C stops at the next step boundary and saves a checkpoint that
the same command resumes; the result is a named adapter (`volunteer adapters`).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from volunteer.errors import SettingsError
from volunteer.model_cache.smollm2 import DEFAULT_MODEL
from volunteer.paths import Paths

BAR_WIDTH = 24


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="train a soft prompt or LoRA adapter through the swarm",
        description="Train an adapter of the swarm's model on DATA (JSONL: one "
        '{"messages": [...]} chat, the loss on the assistant turns only, or one '
        '{"text": ...} per line). The servers run forward and backward through their '
        "frozen blocks; every trainable tensor stays here. Ctrl-C saves a checkpoint "
        "that the same command resumes.",
    )
    parser.add_argument("data", type=Path, help="the JSONL file to learn from")
    parser.add_argument(
        "--method",
        choices=("ptune", "deep_ptune", "lora"),
        default="lora",
        help="ptune: a soft prompt; deep_ptune: a prompt per block; lora: low-rank "
        "adapters on every block's projections (default)",
    )
    parser.add_argument("--steps", type=int, default=100, metavar="N")
    parser.add_argument(
        "--lr", type=float, metavar="LR", help="default: 3e-2 ptune, 1e-2 deep_ptune, 1e-3 lora"
    )
    parser.add_argument("--batch-size", type=int, default=8, metavar="B")
    parser.add_argument("--rank", type=int, default=8, metavar="R", help="LoRA rank (8)")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (16)")
    parser.add_argument(
        "--prompt-len", type=int, default=16, metavar="P", help="soft-prompt positions (16)"
    )
    parser.add_argument("--name", help="the adapter's name (default: the data file's name)")
    parser.add_argument("--heldout-every", type=int, default=10, metavar="N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help=f"model name (default: the daemon's; {DEFAULT_MODEL})")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run the whole model in this process")
    where.add_argument(
        "--swarm",
        action="append",
        metavar="MULTIADDR",
        help="train through the swarm this peer belongs to, without a daemon (repeatable)",
    )
    parser.set_defaults(handler=run)


def settings_of(args: argparse.Namespace) -> Any:
    """The run's `TrainSettings` from the flags (a `SettingsError` names a bad one)."""
    from volunteer.finetune.adapter_info import valid_name
    from volunteer.finetune.params import MethodSettings
    from volunteer.finetune.trainer import TrainSettings

    method = MethodSettings(
        args.method, prompt_len=args.prompt_len, rank=args.rank, alpha=args.alpha
    )
    name = args.name or args.data.stem
    return TrainSettings(
        data=args.data,
        name=valid_name(name),
        method=method,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        heldout_every=args.heldout_every,
        seed=args.seed,
    )


def run(args: argparse.Namespace, paths: Paths) -> int:
    if args.swarm:
        from volunteer.machine.cpu_sharing import sleep_idle_threads

        sleep_idle_threads()  # the blocks run on other processes, likely on these cores
    settings = settings_of(args)
    if not args.local and not args.swarm:
        from volunteer.commands.finetune_daemon import run_via_daemon

        return run_via_daemon(settings, args, paths)
    from volunteer.finetune.store import AdapterStore
    from volunteer.finetune.trainer import Stopped, Trainer

    stop = threading.Event()
    bar = ProgressBar(sys.stderr)
    with _model_blocks(args, paths) as (model, blocks), stop_on_ctrl_c(stop):
        trainer = Trainer(
            settings,
            ends=model.ends,
            tokenizer=model.tokenizer,
            config=model.config,
            model=model.name,
            blocks=blocks,
            store=AdapterStore.of(paths),
            on_progress=bar.show,
            should_stop=stop.is_set,
        )
        try:
            info = trainer.run()
        except Stopped as exc:
            bar.end()
            print(f"volunteer: {exc}", file=sys.stderr)
            return 130
    bar.end()
    heldout = "-" if info.heldout_loss is None else f"{info.heldout_loss:.4f}"
    print(
        f"saved adapter {info.name} ({info.method}, {info.steps} steps, "
        f"loss {info.train_loss:.4f}, held-out {heldout}); "
        f"try: volunteer chat --adapter {info.name}"
    )
    return 0


class ProgressBar:
    """One line, redrawn: step, bar, loss, held-out loss, tokens/s and time left."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.began = time.monotonic()
        self.first_step: int | None = None

    def show(self, progress: Any) -> None:
        if progress.loss is None:  # the base model's held-out loss, before any step
            self.out.write(f"\rheld-out loss before training: {progress.heldout[-1][1]:.4f}\n")
            return
        if self.first_step is None:
            self.first_step = progress.step - 1
        done = progress.step / max(progress.steps, 1)
        filled = int(done * BAR_WIDTH)
        elapsed = time.monotonic() - self.began
        steps_here = progress.step - self.first_step
        left = elapsed / max(steps_here, 1) * (progress.steps - progress.step)
        heldout = "" if progress.heldout_loss is None else f" held-out {progress.heldout_loss:.4f}"
        line = (
            f"\r{progress.step}/{progress.steps} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
            f"loss {progress.loss:.4f}{heldout} {progress.tokens_per_s:.0f} tok/s "
            f"{left:.0f}s left"
        )
        self.out.write(line.ljust(100))
        self.out.flush()

    def end(self) -> None:
        if self.first_step is not None:
            self.out.write("\n")
            self.out.flush()
            self.first_step = None


@contextlib.contextmanager
def stop_on_ctrl_c(stop: threading.Event) -> Iterator[None]:
    """The first Ctrl-C asks the run to stop at the next step (and save); a second one
    interrupts at once."""

    def first(signum: int, frame: object) -> None:
        stop.set()
        print("\nvolunteer: stopping after this step (Ctrl-C again to quit now)", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _model_blocks(args: argparse.Namespace, paths: Paths) -> Iterator[tuple[Any, Any]]:
    from volunteer.commands.finetune_model import open_here

    if args.local:
        with open_here(args.model or DEFAULT_MODEL, paths, swarm=None) as found:
            yield found
        return
    if not args.swarm:
        raise SettingsError("give --local or --swarm, or start the daemon")
    with open_here(args.model or DEFAULT_MODEL, paths, swarm=args.swarm) as found:
        yield found
