"""Serving a span of blocks over hivemind P2P."""
