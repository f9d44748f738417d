"""``tools/bench_attention.py`` end to end on a tiny shape: every rank of a ``--thp`` run
allocates on huge pages (PyTorch's ``THP_MEM_ALLOC_ENABLE``, inherited by the spawned
ranks), and the run's bytes equal the cost model's."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))

pytestmark = pytest.mark.usefixtures("forked_ranks")


@pytest.mark.own_world
def test_bench_attention_thp_reaches_every_rank(tmp_path, monkeypatch):
    import bench_attention
    import measure

    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")  # restored after the test
    # fresh interpreters: PyTorch's allocator reads THP_MEM_ALLOC_ENABLE once, at its first
    # allocation, which the fork server (and so its forks) made long before --thp set it
    monkeypatch.setattr(measure, "START_METHOD", "spawn")
    out = str(tmp_path / "bench")
    bench_attention.main(["--seqlens", "64", "--ranks", "2", "--heads", "2", "--head-dim", "8",
                          "--methods", "rsa", "--peers", "--repeats", "0", "--thp",
                          "--out", out])
    with open(out + ".json") as f:
        data = json.load(f)
    assert data["args"]["thp"] is True
    (rec,) = [r for r in data["records"] if r["label"] == "rsa/zigzag"]
    assert sorted(rec["ranks"]) == ["0", "1"]
    assert all(x["thp"] and x["time_s"] > 0 for x in rec["ranks"].values()), rec["ranks"]
    (row,) = data["ratios"]
    assert row["bytes==model"], row
    assert row["spread"] == 1.0  # --repeats 0: the profiled call alone


@pytest.mark.own_world
def test_bench_attention_reports_each_calls_spread(tmp_path):
    """Issue 29: each variant's time is the median of ``--repeats`` calls (the slowest rank's
    time per call) and ``spread`` their max/min, in the record, the ratios and the table."""
    import bench_attention

    out = str(tmp_path / "bench")
    bench_attention.main(["--seqlens", "64", "--ranks", "2", "--heads", "2", "--head-dim", "8",
                          "--methods", "lightseq", "--only", "lightseq/zigzag", "--peers",
                          "--repeats", "3", "--out", out])
    with open(out + ".json") as f:
        data = json.load(f)
    (rec,) = [r for r in data["records"] if r["label"] == "lightseq/zigzag"]
    per_rank = [x["times_s"] for x in rec["ranks"].values()]
    assert all(len(t) == 3 for t in per_rank)
    want = [max(t) for t in zip(*per_rank)]
    assert rec["times_s"] == want and rec["time_s"] == sorted(want)[1]
    (row,) = [r for r in data["ratios"] if r["label"] == "lightseq/zigzag"]
    assert row["spread"] == max(want) / min(want) >= 1.0


@pytest.mark.own_world
def test_bench_attention_window_rows(tmp_path):
    """``--window``: every method's row against the one-process windowed ideal, bytes equal
    to the window-aware model, and a narrow window on 4 ranks sends one neighbour the keys
    the window reaches (RSA, LightSeq) instead of 3 neighbours whole shards."""
    import bench_attention

    out = str(tmp_path / "bench")
    bench_attention.main(["--seqlens", "256", "--ranks", "4", "--heads", "2", "--head-dim", "8",
                          "--window", "16", "--repeats", "0", "--out", out])
    with open(out + ".json") as f:
        data = json.load(f)
    rows = {r["label"]: r for r in data["ratios"]}
    sent = {r["label"]: r.get("traffic_sent") for r in data["records"]}
    ours = [k for k in rows if k != "window/1proc"]
    assert len(ours) == 5 and "window/1proc" in rows
    assert all(rows[k]["bytes==model"] and rows[k]["x_window"] > 0 for k in ours), rows
    kv = 64 * 2 * 8 * 4  # one rank's K (or V): 64 tokens, 2 heads of 8, fp32
    # forward K/V, backward again + partials: RSA's ring and LightSeq move only the
    # neighbour's last 16 of 64 keys that the window reaches (RSA's whole chunks: 6 * kv)
    for k, want in (("rsa/contig+w", 6 * kv // 4), ("lightseq/contig+w", 6 * kv // 4)):
        assert max(sent[k]) == want, (k, sent[k])


@pytest.mark.own_world
def test_bench_attention_balanced_rows(tmp_path):
    """``--packed-docs N --balanced``: the balanced row of a method against its zigzag packed
    row on the same stream, bytes equal to the model, and its time over the stream's
    FLOP-predicted time (``t/pred``)."""
    import bench_attention

    out = str(tmp_path / "bench")
    bench_attention.main(["--seqlens", "256", "--ranks", "2", "--heads", "2", "--head-dim", "8",
                          "--packed-docs", "6", "--doc-lengths", "corpus", "--balanced",
                          "--only", "lightseq/zigzag", "--peers", "--repeats", "0",
                          "--out", out])
    with open(out + ".json") as f:
        data = json.load(f)
    (row,) = [r for r in data["compare"] if r["label"] == "lightseq/balanced+packed"]
    assert row["vs"] == "zigzag+packed" and row["bytes==model"], row
    assert row["busiest_pred"] < 1.2 and row["time_ratio"] > 0, row
    assert row["t/pred"] > 0, row  # against the unpacked lightseq/zigzag row of the same run


def test_profile_attention_reports_each_call_with_its_options(tmp_path):
    """``tools/profile_attention.py --calls N --option NAME=VALUE``: one row per rank and call
    with the phases' op classes and the call's page faults; the option reaches the method."""
    import profile_attention

    out = str(tmp_path / "prof")
    profile_attention.main(["--methods", "rsa", "--seqlens", "64", "--ranks", "2", "--heads",
                            "2", "--head-dim", "8", "--calls", "2", "--option",
                            "keep_rows=False", "--rows", "0", "--out", out])
    with open(out + ".json") as f:
        data = json.load(f)
    assert sorted((r["rank"], r["call"]) for r in data["rows"]) == [(0, 0), (0, 1), (1, 0),
                                                                    (1, 1)]
    assert all(r["faults"] >= 0 and "matmul" in r["forward"]["classes"] for r in data["rows"])
    assert data["args"]["option"] == ["keep_rows=False"]
    with pytest.raises(ValueError, match="keep_rows must be True or False"):
        profile_attention.main(["--methods", "rsa", "--seqlens", "64", "--ranks", "1",
                                "--option", "keep_rows=maybe", "--out", out])


def test_run_ranks_raises_when_a_rank_dies():
    """``measure.run_ranks``: a rank that dies before reporting (here an unknown method inside
    the worker) raises ``RuntimeError`` naming it, instead of waiting for its rows forever."""
    import argparse

    import profile_attention
    from measure import run_ranks

    a = argparse.Namespace(methods=["no-such-method"], seqlens=[64], layout="zigzag", batch=1,
                           heads=2, head_dim=8, packed_docs=0, micro_q=None, option=[],
                           calls=1, rows=0)
    with pytest.raises(RuntimeError, match="rank 0 of 1 exited"):
        run_ranks(profile_attention._worker, 1, a)
