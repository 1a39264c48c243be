"""How torch's CPU threads behave when a process shares the machine's cores.

A swarm process (a daemon, or a client whose blocks run elsewhere) computes in short
bursts and then waits on the network while another process on the same cores computes:
the next server in the route, p2pd, the client's LM head. libgomp's default keeps idle
OpenMP workers spinning after each burst (300,000 spins), taking the core from whoever
computes next; the fewer the cores, the more of the swarm's speed that costs.
Letting idle workers sleep also keeps an idle server at no CPU. A lone process running
the whole model (`chat --local`) keeps the default: there, spinning saves wake-ups.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

Result = TypeVar("Result")

SPIN_COUNT = "10000"
"""libgomp's spins before sleeping, a thirtieth of its default: long enough to keep the
workers hot between the back-to-back ops of one step, short enough to free the core after
it."""


def sleeping_threads_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to `environ` so that idle OpenMP workers sleep; none when
    the user chose a wait policy."""
    if "OMP_WAIT_POLICY" in environ:
        return {}
    added = {"OMP_WAIT_POLICY": "PASSIVE"}
    if "GOMP_SPINCOUNT" not in environ:
        added["GOMP_SPINCOUNT"] = SPIN_COUNT
    return added


def sleep_idle_threads() -> bool:
    """Makes idle OpenMP workers of this process sleep (see `sleeping_threads_env`).

    libgomp reads the policy once, when torch loads it; returns False (and changes
    nothing) when torch is already imported, as in a test that runs the daemon in-process.
    """
    if "torch" in sys.modules:
        return False
    os.environ.update(sleeping_threads_env(os.environ))
    return True


async def in_passing_thread(fn: Callable[..., Result], *args: Any, **kwargs: Any) -> Result:
    """fn(*args, **kwargs) on a thread started for it, waited for until it has ended.

    For torch work off the compute thread (loading weights, benchmarks, a chat's model
    ends). libgomp keeps idle workers spinning between parallel regions only while it
    manages no more threads than the machine has cores, and every thread that ran a
    parallel torch op keeps its team of workers until the thread ends. Such work left on
    a thread that lives on (asyncio.to_thread's pool) raises the count of threads libgomp
    manages past the cores, after which every later prefill on the compute thread wakes
    sleeping workers op after op, and is slower for it.
    """
    call = functools.partial(fn, *args, **kwargs)
    return await _on_thread(call, name=fn.__name__, join=True)


async def on_thread_of_its_own(fn: Callable[..., Result], *args: Any) -> Result:
    """fn(*args) on a thread started for it, as `in_passing_thread`, but not waited for
    once its waiter is cancelled: for long work (a fine-tuning job) whose stop should not
    wait out a swarm call's whole timeout; the thread ends on its own."""
    return await _on_thread(functools.partial(fn, *args), name=fn.__name__, join=False)


async def _on_thread(call: Callable[[], Result], *, name: str, join: bool) -> Result:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Result] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not done.done():  # the waiter may have been cancelled
            outcome()

    def run() -> None:
        try:
            result = call()
        except BaseException as exc:  # handed to the waiting coroutine, which raises it
            error = exc
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                loop.call_soon_threadsafe(settle, lambda: done.set_exception(error))
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, lambda: done.set_result(result))

    thread = threading.Thread(target=run, name=f"volunteer-{name}", daemon=True)
    thread.start()
    try:
        return await done
    finally:
        if join:
            # Its OpenMP team goes when the thread does: wait for that (joining runs no torch).
            await asyncio.to_thread(thread.join)
