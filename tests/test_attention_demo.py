"""The README's attention example, as it is run: torchrun, 2 CPU ranks, a packed stream of
documents with two levels (head all-to-all over both ranks x the method), checked by the
example itself against PyTorch's single-process attention with the block-diagonal mask."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.own_world
@pytest.mark.parametrize("extra", [["--documents", "7", "--head-parallel", "2"],
                                   ["--documents", "5", "--layout", "contiguous"]])
def test_attention_demo_packed_two_level(extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", os.path.join(ROOT, "examples", "attention_demo.py"), "--seq-length", "512",
           "--method", "lightseq", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert p.returncode == 0, p.stderr[-3000:]
    m = re.search(r"out ([0-9.e+-]+), dq ([0-9.e+-]+)", p.stdout)
    assert m, p.stdout
    # fp32 against PyTorch's fp32 attention: a few ulps of 512-term softmax sums
    assert float(m.group(1)) < 1e-5 and float(m.group(2)) < 1e-5, p.stdout
