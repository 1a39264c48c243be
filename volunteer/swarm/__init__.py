"""The swarm's DHT records: typed, signed, validated; announcing and reading them.

May import: scheduler, transport (its limits), machine.
"""
