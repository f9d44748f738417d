"""Megatron parity: CP>1 models with our specs match a CP=1 megatron-core run, on CPU/gloo.

The oracle is megatron-core's own stack at CP=1: ``GPTModel``/``BertModel`` with megatron's
local layer spec (``DotProductAttention``), explicit causal mask. Each CP>1 case builds the same
model (same seed, ``use_cpu_initialization``, float64 via ``.double()``) with one of our specs,
shards the batch with megatron's own ``get_batch_on_this_cp_rank`` (zigzag), wraps it in
megatron-core ``DistributedDataParallel`` and checks, on every rank,

* logits (and BERT's binary logits) against the oracle's rows of this rank's tokens
  (BERT: non-padded tokens only; the oracle's padded query rows attend uniformly, ours
  return zeros, and neither reaches the masked loss);
* every parameter gradient after DDP's reduction against the oracle's.

Loss convention (Megatron's): per rank ``sum(token losses)/N_total * (DP*CP)`` (plus BERT's
binary loss weighted 1/CP), so DDP's average over DP x CP gives the global-batch gradient.
LSS also runs with LSS double averaging: ``lss_ddp`` + ``lss_finalize_model_grads`` (with and
without ``overlap_grad_reduce``) and stock DDP + ``install_lss_grad_averaging`` (Megatron-LM's
route), each in both position-embedding modes: assembled (the default) must match the oracle
on every row of the learned position table on every rank, like every other gradient; owned per
segment (``assemble_position_grads=False``, suffix ``-owned``) on this rank's rows, the other
rows staying zero. Every gradient must also equal the stock-DDP LSS run's (owned: its rows).
A negative control shows the checks catch megatron's local position ids under CP.
Everything is float64: tolerance 1e-9 relative to the largest reference magnitude.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from distributed import run_on_ranks

from megatron_seqpar import METHODS

pytestmark = pytest.mark.megatron
pytest.importorskip("megatron.core")


MODELS = ("gpt-rope", "gpt-learned", "bert")
B, S, V, H, HEADS, GROUPS = 2, 48, 96, 64, 4, 2
BERT_LENGTHS = (48, 31, 40, 17)  # one per global sample (global batch <= 4)
TOL = 1e-9


# ----------------------------------------------------------------------------- model helpers
def init_parallel(tp=1, cp=1, instances=1):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp,
                                 num_distributed_optimizer_instances=instances,
                                 create_gloo_process_groups=False)


def make_config(tp=1, cp=1, **over):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(num_layers=2, hidden_size=H, num_attention_heads=HEADS, num_query_groups=GROUPS,
              use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0,
              tensor_model_parallel_size=tp, context_parallel_size=cp)
    kw.update(over)
    return TransformerConfig(**kw)


def build_model(kind, method, config):
    """``method=None``: megatron's local spec (the oracle); else our spec for ``method``."""
    torch.manual_seed(1234)
    if kind.startswith("gpt"):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.models.gpt.gpt_model import GPTModel

        from megatron_seqpar.specs import get_gpt_layer_spec

        if kind == "gpt-docrope":  # RoPE rotated by our provider (balanced packing)
            from megatron_seqpar.megatron.rope import DocumentRope

            spec, pos = get_gpt_layer_spec(method, rope=DocumentRope()), "none"
        else:
            spec = get_gpt_layer_local_spec() if method is None else get_gpt_layer_spec(method)
            pos = "rope" if kind == "gpt-rope" else "learned_absolute"
        model = GPTModel(config, spec, vocab_size=V, max_sequence_length=S,
                         position_embedding_type=pos, parallel_output=False)
    elif kind == "bert-localpos":  # negative control: megatron's local position ids
        from megatron_seqpar.specs import get_bert_layer_spec

        model = _LocalPositionsBert(config=config, num_tokentypes=0,
                                    transformer_layer_spec=get_bert_layer_spec(method),
                                    vocab_size=V, max_sequence_length=S, parallel_output=False,
                                    add_binary_head=True)
    else:
        from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
        from megatron.core.models.bert.bert_model import BertModel

        from megatron_seqpar.megatron.bert import SeqParBertModel
        from megatron_seqpar.specs import get_bert_layer_spec

        cls, spec = ((BertModel, bert_layer_local_spec) if method is None
                     else (SeqParBertModel, get_bert_layer_spec(method)))
        model = cls(config=config, num_tokentypes=0, transformer_layer_spec=spec,
                    vocab_size=V, max_sequence_length=S, parallel_output=False,
                    add_binary_head=True)
    return model.double()


def _LocalPositionsBert(**kw):
    """SeqParBertModel with BertModel's own ``arange(local length)`` positions (a known bug)."""
    from megatron.core.models.bert.bert_model import BertModel

    from megatron_seqpar.megatron.bert import SeqParBertModel

    class LocalPositionsBert(SeqParBertModel):
        bert_position_ids = BertModel.bert_position_ids

    return LocalPositionsBert(**kw)


def global_batch(kind, n):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, V, (n, S), generator=g)
    batch = {"tokens": tokens, "labels": torch.randint(0, V, (n, S), generator=g),
             "position_ids": torch.arange(S).expand(n, S).contiguous()}
    if kind.startswith("bert"):
        valid = torch.arange(S)[None, :] < torch.tensor(BERT_LENGTHS[:n])[:, None]
        batch["padding_mask"] = valid.long()  # 1 = real token (BertModel's convention)
        batch["loss_mask"] = valid.double()
        batch["sop"] = torch.arange(n) % 2
    else:
        batch["loss_mask"] = torch.ones(n, S, dtype=torch.float64)
    return batch


def zigzag_index(cp_rank, cp, s=S):
    from megatron_seqpar.megatron.bert import zigzag_positions

    return zigzag_positions(s // cp, cp_rank, cp)


def forward_loss(kind, model, batch, n_tokens, n_samples, dp, cp, oracle):
    """Megatron-convention loss on this rank's shard; returns (loss, logits, binary_logits)."""
    import torch.nn.functional as F

    if kind.startswith("bert"):
        logits, binary = model(batch["tokens"], batch["padding_mask"])
        sop = F.cross_entropy(binary, batch["sop"], reduction="sum") / n_samples / cp
    else:
        s = batch["tokens"].size(1)
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None] if oracle else None
        logits = model(batch["tokens"], batch["position_ids"], mask)
        binary, sop = None, 0.0
    tok = F.cross_entropy(logits.reshape(-1, V), batch["labels"].reshape(-1), reduction="none")
    lm = (tok * batch["loss_mask"].reshape(-1)).sum() / n_tokens
    return (lm + sop) * dp * cp, logits, binary


def lss_route(lss_double):
    """The wrapping of an LSS double-averaging mode (``-owned`` dropped)."""
    return lss_double.removesuffix("-owned") if isinstance(lss_double, str) else lss_double


def lss_owned(lss_double) -> bool:
    """Position-embedding rows owned per segment (``assemble_position_grads=False``)?"""
    return isinstance(lss_double, str) and lss_double.endswith("-owned")


def _optimizer_instances() -> int:
    """What ``init_parallel(instances=...)`` made (one group across instances, or none)."""
    from megatron.core import parallel_state as ps

    inter = ps.get_inter_distributed_optimizer_instance_group(check_initialized=False)
    return inter.size() if inter is not None else 1


def ddp_wrap(config, model, lss_double=False):
    """Stock DDP (False), ``lss_ddp`` ("ddp"/True/"overlap") or stock DDP +
    ``install_lss_grad_averaging`` ("install", what Megatron-LM gets; "distopt" and
    "distopt-overlap" with the distributed optimizer, whose instances are LSS's levels); a
    ``-owned`` suffix installs the owned position-embedding variant."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_seqpar.megatron.lss_grad import install_lss_grad_averaging, lss_ddp

    route = lss_route(lss_double)
    distopt = isinstance(route, str) and route.startswith("distopt")
    ddp_cfg = DistributedDataParallelConfig(
        overlap_grad_reduce=route in ("overlap", "distopt-overlap"),
        use_distributed_optimizer=distopt,
        num_distributed_optimizer_instances=_optimizer_instances() if distopt else 1)
    if route in (True, "ddp", "overlap"):
        return lss_ddp(config, ddp_cfg, model)
    ddp = DistributedDataParallel(config, ddp_cfg, model)
    if route == "install" or distopt:
        install_lss_grad_averaging([ddp], assemble_position_grads=not lss_owned(lss_double))
    return ddp


def grads_of(ddp_model):
    """Reduced gradients by name; tensor-parallel shards gathered along their partition dim."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()
    out = {}
    for n, p in ddp_model.module.named_parameters():
        g = p.main_grad.detach().clone()
        if getattr(p, "tensor_model_parallel", False) and tp_group.size() > 1:
            parts = [torch.empty_like(g) for _ in range(tp_group.size())]
            dist.all_gather(parts, g.contiguous(), group=tp_group)
            g = torch.cat(parts, dim=p.partition_dim)
        out[n] = g
    return out


def run_case(kind, method, *, tp, cp, dp, b=B, lss_double=False):
    """One model case on this rank; returns (local logits, binary logits, grads, coords)."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_seqpar.megatron.lss_grad import lss_finalize_model_grads

    oracle = method is None
    config = make_config(tp=tp, cp=cp)
    model = ddp_wrap(config, build_model(kind, method, config), lss_double)
    n_global = b * dp
    full = global_batch(kind, n_global)
    d = ps.get_data_parallel_rank()
    batch = {k: v[d * b:(d + 1) * b] for k, v in full.items()}
    sop = batch.pop("sop", None)
    batch = get_batch_on_this_cp_rank(batch)
    batch["sop"] = sop
    if kind == "gpt-learned-localpos":  # negative control: local positions (LightSeq's bug)
        batch["position_ids"] = torch.arange(S // cp).expand(b, S // cp).contiguous()
    n_tokens = full["loss_mask"].sum()
    model.zero_grad_buffer()
    loss, logits, binary = forward_loss(kind, model, batch, n_tokens, n_global, dp, cp, oracle)
    loss.backward()
    if lss_route(lss_double) == "install":
        config.finalize_model_grads_func([model])  # set by install_lss_grad_averaging
    elif str(lss_double).startswith("distopt"):
        model.finish_grad_sync()  # Megatron's own two levels: RS over CP, AR over DP
        gather_optimizer_shards(model)
    elif lss_double:
        lss_finalize_model_grads(ps.get_context_parallel_group(),
                                 assemble_position_grads=not lss_owned(lss_double))([model])
    else:
        model.finish_grad_sync()
    coords = (d, ps.get_context_parallel_rank())
    return (logits.detach(), None if binary is None else binary.detach(), grads_of(model),
            coords)


def gather_optimizer_shards(ddp_model):
    """After a distributed-optimizer reduction each rank holds only its shard of each bucket
    (the one its optimizer steps); all-gather the shards over the optimizer instance so that
    ``grads_of`` reads whole gradients."""
    import torch.distributed as dist
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    for group in ddp_model.bucket_groups:
        intra = group.intra_distributed_optimizer_instance_group
        for bucket in group.buckets:
            shards = shard_buffer(bucket.grad_data, intra.size())
            dist.all_gather_into_tensor(bucket.grad_data, shards[intra.rank()].clone(),
                                        group=intra)


# ----------------------------------------------------------------------------- workers
def _worker(rank, world_size, tp, cp, cases, instances=1):
    from megatron.core import parallel_state as ps

    from megatron_seqpar import cpu_workarounds

    dp = world_size // (tp * cp)
    out = {}
    with cpu_workarounds.cpu_shims():
        init_parallel(tp=tp, cp=cp, instances=instances)
        try:
            for kind, method, lss_double in cases:
                t0 = time.perf_counter()
                out[(kind, method, lss_double)] = run_case(kind, method, tp=tp, cp=cp, dp=dp,
                                                           lss_double=lss_double) + (
                    time.perf_counter() - t0,)
        finally:
            ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def oracle():
    """CP=1, DP=1 megatron-core runs on the whole global batch (4 samples covers DP=2)."""
    cases = [(k, None, False) for k in MODELS]
    ref = {}
    for n_dp in (1, 2):  # global batch B*n_dp
        res = run_on_ranks(_worker_oracle, 1, n_dp, cases, timeout=300)[0]
        for (kind, _, _), v in res.items():
            ref[(kind, n_dp)] = v
    return ref


def _worker_oracle(rank, world_size, n_dp, cases):
    from megatron.core import parallel_state as ps

    from megatron_seqpar import cpu_workarounds

    out = {}
    with cpu_workarounds.cpu_shims():
        init_parallel()
        try:
            for kind, _, _ in cases:  # one rank holds the whole global batch of B*n_dp
                out[(kind, None, False)] = run_case(kind, None, tp=1, cp=1, dp=1, b=B * n_dp)
        finally:
            ps.destroy_model_parallel()
    return out


def _rel(a, b):
    scale = max(float(b.abs().max()), 1e-30)
    return float((a - b).abs().max()) / scale


def compare(kind, res, ref, cp, lss_double):
    """Max relative errors (logits, grads) of one rank's result against the oracle."""
    logits, binary, grads, (d, r), _ = res
    r_logits, r_binary, r_grads, _ = ref
    idx = zigzag_index(r, cp)
    want = r_logits[d * B:(d + 1) * B][:, idx]
    if kind.startswith("bert"):
        valid = (torch.arange(S)[None, :] <
                 torch.tensor(BERT_LENGTHS[d * B:(d + 1) * B])[:, None])[:, idx]
        err_l = _rel(logits[valid], want[valid])
        err_l = max(err_l, _rel(binary, r_binary[d * B:(d + 1) * B]))
    else:
        err_l = _rel(logits, want)
    err_g = 0.0
    assert set(grads) == set(r_grads)
    assert all(grads[n].shape == r_grads[n].shape for n in grads)
    for name, g in grads.items():
        w = r_grads[name]
        if lss_owned(lss_double) and name.endswith("position_embeddings.weight"):
            from megatron_seqpar.megatron.lss_grad import owned_position_rows

            own = owned_position_rows(S, r, cp)
            other = torch.ones(w.size(0), dtype=torch.bool)
            other[own] = False
            if bool(other.any()) and float(g[other].abs().max()) != 0.0:
                err_g = float("inf")  # rows of other segments must stay untouched
            g, w = g[own], w[own]
        err_g = max(err_g, _rel(g, w))
    return err_l, err_g


def _check(tp, cp, world, oracle, cases, label, expect_fail=False, instances=1):
    results = run_on_ranks(_worker, world, tp, cp, cases, instances, timeout=420)
    dp = world // (tp * cp)
    rows, bad = [], []
    for case in cases:
        kind, method, lss_double = case
        ref = oracle[(kind.removesuffix("-localpos"), dp)]
        errs = [compare(kind, res[case], ref, cp, lss_double) for res in results]
        el, eg = max(e[0] for e in errs), max(e[1] for e in errs)
        secs = max(res[case][-1] for res in results)
        name = method + {False: "", True: "+double-avg", "ddp": "+double-avg",
                         "install": "+double-avg(installed)",
                         "overlap": "+double-avg(overlap)",
                         "distopt": "+double-avg(distributed optimizer)",
                         "distopt-overlap": "+double-avg(distributed optimizer, overlap)",
                         }[lss_route(lss_double)]
        name += "-owned" if lss_owned(lss_double) else ""
        rows.append({"config": label, "method": name, "model": kind, "max_rel_err_logits": el,
                     "max_rel_err_grads": eg, "seconds": round(secs, 2)})
        if (el < TOL and eg < TOL) == expect_fail:
            bad.append(rows[-1])
    modes = (True, "install", "overlap", "ddp-owned", "install-owned", "overlap-owned",
             "distopt", "distopt-overlap")
    for kind, mode in ((k, m) for k in MODELS for m in modes):
        a, b = (kind, "lss", False), (kind, "lss", mode)  # double avg == plain Megatron CP
        if a in cases and b in cases:
            for res in results:
                r = res[a][3][1]
                for name, g in res[b][2].items():
                    want = res[a][2][name]
                    if lss_owned(mode) and name.endswith("position_embeddings.weight"):
                        from megatron_seqpar.megatron.lss_grad import owned_position_rows

                        own = owned_position_rows(S, r, cp)
                        g, want = g[own], want[own]
                    assert _rel(g, want) < TOL, (kind, name)
    report_rows(rows, bad, "parity failures")
    return rows


def report_rows(rows, bad, what: str) -> None:
    """Print the parity rows (and append them to ``$MSP_PARITY_TABLE`` as JSON lines when
    set), then fail on ``bad`` with ``what``."""
    out = os.environ.get("MSP_PARITY_TABLE")
    if out:
        with open(out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    for row in rows:
        print(row)
    assert not bad, f"{what}: {bad}"


def _cases(methods=METHODS, models=MODELS, lss_double=True):
    cases = [(k, m, False) for m in methods for k in models]
    if lss_double and "lss" in methods:
        cases += [(k, "lss", True) for k in models]
        cases += [(k, "lss", "install") for k in models if k != "gpt-rope"]
        cases += [("gpt-learned", "lss", "overlap")] if "gpt-learned" in models else []
        learned = [k for k in models if k != "gpt-rope"]  # models with a position table
        cases += [(k, "lss", m) for k in learned for m in ("ddp-owned", "install-owned")]
        cases += [("gpt-learned", "lss", "overlap-owned")] if "gpt-learned" in models else []
    return cases


def test_parity_cp1(oracle):
    _check(1, 1, 1, oracle, _cases(lss_double=False), "CP=1")


def test_parity_cp2(oracle):
    _check(1, 2, 2, oracle, _cases(), "CP=2")


def test_parity_cp3(oracle):
    _check(1, 3, 3, oracle, _cases(lss_double=False), "CP=3")


def test_parity_cp2_dp2(oracle):
    _check(1, 2, 4, oracle, _cases(), "CP=2 x DP=2")


def test_parity_tp2_cp2(oracle):
    _check(2, 2, 4, oracle, _cases(models=("gpt-rope", "bert"), lss_double=False), "TP=2 x CP=2")


def test_negative_controls_cp2(oracle):
    """The checks can fail: megatron's local position ids under CP (BertModel's own
    ``bert_position_ids``; GPT fed ``arange(local)`` as LightSeq's original does) are caught."""
    cases = [("bert-localpos", "lightseq", False), ("gpt-learned-localpos", "lightseq", False)]
    rows = _check(1, 2, 2, oracle, cases, "CP=2 control", expect_fail=True)
    assert all(r["max_rel_err_logits"] > 1e-3 for r in rows)


@pytest.mark.parametrize("cp, world", [(2, 2), (2, 4)], ids=["cp2", "cp2xdp2"])
def test_lss_distributed_optimizer(oracle, cp, world):
    """LSS with megatron-core's distributed optimizer (issue 27): one optimizer instance per DP
    replica, sharded over its CP group, so DDP's reduce-scatter is level 1 (sequence group) and
    the all-reduce across instances level 2 (DP); every rank's shard, gathered, is the
    single-process gradient, with and without overlap. (No plain-DDP case beside it: with
    optimizer instances, megatron-core's DDP reduces over the instance group whether or not
    the optimizer is distributed.)"""
    cases = [(k, "lss", "distopt") for k in ("gpt-learned", "bert")]
    cases += [("gpt-learned", "lss", "distopt-overlap")]
    dp = world // cp
    _check(1, cp, world, oracle, cases, f"CP={cp} x DP={dp} distributed optimizer",
           instances=dp)


def _lss_distopt_wrong_instances(rank, world_size):
    from megatron.core import parallel_state as ps

    from megatron_seqpar import cpu_workarounds

    with cpu_workarounds.cpu_shims():
        init_parallel(cp=2)  # one optimizer instance over DP x CP: a single level
        try:
            config = make_config(cp=2)
            ddp_wrap(config, build_model("gpt-learned", "lss", config), "distopt")
        except ValueError as e:
            return str(e)
        finally:
            ps.destroy_model_parallel()
    return None


def test_lss_distributed_optimizer_needs_one_instance_per_replica():
    msgs = run_on_ranks(_lss_distopt_wrong_instances, 4)
    assert all(m and "--num-distributed-optimizer-instances 2" in m for m in msgs), msgs


def _lss_distopt_bytes(rank, world_size):
    """Bytes this rank sends per level of LSS with the distributed optimizer at CP=2 x DP=2,
    read from the collectives megatron-core's buckets call (ring formulas per call)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import param_and_grad_buffer as pgb

    from megatron_seqpar import cpu_workarounds

    sent = {"level1": 0, "level2": 0, "param_gather": 0}

    def record(level, factor, fn):
        def call(out_or_t, *args, group=None, **kwargs):
            k = group.size()
            # the whole buffer: reduce-scatter's input, all-reduce's tensor, all-gather's output
            t = args[0] if level == "level1" else out_or_t
            sent[level] += factor * (k - 1) * t.numel() * t.element_size() // k
            return fn(out_or_t, *args, group=group, **kwargs)
        return call

    with cpu_workarounds.cpu_shims():
        init_parallel(cp=2, instances=2)
        try:
            config = make_config(cp=2)
            model = ddp_wrap(config, build_model("gpt-learned", "lss", config), "distopt")
            n = sum(b.grad_data.numel() for g in model.bucket_groups for b in g.buckets)
            d = ps.get_data_parallel_rank()
            batch = get_batch({k: v[d * B:(d + 1) * B] for k, v in
                               global_batch("gpt-learned", 2 * B).items()})
            loss, _, _ = forward_loss("gpt-learned", model, batch, 2 * B * S, 2 * B, 2, 2, False)
            loss.backward()
            saved = (pgb.dist_reduce_scatter_func, dist.all_reduce, pgb.dist_all_gather_func)
            pgb.dist_reduce_scatter_func = record("level1", 1, saved[0])
            dist.all_reduce = record("level2", 2, saved[1])
            pgb.dist_all_gather_func = record("param_gather", 1, saved[2])
            try:
                model.finish_grad_sync()
                model.start_param_sync(force_sync=True)
            finally:
                pgb.dist_reduce_scatter_func, dist.all_reduce, pgb.dist_all_gather_func = saved
            return sent, n
        finally:
            ps.destroy_model_parallel()


def test_lss_distributed_optimizer_bytes_per_level():
    """The bytes each level sends (measured at the collectives) are the model's
    (``model_cost.lss_grad_bytes``): reduce-scatter over CP, all-reduce of the 1/P shard over
    DP, all-gather of the parameters over CP; float64 buffers (the parity tests' models)."""
    from megatron_seqpar.model_cost import lss_grad_bytes

    for sent, n in run_on_ranks(_lss_distopt_bytes, 4, timeout=180):
        want = lss_grad_bytes(n, 8, 2, 2, distributed_optimizer=True)
        assert sent == {"level1": want.level1, "level2": want.level2,
                        "param_gather": want.param_gather}, (sent, want)


def _lss_level1(rank, world_size, assemble):
    from megatron.core import parallel_state as ps

    from megatron_seqpar import cpu_workarounds
    from megatron_seqpar.megatron.lss_grad import (
        average_over_sequence_group,
        position_embedding_params,
    )

    with cpu_workarounds.cpu_shims():
        init_parallel(cp=2)
        try:
            config = make_config(cp=2)
            model = ddp_wrap(config, build_model("gpt-learned", "lss", config), True)
            n = sum(p.numel() for p in model.module.parameters())
            e = sum(p.numel() for p in position_embedding_params(model.module))
            batch = get_batch(global_batch("gpt-learned", B))
            loss, _, _ = forward_loss("gpt-learned", model, batch, B * S, B, 1, 2, False)
            loss.backward()
            payload = average_over_sequence_group(model, ps.get_context_parallel_group(),
                                                  assemble_position_grads=assemble)
            return payload, n, e
        finally:
            ps.destroy_model_parallel()


def get_batch(batch):
    from megatron.core.utils import get_batch_on_this_cp_rank

    return get_batch_on_this_cp_rank(batch)


@pytest.mark.parametrize("assemble", [True, False], ids=["assembled", "owned"])
def test_lss_level1_bytes(assemble):
    """Level 1 of LSS double averaging all-reduces every gradient (assembled, the default) or
    every gradient but the position tables (owned per segment)."""
    for payload, n, e in run_on_ranks(_lss_level1, 2, assemble, timeout=180):
        assert e == S * H
        assert payload == (n if assemble else n - e) * 8  # float64 grad buffer
