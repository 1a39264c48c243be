"""`volunteer adapters list | show NAME | delete NAME`: the fine-tuned adapters kept here.

No daemon is needed: these read and change the adapter store in the data dir.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from volunteer.commands.models_cmd import format_size
from volunteer.paths import Paths
from volunteer.transport.protocol import printable

if TYPE_CHECKING:  # the store (torch, safetensors) loads when an adapters command runs
    from volunteer.finetune.adapter_info import AdapterInfo
    from volunteer.finetune.store import AdapterStore

HEADER = ("NAME", "METHOD", "MODEL", "STEPS", "TRAIN", "HELD-OUT", "SIZE", "CREATED")


def register(subparsers: Any) -> None:
    """Adds the `adapters` command and its subcommands to the CLI."""
    parser = subparsers.add_parser(
        "adapters",
        help="list, show and delete fine-tuned adapters",
        description="Adapters are the trained tensors of a fine-tuning run (soft prompts or "
        "LoRA), kept by name in the data dir.",
    )
    actions = parser.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)

    list_parser = actions.add_parser("list", help="one line per adapter, damaged ones marked")
    list_parser.add_argument("--json", action="store_true", help="print them as JSON")
    list_parser.set_defaults(handler=run_list)

    show = actions.add_parser("show", help="an adapter's settings, losses and tensors")
    show.add_argument("name", metavar="NAME", help="the adapter's name")
    show.add_argument("--json", action="store_true", help="print it as JSON")
    show.set_defaults(handler=run_show)

    delete = actions.add_parser(
        "delete", help="remove an adapter (and its training checkpoint, if any)"
    )
    delete.add_argument("name", metavar="NAME", help="the adapter's name")
    delete.set_defaults(handler=run_delete)


def run_list(args: argparse.Namespace, paths: Paths) -> int:
    """Prints every adapter, a damaged one with what is wrong with it."""
    from volunteer.finetune.store import AdapterStore, BrokenAdapter

    store = AdapterStore.of(paths)
    rows = store.list()
    good = [row for row in rows if not isinstance(row, BrokenAdapter)]
    broken = [row for row in rows if isinstance(row, BrokenAdapter)]
    if args.json:
        adapters = [_info_json(store, info) for info in good]
        damaged = [{"name": b.name, "path": str(b.path), "reason": b.reason} for b in broken]
        print(json.dumps({"root": str(store.root), "adapters": adapters, "broken": damaged}))
        return 0
    if not rows:
        print(f"no adapters yet in {store.root}")
        return 0
    table = [HEADER, *(_row(store, info) for info in good)]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    for row in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    for row in broken:
        print(f"{printable(row.name)}  DAMAGED: {printable(row.reason, max_chars=300)}")
    print(f"adapters: {store.root}")
    return 0


def run_show(args: argparse.Namespace, paths: Paths) -> int:
    """Prints one adapter's settings, losses, tensor shapes and size; damaged: exit 1."""
    from volunteer.finetune.store import AdapterStore

    store = AdapterStore.of(paths)
    info, tensors = store.load(args.name)
    shapes = {key: list(tensor.shape) for key, tensor in tensors.items()}
    dtypes = {key: str(tensor.dtype).removeprefix("torch.") for key, tensor in tensors.items()}
    if args.json:
        described = {k: {"shape": shapes[k], "dtype": dtypes[k]} for k in sorted(tensors)}
        print(json.dumps({**_info_json(store, info), "tensors": described}))
        return 0
    for label, value in _settings(store, info):
        print(f"{label + ':':<10} {value}")
    print("tensors:")
    width, shape_width = max(map(len, tensors)), max(len(str(s)) for s in shapes.values())
    for key in sorted(tensors):
        print(f"  {key:<{width}}  {shapes[key]!s:<{shape_width}}  {dtypes[key]}")
    return 0


def run_delete(args: argparse.Namespace, paths: Paths) -> int:
    """Removes an adapter and its training checkpoint; neither there: exit 1."""
    from volunteer.finetune.adapter_info import AdapterError, valid_name
    from volunteer.finetune.store import AdapterStore

    store = AdapterStore.of(paths)
    folder = store.root / valid_name(args.name)
    size = _folder_bytes(folder)
    has_checkpoint = store.checkpoint_delete(args.name)
    try:
        store.delete(args.name)
    except AdapterError:
        if not has_checkpoint:
            raise
    else:
        print(f"removed adapter {args.name} ({format_size(size)}, {folder})")
    if has_checkpoint:
        print(f"removed the training checkpoint of {args.name}")
    return 0


def _settings(store: AdapterStore, info: AdapterInfo) -> list[tuple[str, str]]:
    if info.method == "lora":
        how = f"lora (rank {info.rank}, alpha {info.alpha:g}, targets {', '.join(info.targets)})"
    else:
        how = f"{info.method} ({info.prompt_len} prompt tokens)"
    losses = f"train {_loss(info.train_loss)}, held-out {_loss(info.heldout_loss)}"
    folder = store.root / info.name
    return [
        ("name", info.name),
        ("method", how),
        ("model", f"{info.model} ({info.num_layers} layers, hidden {info.hidden_size})"),
        ("trained", f"{info.steps} steps on {info.data or '-'}"),
        ("losses", losses),
        ("created", info.created),
        ("size", f"{format_size(_folder_bytes(folder))} in {folder}"),
    ]


def _row(store: AdapterStore, info: AdapterInfo) -> tuple[str, ...]:
    size = format_size(_folder_bytes(store.root / info.name))
    return (info.name, info.method, info.model, str(info.steps), _loss(info.train_loss),
            _loss(info.heldout_loss), size, info.created)  # fmt: skip


def _info_json(store: AdapterStore, info: AdapterInfo) -> dict[str, Any]:
    folder = store.root / info.name
    return {**info.to_json(), "path": str(folder), "size_bytes": _folder_bytes(folder)}


def _loss(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.4f}"


def _folder_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
