"""The suite under Megatron's runner: ``torchrun --nproc-per-node N -m pytest tests`` (issue 14).

Under plain pytest (``make test``) nothing here changes anything. Under torchrun each of the N
pytest processes runs the whole suite:

* distributed tests run on torchrun's world through ``distributed.run_on_ranks`` (calls for a
  world size other than N skip with the reason);
* single-process tests run on every rank, with torchrun's variables (RANK, WORLD_SIZE,
  MASTER_ADDR, TORCHELASTIC_*, ...) hidden from ``os.environ``, so they, and the processes
  they launch, see the environment plain pytest gives them;
* tests marked ``own_world`` launch a process world of their own (torchrun subprocesses,
  spawned gloo ranks, a peer killed on purpose): they run on local rank 0 only and skip on the
  other ranks, so N ranks do not start N such worlds on the same cores;
* each rank waits for the others before it exits, so every rank prints its own summary
  (torchrun stops all ranks once one exits non-zero);
* every rank has its own pytest temporary directory (pytest numbers one per process, created
  with an atomic mkdir), and free ports are asked of the OS, so nothing collides across ranks.
"""

from __future__ import annotations

import distributed
import pytest

from megatron_seqpar import cpu_workarounds

# before any test module imports megatron-core: its fused helpers eager, 1.8 CPU s less per
# process (cpu_workarounds, shim 0); the gloo workers do the same (distributed._worker)
cpu_workarounds.import_megatron_core()

OWN_WORLD = ("own_world: the test launches a process world of its own (torchrun subprocess, "
             "spawned ranks); under torchrun it runs on local rank 0 only")


def pytest_configure(config):
    config.addinivalue_line("markers", OWN_WORLD)
    distributed.hide_launcher_env()  # no-op under plain pytest


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    distributed.set_current_test(item.nodeid, item.get_closest_marker("own_world") is not None)
    try:
        return (yield)
    finally:
        distributed.set_current_test("", False)


def pytest_unconfigure(config):
    distributed.wait_for_all_ranks()  # after this rank's summary; no-op under plain pytest


def pytest_runtest_setup(item):
    world = distributed.TORCHRUN
    if world is not None and world.local_rank != 0 and item.get_closest_marker("own_world"):
        pytest.skip(f"launches its own process world: under torchrun it runs on local rank 0 "
                    f"only (this is local rank {world.local_rank} of {world.world_size})")


@pytest.fixture
def forked_ranks(monkeypatch):
    """The tools' rank processes start as forks of the suite's fork server, which imported
    torch and megatron-core once (``tools/measure.py`` ``START_METHOD``, ``pool_preload.py``),
    not as fresh interpreters (about 4 CPU s a rank here). A test whose ranks must read their
    environment at start-up sets ``START_METHOD`` back to ``"spawn"``."""
    import measure  # tools/, which the test module put on sys.path

    monkeypatch.setattr(measure, "START_METHOD", "forkserver")
