"""The OpenAI-compatible HTTP endpoint of the daemon (`volunteer start --api`).

- `schema`: the requests it accepts, checked and bounded, and the answers' JSON.
- `errors`: OpenAI-shaped errors with their HTTP statuses.
- `app`: the aiohttp application: auth, the concurrency gate, the routes.
- `service`: the daemon service that runs it.

Requests run through the daemon's `ChatService`, as `volunteer chat` does. Imports the
core, `volunteer.chat`, `volunteer.control`, `volunteer.client`, `volunteer.models`,
`volunteer.model_cache` and `volunteer.daemon`.
"""
