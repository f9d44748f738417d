"""``tools/bench_model.py`` runs end to end on a tiny GPT; ``measure.count_comm`` counts bytes
with each op's own group size, the profiler's convention otherwise."""

from __future__ import annotations

import json
import os
import sys

import pytest
from distributed import run_on_ranks

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, TOOLS)

pytestmark = pytest.mark.usefixtures("forked_ranks")


def _collectives(rank, world_size):
    """The same ops under the profiler (``measure``) and under ``count_comm``."""
    import torch
    import torch.distributed as dist
    from measure import count_comm, measure

    singles = [dist.new_group([r]) for r in range(world_size)]  # every rank joins each
    own = singles[rank]

    def ops():
        a, b = torch.ones(1000), torch.ones(24, 10)
        dist.all_reduce(a)
        with dist._coalescing_manager(async_ops=True) as cm:  # Megatron DDP's bucket sync
            dist.all_reduce(a, async_op=True)
            dist.all_reduce(b, async_op=True)
        cm.wait()
        out = torch.empty(world_size * 1000)
        dist.all_gather_into_tensor(out, a)
        dist.reduce_scatter_tensor(a, out)
        peer = (rank + 1) % world_size
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, b, peer),
                                       dist.P2POp(dist.irecv, torch.empty(24, 10), peer)])
        for r in reqs:
            r.wait()
        dist.all_to_all_single(torch.empty(24, 10), b)
        dist.all_reduce(a, group=own)  # a group of one: moves nothing

    with measure(rank, world_size) as m:
        ops()
    with count_comm() as c:
        ops()
    return m.sent_bytes, m.recv_bytes, c.sent_bytes, c.recv_bytes, c.by_group


def test_count_comm_agrees_with_the_profiler_and_knows_group_sizes():
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    for m_sent, m_recv, c_sent, c_recv, by_group in run_on_ranks(_collectives, 2):
        one = 4000  # the profiler counts the group-of-one all-reduce as world-sized
        expect = 4000 + 4960 + 4000 + 4000 + 960 + 480  # AR, coalesced AR, AG, RS, p2p, a2a
        assert (c_sent, c_recv) == (expect, expect)
        assert (m_sent, m_recv) == (expect + one, expect + one)
        assert by_group == {2: expect, 1: 0}


@pytest.mark.megatron
@pytest.mark.own_world
def test_bench_model_tiny_run_has_every_row(tmp_path, capsys):
    import bench_model

    out = str(tmp_path / "bench")
    bench_model.main(["--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "4",
                      "--seq-length", "256", "--repeats", "1", "--methods", "lightseq",
                      "--baselines", "nosp", "tp2sp", "--out", out])
    with open(out + ".json") as f:
        data = json.load(f)
    assert os.path.getsize(out + ".png") > 0
    rows = {r["label"]: r for r in data["ratios"]}
    assert set(rows) == {"nosp/1thr", "nosp/2thr", "lightseq/cp2", "megatron/tp2+sp"}
    for label, r in rows.items():
        assert "status" not in r, (label, r)
        assert r["time_s"] > 0 and r["peak_mb"] > 0 and r["t/ideal"] > 0, (label, r)
        assert r["t/tp2sp"] > 0 and r["mem/nosp"] > 0 and r["mem/tp2sp"] > 0, (label, r)
    for label in ("lightseq/cp2", "megatron/tp2+sp"):
        assert rows[label]["sent_mb"] > 0, label
    assert rows["nosp/1thr"]["sent_mb"] == 0  # one process: its groups of one move nothing
    assert rows["lightseq/cp2"]["attn_sent_mb"] > 0
    assert rows["megatron/tp2+sp"]["attn_sent_mb"] == 0  # Megatron's traffic is not attention
    # the same model on the same tokens: every variant's loss agrees to fp32 round-off
    losses = [r["loss"] for r in rows.values()]
    assert max(losses) - min(losses) < 1e-5 * abs(losses[0]), losses
    assert "t/ideal" in capsys.readouterr().out
