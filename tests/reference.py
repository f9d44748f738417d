"""Single-process attention over the full sequence: the ground truth every method must match.

Written independently of the package's kernels: plain float math, K/V heads expanded, causal
mask by position, key padding mask; a row with every key masked yields zeros and zero grads.
"""

import torch


def reference_attention(q, k, v, *, causal, scale=None, key_padding_mask=None, cu_seqlens=None):
    """``q`` ``[b, S, hq, D]``, ``k``/``v`` ``[b, S, hkv, D]`` -> ``[b, S, hq, D]``.
    ``cu_seqlens``: packed sequences ``[0, L1, ..., S]``: a block-diagonal mask."""
    b, S, hq, d = q.shape
    g = hq // k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    k = k.repeat_interleave(g, dim=2)
    v = v.repeat_interleave(g, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    mask = torch.zeros(b, 1, S, S, dtype=torch.bool, device=q.device)
    if causal:
        mask = mask | torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1)
    if key_padding_mask is not None:
        mask = mask | key_padding_mask[:, None, None, :]
    if cu_seqlens is not None:
        doc = torch.zeros(S, dtype=torch.long, device=q.device)
        for i, (a, e) in enumerate(zip(cu_seqlens, cu_seqlens[1:])):
            doc[a:e] = i
        mask = mask | (doc[:, None] != doc[None, :])
    dead = mask.all(-1, keepdim=True)
    scores = scores.masked_fill(mask, float("-inf")).masked_fill(dead, 0.0)
    p = torch.softmax(scores, dim=-1).masked_fill(mask, 0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def make_padding(b, S, generator=None):
    """A key padding mask with right padding, left padding (fully masked causal rows) and one
    fully padded sample (fully masked rows in both modes)."""
    kpm = torch.zeros(b, S, dtype=torch.bool)
    kpm[0, S - S // 3:] = True  # right padding
    if b > 1:
        kpm[1, : S // 4 + 1] = True  # left padding: early causal rows see only padding
    if b > 2:
        kpm[2] = True  # nothing to attend to at all
    return kpm


def relerr(a, b):
    """Max abs error relative to the reference's largest magnitude."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check_sharded(call, shard, *, b, S, hq, hkv, d, seed, causal, kpm=None, cu_seqlens=None,
                  dtype=torch.float64):
    """Run ``call(q, k, v, kpm)`` on this rank's shards (``shard(full) -> local``) forward and
    backward, against ``reference_attention`` on the full inputs. Inputs are drawn in float64
    and rounded to ``dtype`` first, so the reference sees exactly what the op sees.
    Returns ``([out, dq, dk, dv] relative errors, the op's output)``."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, S, hq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, S, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, S, hkv, d, generator=gen, dtype=torch.float64)
    dout = torch.randn(b, S, hq, d, generator=gen, dtype=torch.float64)
    q, k, v, dout = (x.to(dtype).double() for x in (q, k, v, dout))
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*ref_in, causal=causal, key_padding_mask=kpm,
                              cu_seqlens=cu_seqlens)
    ref.backward(dout)
    mine = [shard(x).to(dtype).requires_grad_() for x in (q, k, v)]
    out = call(*mine, None if kpm is None else shard(kpm))
    out.backward(shard(dout).to(dtype))
    pairs = [(out, ref)] + [(m.grad, r.grad) for m, r in zip(mine, ref_in)]
    return [relerr(a.double(), shard(r.detach())) for a, r in pairs], out
