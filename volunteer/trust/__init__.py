"""Trust in other peers' work (issue 15): when two computations of the same blocks agree
(`tolerance`), what a peer's record of checks is (`reputation`). Imports core, `models`,
`scheduler`, `transport` and `swarm`; never the client, server or daemon (they use it).
"""
