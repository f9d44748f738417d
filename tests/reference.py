"""Single-process attention over the full sequence: the ground truth every method must match.

Written independently of the package's kernels: plain float math, K/V heads expanded, causal
mask by position, key padding mask; a row with every key masked yields zeros and zero grads.
"""

import torch


def reference_attention(q, k, v, *, causal, scale=None, key_padding_mask=None, cu_seqlens=None,
                        window_size=None, softmax_offset=None):
    """``q`` ``[b, S, hq, D]``, ``k`` ``[b, S, hkv, D]``, ``v`` ``[b, S, hkv, Dv]`` ->
    ``[b, S, hq, Dv]``. ``cu_seqlens``: packed sequences ``[0, L1, ..., S]``: a block-diagonal
    mask. ``window_size=(left, right)``: key j visible to query i only if
    ``i - left <= j <= i + right`` (-1: unbounded). ``softmax_offset`` ``[hq]``: one extra
    logit per head in every row's denominator (a zero-valued column of the softmax)."""
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
    if window_size is not None:
        i = torch.arange(S, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        left, right = window_size
        if left >= 0:
            mask = mask | (j < i - left)
        if right >= 0:
            mask = mask | (j > i + right)
    if softmax_offset is not None:  # the sink: one more column, never masked, value 0
        sink = softmax_offset.view(1, hq, 1, 1).expand(b, hq, S, 1)
        scores = torch.cat([scores.masked_fill(mask, float("-inf")), sink], dim=-1)
        p = torch.softmax(scores, dim=-1)[..., :S]
        return torch.einsum("bhqk,bkhd->bqhd", p, v)
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


def relerr(a, b, floor=1e-30):
    """Max abs error relative to the reference's largest magnitude (at least ``floor``: a
    reference that is exactly zero in exact arithmetic is then compared absolutely)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(floor)).item()


def check_sharded(call, shard, *, b, S, hq, hkv, d, seed, causal, kpm=None, cu_seqlens=None,
                  dtype=torch.float64, dv=None, window_size=None, sinks=False, group=None,
                  floor=1e-30):
    """Run ``call(q, k, v, kpm)`` on this rank's shards (``shard(full) -> local``) forward and
    backward, against ``reference_attention`` on the full inputs. Inputs are drawn in float64
    and rounded to ``dtype`` first, so the reference sees exactly what the op sees.
    ``dv``: V's head dim (MLA; default ``d``); ``window_size`` is passed to both; ``sinks``:
    a random ``softmax_offset`` is passed as ``call(..., softmax_offset=o)`` and its
    gradient, summed over ``group``, is compared as a fifth error. ``floor``: see ``relerr``.
    Returns ``([out, dq, dk, dv(, d offset)] relative errors, the op's output)``."""
    gen = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    q = torch.randn(b, S, hq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, S, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, S, hkv, dv, generator=gen, dtype=torch.float64)
    dout = torch.randn(b, S, hq, dv, generator=gen, dtype=torch.float64)
    offset = torch.randn(hq, generator=gen, dtype=torch.float64) if sinks else None
    q, k, v, dout = (x.to(dtype).double() for x in (q, k, v, dout))
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    extra, ref_extra = {}, {}
    if sinks:
        ref_off = offset.clone().requires_grad_()
        my_off = offset.to(dtype).clone().requires_grad_()
        ref_extra, extra = {"softmax_offset": ref_off}, {"softmax_offset": my_off}
    ref = reference_attention(*ref_in, causal=causal, key_padding_mask=kpm,
                              cu_seqlens=cu_seqlens, window_size=window_size, **ref_extra)
    ref.backward(dout)
    mine = [shard(x).to(dtype).requires_grad_() for x in (q, k, v)]
    out = call(*mine, None if kpm is None else shard(kpm), **extra)
    out.backward(shard(dout).to(dtype))
    pairs = [(out, ref)] + [(m.grad, r.grad) for m, r in zip(mine, ref_in)]
    errs = [relerr(a.double(), shard(r.detach()), floor) for a, r in pairs]
    if sinks:
        g = my_off.grad.double()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(g, group=group)
        errs.append(relerr(g, ref_off.grad, floor))
    return errs, out
