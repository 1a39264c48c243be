"""The Textual app; talks to the daemon only through volunteer's control client."""
