"""Block attention kernels with one contract, and attention over position runs.

Contract (all tensors ``[b, h, s, d]``, K/V may have fewer heads than Q: GQA, query head ``i``
uses kv head ``i // (hq // hkv)``):

    out, lse = backend.forward(q, k, v, scale, causal, mask)
    dq, dk, dv = backend.backward(dout, q, k, v, out, lse, scale, causal, mask)

``causal`` is the top-left diagonal of a square block; ``mask`` is a bool tensor
``[b or 1, 1, sq or 1, sk]``, True = masked (``[b, 1, 1, sk]``: key padding, broadcast over
rows); both may be given (a causal diagonal with padded keys). A row with every key masked
has ``out = 0`` and ``lse = -inf``. In the backward, ``out`` and ``lse`` are the *final*
(merged) ones of the rows, so the block's share of the gradient is exact.

Backends: ``reference`` (pure torch, float64-safe, materialises the block's scores),
``cpu_flash`` (PyTorch's fused CPU flash kernel, ~10x the math path, float64 included), and on
CUDA ``cuda_flash`` (PyTorch's flash kernel: fp16/bf16 blocks without a mask) and
``cuda_efficient`` (the memory-efficient kernel: fp32/fp16/bf16, additive bias for masks),
and the opt-in ``cuda_cudnn``, all in ``kernels_cuda``, which holds the dispatch table.
``auto`` picks per block with the pure rule ``kernels_cuda.choose_backend`` and falls back
to ``reference``; a named backend that cannot serve a block falls back to ``reference`` too.

``attend``/``attend_backward`` run a query buffer against a key buffer whose tokens are given
as position runs (see ``layouts``): the causal mask follows global positions, blocks that are
fully visible, diagonal, partially visible or empty are told apart, empty ones are skipped,
and partial results are merged in fp32 (fp64 for fp64 inputs) by log-sum-exp.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch

from megatron_seqpar import kernels_cuda
from megatron_seqpar.layouts import Run

NEG_INF = float("-inf")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- backends
def _scores(q, k, scale, causal, mask):
    b, hq, sq, d = q.shape
    hkv, sk = k.size(1), k.size(2)
    cd = acc_dtype(q.dtype)
    qg = q.to(cd).reshape(b, hkv, hq // hkv, sq, d)
    s = torch.matmul(qg, k.to(cd).unsqueeze(2).transpose(-1, -2)) * scale  # [b,hkv,g,sq,sk]
    if causal:
        s.masked_fill_(torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu_(1), NEG_INF)
    if mask is not None:
        s.masked_fill_(mask.unsqueeze(1), NEG_INF)
    return s


def _ref_forward(q, k, v, scale, causal, mask):
    b, hq, sq, d = q.shape
    s = _scores(q, k, scale, causal, mask)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))
    out = torch.matmul(p, v.to(s.dtype).unsqueeze(2))
    return out.reshape(b, hq, sq, -1).to(q.dtype), lse.reshape(b, hq, sq)


def _ref_backward(dout, q, k, v, out, lse, scale, causal, mask):
    b, hq, sq, d = q.shape
    hkv = k.size(1)
    g = hq // hkv
    s = _scores(q, k, scale, causal, mask)
    cd = s.dtype
    lse = lse.to(cd).reshape(b, hkv, g, sq)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))
    do = dout.to(cd).reshape(b, hkv, g, sq, -1)
    delta = (do * out.to(cd).reshape(b, hkv, g, sq, -1)).sum(-1, keepdim=True)
    vf, kf = v.to(cd).unsqueeze(2), k.to(cd).unsqueeze(2)
    dv = torch.matmul(p.transpose(-1, -2), do).sum(2)
    ds = p * (torch.matmul(do, vf.transpose(-1, -2)) - delta)
    dq = torch.matmul(ds, kf).reshape(b, hq, sq, d) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(cd).reshape(b, hkv, g, sq, d)).sum(2) * scale
    return dq, dk, dv


def _additive(mask, dtype):
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, NEG_INF)


def _fold_causal(q, k, causal, mask):
    """With an explicit mask, the diagonal goes into it (so empty rows are seen)."""
    if causal and mask is not None:
        tri = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).triu_(1)
        return False, mask | tri
    return causal, mask


# A causal square block longer than this is cut into tiles (``_causal_tiles``) on the CPU
# fused kernel. The kernel computes whole key tiles of up to 512 (a causal n <= 512 block costs
# as much as the full square), so small causal blocks ran at ~2x the time per visible pair of
# a full block; cut in halves down to 64, they run at 1.1-1.5x (docs/benchmarks.md, issue 17).
CPU_CAUSAL_TILE = 64


def _causal_tiles(n: int, tile: int) -> list[tuple[slice, slice, bool]]:
    """A causal ``n x n`` block as ``(rows, keys, causal)`` pieces: halves recursively (the
    top-left and bottom-right causal halves, the bottom-left full quarter) down to causal
    diagonal tiles of at most ``tile``. Every visible pair is in exactly one piece. The
    diagonal tiles come first, in order: their rows (and keys) cover ``[0, n)`` once, so the
    callers write them into uninitialised buffers and merge or add the full pieces after."""
    diag: list[tuple[slice, slice, bool]] = []
    full: list[tuple[slice, slice, bool]] = []

    def split(lo: int, hi: int) -> None:
        if hi - lo <= tile:
            diag.append((slice(lo, hi), slice(lo, hi), True))
            return
        mid = lo + (hi - lo) // 2
        split(lo, mid)
        full.append((slice(mid, hi), slice(lo, mid), False))
        split(mid, hi)

    split(0, n)
    return diag + full


def _tiled(q, k, causal, mask) -> list | None:
    """The tiles of a causal square block on the CPU kernel, or None to call it whole (not
    causal, not square, short, or a mask with rows of its own)."""
    n = q.size(2)
    if (not causal or n != k.size(2) or n <= CPU_CAUSAL_TILE
            or (mask is not None and mask.size(2) != 1)):
        return None
    return _causal_tiles(n, CPU_CAUSAL_TILE)


def _cpu_flash_forward(q, k, v, scale, causal, mask):
    tiles = _tiled(q, k, causal, mask)
    if tiles is None:
        return _cpu_flash_block(q, k, v, scale, causal, mask)
    b, hq, n, _ = q.shape
    out = q.new_empty(b, hq, n, v.size(-1), dtype=acc_dtype(q.dtype))
    lse = q.new_empty(b, hq, n, dtype=out.dtype)
    for rows, keys, tri in tiles:
        m = None if mask is None else mask[..., keys]
        o, lb = _cpu_flash_block(q[:, :, rows], k[:, :, keys], v[:, :, keys], scale, tri, m)
        if tri:  # diagonal tiles first: each row's first piece
            out[:, :, rows].copy_(o)
            lse[:, :, rows].copy_(lb)
        else:
            merge_(out[:, :, rows], lse[:, :, rows], o, lb)
    return out.to(q.dtype), lse


def _cpu_flash_block(q, k, v, scale, causal, mask):
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    causal, mask = _fold_causal(q, k, causal, mask)
    bias = None if mask is None else _additive(mask, q.dtype)
    out, lse = op(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
    if mask is not None:  # the kernel reports lse = 0 for fully masked rows: make it -inf
        lse = lse.masked_fill(mask.all(-1), NEG_INF)
    return out, lse


def _cpu_flash_backward(dout, q, k, v, out, lse, scale, causal, mask):
    tiles = _tiled(q, k, causal, mask)
    if tiles is None:
        return _cpu_flash_block_backward(dout, q, k, v, out, lse, scale, causal, mask)
    cd = acc_dtype(q.dtype)
    grads = [torch.empty(x.shape, dtype=cd, device=x.device) for x in (q, k, v)]
    for rows, keys, tri in tiles:
        m = None if mask is None else mask[..., keys]
        g = _cpu_flash_block_backward(dout[:, :, rows], q[:, :, rows], k[:, :, keys],
                                      v[:, :, keys], out[:, :, rows], lse[:, :, rows], scale,
                                      tri, m)
        for acc, part, sl in zip(grads, g, (rows, keys, keys)):
            if tri:  # diagonal tiles first: each row's and key's first piece
                acc[:, :, sl].copy_(part)
            else:
                acc[:, :, sl] += part
    return tuple(grads)


def _cpu_flash_block_backward(dout, q, k, v, out, lse, scale, causal, mask):
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    causal, mask = _fold_causal(q, k, causal, mask)
    bias = None if mask is None else _additive(mask, q.dtype)
    lse = lse.masked_fill(torch.isinf(lse), 0.0).to(acc_dtype(q.dtype))
    return op(dout.to(q.dtype), q, k, v, out.to(q.dtype), lse, 0.0, causal,
              attn_mask=bias, scale=scale)


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable
    backward: Callable


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("reference", _ref_forward, _ref_backward),
        Backend("cpu_flash", _cpu_flash_forward, _cpu_flash_backward),
        Backend("cuda_flash", kernels_cuda.flash_forward, kernels_cuda.flash_backward),
        Backend("cuda_efficient", kernels_cuda.efficient_forward,
                kernels_cuda.efficient_backward),
        Backend("cuda_cudnn", kernels_cuda.cudnn_forward, kernels_cuda.cudnn_backward),
    )
}
BACKEND_NAMES = ("auto", *BACKENDS)


def device_kind(x: torch.Tensor) -> str:
    """The device type the dispatch (and RSA's tiling) plans for: ``x.device.type``. The one
    seam where tests/test_fake_cuda.py runs the CUDA plan on meta tensors (a CPU-only torch
    cannot index fake CUDA tensors)."""
    return x.device.type


def pick_backend(name: str, q: torch.Tensor, mask, causal: bool = False) -> Backend:
    """The backend ``name`` (or, for ``auto``, ``kernels_cuda.choose_backend``'s pick) for this
    block; one that cannot serve it falls back to ``reference``. Shapes and dtypes only."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown kernel backend {name!r}; use one of {BACKEND_NAMES}")
    device = device_kind(q)
    cap = kernels_cuda.capability(q.device) if device == "cuda" else None
    kind = (device, q.dtype, mask is not None, causal, q.size(-1))
    if name == "auto":
        return BACKENDS[kernels_cuda.choose_backend(*kind, capability=cap)]
    ok = (name in kernels_cuda.available_backends()
          and kernels_cuda.supports(name, *kind, capability=cap))
    return BACKENDS[name] if ok else BACKENDS["reference"]


def _pad_last(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` with zeros appended to its last dim up to ``n``."""
    return torch.nn.functional.pad(x, (0, n - x.size(-1)))


def block_attention(q, k, v, *, scale, causal=False, mask=None, backend="auto"):
    """One block: ``(out, lse)``; out in q's dtype, lse in fp32 (fp64 for fp64 inputs).

    ``v`` may have another head dim than ``q``/``k`` (MLA); the fused kernels need one head
    dim, so they get zero-padded operands (zero columns of V add zero columns to the output;
    zero columns of Q and K add nothing to the scores) and the result is cut back."""
    be = pick_backend(backend, q, mask, causal)
    dq, dv = q.size(-1), v.size(-1)
    if dq == dv or be.name == "reference":
        return be.forward(q, k, v, scale, causal, mask)
    n = max(dq, dv)
    out, lse = be.forward(_pad_last(q, n), _pad_last(k, n), _pad_last(v, n), scale, causal, mask)
    return out[..., :dv], lse


def block_attention_backward(dout, q, k, v, out, lse, *, scale, causal=False, mask=None,
                             backend="auto"):
    """Gradients of one block given the rows' final ``out`` and ``lse`` (another V head dim:
    zero-padded as in ``block_attention``; the padded dO and O columns are zero, so the
    kernel's ``rowsum(dO∘O)`` is unchanged)."""
    be = pick_backend(backend, q, mask, causal)
    d, dv = q.size(-1), v.size(-1)
    if d == dv or be.name == "reference":
        return be.backward(dout, q, k, v, out, lse, scale, causal, mask)
    n = max(d, dv)
    g = be.backward(*(_pad_last(x, n) for x in (dout, q, k, v, out)), lse, scale, causal, mask)
    return g[0][..., :d], g[1][..., :d], g[2][..., :dv]


def merge_(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Merge partial result ``(out_b, lse_b)`` into ``(out, lse)`` in place (accumulator dtype).

    ``out = (out·e^lse + out_b·e^lse_b) / e^new``, ``new = logaddexp(lse, lse_b)``; rows where
    both sides are empty (-inf) stay 0 / -inf.
    """
    new = torch.logaddexp(lse, lse_b.to(lse.dtype))
    safe = new.masked_fill(torch.isinf(new), 0.0)
    out.mul_(torch.exp(lse - safe).unsqueeze(-1))
    out.add_(out_b.to(out.dtype) * torch.exp(lse_b.to(lse.dtype) - safe).unsqueeze(-1))
    lse.copy_(new)


# ----------------------------------------------------------------------------- block plan
class KeyPad(NamedTuple):
    """A key buffer's padding: ``mask`` ``[b, sk]`` bool (True = padded) and, when known on the
    host, ``ranges``: the local key ranges ``((lo, hi), ...)`` holding a padded key in some
    batch row (None = not known). A block whose keys miss every range takes no mask, so on
    CUDA it runs the flash kernel instead of the masked efficient one."""

    mask: torch.Tensor
    ranges: tuple | None = None


def key_pad(kpm_all, j: int, ranges_all=None):
    """Rank ``j``'s key padding for ``attend`` / ``block_mask``: None when there is no mask or
    its keys are known to hold no padding, else a ``KeyPad`` (``ranges_all``: per rank, the
    padded ranges, or None = not known)."""
    if kpm_all is None:
        return None
    ranges = None if ranges_all is None else ranges_all[j]
    if ranges == ():
        return None
    return KeyPad(kpm_all[j], ranges)


class Block(NamedTuple):
    q: slice
    k: slice
    kind: str  # "full" | "causal" | "mask"
    q_run: Run
    k_run: Run
    window: tuple | None = None  # a "mask" block's (causal, left, right) rule, from a window


def check_window(window) -> tuple[int, int] | None:
    """``window_size`` validated: None, or ``(left, right)`` ints ``>= -1`` (-1: that side
    unbounded, the flash-attn / Megatron convention). ``(-1, -1)`` is no window (None)."""
    if window is None:
        return None
    bad = ValueError(f"window_size must be a pair (left, right) of ints >= -1 (-1 = unbounded), "
                     f"got {window!r}")
    try:
        left, right = window
    except (TypeError, ValueError):
        raise bad from None
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= -1 for x in (left, right)):
        raise bad
    return None if (left, right) == (-1, -1) else (left, right)


# Sliding windows: a query run is cut into row tiles of max(this, band/4) rows, so each tile
# computes its band's keys plus at most a tile's worth on either edge (about 1.25x the visible
# pairs for a window much longer than a tile; the edges are masked blocks).
WINDOW_TILE_MIN = 64


def _window_blocks(qr: Run, kr: Run, causal: bool, window) -> list[tuple[str, int, int, int, int]]:
    """The non-empty ``(kind, q_lo, q_hi, k_lo, k_hi)`` pieces (global positions, half-open)
    of query run ``qr`` against key run ``kr`` of the same sequence under ``window``: key ``j``
    visible to query ``i`` iff ``lo(i) <= j <= hi(i)``, both bounds non-decreasing in ``i``."""
    left, right = window
    ks, ke = kr.start, kr.end

    def lo(i):
        return ks if left < 0 else max(ks, i - left)

    def hi(i):  # inclusive
        h = ke - 1 if right < 0 else min(ke - 1, i + right)
        return min(h, i) if causal else h

    qs, qe = qr.start, qr.end
    if ((causal and ks > qe - 1) or (left >= 0 and ke - 1 < qs - left)
            or (right >= 0 and ks > qe - 1 + right)):  # no query sees any key
        return []
    if lo(qe - 1) == ks and hi(qs) == ke - 1:  # every query sees every key
        return [("full", qs, qe, ks, ke)]
    band = (left if left >= 0 else qr.length) + (0 if causal else max(right, 0)) + 1
    tile = max(WINDOW_TILE_MIN, band // 4)
    out = []
    for a in range(qs, qe, tile):
        b = min(qe, a + tile)
        L, H, FL, FH = lo(a), hi(b - 1), lo(b - 1), hi(a)
        if L > H:
            continue
        if causal and ks <= a and b <= ke and FL <= a:  # the tile's own square is a diagonal
            out += [("mask", a, b, L, FL)] if L < FL else []
            out += [("full", a, b, FL, a)] if FL < a else []
            out.append(("causal", a, b, a, b))
        elif FL <= FH:
            out += [("mask", a, b, L, FL)] if L < FL else []
            out.append(("full", a, b, FL, FH + 1))
            out += [("mask", a, b, FH + 1, H + 1)] if FH < H else []
        else:
            out.append(("mask", a, b, L, H + 1))
    return out


def _diagonal_groups(runs):
    """For a buffer against itself: ``[(lo, hi, doc)]`` local ranges, one per packed sequence,
    each of whose causal mask is the local triangle (its runs adjacent, positions increasing
    with the local index), when the runs tile the buffer from 0 and no sequence comes back
    after another one; else None (the general planner then handles it)."""
    groups: list[list] = []
    local = 0
    for r in runs:
        if r.local != local:
            return None
        last = groups[-1] if groups else None
        if last is not None and last[2] == r.doc:
            if last[3] > r.start:  # positions not increasing inside the sequence
                return None
            last[1], last[3] = r.local + r.length, r.end
        else:
            groups.append([r.local, r.local + r.length, r.doc, r.end])
        local += r.length
    docs = [g[2] for g in groups]
    if len(set(docs)) != len(docs):
        return None
    return [(a, b, doc) for a, b, doc, _ in groups]


def plan_blocks(q_runs, k_runs, causal: bool, join_keys: bool = True,
                window=None) -> tuple[Block, ...]:
    """The non-empty (query rows, key columns) blocks, grouped by query run.

    Runs of different packed sequences (``Run.doc``) never make a block: cross-sequence work
    costs nothing. ``window``: a checked ``(left, right)`` sliding window (``check_window``):
    blocks it leaves empty are skipped too, and a query run is cut into row tiles that follow
    the band (``_window_blocks``; their edges are ``mask`` blocks carrying the rule).

    Fully visible key ranges adjacent in the key buffer are joined into one block (unless
    ``join_keys=False``: a backward accumulating into given dK/dV then holds one run's kernel
    gradients at a time, not the joined range's). Two more
    joins make fewer, larger kernel calls: a buffer against itself (the same runs, positions
    increasing with the local index) is ONE diagonal block per packed sequence, since its
    local triangle is then the causal mask; and adjacent query runs whose only block is the
    same fully visible key range share one call.
    """
    window = None if window is None else tuple(window)
    return _plan(tuple(q_runs), tuple(k_runs), causal, join_keys, window)


@lru_cache(maxsize=4096)
def _plan(q_runs, k_runs, causal: bool, join_keys: bool, window) -> tuple[Block, ...]:
    """``plan_blocks`` on hashable arguments, cached: a plan depends on positions alone, and
    every layer and micro-step of a run asks for the same few (a tuple: shared, immutable)."""
    if window is not None:
        return _plan_window(q_runs, k_runs, causal, window)
    if causal and q_runs and q_runs == k_runs:
        groups = _diagonal_groups(q_runs)
        if groups is not None:  # local indices stand in for positions: the same triangles
            return tuple(Block(slice(a, b), slice(a, b), "causal", Run(a, 0, b - a, doc),
                               Run(a, 0, b - a, doc)) for a, b, doc in groups)
    blocks: list[Block] = []
    for qr in q_runs:
        q_sl = slice(qr.local, qr.local + qr.length)
        parts: list[tuple[str, Run]] = []
        for kr in k_runs:
            if kr.doc != qr.doc:  # packed sequences never see each other: no block at all
                continue
            if not causal:
                parts.append(("full", kr))
                continue
            n_full = min(kr.end, qr.start) - kr.start  # keys before every query of the run
            if n_full > 0:
                parts.append(("full", kr._replace(length=n_full)))
            lo, hi = max(kr.start, qr.start), min(kr.end, qr.end)
            if lo < hi:
                sub = Run(kr.local + lo - kr.start, lo, hi - lo, kr.doc)
                parts.append(("causal" if (lo, hi) == (qr.start, qr.end) else "mask", sub))
        merged: list[tuple[str, Run]] = []
        for kind, kr in parts:
            if join_keys and merged and kind == "full" and merged[-1][0] == "full":
                prev = merged[-1][1]
                if prev.local + prev.length == kr.local:
                    merged[-1] = ("full", prev._replace(length=prev.length + kr.length))
                    continue
            merged.append((kind, kr))
        new = [Block(q_sl, slice(kr.local, kr.local + kr.length), kind, qr, kr)
               for kind, kr in merged]
        if len(new) == 1 and _joins(blocks, new[0]):
            blocks[-1] = blocks[-1]._replace(q=slice(blocks[-1].q.start, q_sl.stop))
        else:
            blocks += new
    return tuple(blocks)


def _plan_window(q_runs, k_runs, causal: bool, window) -> tuple[Block, ...]:
    """``plan_blocks`` under a sliding window: per (query run, key run) of one sequence, the
    pieces of ``_window_blocks`` as blocks (local slices; each ``mask`` block keeps the rule
    its explicit mask is built from)."""
    rule = (causal, *window)
    blocks = []
    for qr in q_runs:
        for kr in k_runs:
            if kr.doc != qr.doc:
                continue
            for kind, a, b, c, e in _window_blocks(qr, kr, causal, window):
                q_run = Run(qr.local + a - qr.start, a, b - a, qr.doc)
                k_run = Run(kr.local + c - kr.start, c, e - c, kr.doc)
                blocks.append(Block(slice(q_run.local, q_run.local + q_run.length),
                                    slice(k_run.local, k_run.local + k_run.length), kind,
                                    q_run, k_run, rule if kind == "mask" else None))
    return tuple(blocks)


def _joins(blocks: list[Block], blk: Block) -> bool:
    """Whether ``blk``, the only block of its query run, extends the last query run's only
    block: both fully visible, the same keys, adjacent query rows."""
    if not blocks or blk.kind != "full":
        return False
    last = blocks[-1]
    alone = len(blocks) == 1 or blocks[-2].q != last.q
    return alone and last.kind == "full" and last.k == blk.k and last.q.stop == blk.q.start


def block_mask(blk: Block, kpm, device):
    """``(causal, mask)`` for a block: mask ``[b|1, 1, sq|1, sk]`` bool or None. A diagonal
    block keeps ``causal`` with only the key padding ``[b, 1, 1, sk]`` as its mask (the fused
    kernels apply the triangle themselves); an offset ``mask`` block gets its explicit
    ``[1, 1, sq, sk]`` triangle (never emitted for the contiguous and zigzag layouts).
    ``kpm``: the key buffer's ``[b, sk]`` bool padding, or a ``KeyPad`` (then a block that
    misses its padded ranges gets no padding mask)."""
    mask = None
    if blk.kind == "mask":
        qp = torch.arange(blk.q_run.start, blk.q_run.end, device=device).unsqueeze(1)
        kp = torch.arange(blk.k_run.start, blk.k_run.end, device=device).unsqueeze(0)
        causal, left, right = blk.window or (True, -1, -1)
        mask = kp > qp if causal else torch.zeros(qp.size(0), kp.size(1), dtype=torch.bool,
                                                  device=device)
        if left >= 0:
            mask |= kp < qp - left
        if right >= 0:
            mask |= kp > qp + right
        mask = mask.view(1, 1, qp.size(0), kp.size(1))
    if isinstance(kpm, KeyPad):
        hit = kpm.ranges is None or any(lo < blk.k.stop and blk.k.start < hi
                                        for lo, hi in kpm.ranges)
        kpm = kpm.mask if hit else None
    if kpm is not None:
        pad = kpm[:, blk.k].view(kpm.size(0), 1, 1, -1)
        mask = pad if mask is None else mask | pad
    return blk.kind == "causal", mask


def attend(q, q_runs, k, v, k_runs, *, scale, causal, kpm=None, backend="auto", out=None,
           lse=None, window=None):
    """Attention of ``q`` against ``(k, v)`` whose tokens sit at the given runs.

    Returns ``(out, lse)`` in the accumulation dtype; rows that see no key get 0 / -inf.
    ``kpm``: ``[b, sk]`` bool key padding mask of the key buffer (True = padded), a
    ``KeyPad``, or None.
    ``out``/``lse``: an earlier call's result to merge into (one key buffer after another).
    ``window``: a checked sliding window ``(left, right)`` or None (``plan_blocks``).
    """
    b, hq, sq, d = q.shape
    cd = acc_dtype(q.dtype)
    fresh = out is None  # then a query run's first block is copied in, not merged
    if fresh:  # stored [b, s, h, d]: the caller's transpose back is free
        out = zeros_public((b, hq, sq, v.size(-1)), cd, q.device)
        lse = torch.full((b, hq, sq), NEG_INF, dtype=cd, device=q.device)
    seen = None
    for blk in plan_blocks(q_runs, k_runs, causal, window=window):
        blk_causal, mask = block_mask(blk, kpm, q.device)
        o, lb = block_attention(q[:, :, blk.q], k[:, :, blk.k], v[:, :, blk.k], scale=scale,
                                causal=blk_causal, mask=mask, backend=backend)
        if fresh and blk.q != seen:
            out[:, :, blk.q].copy_(o)
            lse[:, :, blk.q].copy_(lb)
        else:
            merge_(out[:, :, blk.q], lse[:, :, blk.q], o, lb)
        seen = blk.q
        del o, lb
    return out, lse


def zeros_public(x, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Zeros shaped like the ``[b, h, s, d]`` view ``x`` (or a shape) but stored as
    ``[b, s, h, d]`` (the public layout): outputs and gradients handed back to autograd or sent
    home need no copy."""
    b, h, s, d = x if isinstance(x, tuple) else x.shape
    device = x.device if device is None else device
    return torch.zeros(b, s, h, d, dtype=dtype, device=device).transpose(1, 2)


def attend_backward(dout, q, q_runs, k, v, k_runs, out, lse, *, scale, causal, kpm=None,
                    backend="auto", dq=None, dk=None, dv=None, window=None):
    """Accumulate the gradients of ``attend`` into ``dq, dk, dv`` (created when None).

    ``out``/``lse`` are the rows' final values. Accumulators use the accumulation dtype.
    When ``dk``/``dv`` are not given and one block covers every key, the kernel's own dK/dV
    are returned as they are (no zero-filled accumulator beside them: less peak memory).
    Otherwise fully visible key runs are not joined, so the kernel's transient dK/dV are one
    run's, not the joined range's.
    """
    cd = acc_dtype(q.dtype)
    blocks = plan_blocks(q_runs, k_runs, causal, window=window)
    whole = (dk is None and dv is None and len(blocks) == 1
             and blocks[0].k == slice(0, k.size(2)))
    if not whole:  # accumulating: one key run's kernel gradients alive at a time
        blocks = plan_blocks(q_runs, k_runs, causal, join_keys=False, window=window)
    dq = zeros_public(q, cd) if dq is None else dq
    if not whole:
        dk = zeros_public(k, cd) if dk is None else dk
        dv = zeros_public(v, cd) if dv is None else dv
    for blk in blocks:
        blk_causal, mask = block_mask(blk, kpm, q.device)
        g = block_attention_backward(
            dout[:, :, blk.q], q[:, :, blk.q], k[:, :, blk.k], v[:, :, blk.k],
            out[:, :, blk.q], lse[:, :, blk.q], scale=scale, causal=blk_causal, mask=mask,
            backend=backend)
        dq[:, :, blk.q] += g[0]
        if whole:
            return dq, g[1].to(cd), g[2].to(cd)
        dk[:, :, blk.k] += g[1]
        dv[:, :, blk.k] += g[2]
        del g  # before the next block's gradients exist: one set alive at a time
    if dk is None:  # no block at all
        dk, dv = zeros_public(k, cd), zeros_public(v, cd)
    return dq, dk, dv


def count_blocks(q_runs, k_runs, causal: bool, window=None) -> int:
    """How many kernel calls ``attend`` makes (0 means the pair is skipped)."""
    return len(plan_blocks(q_runs, k_runs, causal, window=window))


def visible_span(q_runs, k_runs, causal: bool, window=None):
    """``((q_lo, q_hi), (k_lo, k_hi))``: the local query rows and key columns that the visible
    blocks of ``q_runs`` against ``k_runs`` touch (``(0, 0)`` each when none). Pure: the
    methods and the cost model use it."""
    blocks = plan_blocks(q_runs, k_runs, causal, window=window)
    if not blocks:
        return (0, 0), (0, 0)
    return ((min(b.q.start for b in blocks), max(b.q.stop for b in blocks)),
            (min(b.k.start for b in blocks), max(b.k.stop for b in blocks)))


def kv_range(q_runs, k_runs, causal: bool, window=None) -> tuple[int, int]:
    """The local key range ``[lo, hi)`` of a K/V buffer that the visible blocks of ``q_runs``
    read (``(0, 0)`` when none): only that part of a shard travels (LightSeq, LSS), and only
    its dK/dV come home. A sliding window narrower than a shard sends the neighbour's last
    ``left`` keys; packed documents, the keys of the documents that cross."""
    return visible_span(q_runs, k_runs, causal, window)[1]


def _pair_ranges(runs_per_rank: tuple, causal: bool, window, local_len: int, axis: int):
    """``[i][j]`` = ``visible_span(...)[axis]`` of rank ``i``'s queries against rank ``j``'s
    keys, or None when the off-diagonal ranges add up to the whole shards (then
    point-to-point transfers of them move no less than the dense collectives)."""
    P = len(runs_per_rank)
    span = tuple(tuple(visible_span(qr, kr, causal, window)[axis] for kr in runs_per_rank)
                 for qr in runs_per_rank)
    if sum(hi - lo for i in range(P) for j in range(P) if i != j
           for lo, hi in (span[i][j],)) >= P * (P - 1) * local_len:
        return None
    return span


@lru_cache(maxsize=64)
def key_ranges(runs_per_rank: tuple, causal: bool, window, local_len: int):
    """``[i][j]`` = ``kv_range`` of rank ``i``'s queries against rank ``j``'s keys, or None
    when they add up to the whole shards (``_pair_ranges``). The rule behind LSS's sparse
    path (``lss._plan``) and its cost (``cost.lss_ranges``); cached, since every layer of a
    step asks it twice with the same runs."""
    return _pair_ranges(runs_per_rank, causal, window, local_len, 1)


@lru_cache(maxsize=64)
def query_ranges(runs_per_rank: tuple, causal: bool, window, local_len: int):
    """``[i][j]``: the local query rows ``[lo, hi)`` of rank ``i`` that see any of rank
    ``j``'s keys, or None when they add up to the whole shards (``_pair_ranges``). The rule
    behind MQSP's sparse path (``mqsp._plan``: only those rows travel to ``j``) and its cost
    (``cost.mqsp_ranges``)."""
    return _pair_ranges(runs_per_rank, causal, window, local_len, 0)


def rank_ranges(span, rank: int):
    """``(sources, sinks)`` of ``rank`` in an ``[i][j]`` range matrix (``key_ranges``,
    ``query_ranges``): ``[(j, lo, hi)]``, its row's ranges against the other ranks ``j``, and
    ``[(i, lo, hi)]``, its column's, the other ranks' against it; empty ranges left out."""
    others = [x for x in range(len(span)) if x != rank]
    return ([(j, lo, hi) for j in others for lo, hi in (span[rank][j],) if hi > lo],
            [(i, lo, hi) for i in others for lo, hi in (span[i][rank],) if hi > lo])


def cut_key_pad(pad, lo: int, hi: int):
    """A key padding (``KeyPad`` or None) for keys ``[lo, hi)`` of its buffer."""
    if pad is None:
        return None
    ranges = None if pad.ranges is None else tuple(
        (max(a, lo) - lo, min(b, hi) - lo) for a, b in pad.ranges if a < hi and lo < b)
    return None if ranges == () else KeyPad(pad.mask[:, lo:hi], ranges)


def sees_matrix(runs_per_rank, causal: bool, window=None) -> list[list[bool]]:
    """``[i][j]``: whether rank ``i``'s queries see any of rank ``j``'s keys (a non-empty
    block), from the ranks' position runs alone: the same on every rank, and the one rule
    behind RSA's ring length and the cost model's transfers."""
    return [[count_blocks(qr, kr, causal, window) > 0 for kr in runs_per_rank]
            for qr in runs_per_rank]


def ring_steps(sees) -> int:
    """Steps of a ring ``r -> r+1`` that brings every rank the chunks its queries see: rank
    ``j``'s chunk reaches rank ``i`` at step ``(i - j) mod P``."""
    P = len(sees)
    return 1 + max(((i - j) % P for i in range(P) for j in range(P) if sees[i][j]), default=0)
