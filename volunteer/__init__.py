"""volunteer: lend your machine to a swarm that serves and trains language models."""

__version__ = "0.1.0"
