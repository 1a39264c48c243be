"""Pure decisions: plain data in, a decision out (no torch, no network, no clock).

May import: the standard library, numpy and scipy; nothing else of ours.

Acted on today:
    - `capacity`: how many blocks fit (the daemon's span plan, `volunteer.daemon.span_plan`);
    - `block_selection`: where a joining server sits (through `volunteer.swarm.records`);
    - `rebalancing.should_move`, `next_check_delay_s`: when a serving daemon moves;
    - `routing`: the client's inference and forward/backward routes, and its backoff;
    - `claims`: the speed routing counts for a server, measured or claimed (probation);
    - `verification`: how often a server's work is checked, and how long a ban lasts;
    - `owner_rules`: when the machine's owner wants it back (battery, schedule, user
      activity, other programs' CPU), applied by `volunteer.daemon.rule_watch`.

Reported, not yet acted on:
    - `offload`, `offload_cost`: the FlexGen offloading policy; `volunteer profile` shows
      it, the daemon keeps its blocks in memory until compressed and offloaded serving lands;
    - `role`: serve or train; `volunteer profile` shows it, the daemon always serves.

For later issues:
    - `training`: the stage a training peer joins (fine-tuning and training roles);
    - `simulate`: the swarm at internet scale, for the tests and `bench/scheduler_decisions.py`.
"""
