"""Tests of the swarm client against real block servers on loopback."""
