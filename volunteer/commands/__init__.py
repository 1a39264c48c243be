"""CLI subcommands, each a module with `register(subparsers)`; they may import any layer.

A registered parser sets `handler=callable(args, paths) -> int` through set_defaults.
"""
