"""CLI subcommands; each module exposes `register(subparsers)` adding its parser.

A registered parser sets `handler=callable(args, paths) -> int` through set_defaults.
"""
