"""Fine-tuning through the swarm: the client holds every trainable parameter (soft
prompts, LoRA adapters) and their optimizer; servers run forward and backward through
their frozen blocks. Data loading, the training loop and the named-adapter store.

May import: models, client, scheduler, transport, swarm, trust, machine, chat; never the
server or the daemon.
"""
