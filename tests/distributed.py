"""Run a function on N gloo processes, fast enough to do it hundreds of times per suite.

``run_on_ranks(fn, world_size, *args, timeout=...)`` calls ``fn(rank, world_size, *args)`` on
every rank of a gloo group on 127.0.0.1 and returns the per-rank results. ``fn`` must be a
module-level function (it is pickled by name into spawned children).

Spawning and initialising a process group costs seconds, so each world size keeps one pool of
worker processes alive for the whole pytest session and feeds it one call at a time. A call that
raises on any rank is re-raised here with the child's traceback; a call that outlives its
timeout (a hang, a dead peer) kills the pool, which is rebuilt on the next call, and fails with
a message naming the timeout. Workers are daemonic and killed at interpreter exit, so no stray
processes survive the run. Workers run with one torch thread each (the machine has 2 cores).
"""

from __future__ import annotations

import atexit
import os
import queue
import socket
import time
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

_CTX = mp.get_context("spawn")
DEFAULT_TIMEOUT = 180.0
GROUP_TIMEOUT = timedelta(seconds=90)  # what every collective of the suite waits at most


class DistributedTestError(AssertionError):
    """A rank raised, or the call timed out; the message carries the child's traceback."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, inbox, outbox) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=GROUP_TIMEOUT,
    )
    while True:
        task = inbox.get()
        if task is None:
            break
        call_id, fn, args, kwargs = task
        try:
            outbox.put((call_id, rank, True, fn(rank, world_size, *args, **kwargs)))
        except BaseException:  # noqa: BLE001 - everything goes back to the parent
            outbox.put((call_id, rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class _Pool:
    def __init__(self, world_size: int):
        self.world_size = world_size
        port = _free_port()
        self.outbox = _CTX.Queue()
        self.inboxes = [_CTX.Queue() for _ in range(world_size)]
        self.procs = [
            _CTX.Process(
                target=_worker, args=(r, world_size, port, self.inboxes[r], self.outbox),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()
        self.calls = 0

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def run(self, fn, args, kwargs, timeout: float):
        self.calls += 1
        call_id = self.calls
        for box in self.inboxes:
            box.put((call_id, fn, args, kwargs))
        results: dict[int, object] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < self.world_size:
            remaining = deadline - time.monotonic()
            if errors:  # peers of a failed rank may be stuck in a collective: give them a moment
                remaining = min(remaining, 5.0)
            if remaining <= 0:
                break
            try:
                cid, rank, ok, value = self.outbox.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                if not self.alive():  # a worker died without a word: do not wait for it
                    break
                continue
            if cid == call_id:
                (results if ok else errors)[rank] = value
        if errors or len(results) < self.world_size:
            self.kill()
            name = getattr(fn, "__qualname__", repr(fn))
            if errors:
                rank = min(errors)
                raise DistributedTestError(
                    f"{name} failed on rank {rank} of {self.world_size}:\n{errors[rank]}"
                )
            missing = sorted(set(range(self.world_size)) - set(results))
            raise DistributedTestError(
                f"{name} did not finish on ranks {missing} of {self.world_size} within "
                f"{timeout:.0f}s (hang or dead peer); pool killed"
            )
        return [results[r] for r in range(self.world_size)]

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=5)

    def close(self) -> None:
        for box in self.inboxes:
            try:
                box.put(None)
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(timeout=5)
        self.kill()


_POOLS: dict[int, _Pool] = {}


def run_on_ranks(fn, world_size: int, *args, timeout: float = DEFAULT_TIMEOUT, **kwargs):
    """Call ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks.

    Returns the list of per-rank return values (they must be picklable). Raises
    ``DistributedTestError`` with the child's traceback when any rank raises, or when the call
    does not finish within ``timeout`` seconds.
    """
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.kill()
        pool = _POOLS[world_size] = _Pool(world_size)
    try:
        return pool.run(fn, args, kwargs, timeout)
    except DistributedTestError:
        _POOLS.pop(world_size, None)
        raise


def shutdown_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


atexit.register(shutdown_pools)
