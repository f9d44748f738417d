"""The peers of ``tools/baselines.py`` agree with single-process attention (float64, P=2, 3).

DeepSpeed-Ulysses is skipped when DeepSpeed is not installed; PyTorch's ring merges in fp32,
so it is held to 1e-6 instead of 1e-10.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))


def _check_peers(rank, world):
    import torch
    from baselines import BASELINES
    from bench_attention import shard

    S, D = 12 * world, 8
    h, hkv = 2 * world, world  # GQA, heads divisible by P (Ulysses splits them)
    g = torch.Generator().manual_seed(0)
    qf, kf, vf, df = (torch.randn(2, S, n, D, generator=g, dtype=torch.float64)
                      for n in (h, hkv, hkv, h))
    errs = {}
    for causal in (True, False):
        ref = [x.clone().requires_grad_() for x in (qf, kf, vf)]
        BASELINES["nosp"].fn(*ref, causal=causal).backward(df)
        for name in ("ulysses", "ring", "allgather"):
            b = BASELINES[name]
            if not b.available():
                continue
            lay = b.layout(causal)
            loc = [shard(x, rank, world, lay).requires_grad_() for x in (qf, kf, vf)]
            with b.context(None, seq_len=S, causal=causal):
                out = b.fn(*loc, causal=causal)
                out.backward(shard(df, rank, world, lay))
            want = [shard(o, rank, world, lay) for o in
                    (BASELINES["nosp"].fn(qf, kf, vf, causal=causal), *(r.grad for r in ref))]
            errs[(name, causal)] = max((a - b_).abs().max().item()
                                       for a, b_ in zip([out, *(x.grad for x in loc)], want))
    return errs


@pytest.mark.parametrize("world", [2, 3])
def test_peers_match_reference(world):
    from distributed import run_on_ranks

    per_rank = run_on_ranks(_check_peers, world, timeout=300)
    for errs in per_rank:
        assert errs, "no peer ran"
        for (name, causal), err in errs.items():
            tol = 1e-6 if name == "ring" else 1e-10
            assert err < tol, (name, causal, err)
