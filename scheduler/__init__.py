"""Pure decisions: plain data in, a decision out (no torch, no network, no clock)."""
