"""Our own Llama-family model runtime: config, blocks, loading, tokenizer, sampling.

This layer uses torch only: it knows nothing of the swarm, the network or the TUI.
"""
