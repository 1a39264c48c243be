"""The background daemon: lifecycle, control API, identity."""
