"""End to end, as ``make demo`` runs it but smaller: torchrun, 2 CPU ranks, CP=2, LightSeq.

The byte-level GPT must learn (mean loss of the last 10 steps at least 20% below the first 10),
and the run must leave its JSON-lines log and PNG plot and print where they are. The full demo
(seq 4096, 200 steps) is ``make demo``; this keeps the same path under a minute.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.megatron
@pytest.mark.own_world
def test_small_demo_learns_and_reports(tmp_path):
    from megatron_seqpar.training import report

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", os.path.join(ROOT, "examples", "pretrain_gpt.py"), "--num-layers", "2",
           "--hidden-size", "64", "--num-attention-heads", "2", "--seq-length", "512",
           "--train-iters", "40", "--lr", "3e-3", "--lr-warmup-iters", "5",
           "--context-parallel-size", "2", "--seqpar-method", "lightseq",
           "--data-cache-path", str(tmp_path / "data"), "--log-dir", str(tmp_path / "run"),
           "--cpu-threads", "1"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert p.returncode == 0, p.stderr[-3000:]
    log = tmp_path / "run" / report.LOG_NAME
    png = tmp_path / "run" / report.PLOT_NAME
    assert f"log:  {log}" in p.stdout and f"plot: {png}" in p.stdout, p.stdout
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    s = report.summary(str(log), window=10)
    assert s["steps"] == 40
    assert s["drop"] >= 0.20, s
    recs = report.step_records(str(log))
    assert all(len(r["peak_mem_bytes"]) == 2 and min(r["sent_bytes"]) > 0 for r in recs)
