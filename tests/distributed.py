"""Run a function on N gloo processes, fast enough to do it hundreds of times per suite.

``run_on_ranks(fn, world_size, *args, timeout=...)`` calls ``fn(rank, world_size, *args)`` on
every rank of a gloo group on 127.0.0.1 and returns the per-rank results. ``fn`` must be a
module-level function (it is pickled by name and imported in the workers).

Starting a process and initialising a process group costs seconds, so each world size keeps one
pool of worker processes alive for the whole pytest session and feeds it one call at a time.
The workers are forks of one fork server that imported torch and megatron-core once
(``pool_preload.py``): 4 pools, 10 workers, took 37-39 CPU s as fresh interpreters and take
10-12 CPU s so (this 2-core machine, 2026-12-07). A call that
raises on any rank is re-raised here with the child's traceback; a call that outlives its
timeout (a hang, a dead peer) kills the pool, which is rebuilt on the next call, and fails with
a message naming the timeout. Workers are daemonic and killed at interpreter exit, and a
worker whose parent died without that (pytest killed) leaves within 5 s, so no stray
processes survive the run. Workers run with one torch thread each (the machine has 2 cores).

Under Megatron's runner (``torchrun --nproc-per-node N -m pytest tests``) there is no pool: the
N pytest processes that torchrun started are the ranks. ``run_on_ranks(fn, N, ...)`` runs
``fn`` in this process, in a gloo world of the N torchrun ranks that is built for the call and
destroyed after it (Megatron's ``Utils.initialize_model_parallel`` / ``destroy_model_parallel``
pattern, per call, so that single-process tests, which run on every rank, see no process group
as under plain pytest; ``group=None`` would otherwise mean the N-rank world).
``run_on_ranks(fn, 1, ...)`` runs ``fn`` on every rank, each alone in a world of one, like any
single-process test. Other world sizes skip with the reason. Every rank gets every rank's
result; a rank that raised is re-raised on all ranks with its traceback. The start and the
results of a call are exchanged through torchrun's store, not a collective, so a rank whose
``fn`` raised never leaves a peer stuck in a collective it will not join (a peer already stuck
in one of ``fn``'s own collectives is freed by the group timeout). ``timeout`` is not enforced
there: nothing can be killed.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import pickle
import queue
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta

import torch.multiprocessing as mp

from megatron_seqpar.comm import free_port

# Workers are forks of a fork server that imported torch and megatron-core once (see
# pool_preload.py), not fresh interpreters that each import them again.
_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["pool_preload"])
DEFAULT_TIMEOUT = 180.0
GROUP_TIMEOUT = timedelta(seconds=90)  # what every collective of the suite waits at most


class DistributedTestError(AssertionError):
    """A rank raised, or the call timed out; the message carries the child's traceback."""


def _worker(rank: int, world_size: int, port: int, inbox, outbox) -> None:
    import torch
    import torch.distributed as dist

    from megatron_seqpar.cpu_workarounds import import_megatron_core

    # a no-op after the fork server's preload (pool_preload.py); it matters only where that
    # preload failed, which multiprocessing ignores: then before a test module imports it
    import_megatron_core()

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
    # everything imported so far lives as long as the worker: keep it out of every collection
    # (a full collection of a worker with megatron-core imported: 0.13 CPU s; then ~0)
    gc.freeze()
    parent = os.getppid()
    while True:
        try:
            task = inbox.get(timeout=5.0)
        except queue.Empty:
            if os.getppid() != parent:  # pytest died without closing the pool: do not linger
                break
            continue
        if task is None:
            break
        call_id, fn, args, kwargs = task
        before = _groups()
        try:
            result = (call_id, rank, True, fn(rank, world_size, *args, **kwargs))
        except BaseException:  # noqa: BLE001 - everything goes back to the parent
            outbox.put((call_id, rank, False, traceback.format_exc()))
            continue  # the parent kills this pool: peers may be stuck in a collective
        _release_groups(before)
        outbox.put(result)
    dist.destroy_process_group()


def _groups() -> set:
    from torch.distributed import distributed_c10d as c10d

    return set(c10d._world.pg_map)


def _release_groups(before: set) -> None:
    """Destroy the process groups a call made (after a barrier: every rank is done with them).

    megatron-core's ``destroy_model_parallel`` drops its references but keeps the groups, and
    each gloo group keeps threads that wake up periodically: a pool that ran the Megatron tests
    held over a thousand of them per worker, which took a third of the machine from every test
    after. The two-level subgroups that ``megatron_seqpar.headpar`` caches stay: they are few,
    made once per world, and their store names (hashed from the ranks) cannot be reused in the
    same world.
    """
    import torch.distributed as dist

    from megatron_seqpar import headpar

    cached = {id(pg) for groups in headpar._GROUPS.values() for pg in groups.values()}
    new = [pg for pg in _groups() if pg not in before and id(pg) not in cached]
    if not new:
        return
    dist.barrier()
    for pg in new:
        dist.destroy_process_group(pg)
    del new
    gc.collect()  # models and megatron-core's group collections hold the last references
    gc.freeze()  # what outlived the collection stays out of the next ones (see _worker)


class _Pool:
    def __init__(self, world_size: int):
        self.world_size = world_size
        port = free_port()
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
    does not finish within ``timeout`` seconds. Under torchrun: see the module docstring.
    """
    if TORCHRUN is not None:
        return _run_in_torchrun_world(fn, world_size, args, kwargs)
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


# ------------------------------------------------------------------ under Megatron's runner
# Variables torchrun sets for its workers (torch/distributed/elastic/agent/server/
# local_elastic_agent.py), all TORCHELASTIC_* included. While the tests run they are hidden
# from os.environ (see hide_launcher_env), so that code under test and the subprocesses that
# tests launch see what they see under plain pytest: no RANK/WORLD_SIZE, no agent store.
_REQUIRED = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "TORCHELASTIC_RUN_ID")
_LAUNCHER = (*_REQUIRED, "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "LOCAL_WORLD_SIZE",
             "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE")
# How long a rank waits for its peers to reach a call or to finish it. Tests marked own_world
# run on local rank 0 only while the others go ahead to the next run_on_ranks call and wait
# there, so this must comfortably exceed the longest stretch of such tests between two
# distributed calls (each launches torchrun subprocesses with timeouts of up to 10 minutes).
# A crashed rank does not leave the others waiting this long: torchrun then stops them all.
TORCHRUN_WAIT = timedelta(seconds=float(os.environ.get("SEQPAR_TEST_TORCHRUN_WAIT_S", 7200)))
# What each collective inside fn waits at most: the pool's 90 s, raised because N ranks of a
# torchrun world share the cores with whatever else runs (N=4 on 2 cores here).
TORCHRUN_GROUP_TIMEOUT = timedelta(seconds=300)


@dataclass(frozen=True)
class TorchrunWorld:
    """This process's place in the world torchrun launched, read once at import."""

    rank: int
    local_rank: int
    world_size: int
    env: tuple = field(repr=False)  # (name, value) of each launcher variable, to rendezvous


def _detect_torchrun(environ) -> TorchrunWorld | None:
    """The torchrun world this pytest process belongs to, or None (plain pytest, pool workers).

    All of RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and TORCHELASTIC_RUN_ID must be
    set (torchrun sets them all; a stray RANK in a shell does not switch modes).
    """
    if not all(environ.get(name) for name in _REQUIRED):
        return None
    try:
        rank, local_rank, world = (int(environ[n]) for n in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    except ValueError as exc:
        raise RuntimeError(f"torchrun variables are not integers: {exc}") from None
    if not 0 <= rank < world or local_rank < 0:
        raise RuntimeError(f"torchrun variables disagree: RANK={rank} WORLD_SIZE={world}")
    env = tuple((n, v) for n, v in environ.items()
                if n in _LAUNCHER or n.startswith("TORCHELASTIC_"))
    return TorchrunWorld(rank, local_rank, world, env)


TORCHRUN = _detect_torchrun(os.environ)
_STORE = None
_CALLS = 0
_TEST = {"nodeid": "", "own_world": False}  # set by conftest.py around each test


def hide_launcher_env() -> None:
    """Remove torchrun's variables from os.environ (conftest.py, once, under torchrun)."""
    for name, _ in TORCHRUN.env if TORCHRUN else ():
        os.environ.pop(name, None)


def set_current_test(nodeid: str, own_world: bool) -> None:
    _TEST.update(nodeid=nodeid, own_world=own_world)


@contextlib.contextmanager
def _launcher_env():
    saved = {n: os.environ.get(n) for n, _ in TORCHRUN.env}
    os.environ.update(dict(TORCHRUN.env))
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def _store():
    """A client of torchrun's store (torch's own env:// rendezvous), under a prefix of ours."""
    global _STORE
    if _STORE is None:
        import torch.distributed as dist

        with _launcher_env():
            store, _, _ = next(dist.rendezvous("env://", TORCHRUN.rank, TORCHRUN.world_size,
                                               timeout=TORCHRUN_WAIT))
        attempt = dict(TORCHRUN.env).get("TORCHELASTIC_RESTART_COUNT", "0")  # keys per attempt
        _STORE = dist.PrefixStore(f"megatron_seqpar_tests/{attempt}", store)
    return _STORE


_CHUNK = 4 << 20  # torchrun's store (libuv TCPStore) refuses a message over 8 MiB


def _exchange(store, call: int | str, what: str, payload: bytes) -> list[bytes]:
    """Every rank posts ``payload`` and gets all ranks' payloads (no collective involved)."""
    keys = [f"{call}/{what}/{r}" for r in range(TORCHRUN.world_size)]
    mine = keys[TORCHRUN.rank]
    chunks = [payload[i:i + _CHUNK] for i in range(0, len(payload), _CHUNK)] or [b""]
    for i, chunk in enumerate(chunks):
        store.set(f"{mine}/{i}", chunk)
    store.set(mine, str(len(chunks)).encode())  # posted last: peers wait for this key
    try:
        store.wait(keys, TORCHRUN_WAIT)
    except RuntimeError:  # torch's DistStoreError on timeout
        missing = [r for r, k in enumerate(keys) if not store.check([k])]
        raise DistributedTestError(
            f"ranks {missing} of the torchrun world did not reach '{what}' of call {call} "
            f"({_TEST['nodeid']}) within {TORCHRUN_WAIT.total_seconds():.0f}s "
            "(SEQPAR_TEST_TORCHRUN_WAIT_S)") from None
    return [b"".join(store.get(f"{k}/{i}") for i in range(int(store.get(k)))) for k in keys]


def wait_for_all_ranks() -> None:
    """Under torchrun, return once every rank got here (conftest.py, at the end of the session).

    torchrun stops every rank as soon as one exits non-zero; waiting here first lets each rank
    finish and print its own summary, whatever the others' outcome.
    """
    if TORCHRUN is not None:
        _exchange(_store(), "session", "end", b"")


def _forget(store, call: int) -> None:
    for what in ("start", "result"):
        key = f"{call}/{what}/{TORCHRUN.rank}"
        if store.check([key]):
            for i in range(int(store.get(key))):
                store.delete_key(f"{key}/{i}")
            store.delete_key(key)


def _clean_parallel_state() -> None:
    """Megatron's ``destroy_model_parallel``, should ``fn`` have left its groups behind."""
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None:
        ps.destroy_model_parallel()


def _call_in_world(store, call: int, world_size: int, fn, args, kwargs) -> list[bytes]:
    """Build the group, run fn, exchange outcomes, destroy the group; every rank's outcome."""
    import torch
    import torch.distributed as dist

    me = TORCHRUN.rank
    solo = world_size == 1  # each rank alone, in a world of its own
    rank, prefix = (0, f"{call}/pg/{me}") if solo else (me, f"{call}/pg")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a pool worker
    dist.init_process_group("gloo", store=dist.PrefixStore(prefix, store), rank=rank,
                            world_size=world_size, timeout=TORCHRUN_GROUP_TIMEOUT)
    try:
        try:
            payload = pickle.dumps((True, fn(rank, world_size, *args, **kwargs)))
        except KeyboardInterrupt:
            raise
        except BaseException:  # noqa: BLE001 - everything goes to every rank
            payload = pickle.dumps((False, traceback.format_exc()))
        # only once every rank is done with fn may the group go: a peer may still be reading
        return _exchange(store, call, "result", payload)
    finally:
        _clean_parallel_state()
        dist.destroy_process_group()
        torch.set_num_threads(threads)


def _run_in_torchrun_world(fn, world_size: int, args, kwargs):
    """``run_on_ranks`` under torchrun: on the N torchrun ranks, or, for ``world_size=1``, on
    each rank alone (a single-process case, run on every rank like any single-process test)."""
    import pytest

    global _CALLS
    world, name = TORCHRUN, getattr(fn, "__qualname__", repr(fn))
    if world_size not in (1, world.world_size):
        pytest.skip(f"needs {world_size} ranks, this torchrun world has {world.world_size}: "
                    f"run it with plain pytest (its own {world_size}-process pool) or "
                    f"torchrun --nproc-per-node {world_size}")
    if _TEST["own_world"]:
        raise DistributedTestError(f"{_TEST['nodeid']} is marked own_world (local rank 0 only) "
                                   "but calls run_on_ranks, which needs every rank")
    _CALLS += 1
    store = _store()
    here = f"{_TEST['nodeid']} / {name} / {world_size}"
    starts = [s.decode() for s in _exchange(store, _CALLS, "start", here.encode())]
    if len(set(starts)) > 1:
        raise DistributedTestError(
            f"torchrun ranks out of step at call {_CALLS}: "
            + "; ".join(f"rank {r} in {s}" for r, s in enumerate(starts)))
    if _CALLS > 1:
        _forget(store, _CALLS - 1)  # every rank has read those: it reached this call
    outcomes = []
    for payload in _call_in_world(store, _CALLS, world_size, fn, args, kwargs):
        try:
            outcomes.append(pickle.loads(payload))
        except Exception as exc:  # noqa: BLE001 - e.g. a class only one rank could import
            outcomes.append((False, f"result could not be unpickled: {exc!r}"))
    failed = [r for r, (ok, _) in enumerate(outcomes) if not ok]
    if failed:  # raised on every rank, so that all of them stay in step
        raise DistributedTestError(f"{name} failed on torchrun rank {failed[0]} (ranks {failed} "
                                   f"of {world.world_size} failed; world of {world_size}):\n"
                                   f"{outcomes[failed[0]][1]}")
    if world_size == 1:
        return [outcomes[world.rank][1]]
    return [value for _, value in outcomes]


def kill_process_tree(proc) -> None:
    """SIGKILL a launched process and every process under it, then reap it. torchrun starts its
    workers in sessions of their own, so killing the launcher's process group leaves them
    running (and writing to the test's checkpoint directory)."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    for p in [*tree, proc]:
        try:
            p.kill()
        except (psutil.Error, ProcessLookupError):
            pass
    proc.wait(timeout=30)
