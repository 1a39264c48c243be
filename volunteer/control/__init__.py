"""The daemon's control API: local socket, messages, client, starting and stopping it.

May import: the core modules and atomic writes; no torch or hivemind (the TUI uses it).
"""
