"""The swarm client: routes, remote spans, fault-tolerant inference sessions."""
