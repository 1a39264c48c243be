"""The swarm client: routes, remote spans, fault-tolerant inference sessions.

May import: models, scheduler, transport, swarm, machine; never the server or the daemon.
"""
