"""Chat: conversations, where they run (here, via the daemon, via the swarm), saved chats.

May import: models, client, control, model_cache, machine, and the daemon's services.
"""
