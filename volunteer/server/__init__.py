"""Serving a span of blocks over hivemind P2P: handler, sessions, compute, pushes.

May import: models, transport, machine; never the client or the daemon.
"""
