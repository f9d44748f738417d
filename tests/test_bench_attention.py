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


@pytest.mark.own_world
def test_bench_attention_thp_reaches_every_rank(tmp_path, monkeypatch):
    import bench_attention

    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")  # restored after the test
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
