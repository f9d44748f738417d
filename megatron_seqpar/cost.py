"""Analytic cost model: bytes sent, attention memory and FLOPs, per rank, per attention layer
(a whole model's layers, for the planner: ``megatron_seqpar.model_cost``).

``attention_cost(method, shape)`` returns an ``AttentionCost`` for one attention layer's forward
and backward on every rank of the sequence group. Methods: the four of the package (``rsa``,
``mqsp``, ``lss``, ``lightseq``) and the baselines ``ulysses`` (DeepSpeed all-to-all over
heads), ``ring`` (PyTorch context-parallel ring), ``allgather`` (naive all-gather of K/V) and
``nosp`` (one rank holds the whole sequence).

Byte convention (the same as ``megatron_seqpar.comm.count_traffic``): a p2p transfer counts
the bytes of the tensors sent; an all-gather of ``n`` bytes per rank sends ``(P-1)·n``; a
reduce-scatter of an ``N``-byte buffer ``(P-1)/P·N``; an all-reduce of ``N`` bytes
``2(P-1)/P·N``; an all-to-all of an ``N``-byte buffer ``(P-1)/P·N``. Received bytes follow the
same rule (for p2p they are what other ranks sent to this one).

Notation: ``s = S/P`` local tokens, ``Q = b·s·hq·D·e`` bytes of the local queries (``e`` the
element size), ``KV = b·s·hkv·D·e`` bytes of the local keys (values alike), ``L = b·hq·s·4``
bytes of the fp32 log-sum-exp of the local rows.

Memory (``act_bytes``) is the attention working set of one layer beyond its inputs ``q, k, v``
and the incoming gradient: what the op saves for backward plus the largest transient of its
forward or backward (receive buffers, score blocks, fp32 accumulators, gradients). FLOPs count
the two matmuls of the forward (``4·D`` per computed query-key pair and head) and five in the
backward (recomputed scores, ``dV``, ``dP``, ``dQ``, ``dK``).

Packed sequences (``AttnShape.cu_seqlens``, see ``packed_shape``): ranks hold the position runs
of ``megatron_seqpar.layouts`` and pairs of different sequences are never computed (the block
planner's rule), so per-rank FLOPs follow ``sum(L_i^2)`` of the sequences a rank touches.
Bytes: LightSeq leaves out every transfer whose block would be empty (its schedule's
``needed``), so a packed stream of short sequences sends less, RSA stops its rings after the
farthest chunk some rank needs (``rsa_steps``) with just the part of each chunk the others
read (``rsa_ranges``), and LSS and MQSP send K/V (queries) only to
the ranks that need them, point to point instead of their collectives: MQSP just the query
rows that see a source's keys (``mqsp_ranges``), LSS just the key ranges a receiver reads
(``lss_ranges``).

Sliding windows (``AttnShape.window = (left, right)``, -1 = unbounded): pairs outside the band
are never computed (the block planner skips what the window leaves empty; its band-edge tiles
compute a little more, not counted), and the same rules make LightSeq, RSA and LSS talk to
the neighbours the window reaches only (MQSP's queries go to those neighbours too).

Two levels (``AttnShape.head_parallel = U > 1``): per rank, the inner level is the head
all-to-all of ``megatron_seqpar.headpar`` (Q, K, V in and O out in the forward, dO in and dQ,
dK, dV out in the backward, over ``U`` ranks; K/V heads repeated to ``kv_heads(hq, hkv, U)``),
and the outer level is the method on ``U·s`` tokens, ``hq/U`` query heads and ``h'/U`` K/V
heads over ``R = P/U`` ranks (``AttentionCost.outer``). ``AttentionCost.inner_sent`` holds the
inner bytes, ``sent`` both levels; memory adds the all-to-all buffers (``_two_level_act``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from megatron_seqpar.headpar import kv_heads, two_level_runs
from megatron_seqpar.kernels import (
    check_window,
    key_ranges,
    kv_range,
    query_ranges,
    rank_ranges,
    ring_steps,
    sees_matrix,
)
from megatron_seqpar.layouts import LAYOUTS, Run, check_cu_seqlens, local_runs
from megatron_seqpar.lightseq import schedule
from megatron_seqpar.mqsp import pick_micro_chunks
from megatron_seqpar.registry import METHODS
from megatron_seqpar.rsa import plan_rows, ring_ranges, row_elements

BASELINES = ("ulysses", "ring", "allgather", "nosp")
ALL = METHODS + BASELINES
DTYPE_BYTES = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class AttnShape:
    """One attention layer on one sequence group: global length ``S`` over ``P`` ranks.

    ``hq``/``hkv`` are the heads of this tensor-parallel rank (already divided by TP).
    ``dtype`` names the activation dtype; ``mqsp_chunks`` is MQSP's micro-query count ``m``.
    """

    S: int
    P: int
    b: int = 1
    hq: int = 8
    hkv: int = 8
    D: int = 64
    dtype: str = "fp32"
    causal: bool = True
    layout: str = "contiguous"
    balance: bool = True  # LightSeq's Q-shipping balance (contiguous causal only)
    mqsp_chunks: int | None = None  # None: as megatron_seqpar.mqsp picks it from the budget
    mqsp_budget_mb: float = 1024.0
    lss_regather: bool = True  # LSS gathers K/V again in the backward (its regather_kv)
    cu_seqlens: tuple[int, ...] | None = None  # packed stream boundaries [0, L1, ..., S]
    head_parallel: int = 1  # U: two levels (head all-to-all inside U ranks x method over P/U)
    window: tuple[int, int] | None = None  # sliding window (left, right), -1 = unbounded
    stacked: int = 1  # internal: a rank holds this many consecutive layout shards (outer level)

    def __post_init__(self):
        for name in ("S", "P", "b", "hq", "hkv", "D"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.S % self.P:
            raise ValueError(f"S={self.S} is not a multiple of P={self.P}; pad the sequence")
        if self.hq % self.hkv:
            raise ValueError(f"hq={self.hq} is not a multiple of hkv={self.hkv}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {self.dtype!r}; use one of {tuple(DTYPE_BYTES)}")
        if self.mqsp_chunks is not None and (self.mqsp_chunks < 1 or self.s % self.mqsp_chunks):
            raise ValueError(f"mqsp_chunks={self.mqsp_chunks} must divide s={self.s}")
        if self.layout == "zigzag" and self.P > 1 and self.s % 2:
            raise ValueError(f"zigzag needs an even local length, got s={self.s}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; use one of {LAYOUTS}")
        if self.layout == "balanced" and self.cu_seqlens is None:
            raise ValueError("the balanced layout places packed documents: give cu_seqlens")
        if self.cu_seqlens is not None:
            object.__setattr__(self, "cu_seqlens", check_cu_seqlens(
                tuple(int(x) for x in self.cu_seqlens), self.S, self.layout,
                self.P * self.stacked))
        if self.head_parallel < 1 or self.P % self.head_parallel or self.hq % self.head_parallel:
            raise ValueError(f"head_parallel={self.head_parallel} must divide P={self.P} and "
                             f"hq={self.hq}")
        object.__setattr__(self, "window", check_window(self.window))
        if self.head_parallel > 1 and self.stacked > 1:
            raise ValueError("stacked is the outer level of a two-level shape: use head_parallel")

    @property
    def s(self) -> int:
        return self.S // self.P

    @property
    def e(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def q_bytes(self) -> int:
        return self.b * self.s * self.hq * self.D * self.e

    @property
    def kv_bytes(self) -> int:
        return self.b * self.s * self.hkv * self.D * self.e

    @property
    def lse_bytes(self) -> int:
        return self.b * self.hq * self.s * 4

    @property
    def lse_acc(self) -> int:
        """Bytes of the local rows' lse in the accumulation dtype (how our ops ship it)."""
        return self.b * self.hq * self.s * self.acc

    @property
    def acc(self) -> int:
        """Bytes per element of fp32 accumulators (fp64 stays fp64)."""
        return max(4, self.e)


@dataclass(frozen=True)
class AttentionCost:
    """Per-rank costs of one attention layer (forward + backward), tuples indexed by rank."""

    method: str
    shape: AttnShape
    sent_fwd: tuple[int, ...]
    sent_bwd: tuple[int, ...]
    recv_fwd: tuple[int, ...]
    recv_bwd: tuple[int, ...]
    act_bytes: tuple[int, ...]
    pairs: tuple[int, ...]  # query-key pairs computed per head in the forward
    notes: str = ""
    inner_sent: tuple[int, ...] | None = None  # two levels: the head all-to-alls' share
    inner_recv: tuple[int, ...] | None = None
    outer: AttentionCost | None = None  # two levels: the method over the R outer ranks
    flops_per_pair: int = field(init=False, default=0)

    def __post_init__(self):
        n = self.shape.P
        for name in ("sent_fwd", "sent_bwd", "recv_fwd", "recv_bwd", "act_bytes", "pairs"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} needs one entry per rank ({n})")
        if self.inner_sent is None:
            object.__setattr__(self, "inner_sent", (0,) * n)
            object.__setattr__(self, "inner_recv", (0,) * n)
        sh = self.shape  # pairs are per head of the level that computes them (hq/U heads)
        object.__setattr__(self, "flops_per_pair",
                           4 * sh.D * sh.b * (sh.hq // sh.head_parallel))

    @property
    def outer_sent(self) -> tuple[int, ...]:
        """Bytes of the sequence-parallel method (all of them when ``head_parallel = 1``)."""
        return tuple(a - b for a, b in zip(self.sent, self.inner_sent))

    @property
    def sent(self) -> tuple[int, ...]:
        return tuple(a + b for a, b in zip(self.sent_fwd, self.sent_bwd))

    @property
    def recv(self) -> tuple[int, ...]:
        return tuple(a + b for a, b in zip(self.recv_fwd, self.recv_bwd))

    @property
    def max_sent(self) -> int:
        return max(self.sent)

    @property
    def max_act_bytes(self) -> int:
        return max(self.act_bytes)

    @property
    def flops_fwd(self) -> tuple[int, ...]:
        return tuple(p * self.flops_per_pair for p in self.pairs)

    @property
    def flops(self) -> tuple[int, ...]:
        """Forward + backward FLOPs (backward = 2.5x forward: five matmuls against two)."""
        return tuple(int(f * 3.5) for f in self.flops_fwd)


# ----------------------------------------------------------------------------- helpers
def _tri(n: int) -> int:
    """Causal pairs of an ``n``-token diagonal block (the diagonal included)."""
    return n * (n + 1) // 2


def _clamped_sum(n: int, cap: int) -> int:
    """``sum(min(x, cap) for x in range(1, n + 1))`` in closed form (0 for ``n <= 0``)."""
    if n <= 0:
        return 0
    if n <= cap:
        return n * (n + 1) // 2
    return cap * (cap + 1) // 2 + (n - cap) * cap


def _positions(sh: AttnShape, r: int) -> tuple[Run, ...]:
    """Position runs of (method) rank ``r``: ``megatron_seqpar.layouts``' definition, packed
    sequences included; on the outer level of two levels, the ``stacked`` consecutive CP
    ranks' runs concatenated (``headpar.two_level_runs``)."""
    if sh.stacked > 1:
        return two_level_runs(sh.layout, r, sh.P * sh.stacked, sh.stacked, sh.s, sh.cu_seqlens)
    return local_runs(sh.layout, r, sh.P, sh.s, sh.cu_seqlens)


def _positive_sum(a: int, b: int, lo: int, hi: int) -> int:
    """``sum(max(0, a*i + b) for i in range(lo, hi))`` for a slope ``a`` in {-1, 0, 1}."""
    if a == 1:
        lo = max(lo, 1 - b)
    elif a == -1:
        hi = min(hi, b)
    elif b <= 0:
        return 0
    if lo >= hi:
        return 0
    return (2 * b + a * (lo + hi - 1)) * (hi - lo) // 2


def _window_pairs(sh: AttnShape, qr: Run, kr: Run) -> int:
    """Visible pairs of query run ``qr`` and key run ``kr`` (same sequence) under the window:
    query ``i`` sees keys ``[max(ks, i - L), min(ke - 1, i + R)]`` (``R = 0`` when causal,
    unbounded sides infinite), a clamped piecewise-linear count summed in closed form over the
    stretches between the two bounds' breakpoints (the planner calls this for 100K-token
    shards)."""
    left, right = sh.window
    big = 1 << 62
    L = left if left >= 0 else big
    R = 0 if sh.causal else (right if right >= 0 else big)
    ks, ke = kr.start, kr.end
    cuts = sorted({qr.start, qr.end, *(x for x in (ks + L + 1, ke - R)
                                       if qr.start < x < qr.end)})
    total = 0
    for a, b in zip(cuts, cuts[1:]):
        lo_slope, hi_slope = int(a > ks + L), int(a <= ke - 1 - R)
        count = min(ke - 1, a + R) - max(ks, a - L) + 1  # at i = a
        slope = hi_slope - lo_slope
        total += _positive_sum(slope, count - slope * a, a, b)
    return total


def _pairs(sh: AttnShape, q_runs, k_runs) -> int:
    """Query-key pairs a kernel computes: runs of different packed sequences never meet, and
    fully masked (causal or out-of-window) blocks are skipped."""
    total = 0
    if sh.window is not None:
        return sum(_window_pairs(sh, qr, kr) for qr in q_runs for kr in k_runs
                   if kr.doc == qr.doc)
    for qr in q_runs:
        qs, ql = qr.start, qr.length
        for kr in k_runs:
            ks, kl = kr.start, kr.length
            if kr.doc != qr.doc:
                continue
            if not sh.causal:
                total += ql * kl
            elif ks + kl - 1 <= qs:  # every key before every query
                total += ql * kl
            elif ks >= qs + ql:  # every key after every query: skipped
                continue
            elif ks == qs and kl == ql:
                total += _tri(ql)
            else:  # partial overlap: query q sees clamp(q + 1 - ks, 0, kl) keys
                total += _clamped_sum(qs + ql - ks, kl) - _clamped_sum(qs - ks, kl)
    return total


def _needed_pairs(sh: AttnShape, r: int) -> int:
    """Pairs rank r's queries need against all keys."""
    return sum(_pairs(sh, _positions(sh, r), _positions(sh, j)) for j in range(sh.P))


def _all_pairs(sh: AttnShape) -> int:
    """Pairs of the whole stream (one rank, every sequence on its own)."""
    cu = sh.cu_seqlens or (0, sh.S)
    if sh.window is not None:
        return sum(_window_pairs(sh, Run(0, a, b - a), Run(0, a, b - a))
                   for a, b in zip(cu, cu[1:]))
    return sum(_tri(b - a) if sh.causal else (b - a) ** 2 for a, b in zip(cu, cu[1:]))


# ----------------------------------------------------------------------------- methods
# Each model returns (sent_fwd, sent_bwd, recv_fwd, recv_bwd, act_bytes, pairs) for rank r.
# ``a`` is the accumulation element size; partial outputs, lse and gradients travel in it.
def _run_tokens(sh: AttnShape) -> int:
    """Tokens in one of a rank's position runs: half the local ones when zigzag (P > 1)."""
    return sh.s // (2 if sh.layout == "zigzag" and sh.P > 1 else 1)


def _kernel_scratch(sh: AttnShape, rows: int) -> int:
    """The fused kernel's own working buffer in a backward call: one more gradient-sized
    tensor of the block's larger side (measured: a call on ``n``-row blocks peaks at its three
    gradients plus one ``n``-row tensor), in the accumulation dtype."""
    return sh.b * rows * sh.hq * sh.D * sh.acc


def _wrapper(sh: AttnShape) -> int:
    """What the shared autograd wrapper holds during the backward: the output and lse
    (accumulation dtype) and dq, dk, dv (accumulation dtype); q, k, v and the incoming
    gradient are used through ``[b,h,s,d]`` views, without copies."""
    Q, KV, a, e = sh.q_bytes, sh.kv_bytes, sh.acc, sh.e
    return Q * a // e + sh.lse_acc + (Q + 2 * KV) * a // e


def rsa_steps(sh: AttnShape) -> int:
    """RSA's ring steps (``rsa._ring_steps``): rank ``j``'s chunk reaches rank ``i`` at step
    ``(i - j) mod P``; with packed sequences or a window the rings stop after the farthest
    chunk some rank needs, else ``P``."""
    if sh.window is None and sh.cu_seqlens is None:
        return sh.P
    return ring_steps(_sees(sh))


def rsa_ranges(sh: AttnShape) -> tuple[int, ...]:
    """Per rank, the tokens of its chunk that travel RSA's rings (``rsa.ring_ranges``: what
    the other ranks read; the whole chunk without a window or packing)."""
    return tuple(hi - lo for lo, hi in ring_ranges(_span(sh, key_ranges), sh.P, sh.s))


def _rsa(sh: AttnShape, r: int):
    P, a, e = sh.P, sh.acc, sh.e
    steps = rsa_steps(sh)
    n = steps - 1  # transfers per ring
    width = rsa_ranges(sh)
    tok = sh.kv_bytes // sh.s  # one token's K (or V)
    # step t forwards chunk (r - t)'s range and receives chunk (r - t - 1)'s, in the K ring,
    # then the V ring; the backward's rings again, and at step t >= 1 the dV, dK partials of
    # chunk (r - t)'s range go home while this rank's own range's partials come back
    out_tok = sum(width[(r - t) % P] for t in range(n))
    in_tok = sum(width[(r - t - 1) % P] for t in range(n))
    home = sum(width[(r - t) % P] for t in range(1, steps))
    fwd, fwd_recv = 2 * out_tok * tok, 2 * in_tok * tok
    bwd = fwd + 2 * home * tok * a // e
    bwd_recv = fwd_recv + 2 * n * width[r] * tok * a // e
    # the method: its score rows, kept for the backward; the needed blocks only (rsa.plan_rows).
    # On CPU (keep_rows) the buffer is also kept across calls (hostmem.BufferPool): the same
    # bytes, still counted here; a model of L layers holds L of them at the end of its forward
    # with or without the pool, and with it they stay resident between steps
    plans = plan_rows(_positions(sh, r), [_positions(sh, j) for j in range(sh.P)], sh.causal,
                      sh.window)
    probs = sh.b * sh.hq * row_elements(plans) * a
    # the backward's K ring, beside the rows and the wrapper's tensors: dO, the scaled Q and
    # a block's rescaled Q or dQ product (accumulation dtype; the per-block row factors are
    # small), the ring's copy of its own range and two receive buffers of the widest range,
    # and the dK partials sent and received: each step's pair is settled one step later, so
    # at most two pairs are alive (rsa._ring)
    wide = max(width) * tok
    act = (probs + _wrapper(sh) + 3 * sh.q_bytes * a // e + width[r] * tok + 2 * wide
           + min(2 * n, 4) * wide * a // e)
    # computed: only the needed blocks of the rows (its diagonal row tiles also compute up to
    # t(t-1)/2 masked entries per tile of t rows: left out)
    return fwd, bwd, fwd_recv, bwd_recv, act, _needed_pairs(sh, r)


def mqsp_chunks(sh: AttnShape) -> int:
    """MQSP's micro-query count: ``mqsp_chunks`` or the choice of
    ``megatron_seqpar.mqsp.pick_micro_chunks`` for ``mqsp_budget_mb``."""
    if sh.mqsp_chunks is not None:
        return sh.mqsp_chunks

    return pick_micro_chunks(s=sh.s, world_size=sh.P, row_bytes=sh.s * sh.b * sh.hq * sh.acc,
                             budget_bytes=sh.mqsp_budget_mb * 2**20)


def _mqsp(sh: AttnShape, r: int):
    P, a, e = sh.P, sh.acc, sh.e
    m = mqsp_chunks(sh)
    c = sh.s // m
    qc = sh.b * sh.hq * c * sh.D  # elements of one rank's micro-chunk of Q
    stat = sh.b * sh.hq * P * c * a  # one micro-step's row statistics
    rs = lambda n: (P - 1) * n // P
    plan = mqsp_ranges(sh, r)
    if plan is not None:  # point to point (mqsp._sparse_forward / _sparse_backward)
        # over the m micro-steps a pair exchanges exactly the rows of its range
        n_out, n_in = sum(plan[0]), sum(plan[1])
        q_row, lse_row = sh.b * sh.hq * sh.D, sh.b * sh.hq * a  # one row's Q (elems), lse
        fwd = n_out * q_row * e + n_in * (q_row * a + lse_row)  # rows out; (o, lse) back
        fwd_recv = n_in * q_row * e + n_out * (q_row * a + lse_row)
        packed = (2 * q_row + 2 * sh.b * sh.hq) * a  # one row's [Q, dO, lse, δ]
        bwd = n_out * packed + n_in * q_row * a  # packed rows out; dQ partials back
        bwd_recv = n_in * packed + n_out * q_row * a
        run = _run_tokens(sh)
        # a micro-step holds its own c rows, at most c of each sink's and a copy of at most c
        # for each source (packed with their dQ partials, or their (o, lse) in the forward);
        # the kernel's scratch
        rows = c + sum(min(c, n) for n in plan[1]) + sum(min(c, n) for n in plan[0])
        act = (_wrapper(sh) + rows * (packed + q_row * a) + 3 * qc * a
               + 2 * (sh.kv_bytes * run // sh.s) * a // e + _kernel_scratch(sh, max(c, run)))
        pairs = sum(_pairs(sh, _positions(sh, j), _positions(sh, r)) for j in range(P))
        return fwd, bwd, fwd_recv, bwd_recv, act, pairs
    fwd = m * ((P - 1) * qc * e + (P - 1) * stat + rs(P * qc * a))  # Q, lse gathers; ctx RS
    bwd = m * ((P - 1) * 2 * (qc + sh.b * sh.hq * c) * a + rs(P * qc * a))  # packed gather, dQ
    # the backward's micro-step holds the gathered [q, dO, lse, δ] rows of every rank and
    # their dQ partials (P·c rows, accumulation dtype, used in place), one kernel call's
    # stand-in for O (α·dO) and gradients (c rows of dQ; dK/dV of one key run: half the local
    # keys when zigzag), the reduce-scatter's c rows and the kernel's scratch; the score
    # block stays in the kernel
    lc = sh.b * sh.hq * c * a  # one rank's lse rows
    run = _run_tokens(sh)
    key_run = sh.kv_bytes * run // sh.s
    act = (_wrapper(sh) + P * (3 * qc * a + 2 * lc) + 3 * qc * a
           + 2 * key_run * a // e + _kernel_scratch(sh, max(c, run)))
    pairs = sum(_pairs(sh, _positions(sh, j), _positions(sh, r)) for j in range(P))
    return fwd, bwd, fwd, bwd, act, pairs


def mqsp_ranges(sh: AttnShape, r: int) -> tuple[list[int], list[int]] | None:
    """``mqsp._plan`` in rows: None in the dense case (its gathers), else the lengths of the
    row ranges rank ``r`` sends (one per source) and receives (one per sink), from
    ``kernels.query_ranges``, the rule MQSP itself follows."""
    return _ranges(sh, r, query_ranges)


def _sees(sh: AttnShape) -> list[list[bool]]:
    """``kernels.sees_matrix`` of the shape's ranks: the rule the methods use."""
    return sees_matrix([_positions(sh, j) for j in range(sh.P)], sh.causal, sh.window)


def lss_ranges(sh: AttnShape, r: int) -> tuple[list[int], list[int]] | None:
    """``lss._plan`` in tokens: None in the dense case (all-gather, reduce-scatter), else the
    lengths of the key ranges rank ``r`` receives (one per source) and sends (one per sink),
    from ``kernels.key_ranges``, the rule LSS itself follows."""
    return _ranges(sh, r, key_ranges)


def _span(sh: AttnShape, rule):
    """``Setup.pair_ranges`` of the shape's ranks: ``rule``'s ``[i][j]`` range matrix, or
    None (dense)."""
    if sh.window is None and sh.cu_seqlens is None:
        return None
    return rule(tuple(_positions(sh, j) for j in range(sh.P)), sh.causal, sh.window, sh.s)


def _ranges(sh: AttnShape, r: int, rule) -> tuple[list[int], list[int]] | None:
    """``kernels.rank_ranges`` of rank ``r`` in ``rule``'s matrix, as lengths; None when the
    rule says dense."""
    span = _span(sh, rule)
    if span is None:
        return None
    return tuple([hi - lo for _, lo, hi in side] for side in rank_ranges(span, r))


def _lss(sh: AttnShape, r: int):
    P, KV, a, e = sh.P, sh.kv_bytes, sh.acc, sh.e
    plan = lss_ranges(sh, r)
    tok = 2 * KV // sh.s  # one token's K and V
    if plan is not None:
        # the key ranges the receivers' blocks read, point to point (again in the backward
        # when lss_regather), and their dK/dV partials home in the accumulation dtype
        got, given = sum(plan[0]) * tok, sum(plan[1]) * tok
        fwd, fwd_recv = given, got
        bwd = got * a // e + given * sh.lss_regather
        bwd_recv = given * a // e + got * sh.lss_regather
        # the received ranges, this rank's dQ/dK/dV, the partials sent, those received, the
        # kernel's scratch
        act = (_wrapper(sh) + got + 2 * KV * a // e + (got + given) * a // e
               + _kernel_scratch(sh, _run_tokens(sh)))
        return fwd, bwd, fwd_recv, bwd_recv, act, _needed_pairs(sh, r)
    # one fused all-gather of packed [K, V]; one fused reduce-scatter of packed [dK, dV]
    # after gathering K/V again (lss_regather)
    fwd = fwd_recv = (P - 1) * 2 * KV
    bwd = bwd_recv = (P - 1) * 2 * KV * a // e + fwd * sh.lss_regather
    # the gathered K/V, in place (2·S); the backward recycles a regathered buffer of the
    # accumulation dtype as the dK/dV send buffer, else holds one beside it; then either one
    # segment's dK/dV with a block's gradients, or the reduce-scatter's receive buffer (2·s
    # either way); the kernel's scratch
    recycled = sh.lss_regather and a == e
    act = (_wrapper(sh) + P * 2 * KV + (0 if recycled else P * 2 * KV * a // e)
           + 2 * KV * a // e + _kernel_scratch(sh, _run_tokens(sh)))
    return fwd, bwd, fwd_recv, bwd_recv, act, _needed_pairs(sh, r)


def _lightseq(sh: AttnShape, r: int):
    Q, KV, a, e, L = sh.q_bytes, sh.kv_bytes, sh.acc, sh.e, sh.lse_acc
    steps = lightseq_steps(sh, r)
    runs = [_positions(sh, j) for j in range(sh.P)]

    def part(i, j):  # a K/V step moves the part of the shard that the receiver reads
        lo, hi = kv_range(runs[i], runs[j], sh.causal, sh.window)
        return (hi - lo) / sh.s

    f_send = {"kv_to": 2 * KV, "q_to": Q, "q_from": Q * a // e + L}
    f_recv = {"kv_from": 2 * KV, "q_from": Q, "q_to": Q * a // e + L}
    b_send = {"kv_to": 2 * KV, "q_to": 3 * Q + L, "kv_from": 2 * KV * a // e,
              "q_from": Q * a // e}
    b_recv = {"kv_from": 2 * KV, "q_from": 3 * Q + L, "kv_to": 2 * KV * a // e,
              "q_to": Q * a // e}
    share = {"kv_to": lambda p: part(p, r), "kv_from": lambda p: part(r, p)}
    tot = lambda table: sum(round(table[k] * share[k](p)) if k in share else table.get(k, 0)
                            for st in steps for k, p in st.items() if k in table)
    n_kv = min(2, sum("kv_from" in st for st in steps))  # K/V receive slots
    n_q = min(2, sum("q_from" in st for st in steps))  # shipped [q, dO, O, lse] slots
    # the op works on views of q, k, v, dO (no copies); during the backward it holds out and
    # lse, dq/dk/dv (accumulation dtype), the K/V receive slots, the kernel's block gradients
    # with the dK/dV partial on its way home, the Q-shipping slots, and the fused kernel's
    # scratch (one local-sized tensor: the own block is one call)
    # ... and, from step 2 on, the receive buffers of returns coming back: a step's returns
    # are settled before the next step computes, and returned dK/dV land in the step's own
    # K/V slot when it has one of the same dtype (fp32), so only returned dQ and dK/dV
    # without such a slot keep a buffer (made at first use)
    ret = ((2 * KV * a // e) * any("kv_to" in st and ("kv_from" not in st or a != e)
                                   for st in steps[:-1])
           + (Q * a // e) * any("q_to" in st for st in steps[:-1]))
    # (a shipped query block also needs its own dQ accumulator)
    act = (_wrapper(sh) + n_kv * 2 * KV + (Q + 2 * KV) * a // e * (n_kv + n_q > 0)
           + n_q * (3 * Q + L) + Q * a // e * (n_q > 0) + ret + _kernel_scratch(sh, sh.s))
    pr = lambda i, j: _pairs(sh, _positions(sh, i), _positions(sh, j))
    pairs = pr(r, r) + sum((pr(r, st["kv_from"]) if "kv_from" in st else 0)
                           + (pr(st["q_from"], r) if "q_from" in st else 0) for st in steps)
    return tot(f_send), tot(b_send), tot(f_recv), tot(b_recv), act, pairs


def lightseq_steps(sh: AttnShape, r: int) -> list[dict[str, int]]:
    """Rank ``r``'s steps after the local block, each ``{role: peer}`` for the roles it plays
    (``kv_to``, ``kv_from``, ``q_to``, ``q_from``): ``lightseq.schedule`` itself, with the
    blocks a role would compute taken from the shape's runs (a role whose block is empty is
    left out on both sides, as the op leaves out its transfer)."""
    runs = [_positions(sh, j) for j in range(sh.P)]
    steps = schedule(sh.P, r, causal=sh.causal, layout=sh.layout, balance=sh.balance,
                     needed=lambda i, j: _pairs(sh, runs[i], runs[j]) > 0)
    return [{role: peer for role, peer in st._asdict().items() if peer is not None}
            for st in steps]


def _ulysses(sh: AttnShape, r: int):
    P, Q, KV = sh.P, sh.q_bytes, sh.kv_bytes
    a2a = lambda n: (P - 1) * n // P
    fwd = a2a(Q) + 2 * a2a(KV) + a2a(Q)  # q, k, v in; out back
    bwd = a2a(Q) + a2a(Q) + 2 * a2a(KV)  # dout in; dq, dk, dv back
    # whole sequence for hq/P heads (the same bytes as a shard): q, k, v, out and lse kept,
    # dout, dq, dk, dv and the all-to-all buffers in the backward
    act = 2 * (Q + 2 * KV) + 4 * Q + sh.lse_bytes
    return fwd, bwd, fwd, bwd, act, _all_pairs(sh) // P


def _ring(sh: AttnShape, r: int):
    P, KV, a, e = sh.P, sh.kv_bytes, sh.acc, sh.e
    fwd = (P - 1) * 2 * KV
    bwd = (P - 1) * 2 * KV + P * 2 * KV * a // e  # K/V again; dK/dV travel P hops
    Q = sh.q_bytes
    act = 3 * 2 * KV + 3 * Q * a // e + 2 * sh.lse_bytes + 4 * 2 * KV * a // e + Q
    return fwd, bwd, fwd, bwd, act, _needed_pairs(sh, r)


def _allgather(sh: AttnShape, r: int):
    P, KV, Q = sh.P, sh.kv_bytes, sh.q_bytes
    fwd = (P - 1) * 2 * KV
    bwd = (P - 1) * 2 * KV  # reduce-scatter of [dK; dV] for the whole sequence
    act = 6 * P * 2 * KV + 6 * Q + sh.lse_bytes
    return fwd, bwd, fwd, bwd, act, _needed_pairs(sh, r)


def _nosp(sh: AttnShape, r: int):
    act = sh.q_bytes * 2 + sh.lse_bytes + 2 * sh.kv_bytes
    return 0, 0, 0, 0, act, _needed_pairs(sh, r)


_MODELS = {"rsa": _rsa, "mqsp": _mqsp, "lss": _lss, "lightseq": _lightseq,
           "ulysses": _ulysses, "ring": _ring, "allgather": _allgather, "nosp": _nosp}


def attention_cost(method: str, shape: AttnShape) -> AttentionCost:
    """Per-rank bytes, memory and computed pairs of one attention layer (fwd + bwd); with
    ``shape.head_parallel > 1`` both levels (``two_level_cost``)."""
    if method not in _MODELS:
        raise ValueError(f"unknown method {method!r}; use one of {ALL}")
    if method == "nosp" and shape.P != 1:
        raise ValueError("nosp is one rank holding the whole sequence: use P=1")
    if method == "ulysses" and shape.hkv % shape.P:
        raise ValueError(f"ulysses splits heads: hkv={shape.hkv} must be a multiple of P")
    if shape.head_parallel > 1:
        return two_level_cost(method, shape)
    rows = [_MODELS[method](shape, r) for r in range(shape.P)]
    cols = list(zip(*rows))
    return AttentionCost(method, shape, *(tuple(int(x) for x in c) for c in cols))


def outer_shape(sh: AttnShape) -> AttnShape:
    """The outer level of a two-level shape: ``R = P/U`` ranks, each holding the ``U·s`` tokens
    of ``U`` consecutive CP ranks, ``hq/U`` query and ``h'/U`` K/V heads
    (``h' = headpar.kv_heads(hq, hkv, U)``)."""
    U = sh.head_parallel
    return replace(sh, P=sh.P // U, hq=sh.hq // U, hkv=kv_heads(sh.hq, sh.hkv, U) // U,
                   head_parallel=1, stacked=U)


def inner_bytes(sh: AttnShape) -> tuple[int, int]:
    """(forward, backward) bytes one rank sends (and receives) in the head all-to-alls:
    forward ONE all-to-all of the packed ``[Q, K, V]`` (K/V repeated to ``h'`` heads) and ONE of
    the output, input dtype; backward ONE of dO (input dtype) and ONE of the packed
    ``[dQ, dK, dV]`` (accumulation dtype). An all-to-all of ``N`` bytes sends ``(U-1)·N/U``.
    (A key padding mask adds ``(U-1)·b·s`` bytes of all-gather: not modelled.)"""
    U, e, a = sh.head_parallel, sh.e, sh.acc
    if U == 1:
        return 0, 0
    qkv = sh.b * sh.s * (sh.hq + 2 * kv_heads(sh.hq, sh.hkv, U)) * sh.D
    o = sh.b * sh.s * sh.hq * sh.D
    a2a = lambda n: (U - 1) * n // U
    return a2a(qkv * e) + a2a(o * e), a2a(o * e) + a2a(qkv * a)


def _two_level_act(sh: AttnShape, outer_act: int, method: str) -> int:
    """Working set of one two-level call. The method's inputs are the received ``[Q, K', V']``
    buffer (kept for the backward, input dtype), its incoming gradient the received dO, and
    the caller's output a new tensor (input dtype), all beside the outer method's own working
    set; LightSeq's backward also holds dense copies of its strided K'/V' views (its sends)
    and two of its Q view (its shipping template, made even when no step ships). At the end of
    the backward the method's ``[dQ, dK', dV']`` (accumulation dtype) exist four times: the
    method's, the all-to-all's send and receive buffers and the regrouped copies, beside the
    saved inputs, output, lse and dO. Measured (CPU, fp32, P=4): see docs/two_level.md."""
    U, e, a = sh.head_parallel, sh.e, sh.acc
    qkv = sh.b * sh.s * (sh.hq + 2 * kv_heads(sh.hq, sh.hkv, U)) * sh.D
    Q = sh.q_bytes
    during = outer_act + qkv * e + 2 * Q
    if method == "lightseq":
        kv = sh.b * sh.s * kv_heads(sh.hq, sh.hkv, U) * sh.D * e
        during += 2 * kv + 2 * Q
    end = qkv * e + 2 * Q + Q * a // e + sh.lse_acc + 4 * qkv * a
    return max(during, end)


def two_level_cost(method: str, sh: AttnShape) -> AttentionCost:
    """Both levels per CP rank ``c = jU + u``: the inner all-to-alls (the same on every rank)
    plus outer rank ``j``'s share of the method (``outer_shape``)."""
    if method not in METHODS + ("ring",):
        raise ValueError(f"two levels are modelled for {METHODS + ('ring',)}, not {method!r}")
    U = sh.head_parallel
    out = attention_cost(method, outer_shape(sh))
    fwd, bwd = inner_bytes(sh)
    j = [c // U for c in range(sh.P)]
    pick = lambda xs, add=0: tuple(xs[i] + add for i in j)
    act = tuple(_two_level_act(sh, out.act_bytes[i], method) for i in j)
    return AttentionCost(method, sh, pick(out.sent_fwd, fwd), pick(out.sent_bwd, bwd),
                         pick(out.recv_fwd, fwd), pick(out.recv_bwd, bwd), act, pick(out.pairs),
                         inner_sent=(fwd + bwd,) * sh.P, inner_recv=(fwd + bwd,) * sh.P,
                         outer=out)


def packed_shape(lengths, P: int, **kw) -> AttnShape:
    """An ``AttnShape`` for a packed stream of sequences of the given lengths over ``P`` ranks
    (``cu_seqlens`` = their running sums; ``S`` = their total)."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return AttnShape(S=cu[-1], P=P, cu_seqlens=tuple(cu), **kw)


def packed_flop_ratio(lengths, causal: bool = True) -> float:
    """Predicted compute of a packed stream against the same ``S`` unpacked: ``sum(L_i^2)/S^2``
    (the exact pair counts when causal: ``sum L_i(L_i+1) / S(S+1)``)."""
    S = sum(lengths)
    if not causal:
        return sum(n * n for n in lengths) / S**2
    return sum(n * (n + 1) for n in lengths) / (S * (S + 1))
