"""Packed (THD) sequences in megatron-core: a packed GPT at CP>1 equals CP=1, on CPU/gloo.

The oracle is megatron-core's own stack at CP=1 with no packing at all: every document runs
alone through ``GPTModel`` with megatron's local layer spec (``DotProductAttention``, explicit
causal mask, RoPE / learned positions from 0), on its real tokens only; the loss is the sum
over documents. Packing must give exactly that: attention stays inside each document, RoPE
positions restart at each document, and padding tokens (past each real length) change nothing.

Each case packs the same documents into one THD row (``cu_seqlens_padded`` with every padded
length a multiple of 12 = 2*CP for CP=2, 3; ``cu_seqlens`` the real lengths), shards it with
our ``thd.get_thd_batch_on_this_cp_rank`` (no Transformer Engine), builds the same model
(same seed, float64) with our spec for one method, wraps it in megatron-core DDP and checks
on every rank: this rank's logits of real tokens against the oracle's, the global loss, and
every parameter gradient after DDP's reduction (TP shards gathered). Worlds: CP=1, CP=2,
CP=3, TP=2 x CP=2, and CP=4 for the balanced layout (``--seqpar-packing balanced``: its own
stream ``BALANCED_DOCS`` without per-document padding, learned positions, every method; a
mutated assignment must fail). Everything is float64: 1e-9 relative to the largest reference
magnitude (as tests/test_megatron_parity.py; measured errors are ~1e-15).

Loss convention (Megatron's): per rank ``sum(token losses * loss_mask) / N_real * CP``, so
DDP's average over CP gives the global gradient.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from distributed import run_on_ranks

from megatron_seqpar import METHODS

pytestmark = pytest.mark.megatron
pytest.importorskip("megatron.core")

from test_megatron_parity import (  # noqa: E402
    _rel,
    build_model,
    ddp_wrap,
    grads_of,
    init_parallel,
    make_config,
)

V = 96  # vocabulary (test_megatron_parity.V)
# (real, padded) per document: padding inside most documents, one document with none, one
# shorter than a rank's shard (5 real tokens; a shard is 54 or 36 tokens), one of a single
# token, one made only of padding. Padded lengths: multiples of 12 = 2*CP for CP = 2 and 3.
DOCS = ((29, 36), (5, 12), (12, 12), (1, 12), (17, 24), (0, 12))
# The balanced layout (--seqpar-packing balanced) needs no per-document padding: lengths that
# are not multiples of 2*CP, one document (31) longer than a rank's share at CP=3 and 4 (24,
# 18 tokens), tiny ones, a piece of padding only; 72 tokens divide by CP = 2, 3, 4.
BALANCED_DOCS = ((29, 31), (5, 5), (13, 13), (1, 1), (17, 20), (0, 2))
TOL = 1e-9
# variants that must FAIL the checks (negative controls): the row told it is one sequence; the
# balanced layout's tokens shifted by one on every rank (a mutated assignment)
CONTROLS = ("one-sequence", "balanced-mutated")


def docs_of(variant) -> tuple:
    return BALANCED_DOCS if variant and variant.startswith("balanced") else DOCS


def packing(docs=DOCS):
    real = [0]
    padded = [0]
    for n, p in docs:
        real.append(real[-1] + n)
        padded.append(padded[-1] + p)
    return (torch.tensor(real, dtype=torch.int32), torch.tensor(padded, dtype=torch.int32),
            max(p for _, p in docs))


def packed_batch(docs=DOCS):
    """The global THD row: tokens, labels, loss_mask (1 = real), position_ids restarting."""
    g = torch.Generator().manual_seed(11)
    _, cu_pad, _ = packing(docs)
    T = int(cu_pad[-1])
    tokens = torch.randint(0, V, (1, T), generator=g)
    labels = torch.randint(0, V, (1, T), generator=g)
    loss_mask = torch.zeros(1, T, dtype=torch.float64)
    position_ids = torch.zeros(1, T, dtype=torch.long)
    for (n, p), a in zip(docs, cu_pad.tolist()):
        loss_mask[0, a:a + n] = 1.0
        position_ids[0, a:a + p] = torch.arange(p)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "position_ids": position_ids}


def _loss(logits, labels, loss_mask, docs=DOCS):
    import torch.nn.functional as F

    tok = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none")
    return (tok * loss_mask.reshape(-1)).sum() / sum(n for n, _ in docs)


# ----------------------------------------------------------------------------- oracle
def _oracle_worker(rank, world_size, cases):
    """CP=1, every document alone (BSHD, megatron's local spec); stream logits + grads, per
    ``(kind, docs)``."""
    from megatron.core import parallel_state as ps

    from megatron_seqpar import cpu_workarounds

    out = {}
    with cpu_workarounds.cpu_shims():
        init_parallel()
        try:
            for kind, docs in cases:
                full = packed_batch(docs)
                _, cu_pad, _ = packing(docs)
                config = make_config()
                model = ddp_wrap(config, build_model(kind, None, config))
                model.zero_grad_buffer()
                logits_stream = torch.zeros(full["tokens"].size(1), V, dtype=torch.float64)
                total = 0.0
                for (n, _), a in zip(docs, cu_pad.tolist()):
                    if n == 0:
                        continue
                    sl = slice(a, a + n)
                    mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)[None, None]
                    logits = model(full["tokens"][:, sl], torch.arange(n)[None], mask)
                    loss = _loss(logits, full["labels"][:, sl], full["loss_mask"][:, sl], docs)
                    loss.backward()  # DDP accumulates main_grad over the documents
                    total += float(loss)
                    logits_stream[sl] = logits[0].detach()
                model.finish_grad_sync()
                out[(kind, docs)] = (logits_stream, total, grads_of(model))
        finally:
            ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def oracle():
    cases = (("gpt-rope", DOCS), ("gpt-learned", DOCS), ("gpt-learned", BALANCED_DOCS),
             ("gpt-rope", BALANCED_DOCS))
    return run_on_ranks(_oracle_worker, 1, cases, timeout=300)[0]


# ----------------------------------------------------------------------------- packed runs
def run_packed(kind, method, *, tp, cp, variant=None):
    """One packed case on this rank: (stream indices, logits, global loss, grads).

    ``variant="remat"``: Megatron's full activation recompute with our rematerialization-aware
    checkpointing (``megatron_seqpar.megatron.checkpointing``; kept out + lse are used in
    backward). ``variant="one-sequence"`` (a negative control): the model is told the row is
    ONE sequence (``cu_seqlens = [0, T]``), so attention crosses documents and RoPE positions
    run on; the checks must catch it. ``variant="balanced"``: the balanced layout
    (``BALANCED_DOCS``; RoPE only as ``gpt-docrope``: megatron-core's THD RoPE assumes zigzag);
    ``"balanced-mutated"`` (a negative control): each rank's balanced tokens shifted by one
    (``roll``), the params still saying balanced."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_seqpar.megatron.thd import get_thd_batch_on_this_cp_rank, partitioned_indices

    docs = docs_of(variant)
    layout = "balanced" if docs is BALANCED_DOCS else "zigzag"
    cu, cu_pad, longest = packing(docs)
    full = packed_batch(docs)
    batch, params = get_thd_batch_on_this_cp_rank(
        dict(full), cu, cu_pad, torch.tensor([longest], dtype=torch.int32), layout=layout)
    idx = partitioned_indices(cu_pad, int(cu_pad[-1]), cp, ps.get_context_parallel_rank(),
                              layout).long()
    if variant == "balanced-mutated":
        batch = {k: v[:, idx.roll(1)] for k, v in full.items()}
    if variant == "one-sequence":
        whole = torch.tensor([0, int(cu_pad[-1])], dtype=torch.int32)
        params = type(params)(qkv_format="thd", cu_seqlens_q=whole, cu_seqlens_kv=whole,
                              max_seqlen_q=int(cu_pad[-1]), max_seqlen_kv=int(cu_pad[-1]))
    remat = variant is not None and variant.endswith("remat")
    recompute = dict(recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1) if remat else {}
    config = make_config(tp=tp, cp=cp, **recompute)
    model = ddp_wrap(config, build_model(kind, method, config))
    remats = [m.remat for m in model.modules() if getattr(m, "remat", None) is not None]
    assert len(remats) == (config.num_layers if remat else 0)
    model.zero_grad_buffer()
    logits = model(batch["tokens"], batch["position_ids"], None, packed_seq_params=params)
    loss = _loss(logits, batch["labels"], batch["loss_mask"], docs)
    assert sum(r.kept for r in remats) == len(remats)  # one (out, lse) kept per layer
    (loss * cp).backward()
    assert sum(r.kept for r in remats) == 0  # ... and used by the recompute's backward
    model.finish_grad_sync()
    total = loss.detach().clone()
    dist.all_reduce(total, group=ps.get_context_parallel_group())
    return idx, logits[0].detach(), float(total), grads_of(model)


def bad_packings(cp):
    """(label, PackedSeqParams, words the ValueError must contain): each a wrong packing."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu, cu_pad, longest = packing()

    def p(**over):
        kw = dict(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_pad,
                  cu_seqlens_kv_padded=cu_pad, max_seqlen_q=longest, max_seqlen_kv=longest)
        kw.update(over)
        return PackedSeqParams(**kw)

    odd = cu_pad.clone()
    odd[1] += 2  # a padded length of 38 (not a multiple of 2*CP), the next one 10
    long_real = torch.tensor([0, 24, 48, 60, 72, 96, 108], dtype=torch.int32)  # 24 > 12 padded
    swapped = cu.clone()
    swapped[1], swapped[2] = cu[2], cu[1]
    return [
        ("kv boundaries differ", p(cu_seqlens_kv=cu.flip(0)), "cu_seqlens_kv differs"),
        ("kv padded differ", p(cu_seqlens_kv_padded=odd), "cu_seqlens_kv_padded differs"),
        ("not a multiple of 2*CP", p(cu_seqlens_q_padded=odd, cu_seqlens_kv_padded=odd),
         f"multiple of 2*CP = {2 * cp}"),
        ("real longer than padded", p(cu_seqlens_q=long_real, cu_seqlens_kv=long_real),
         "at most the padded length"),
        ("real decreasing", p(cu_seqlens_q=swapped, cu_seqlens_kv=None),
         "cumulative REAL lengths"),
        ("real not from 0", p(cu_seqlens_q=cu + 1, cu_seqlens_kv=None),
         "cu_seqlens_q must start at 0"),
        ("max_seqlen too small", p(max_seqlen_q=longest - 12), "max_seqlen_q="),
        ("wrong total", p(cu_seqlens_q_padded=cu_pad[:-1], cu_seqlens_kv_padded=cu_pad[:-1],
                          cu_seqlens_q=cu[:-1], cu_seqlens_kv=cu[:-1]), "ends at"),
        ("sbhd format", p(qkv_format="sbhd"), "qkv_format='thd'"),
        ("float boundaries", p(cu_seqlens_q=cu.double(), cu_seqlens_kv=None), "integer tensor"),
    ]


def check_bad_packings(cp):
    """Each wrong packing raises ValueError (on every rank, before any collective) naming the
    fix, from the provider and (one of them) from a whole model."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_seqpar.megatron.core_attention import SeqParCoreAttention
    from megatron_seqpar.megatron.thd import get_thd_batch_on_this_cp_rank

    config = make_config(cp=cp)
    attn = SeqParCoreAttention(config, 1, AttnMaskType.causal, method="lightseq")
    _, cu_pad, _ = packing()
    t = int(cu_pad[-1]) // cp
    q = torch.randn(t, 4, 16, dtype=torch.float64)
    k = torch.randn(t, 2, 16, dtype=torch.float64)
    seen = {}
    for label, params, words in bad_packings(cp):
        try:
            attn(q, k, k, None, packed_seq_params=params)
            seen[label] = None
        except ValueError as e:
            seen[label] = (str(e), words)
    # RoPE in the provider (balanced packing): only for packed batches, not with MLA, and a
    # rotary fraction outside (0, 1] is refused when the spec is made
    from megatron_seqpar.megatron.rope import DocumentRope

    roped = SeqParCoreAttention(config, 1, AttnMaskType.causal, method="lightseq",
                                rope=DocumentRope())
    for label, call, words in (
            ("rope: an unpacked batch", lambda: roped(q[:, None], k[:, None], k[:, None], None),
             "rope= rotates packed documents"),
            ("rope: MLA", lambda: SeqParCoreAttention(
                config, 1, AttnMaskType.causal, method="lightseq", k_channels=16, v_channels=8,
                rope=DocumentRope()), "not supported with MLA"),
            ("rope: rotary_percent 0", lambda: DocumentRope(rotary_percent=0.0),
             "rotary_percent=0.0 must be in (0, 1]")):
        try:
            call()
            seen[label] = None
        except ValueError as e:
            seen[label] = (str(e), words)
    # a whole model (learned positions, so RoPE does not see the packing first)
    cu, cu_pad, longest = packing()
    batch, params = get_thd_batch_on_this_cp_rank(packed_batch(), cu, cu_pad, longest)
    params.cu_seqlens_kv = cu.flip(0)
    model = build_model("gpt-learned", "mqsp", config)
    try:
        model(batch["tokens"], batch["position_ids"], None, packed_seq_params=params)
        seen["model: kv boundaries differ"] = None
    except ValueError as e:
        seen["model: kv boundaries differ"] = (str(e), "cu_seqlens_kv differs")
    try:
        attn(q, k, k, torch.zeros(1, 1, t, t, dtype=torch.bool), packed_seq_params=params)
        seen["attention_mask given"] = None
    except ValueError as e:
        seen["attention_mask given"] = (str(e), "attention_mask=None")
    return seen


def check_bidirectional(cp):
    """The provider with ``no_mask`` (bidirectional) on random q/k/v, zigzag and balanced
    layouts: padding tokens, which a
    causal GPT never sees from its real tokens, must be masked keys here. Out and dq/dk/dv of
    this rank's tokens against ``reference_attention`` with the block-diagonal mask and the
    padding as key padding (all four methods). Returns the max relative error, and that of
    the output against the reference WITHOUT the padding mask (which must be large: the check
    sees the padding)."""
    import torch.distributed as dist
    from megatron.core.transformer.enums import AttnMaskType
    from reference import reference_attention

    from megatron_seqpar.megatron.core_attention import SeqParCoreAttention
    from megatron_seqpar.megatron.thd import packed_seq_params, partitioned_indices

    err = control = 0.0
    for docs, layout in ((DOCS, "zigzag"), (BALANCED_DOCS, "balanced")):
        cu, cu_pad, longest = packing(docs)
        T = int(cu_pad[-1])
        params = packed_seq_params(cu, cu_pad, longest, layout)
        g = torch.Generator().manual_seed(5)
        q, k, v, dout = (torch.randn(T, h, 16, generator=g, dtype=torch.float64)
                         for h in (4, 2, 2, 4))
        pad = packed_batch(docs)["loss_mask"] == 0
        ref = [x.clone().requires_grad_() for x in (q, k, v)]
        want = reference_attention(*(x[None] for x in ref), causal=False, key_padding_mask=pad,
                                   cu_seqlens=cu_pad.tolist())[0]
        want.backward(dout)
        unpadded = reference_attention(q[None], k[None], v[None], causal=False,
                                       cu_seqlens=cu_pad.tolist())[0]
        idx = partitioned_indices(cu_pad, T, cp, dist.get_rank(), layout).long()
        for method in METHODS:
            attn = SeqParCoreAttention(make_config(cp=cp), 1, AttnMaskType.no_mask,
                                       method=method)
            mine = [x[idx].clone().requires_grad_() for x in (q, k, v)]
            out = attn(*mine, None, packed_seq_params=params)
            out.backward(dout[idx].reshape(out.shape))
            err = max(err, _rel(out, want.detach()[idx].reshape(out.shape)))
            control = max(control, _rel(out, unpadded[idx].reshape(out.shape)))
            for a, b in zip(mine, ref):
                err = max(err, _rel(a.grad, b.grad[idx]))
    return err, control


def _worker(rank, world_size, tp, cp, cases, bad):
    from megatron.core import parallel_state as ps

    from megatron_seqpar import cpu_workarounds

    out = {}
    with cpu_workarounds.cpu_shims():
        init_parallel(tp=tp, cp=cp)
        try:
            for kind, method, variant in cases:
                t0 = time.perf_counter()
                out[(kind, method, variant)] = run_packed(kind, method, tp=tp, cp=cp,
                                                          variant=variant) + (
                    time.perf_counter() - t0,)
            if bad:
                out["bad"] = check_bad_packings(cp)
                out["bidirectional"] = check_bidirectional(cp)
        finally:
            ps.destroy_model_parallel()
    return out


def _check(tp, cp, oracle, cases, label, bad=False):
    results = run_on_ranks(_worker, tp * cp, tp, cp, cases, bad, timeout=300)
    rows, fails = [], []
    for case in cases:
        kind, docs = case[0], docs_of(case[2])
        # our provider's RoPE (gpt-docrope) against megatron-core's, each document alone
        r_logits, r_loss, r_grads = oracle[("gpt-rope" if kind == "gpt-docrope" else kind, docs)]
        real = packed_batch(docs)["loss_mask"][0].bool()
        el = eg = 0.0
        loss_err = 0.0
        for res in results:
            idx, logits, loss, grads, _ = res[case]
            keep = real[idx]
            el = max(el, _rel(logits[keep], r_logits[idx][keep]))
            loss_err = max(loss_err, abs(loss - r_loss) / abs(r_loss))
            assert set(grads) == set(r_grads)
            for name, g in grads.items():
                assert g.shape == r_grads[name].shape, name
                eg = max(eg, _rel(g, r_grads[name]))
        secs = max(res[case][-1] for res in results)
        row = {"config": label, "model": kind, "method": case[1], "rel_err_loss": loss_err,
               "max_rel_err_logits": el, "max_rel_err_grads": eg, "seconds": round(secs, 2)}
        print(row)
        rows.append(row)
        control = case[2] in CONTROLS
        if (el < TOL and eg < TOL and loss_err < TOL) == control:
            fails.append(row)  # a control that passes fails the test
        if case[2] is not None:
            row["variant"] = case[2]
        if control:
            assert el > 1e-3, row
    assert not fails, f"packed parity failures: {fails}"
    if bad:
        for res in results:
            for name, got in res["bad"].items():
                assert got is not None, f"{name}: no ValueError"
                msg, words = got
                assert words in msg, f"{name}: {msg!r} does not say {words!r}"
        errs = [res["bidirectional"] for res in results]
        print({"config": label, "provider, bidirectional with padding": max(errs)})
        assert max(e for e, _ in errs) < TOL, errs
        assert max(c for _, c in errs) > 1e-3, errs  # without the padding mask: caught
    return rows


def _cases(models=("gpt-rope",)):
    return [(k, m, None) for k in models for m in METHODS]


def test_packed_parity_cp1(oracle):
    _check(1, 1, oracle, _cases(("gpt-rope", "gpt-learned")) + _balanced(False), "CP=1")


def _balanced(controls=True, rope=("lightseq",)):
    """Every method on the balanced layout (learned positions), and the mutated control; RoPE
    rotated by our provider (``gpt-docrope``, megatron-core's THD RoPE assumes zigzag) for the
    ``rope`` methods, against megatron-core's RoPE on each document alone."""
    return ([("gpt-learned", m, "balanced") for m in METHODS]
            + [("gpt-docrope", m, "balanced") for m in rope]
            + [("gpt-learned", "lightseq", "balanced-mutated")] * controls)


def test_packed_parity_cp2(oracle):
    extra = [("gpt-rope", "lightseq", "remat"), ("gpt-rope", "mqsp", "remat"),
             ("gpt-rope", "lightseq", "one-sequence"),
             ("gpt-learned", "lightseq", "balanced-remat")]
    _check(1, 2, oracle, _cases(("gpt-rope", "gpt-learned")) + extra + _balanced(rope=METHODS),
           "CP=2",
           bad=True)


def test_packed_parity_cp3(oracle):
    _check(1, 3, oracle, _cases() + _balanced(False), "CP=3", bad=True)


def test_packed_parity_cp4(oracle):
    _check(1, 4, oracle, _balanced(rope=METHODS), "CP=4")


def test_packed_parity_tp2_cp2(oracle):
    _check(2, 2, oracle, _cases() + _balanced(False), "TP=2 x CP=2")


# ----------------------------------------------------------------------------- THD helpers
PACKINGS = ([0, 24], [0, 4, 8, 20, 24], [0, 12, 12, 36, 48], [0, 8, 16, 24, 48, 96])


def te_partitioned_indices(cu_padded, total_tokens, world_size, rank):
    """Transformer Engine's ``thd_get_partitioned_indices``, written from its definition
    (per local token: find its sequence in the per-rank cumulative lengths ``cu/world``, then
    the first half of that sequence's local share is chunk ``rank``, the second half chunk
    ``2*world-1-rank``); token by token, independent of the package."""
    cu_local = [c // world_size for c in cu_padded]
    out = []
    for token in range(total_tokens // world_size):
        seq = max(i for i in range(len(cu_local) - 1) if cu_local[i] <= token)
        while cu_local[seq + 1] == cu_local[seq]:  # skip empty sequences
            seq += 1
        share = cu_local[seq + 1] - cu_local[seq]
        index = token - cu_local[seq]
        chunk = rank if index < share // 2 else 2 * world_size - 1 - rank
        out.append(cu_padded[seq] + (share // 2) * chunk + index % (share // 2))
    return out


@pytest.mark.parametrize("cu", PACKINGS, ids=lambda c: "-".join(map(str, c)))
def test_partitioned_indices(cu):
    from megatron_seqpar.layouts import local_runs, positions
    from megatron_seqpar.megatron.thd import thd_get_partitioned_indices

    T = cu[-1]
    for cp in (1, 2, 3, 4):
        if any((b - a) % (2 * cp) for a, b in zip(cu, cu[1:])):
            continue
        seen = []
        for r in range(cp):
            idx = thd_get_partitioned_indices(torch.tensor(cu, dtype=torch.int32), T, cp, r)
            assert idx.dtype == torch.int32 and idx.numel() == T // cp
            assert idx.tolist() == te_partitioned_indices(cu, T, cp, r), (cp, r)
            want = positions(local_runs("zigzag", r, cp, T // cp, tuple(cu)))
            assert idx.tolist() == want.tolist()
            seen += idx.tolist()
        assert sorted(seen) == list(range(T))  # every token on exactly one rank


def test_partitioned_indices_errors():
    from megatron_seqpar.megatron.thd import thd_get_partitioned_indices

    cu = torch.tensor([0, 8, 24], dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of 2\\*CP = 6"):
        thd_get_partitioned_indices(cu, 24, 3, 0)
    with pytest.raises(ValueError, match="ends at 24"):
        thd_get_partitioned_indices(cu, 32, 2, 0)
    with pytest.raises(ValueError, match="cp_rank"):
        thd_get_partitioned_indices(cu, 24, 2, 2)
    with pytest.raises(ValueError, match="integer tensor"):
        thd_get_partitioned_indices(cu.float(), 24, 2, 0)
    from megatron_seqpar.megatron.thd import SeqParPackedSeqParams, partitioned_indices

    with pytest.raises(ValueError, match="multiple of CP = 4"):
        partitioned_indices(torch.tensor([0, 5, 22]), 22, 4, 0, "balanced")
    with pytest.raises(ValueError, match="unknown packing layout 'zigzg'"):
        SeqParPackedSeqParams(qkv_format="thd", layout="zigzg")
    # balanced takes lengths that are not multiples of 2*CP: every token once over the ranks
    cu = torch.tensor([0, 5, 13, 22, 24], dtype=torch.int32)
    got = sorted(i for r in range(3)
                 for i in partitioned_indices(cu, 24, 3, r, "balanced").tolist())
    assert got == list(range(24))


def test_thd_batch_matches_megatron(monkeypatch):
    """Our ``get_thd_batch_on_this_cp_rank`` equals megatron-core's, the latter given a stand-in
    ``tex`` that answers with the TE formula above (TE is not installed here)."""
    import megatron.core.utils as mu

    from megatron_seqpar.megatron.thd import get_thd_batch_on_this_cp_rank

    fake_tex = SimpleNamespace(thd_get_partitioned_indices=lambda cu, T, w, r: torch.tensor(
        te_partitioned_indices(cu.tolist(), T, w, r), dtype=torch.int32))
    monkeypatch.setattr(mu, "tex", fake_tex, raising=False)
    monkeypatch.setattr(mu, "is_te_min_version", lambda *a, **k: True)
    cu_pad = torch.tensor([0, 8, 16, 24, 48], dtype=torch.int32)
    cu = torch.tensor([0, 5, 13, 14, 40], dtype=torch.int32)
    for cp in (1, 2):
        for r in range(cp):
            def batch():
                g = torch.Generator().manual_seed(3)
                return {"tokens": torch.randint(0, 50, (1, 48), generator=g),
                        "labels": torch.randint(0, 50, (1, 48), generator=g),
                        "loss_mask": torch.rand(1, 48, generator=g),
                        "attention_mask": None, "cu_seqlens": cu, "max_seqlen": torch.tensor([24])}
            ours, p_ours = get_thd_batch_on_this_cp_rank(batch(), cu, cu_pad, torch.tensor([24]),
                                                         cp, r)
            theirs, p_theirs = mu.get_thd_batch_on_this_cp_rank(batch(), cu, cu_pad,
                                                                torch.tensor([24]), cp, r)
            assert set(ours) == set(theirs)
            for key in ours:
                a, b = ours[key], theirs[key]
                assert (a is None and b is None) or torch.equal(a, b), key
            assert vars(p_ours).keys() == vars(p_theirs).keys()
            for key, a in vars(p_ours).items():
                b = getattr(p_theirs, key)
                assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), key


def test_thd_rope_restarts_per_sequence():
    """megatron-core's THD RoPE on this rank's tokens (our partitioning, CP 1-3, on CPU) equals
    RoPE at positions 0, 1, ... of each sequence alone: positions restart per sequence."""
    from megatron.core.models.common.embeddings.rope_utils import (
        _apply_rotary_pos_emb_bshd,
        _apply_rotary_pos_emb_thd,
    )
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_seqpar import cpu_workarounds
    from megatron_seqpar.megatron.thd import thd_get_partitioned_indices

    cu = [0, 12, 24, 60, 72]
    with cpu_workarounds.cpu_shims():  # shim 1: get_emb moves inv_freq to current_device()
        rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True)
        freqs = rope.get_emb(36).double()  # max padded length: Megatron's rotary_seq_len
    x = torch.randn(72, 3, 16, dtype=torch.float64)
    want = torch.cat([_apply_rotary_pos_emb_bshd(x[a:b, None], freqs[: b - a])[:, 0]
                      for a, b in zip(cu, cu[1:])])
    for cp in (1, 2, 3):
        for r in range(cp):
            idx = thd_get_partitioned_indices(torch.tensor(cu), 72, cp, r).long()
            group = SimpleNamespace(size=lambda cp=cp: cp, rank=lambda r=r: r)
            got = _apply_rotary_pos_emb_thd(x[idx], torch.tensor(cu, dtype=torch.int32), freqs,
                                            cp_group=group)
            torch.testing.assert_close(got, want[idx], rtol=0, atol=1e-14)
