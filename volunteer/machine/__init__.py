"""This machine: hardware, benchmarks, CPU and memory tuning, atomic file writes.

May import: models (for the benchmarks); nothing of the swarm.
"""
