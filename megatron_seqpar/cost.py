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
    mqsp_chunks: int | None = None  # None: as megatron_seqpar.mqsp picks it from the budget
    mqsp_budget_mb: float = 256.0
    lss_regather: bool = True  # LSS gathers K/V again in the backward (its regather_kv)

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


def _clamped_sum(n: int, cap: int) -> int:
    """``sum(min(x, cap) for x in range(1, n + 1))`` in closed form (0 for ``n <= 0``)."""
    if n <= 0:
        return 0
    if n <= cap:
        return n * (n + 1) // 2
    return cap * (cap + 1) // 2 + (n - cap) * cap


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
            else:  # partial overlap: query q sees clamp(q + 1 - ks, 0, kl) keys
                total += _clamped_sum(qs + ql - ks, kl) - _clamped_sum(qs - ks, kl)
    return total


def _needed_pairs(sh: AttnShape, r: int) -> int:
    """Pairs rank r's queries need against all keys."""
    return sum(_pairs(sh, _positions(sh, r), _positions(sh, j)) for j in range(sh.P))


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


def _rsa(sh: AttnShape, r: int):
    P, KV, a, e = sh.P, sh.kv_bytes, sh.acc, sh.e
    fwd = 2 * (P - 1) * KV  # K ring, then V ring
    bwd = 2 * (P - 1) * KV + 2 * (P - 1) * KV * a // e  # V and K rings; dV, dK partials home
    probs = sh.b * sh.hq * sh.s * sh.S * a  # the method: full score rows, kept for backward
    # forward: logsumexp's temporary of the same size as the rows; backward: the rows beside
    # the wrapper's tensors and a dK/dV partial
    act = probs + max(probs, _wrapper(sh) + 2 * KV * a // e)
    return fwd, bwd, fwd, bwd, act, sh.s * sh.S


def mqsp_chunks(sh: AttnShape) -> int:
    """MQSP's micro-query count: ``mqsp_chunks`` or the choice of
    ``megatron_seqpar.mqsp.pick_micro_chunks`` for ``mqsp_budget_mb``."""
    if sh.mqsp_chunks is not None:
        return sh.mqsp_chunks
    from megatron_seqpar.mqsp import pick_micro_chunks

    return pick_micro_chunks(s=sh.s, world_size=sh.P, row_bytes=sh.s * sh.b * sh.hq * sh.acc,
                             budget_bytes=sh.mqsp_budget_mb * 2**20)


def _mqsp(sh: AttnShape, r: int):
    P, a, e = sh.P, sh.acc, sh.e
    m = mqsp_chunks(sh)
    c = sh.s // m
    qc = sh.b * sh.hq * c * sh.D  # elements of one rank's micro-chunk of Q
    stat = sh.b * sh.hq * P * c * a  # one micro-step's row statistics
    rs = lambda n: (P - 1) * n // P  # noqa: E731
    ar = lambda n: 2 * (P - 1) * n // P  # noqa: E731
    fwd = m * ((P - 1) * qc * e + 2 * ar(stat) + rs(P * qc * a))  # Q gather, max+sum, ctx RS
    bwd = m * ((P - 1) * (3 * qc + sh.b * sh.hq * c) * a + rs(P * qc * a))  # packed gather, dQ
    # the backward's micro-step holds the gathered [q, dO, O, lse] rows of every rank and
    # their dQ partials (P·c rows, accumulation dtype, used in place), one kernel call's
    # gradients (c rows of dQ; dK/dV of one key run: half the local keys when zigzag), the
    # reduce-scatter's c rows and the kernel's scratch; the score block stays in the kernel
    lc = sh.b * sh.hq * c * a  # one rank's lse rows
    run = _run_tokens(sh)
    key_run = sh.kv_bytes * run // sh.s
    act = (_wrapper(sh) + P * (4 * qc * a + lc) + 2 * qc * a
           + 2 * key_run * a // e + _kernel_scratch(sh, max(c, run)))
    pairs = sum(_pairs(sh, _positions(sh, j), _positions(sh, r)) for j in range(P))
    return fwd, bwd, fwd, bwd, act, pairs


def _lss(sh: AttnShape, r: int):
    P, KV, a, e = sh.P, sh.kv_bytes, sh.acc, sh.e
    fwd = (P - 1) * 2 * KV  # one fused all-gather of packed [K, V]
    # one fused reduce-scatter of packed [dK, dV], after gathering K/V again (lss_regather)
    bwd = (P - 1) * 2 * KV * a // e + fwd * sh.lss_regather
    # the gathered K/V, in place (2·S); the backward recycles a regathered buffer of the
    # accumulation dtype as the dK/dV send buffer, else holds one beside it; then either one
    # segment's dK/dV with a block's gradients, or the reduce-scatter's receive buffer (2·s
    # either way); the kernel's scratch
    recycled = sh.lss_regather and a == e
    act = (_wrapper(sh) + P * 2 * KV + (0 if recycled else P * 2 * KV * a // e)
           + 2 * KV * a // e + _kernel_scratch(sh, _run_tokens(sh)))
    return fwd, bwd, fwd, bwd, act, _needed_pairs(sh, r)


def _lightseq(sh: AttnShape, r: int):
    Q, KV, a, e, L = sh.q_bytes, sh.kv_bytes, sh.acc, sh.e, sh.lse_acc
    steps = lightseq_steps(sh, r)
    f_send = {"kv_to": 2 * KV, "q_to": Q, "q_from": Q * a // e + L}
    f_recv = {"kv_from": 2 * KV, "q_from": Q, "q_to": Q * a // e + L}
    b_send = {"kv_to": 2 * KV, "q_to": 3 * Q + L, "kv_from": 2 * KV * a // e,
              "q_from": Q * a // e}
    b_recv = {"kv_from": 2 * KV, "q_from": 3 * Q + L, "kv_to": 2 * KV * a // e,
              "q_to": Q * a // e}
    tot = lambda table: sum(table.get(k, 0) for st in steps for k in st)  # noqa: E731
    n_kv = min(2, sum("kv_from" in st for st in steps))  # K/V receive slots
    n_q = min(2, sum("q_from" in st for st in steps))  # shipped [q, dO, O, lse] slots
    # the op works on views of q, k, v, dO (no copies); during the backward it holds out and
    # lse, dq/dk/dv (accumulation dtype), the K/V receive slots, the kernel's block gradients
    # with the dK/dV partial on its way home, the Q-shipping slots, and the fused kernel's
    # scratch (one local-sized tensor: the own block is one call)
    # ... and, from step 2 on, the previous step's returns still in flight: its dK/dV (dQ)
    # partials going home and the buffers for ours coming back
    ret = [sum(b_send[k] for k in ("kv_from", "q_from") if k in st)
           + sum(b_recv[k] for k in ("kv_to", "q_to") if k in st) for st in steps]
    # (a shipped query block also needs its own dQ accumulator)
    act = (_wrapper(sh) + n_kv * 2 * KV + (Q + 2 * KV) * a // e * (n_kv + n_q > 0)
           + n_q * (3 * Q + L) + Q * a // e * (n_q > 0) + max(ret[:-1], default=0)
           + _kernel_scratch(sh, sh.s))
    pr = lambda i, j: _pairs(sh, _positions(sh, i), _positions(sh, j))  # noqa: E731
    pairs = pr(r, r) + sum(pr(r, (r - t) % sh.P) * ("kv_from" in st)
                           + pr((r - t) % sh.P, r) * ("q_from" in st)
                           for t, st in enumerate(steps, start=1))
    return tot(f_send), tot(b_send), tot(f_recv), tot(b_recv), act, pairs


def lightseq_steps(sh: AttnShape, r: int) -> list[set[str]]:
    """Rank ``r``'s steps after the local block, each the set of roles it plays:
    ``kv_to`` (sends its K/V), ``kv_from`` (receives K/V), ``q_to`` (ships its Q, gets out and
    lse back), ``q_from`` (attends a peer's Q, returns out and lse).

    Balanced (contiguous causal, ``balance``): at step ``t`` in ``1..P//2`` rank ``r`` pairs
    with ``(r+t) % P``: K/V go there when ``r+t < P``, else Q goes there; at ``t = P/2`` (even
    P) only ranks ``r < P/2`` send K/V and nobody ships Q. Unbalanced contiguous causal: K/V go
    to ``r+t`` only where needed (``r+t < P``). Zigzag or bidirectional: own K/V to
    ``(r+t) % P`` for ``t = 1..P-1``.
    """
    P = sh.P
    ordered = sh.causal and sh.layout == "contiguous"
    steps = []
    if not (ordered and sh.balance):
        for t in range(1, P):
            roles = set()
            if not ordered or r + t < P:
                roles.add("kv_to")
            if not ordered or r - t >= 0:
                roles.add("kv_from")
            steps.append(roles)
        return steps
    for t in range(1, P // 2 + 1):
        half = 2 * t == P
        roles = set()
        if r + t < P:
            roles.add("kv_to")
        elif not half:
            roles.add("q_to")
        if r - t >= 0:
            roles.add("kv_from")
        elif not half:
            roles.add("q_from")
        steps.append(roles)
    return steps


def _ulysses(sh: AttnShape, r: int):
    P, Q, KV = sh.P, sh.q_bytes, sh.kv_bytes
    a2a = lambda n: (P - 1) * n // P  # noqa: E731
    fwd = a2a(Q) + 2 * a2a(KV) + a2a(Q)  # q, k, v in; out back
    bwd = a2a(Q) + a2a(Q) + 2 * a2a(KV)  # dout in; dq, dk, dv back
    # whole sequence for hq/P heads (the same bytes as a shard): q, k, v, out and lse kept,
    # dout, dq, dk, dv and the all-to-all buffers in the backward
    act = 2 * (Q + 2 * KV) + 4 * Q + sh.lse_bytes
    full = AttnShape(S=sh.S, P=1, causal=sh.causal)
    pairs = _pairs(full, [(0, sh.S)], [(0, sh.S)]) // P
    return fwd, bwd, fwd, bwd, act, pairs


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


# ----------------------------------------------------------------------------- model level
@dataclass(frozen=True)
class ModelConfig:
    """A transformer stack: ``layers`` of attention (``heads`` query, ``kv_heads`` key/value
    heads) and an MLP of width ``ffn`` (``gated``: SwiGLU's three matrices)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int | None = None
    ffn: int | None = None
    vocab: int = 32000
    gated: bool = False
    causal: bool = True

    def __post_init__(self):
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.ffn is None:
            object.__setattr__(self, "ffn", 4 * self.hidden)
        for name in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden must divide into heads, heads into kv_heads groups")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        h, d = self.hidden, self.head_dim
        attn = h * self.heads * d * 2 + 2 * h * self.kv_heads * d
        return attn + (3 if self.gated else 2) * h * self.ffn

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.vocab * self.hidden


RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class LayerCost:
    """One transformer layer on one rank (forward + backward): bytes on the sequence axis and
    on the tensor-parallel axis, activation memory kept for the backward, and FLOPs."""

    attention: AttentionCost
    sp_bytes: int  # sequence-parallel attention traffic, the busiest rank
    tp_bytes: int  # Megatron TP (+ its sequence parallelism) traffic
    act_bytes: int  # activations this layer keeps until its backward
    peak_extra_bytes: int  # transient working set of the layer being (re)computed
    attn_flops: int  # busiest rank, forward + backward (+ recompute)
    linear_flops: int


def layer_cost(model: ModelConfig, *, S: int, P: int, method: str, tp: int = 1, b: int = 1,
               dtype: str = "bf16", recompute: str = "none", layout: str | None = None,
               mqsp_budget_mb: float = 256.0, flash: bool = True) -> LayerCost:
    """Per-rank cost of one layer with sequence parallelism ``P`` and tensor parallelism ``tp``.

    Activations follow Korthikanti et al. (TP with sequence parallelism, flash attention so no
    ``s x s`` term): ``34·s·b·h/tp`` bytes for 16-bit (scaled by the element size), plus what the
    method holds beyond a local fused attention. ``full`` recompute keeps only the layer input
    (``2·s·b·h/tp``) and re-runs the forward; LightSeq's rematerialization-aware checkpoint keeps
    the attention output, so its recompute skips the distributed attention forward.
    ``selective`` recomputes the core attention only (free for fused kernels; for RSA it drops
    the kept score rows at the price of one more attention forward). ``flash=False`` models a
    pre-FlashAttention single-rank baseline (``P = 1``) that keeps its ``5·a·s²·b`` bytes of
    scores, softmax and dropout mask (Korthikanti et al.), as the 2021-2023 papers' TP
    baselines did unless they recompute attention selectively.
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"unknown recompute {recompute!r}; use one of {RECOMPUTE}")
    if model.heads % tp:
        raise ValueError(f"tp={tp} must divide heads={model.heads}")
    hq, hkv = model.heads // tp, max(1, model.kv_heads // tp)
    layout = layout or ("zigzag" if method not in ("ulysses", "allgather") else "contiguous")
    sh = AttnShape(S=S, P=P, b=b, hq=hq, hkv=hkv, D=model.head_dim, dtype=dtype,
                   causal=model.causal, layout=layout, mqsp_budget_mb=mqsp_budget_mb)
    att = attention_cost("nosp" if P == 1 else method, sh)
    local = attention_cost("nosp", AttnShape(S=sh.s, P=1, b=b, hq=hq, hkv=hkv, D=sh.D,
                                             dtype=dtype, causal=model.causal))
    e, s, h = sh.e, sh.s, model.hidden
    base = 34 * s * b * h * e // 2 // tp
    extra = max(0, att.max_act_bytes - local.max_act_bytes)
    if not flash and P == 1 and recompute != "selective":
        extra += 5 * hq * S * S * b * e // 2
    attn_fwd = max(att.flops_fwd)
    attn = max(att.flops)
    linear = 3 * 2 * b * s * model.layer_params // tp
    if recompute == "full":
        act, peak = 2 * s * b * h * e // tp, base + extra
        linear += linear // 3
        attn += 0 if method == "lightseq" else attn_fwd
    elif recompute == "selective" and method == "rsa":
        act, peak = base, extra
        attn += attn_fwd
    else:
        act, peak = base + extra, 0
    tp_bytes = 8 * (tp - 1) * s * b * h * e // tp
    return LayerCost(att, max(att.sent), tp_bytes, act, peak, attn, linear)
