"""What servers and clients share: protocol messages, framing, local links, p2p streams.

May import: the core modules and hivemind; never the server or the client.
"""
