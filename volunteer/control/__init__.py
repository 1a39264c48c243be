"""The daemon's control API: endpoint, typed messages, server, client, starting and stopping.

May import: the core modules and atomic writes; no torch or hivemind (the TUI uses it).
"""
