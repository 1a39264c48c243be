"""Training roles: collaborative training of a model split into SWARM stages, with the
gradients of a stage's peers aggregated so that Byzantine peers cannot steer them.

May import: models, scheduler, transport, swarm, trust, machine; never the daemon.
"""
