"""The background daemon: its wiring, services, identity and span planning.

May import: every package but the TUI and the CLI's commands.
"""
