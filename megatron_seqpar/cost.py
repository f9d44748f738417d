"""Analytic cost model: bytes sent, attention memory and FLOPs, per rank, per attention layer.

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
"""

from __future__ import annotations

from dataclasses import dataclass, field

METHODS = ("rsa", "mqsp", "lss", "lightseq")
BASELINES = ("ulysses", "ring", "allgather", "nosp")
ALL = METHODS + BASELINES
LAYOUTS = ("contiguous", "zigzag")
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
    mqsp_chunks: int = 1

    def __post_init__(self):
        for name in ("S", "P", "b", "hq", "hkv", "D", "mqsp_chunks"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.S % self.P:
            raise ValueError(f"S={self.S} is not a multiple of P={self.P}; pad the sequence")
        if self.hq % self.hkv:
            raise ValueError(f"hq={self.hq} is not a multiple of hkv={self.hkv}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {self.dtype!r}; use one of {tuple(DTYPE_BYTES)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; use one of {LAYOUTS}")

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
    flops_per_pair: int = field(init=False, default=0)

    def __post_init__(self):
        n = self.shape.P
        for name in ("sent_fwd", "sent_bwd", "recv_fwd", "recv_bwd", "act_bytes", "pairs"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} needs one entry per rank ({n})")
        object.__setattr__(self, "flops_per_pair", 4 * self.shape.D * self.shape.b * self.shape.hq)

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


def _positions(sh: AttnShape, r: int) -> list[tuple[int, int]]:
    """Global token runs ``(start, length)`` of rank ``r``."""
    if sh.layout == "contiguous" or sh.P == 1:
        return [(r * sh.s, sh.s)]
    c = sh.S // (2 * sh.P)
    return [(r * c, c), ((2 * sh.P - 1 - r) * c, c)]


def _pairs(sh: AttnShape, q_runs, k_runs) -> int:
    """Query-key pairs a kernel computes, skipping fully masked blocks (causal)."""
    total = 0
    for qs, ql in q_runs:
        for ks, kl in k_runs:
            if not sh.causal:
                total += ql * kl
            elif ks + kl - 1 <= qs:  # every key before every query
                total += ql * kl
            elif ks >= qs + ql:  # every key after every query: skipped
                continue
            elif ks == qs and kl == ql:
                total += _tri(ql)
            else:  # partial overlap: count exactly
                total += sum(max(0, min(ks + kl, q + 1) - ks) for q in range(qs, qs + ql))
    return total


def _needed_pairs(sh: AttnShape, r: int) -> int:
    """Pairs rank r's queries need against all keys."""
    return sum(_pairs(sh, _positions(sh, r), _positions(sh, j)) for j in range(sh.P))


def lightseq_schedule(P: int, r: int, balanced: bool) -> list[tuple[int, str, int]]:
    """Forward sends of rank ``r``: ``(step, what, peer)``, what in {"kv", "q", "out"}.

    Balanced (contiguous causal): at step ``t`` in ``1..P//2`` rank ``r`` pairs with
    ``(r+t) % P``: if ``r+t < P`` it sends its K/V there; otherwise it ships its Q there and that
    rank returns ``out`` and ``lse``. At ``t = P/2`` (even P) only ranks ``r < P/2`` send K/V and
    nobody ships Q. Unbalanced: own K/V to ``(r+t) % P`` for ``t = 1..P-1``.
    """
    sends = []
    if not balanced:
        return [(t, "kv", (r + t) % P) for t in range(1, P)]
    for t in range(1, P // 2 + 1):
        half = P % 2 == 0 and t == P // 2
        if r + t < P:
            sends.append((t, "kv", r + t))
        elif not half:
            sends.append((t, "q", (r + t) % P))
        owner = r - t + P  # the rank that ships its Q to r at this step
        if not half and r < t and owner < P:
            sends.append((t, "out", owner))
    return sends


# ----------------------------------------------------------------------------- methods
def _rsa(sh: AttnShape, r: int):
    P, KV, Q = sh.P, sh.kv_bytes, sh.q_bytes
    fwd = 2 * (P - 1) * KV  # K ring, then V ring
    bwd = 2 * (P - 1) * KV + 2 * (P - 1) * KV  # V and K rings again, dK/dV partials home
    scores = sh.b * sh.hq * sh.s * sh.S * sh.acc  # the method: full score rows
    act = 2 * scores + Q + sh.lse_bytes + 2 * KV + Q + 2 * KV
    return fwd, bwd, fwd, bwd, act, sh.s * sh.S


def _mqsp(sh: AttnShape, r: int):
    P, Q, m = sh.P, sh.q_bytes, sh.mqsp_chunks
    stats = sh.b * sh.hq * sh.S * 4  # fp32 row statistics of all S queries
    ar = 2 * (P - 1) * stats // P
    fwd = (P - 1) * Q + (P - 1) * Q * sh.acc // sh.e + 2 * ar  # Q gather, ctx RS, max+sum
    bwd = (P - 1) * Q + ar + (P - 1) * Q * sh.acc // sh.e  # dC gather, rowsum AR, dQ RS
    block = sh.b * sh.hq * (sh.S // m) * sh.s * sh.acc
    act = P * Q + 2 * block + P * Q * sh.acc // sh.e + stats + 2 * sh.kv_bytes
    pairs = sum(_pairs(sh, _positions(sh, j), _positions(sh, r)) for j in range(P))
    return fwd, bwd, fwd, bwd, act, pairs


def _lss(sh: AttnShape, r: int):
    P, KV = sh.P, sh.kv_bytes
    fwd = (P - 1) * 2 * KV  # one fused all-gather of packed [K, V]
    bwd = fwd + (P - 1) * 2 * KV * sh.acc // sh.e  # re-gather, fused reduce-scatter dK/dV
    act = 2 * P * 2 * KV + P * 2 * KV * sh.acc // sh.e + sh.q_bytes * sh.acc // sh.e
    return fwd, bwd, fwd, bwd, act, _needed_pairs(sh, r)


def _lightseq(sh: AttnShape, r: int):
    P, Q, KV, L = sh.P, sh.q_bytes, sh.kv_bytes, sh.lse_bytes
    balanced = sh.balance and sh.causal and sh.layout == "contiguous"
    sends = lightseq_schedule(P, r, balanced)
    recvs = [(t, w) for j in range(P) if j != r
             for t, w, peer in lightseq_schedule(P, j, balanced) if peer == r]
    size_f = {"kv": 2 * KV, "q": Q, "out": Q + L}
    # backward: K/V again and dK/dV home; Q-ship pairs send q, out, dout, lse and get dq back
    size_b_send = {"kv": 2 * KV, "q": 3 * Q + L, "out": Q}
    size_b_back = {"kv": 2 * KV, "q": Q, "out": 3 * Q + L}  # what the peer sends back
    fwd = sum(size_f[w] for _, w, _ in sends)
    rfwd = sum(size_f[w] for _, w in recvs)
    bwd = sum(size_b_send[w] for _, w, _ in sends)
    bwd += sum(size_b_back[w] for _, w in recvs if w == "kv")  # dK/dV to the K/V owner
    bwd += sum(Q for _, w in recvs if w == "q")  # helper returns dq
    rbwd = sum(size_b_send[w] for _, w in recvs if w != "out")
    rbwd += sum(2 * KV for _, w, _ in sends if w == "kv") + sum(Q for _, w, _ in sends if w == "q")
    act = 2 * (2 * KV) + 2 * (Q + L) + Q * sh.acc // sh.e + 2 * (2 * KV) * sh.acc // sh.e
    return fwd, bwd, rfwd, rbwd, act, _needed_pairs(sh, r)


def _ulysses(sh: AttnShape, r: int):
    P, Q, KV = sh.P, sh.q_bytes, sh.kv_bytes
    a2a = lambda n: (P - 1) * n // P
    fwd = a2a(Q) + 2 * a2a(KV) + a2a(Q)  # q, k, v in; out back
    bwd = a2a(Q) + a2a(Q) + 2 * a2a(KV)  # dout in; dq, dk, dv back
    # full sequence for hq/P heads: gathered q, k, v, out, lse, and their gradients
    act = 2 * (Q + 2 * KV) + 2 * Q + sh.lse_bytes + 2 * (Q + 2 * KV)
    pairs = (_pairs(AttnShape(S=sh.S, P=1, causal=sh.causal), [(0, sh.S)], [(0, sh.S)]) // P)
    return fwd, bwd, fwd, bwd, act, pairs


def _ring(sh: AttnShape, r: int):
    P, KV = sh.P, sh.kv_bytes
    fwd = (P - 1) * 2 * KV
    bwd = (P - 1) * 2 * KV + P * 2 * KV * sh.acc // sh.e  # K/V again; dK/dV travel P hops
    act = 3 * 2 * KV + sh.q_bytes * sh.acc // sh.e * 3 + sh.lse_bytes * 2 + 4 * KV * sh.acc // sh.e
    return fwd, bwd, fwd, bwd, act, _needed_pairs(sh, r)


def _allgather(sh: AttnShape, r: int):
    fwd, bwd, rf, rb, act, pairs = _lss(sh, r)
    return fwd, bwd, rf, rb, act, pairs


def _nosp(sh: AttnShape, r: int):
    act = sh.q_bytes * 2 + sh.lse_bytes + 2 * sh.kv_bytes
    return 0, 0, 0, 0, act, _needed_pairs(sh, r)


_MODELS = {"rsa": _rsa, "mqsp": _mqsp, "lss": _lss, "lightseq": _lightseq,
           "ulysses": _ulysses, "ring": _ring, "allgather": _allgather, "nosp": _nosp}


def attention_cost(method: str, shape: AttnShape) -> AttentionCost:
    """Per-rank bytes, memory and computed pairs of one attention layer (fwd + bwd)."""
    if method not in _MODELS:
        raise ValueError(f"unknown method {method!r}; use one of {ALL}")
    if method == "nosp" and shape.P != 1:
        raise ValueError("nosp is one rank holding the whole sequence: use P=1")
    if method == "ulysses" and shape.hkv % shape.P:
        raise ValueError(f"ulysses splits heads: hkv={shape.hkv} must be a multiple of P")
    rows = [_MODELS[method](shape, r) for r in range(shape.P)]
    cols = list(zip(*rows))
    return AttentionCost(method, shape, *(tuple(int(x) for x in c) for c in cols))
