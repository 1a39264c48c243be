"""The swarm protocol: typed DHT records, announcing and reading them."""
