"""Serving blocks on hivemind P2P: handler, inference stream, validation, sessions, compute, push.

May import: models, transport, machine; never the client or the daemon.
"""
