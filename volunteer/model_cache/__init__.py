"""The model cache: names, fetching, file checks, and the model a daemon serves.

May import: models, machine, and the swarm's name rules (swarm).
"""
