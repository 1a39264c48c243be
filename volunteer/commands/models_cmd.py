"""`volunteer models list | pull NAME | verify NAME`: the shared model cache."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from volunteer.paths import Paths

if TYPE_CHECKING:  # the store (tqdm, hashing) loads when a models command runs
    from volunteer.model_cache.store import CachedModel

_NAME_HELP = (
    "a registered name (see `volunteer models list`), a Hugging Face repo id (org/name), "
    "a Hugging Face-format folder or a .gguf file"
)


def register(subparsers: Any) -> None:
    """Adds the `models` command and its subcommands to the CLI."""
    parser = subparsers.add_parser("models", help="list, pull and verify cached models")
    actions = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    list_parser = actions.add_parser("list", help="show cached and registered models")
    list_parser.set_defaults(handler=run_list)

    pull = actions.add_parser("pull", help="download or import a model into the cache")
    pull.add_argument("name", metavar="NAME", help=_NAME_HELP)
    pull.add_argument(
        "--force", action="store_true", help="fetch again and replace the cached copy"
    )
    pull.add_argument("--quiet", action="store_true", help="draw no progress bars")
    pull.set_defaults(handler=run_pull)

    verify = actions.add_parser("verify", help="re-hash a cached model's files")
    verify.add_argument("name", metavar="NAME", help=_NAME_HELP)
    verify.add_argument("--quiet", action="store_true", help="draw no progress bar")
    verify.set_defaults(handler=run_verify)


def run_list(args: argparse.Namespace, paths: Paths) -> int:
    """Prints one row per cached or registered model."""
    from volunteer.model_cache.store import ModelStore

    rows = [_row(model) for model in ModelStore(paths.models_dir).list()]
    header = ("NAME", "STATUS", "SIZE", "SOURCE")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
        print("  ".join([*cells, row[3]]).rstrip())
    print(f"cache: {paths.models_dir}")
    return 0


def run_pull(args: argparse.Namespace, paths: Paths) -> int:
    """Pulls one model and prints where it is."""
    from volunteer.model_cache.store import ModelStore

    folder = ModelStore(paths.models_dir).pull(args.name, progress=not args.quiet, force=args.force)
    print(f"{args.name}: ready at {folder}")
    return 0


def run_verify(args: argparse.Namespace, paths: Paths) -> int:
    """Verifies one model; a damaged one raises, which the CLI reports with exit 1."""
    from volunteer.model_cache.store import ModelStore

    report = ModelStore(paths.models_dir).verify(args.name, progress=not args.quiet)
    if report.is_hashed:
        what = f"{report.files_checked} files, {format_size(report.bytes_checked)} match"
        print(f"{report.name}: ok ({what} the manifest)")
    else:
        print(f"{report.name}: ok (config.json and safetensors headers are valid)")
    return 0


def format_size(size_bytes: int) -> str:
    """`1234567` -> `1.2 MB` (decimal units, as download tools show them)."""
    units = ("B", "kB", "MB", "GB", "TB")
    size, exponent = float(size_bytes), 0
    while size >= 1000 and exponent < len(units) - 1:
        size /= 1000
        exponent += 1
    return f"{size_bytes} B" if exponent == 0 else f"{size:.1f} {units[exponent]}"


def _row(model: CachedModel) -> tuple[str, str, str, str]:
    name = f"{model.name} (default)" if model.is_default else model.name
    if not model.is_pulled:
        return name, "not pulled", "-", model.source
    return name, "pulled", format_size(model.size_bytes), model.source
