"""Two-level sequence parallelism inside megatron-core: CP=4 as U=2 (head all-to-all) x R=2.

Megatron's ``--hierarchical-context-parallel-sizes 2 2`` makes ``parallel_state`` build the
hierarchical CP groups (level 0: consecutive pairs {0,1},{2,3}; level 1: {0,2},{1,3}) and puts
``hierarchical_context_parallel_sizes=[2, 2]`` into the ``TransformerConfig``; our provider
reads U from the config and the groups from ``pg_collection.hcp`` (the collection GPTModel and
BertModel pass down, filled from ``parallel_state``). Every case is float64 and checked against
megatron-core's own CP=1 run (``test_megatron_parity``'s oracle and helpers): logits of this
rank's tokens and EVERY parameter gradient after the gradient reduction, on every rank.

* parity: GPT (RoPE and learned positions) and BERT, each method, groups from
  ``parallel_state``; the provider must hold Megatron's groups, not build its own;
* LSS double gradient averaging with U=2 (``lss_ddp`` + ``lss_finalize_model_grads``,
  Megatron-LM's installed route, the owned position-embedding variant): the sequence group of
  the first level is still the whole CP group (all P ranks hold segments of the same sequences;
  the head all-to-all is inside attention), so the result must equal CP=1;
* groups through ``pg_collection`` only: ``parallel_state`` with CP=4 and NO hierarchical
  groups, the model built with a ``ProcessGroupCollection`` whose ``hcp`` holds groups made
  by megatron-core's ``create_hierarchical_groups``;
* rematerialization (``recompute_granularity="full"`` + ``remat=True``) with U=2: exact, no
  kept entry left, and the step sends exactly what a no-recompute step sends (head
  all-to-alls included);
* bad splits raise ``ValueError`` naming the fix.

Tolerance: 1e-9 relative to the largest reference magnitude, as in ``test_megatron_parity``
(float64; the methods reorder sums, so agreement is to float64 round-off, ~1e-15 x depth).
"""

from __future__ import annotations

import time

import pytest
import torch
from distributed import run_on_ranks

from megatron_seqpar import METHODS

pytestmark = pytest.mark.megatron
pytest.importorskip("megatron.core")
pytest.importorskip("einops")  # megatron-core needs it for hierarchical CP groups

CP, U, R = 4, 2, 2

MODELS = ("gpt-rope", "gpt-learned", "bert")
TOL = 1e-9


def _init(route: str):
    """Megatron's parallel state for CP=4; returns the pg_collection to build models with."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    # megatron-core 0.16.1's destroy_model_parallel() leaves this global set; our pool's
    # workers re-initialise Megatron per call, so a stale value of an earlier call would leak
    ps._HIERARCHICAL_CONTEXT_PARALLEL_GROUPS = None
    if route == "parallel_state":
        ps.initialize_model_parallel(context_parallel_size=CP,
                                     hierarchical_context_parallel_sizes=[U, R],
                                     create_gloo_process_groups=False)
        return None
    from megatron.core.process_groups_config import ProcessGroupCollection

    ps.initialize_model_parallel(context_parallel_size=CP, create_gloo_process_groups=False)
    assert ps.get_hierarchical_context_parallel_groups(check_initialized=False) is None
    pg = ProcessGroupCollection.use_mpu_process_groups()
    cp_ranks = dist.get_process_group_ranks(pg.cp)
    pg.hcp, _ = ps.create_hierarchical_groups(dist.get_rank(), cp_ranks, [U, R])
    return pg


def _build(kind, method, config, pg_collection=None, remat=None):
    torch.manual_seed(1234)  # the oracle's seed (test_megatron_parity.build_model)
    from test_megatron_parity import S, V

    from megatron_seqpar.specs import get_bert_layer_spec, get_gpt_layer_spec

    kw = {} if pg_collection is None else {"pg_collection": pg_collection}
    if kind.startswith("gpt"):
        from megatron.core.models.gpt.gpt_model import GPTModel

        pos = "rope" if kind == "gpt-rope" else "learned_absolute"
        model = GPTModel(config, get_gpt_layer_spec(method, remat=remat), vocab_size=V,
                         max_sequence_length=S, position_embedding_type=pos,
                         parallel_output=False, **kw)
    else:
        from megatron_seqpar.megatron.bert import SeqParBertModel

        model = SeqParBertModel(config=config, num_tokentypes=0,
                                transformer_layer_spec=get_bert_layer_spec(method, remat=remat),
                                vocab_size=V, max_sequence_length=S, parallel_output=False,
                                add_binary_head=True, **kw)
    return model.double()


def _groups_used(model, pg_collection):
    """True when every provider holds Megatron's hierarchical groups (inner, outer)."""
    from megatron.core import parallel_state as ps

    from megatron_seqpar.megatron.core_attention import SeqParCoreAttention

    want = (pg_collection.hcp if pg_collection is not None
            else ps.get_hierarchical_context_parallel_groups())
    cores = [m for m in model.modules() if isinstance(m, SeqParCoreAttention)]
    return bool(cores) and all(
        c.options.head_parallel == U and c.two_level_groups is not None
        and c.two_level_groups.inner is want[0] and c.two_level_groups.outer is want[1]
        for c in cores)


def _case(kind, method, lss_double, pg_collection, recompute):
    """One model step on this rank: (logits, binary, grads, coords, secs, extra)."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank
    from test_megatron_parity import (
        B,
        ddp_wrap,
        forward_loss,
        global_batch,
        grads_of,
        lss_owned,
        lss_route,
        make_config,
    )

    from megatron_seqpar.comm import count_traffic
    from megatron_seqpar.megatron.core_attention import SeqParCoreAttention
    from megatron_seqpar.megatron.lss_grad import lss_finalize_model_grads

    t0 = time.perf_counter()
    over = dict(recompute_granularity="full", recompute_method="uniform",
                recompute_num_layers=1) if recompute else {}
    config = make_config(cp=CP, hierarchical_context_parallel_sizes=[U, R], **over)
    module = _build(kind, method, config, pg_collection, remat=True if recompute else None)
    used = _groups_used(module, pg_collection)
    model = ddp_wrap(config, module, lss_double)
    full = global_batch(kind, B)
    sop = full.pop("sop", None)
    batch = get_batch_on_this_cp_rank(dict(full))
    batch["sop"] = sop
    model.zero_grad_buffer()
    with count_traffic() as traffic:
        loss, logits, binary = forward_loss(kind, model, batch, full["loss_mask"].sum(), B, 1,
                                            CP, False)
        loss.backward()
    if lss_route(lss_double) == "install":
        config.finalize_model_grads_func([model])
    elif lss_double:
        lss_finalize_model_grads(ps.get_context_parallel_group(),
                                 assemble_position_grads=not lss_owned(lss_double))([model])
    else:
        model.finish_grad_sync()
    cores = [m for m in model.modules() if isinstance(m, SeqParCoreAttention)]
    extra = {"groups_from_megatron": used, "sent_bytes": traffic.sent_bytes,
             "by_kind": dict(traffic.sent_by_kind),
             "kept_left": sum(c.remat.kept for c in cores if c.remat is not None),
             "with_remat": sum(c.remat is not None for c in cores)}
    return (logits.detach(), None if binary is None else binary.detach(), grads_of(model),
            (0, ps.get_context_parallel_rank()), time.perf_counter() - t0, extra)


def _worker(rank, world_size, route, cases):
    from megatron.core import parallel_state as ps

    from megatron_seqpar import cpu_workarounds

    out = {}
    with cpu_workarounds.cpu_shims():
        pg = _init(route)
        try:
            for kind, method, lss_double, recompute in cases:
                out[(kind, method, lss_double, recompute)] = _case(kind, method, lss_double, pg,
                                                                   recompute)
        finally:
            ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def oracle():
    """megatron-core's local attention at CP=1 on the global batch (test_megatron_parity)."""
    from test_megatron_parity import _worker_oracle

    res = run_on_ranks(_worker_oracle, 1, 1, [(k, None, False) for k in MODELS], timeout=300)[0]
    return {kind: v for (kind, _, _), v in res.items()}


def _check(route, cases, oracle, label):
    from test_megatron_parity import compare, lss_owned, lss_route

    results = run_on_ranks(_worker, CP, route, cases, timeout=420)
    rows, bad = [], []
    for case in cases:
        kind, method, lss_double, recompute = case
        errs = [compare(kind, res[case][:5], oracle[kind], CP, lss_double) for res in results]
        el, eg = max(e[0] for e in errs), max(e[1] for e in errs)
        name = method + ("" if not lss_double else f"+double-avg({lss_route(lss_double)})")
        name += "-owned" if lss_owned(lss_double) else ""
        name += "+recompute+remat" if recompute else ""
        rows.append({"config": label, "method": name, "model": kind,
                     "max_rel_err_logits": el, "max_rel_err_grads": eg,
                     "groups_from_megatron": all(r[case][5]["groups_from_megatron"]
                                                 for r in results),
                     "sent_bytes_rank0": results[0][case][5]["sent_bytes"],
                     "seconds": round(max(r[case][4] for r in results), 2)})
        if not (el < TOL and eg < TOL and rows[-1]["groups_from_megatron"]):
            bad.append(rows[-1])
    from test_megatron_parity import report_rows

    report_rows(rows, bad, "two-level parity failures")
    return results


def test_two_level_parity_parallel_state(oracle):
    """CP=4 = U2 x R2 from --hierarchical-context-parallel-sizes, every method and model, and
    LSS double gradient averaging (sequence group = the whole CP group) == CP=1."""
    cases = [(k, m, False, False) for m in METHODS for k in MODELS]
    cases += [("gpt-learned", "lss", True, False), ("bert", "lss", "install", False),
              ("gpt-learned", "lss", "ddp-owned", False)]
    results = _check("parallel_state", cases, oracle, "CP=4 (U=2 x R=2), parallel_state")
    for res in results:  # double averaging == stock Megatron CP reduction, gradient by gradient
        for double in (("gpt-learned", "lss", True, False),):
            plain = res[("gpt-learned", "lss", False, False)][2]
            for name, g in res[double][2].items():
                scale = max(float(plain[name].abs().max()), 1e-30)
                assert float((g - plain[name]).abs().max()) / scale < TOL, name


def test_two_level_groups_from_pg_collection(oracle):
    """parallel_state has no hierarchical groups; the provider takes them from the model's
    pg_collection (hcp made by megatron-core's create_hierarchical_groups)."""
    cases = [("gpt-rope", "lightseq", False, False), ("bert", "mqsp", False, False)]
    _check("pg_collection", cases, oracle, "CP=4 (U=2 x R=2), pg_collection.hcp")


def test_two_level_remat(oracle):
    """Full recompute + remat with U=2: exact, nothing kept, and the method's own forward
    (the traffic across the R outer groups) is not re-run: its bytes equal the
    no-recompute step's. The recompute pass redoes the head all-to-alls of one forward
    (Q,K,V in for the backward, O out; inside the U-rank inner group), exactly that much."""
    from test_megatron_parity import GROUPS, HEADS, B, H, S

    cases = [("gpt-rope", m, False, rc) for m in METHODS for rc in (False, True)]
    results = _check("parallel_state", cases, oracle, "CP=4 (U=2 x R=2), remat")
    d, s = H // HEADS, S // CP
    a2a_forward = 2 * (U - 1) * B * s * (2 * HEADS + 2 * GROUPS) * d * 8 // U  # 2 layers, fp64
    for res in results:
        for m in METHODS:
            plain = res[("gpt-rope", m, False, False)][5]
            remat = res[("gpt-rope", m, False, True)][5]
            assert remat["with_remat"] == 2 and remat["kept_left"] == 0, (m, remat)
            method_bytes = {k: v for k, v in plain["by_kind"].items() if k != "all_to_all"}
            assert method_bytes and all(v > 0 for v in method_bytes.values()), (m, plain)
            assert {k: v for k, v in remat["by_kind"].items() if k != "all_to_all"} == \
                method_bytes, (m, remat, plain)
            assert (remat["by_kind"]["all_to_all"] - plain["by_kind"]["all_to_all"]
                    == a2a_forward), (m, remat, plain)


def _bad_split(rank, world_size):
    from megatron.core import parallel_state as ps
    from test_megatron_parity import make_config

    from megatron_seqpar import cpu_workarounds
    from megatron_seqpar.megatron.parallel_state import two_level_groups

    errors = []
    with cpu_workarounds.cpu_shims():
        ps._HIERARCHICAL_CONTEXT_PARALLEL_GROUPS = None  # see _init
        ps.initialize_model_parallel(context_parallel_size=CP, create_gloo_process_groups=False)
        try:
            for sizes in ([3, 1], [8, 1]):  # U does not divide CP
                config = make_config(cp=CP, hierarchical_context_parallel_sizes=sizes)
                try:
                    _build("gpt-rope", "lightseq", config)
                except ValueError as e:
                    errors.append(str(e))
            try:  # Megatron's groups disagree with U
                two_level_groups(None, 3)
            except ValueError as e:
                errors.append(str(e))
            # U=4 divides CP=4 but not the 2 query heads: the first forward says so
            config = make_config(cp=CP, hierarchical_context_parallel_sizes=[4, 1],
                                 num_attention_heads=2, num_query_groups=2)
            model = _build("gpt-rope", "lightseq", config)
            from megatron.core.utils import get_batch_on_this_cp_rank
            from test_megatron_parity import global_batch

            batch = get_batch_on_this_cp_rank(global_batch("gpt-rope", 1))
            try:
                model(batch["tokens"], batch["position_ids"], None)
            except ValueError as e:
                errors.append(str(e))
        finally:
            ps.destroy_model_parallel()
    return errors


def test_two_level_bad_split():
    for errors in run_on_ranks(_bad_split, CP, timeout=180):
        assert len(errors) == 4, errors
        assert all("does not divide" in e for e in errors), errors
        assert "context-parallel size 4" in errors[0] and "U=8" in errors[1], errors
        assert "query heads" in errors[3], errors


# ----------------------------------------------------------------------------- our driver
DRIVER = dict(model="gpt", num_layers=2, hidden_size=64, num_attention_heads=4,
              num_query_groups=2, seq_length=64, micro_batch_size=1, global_batch_size=2,
              train_iters=4, lr=1e-3, lr_warmup_iters=1, min_lr=1e-4, seed=1234, fp64=True,
              progress_bar=False, plot=False, device="cpu")


def _train(rank, world_size, kwargs):
    import warnings

    from megatron_seqpar.comm import count_traffic
    from megatron_seqpar.cpu_workarounds import cpu_shims
    from megatron_seqpar.training import driver
    from megatron_seqpar.training.arguments import TrainConfig

    warnings.filterwarnings("ignore", category=UserWarning)
    cfg = TrainConfig(world_size=world_size, **kwargs)
    with cpu_shims(), count_traffic() as traffic:
        losses = driver.train(cfg, device="cpu", quiet=True)
    return losses, dict(traffic.sent_by_kind)


def test_driver_two_level_matches_cp1(tmp_path):
    """``--context-parallel-size 4 --hierarchical-context-parallel-sizes 2 2 --seqpar-method
    M`` logs CP=1's losses (float64, 4 Adam steps). Tolerance 1e-12 absolute on losses near
    5.5: float64 sums in another order (~1e-16 relative each) fed through 4 updates; a wrong
    mask or a missing gradient term moves them by >= 1e-3."""
    from megatron_seqpar.training.arguments import parse_args

    common = dict(DRIVER, data_cache_path=str(tmp_path / "data"))
    ref, _ = run_on_ranks(_train, 1, dict(common, log_dir=str(tmp_path / "ref")))[0]
    for method in ("lightseq", "lss"):
        argv = ["--context-parallel-size", "4", "--hierarchical-context-parallel-sizes", "2", "2",
                "--seqpar-method", method]
        cfg = parse_args(argv, world_size=4)
        assert cfg.hierarchical_context_parallel_sizes == (2, 2)
        got = run_on_ranks(_train, CP, dict(
            common, context_parallel_size=4, seqpar_method=method,
            hierarchical_context_parallel_sizes=cfg.hierarchical_context_parallel_sizes,
            log_dir=str(tmp_path / method)), timeout=300)
        for losses, sent in got:
            assert sent.get("all_to_all", 0) > 0, "two levels must run the head all-to-all"
            worst = max(abs(a - b) for a, b in zip(ref, losses))
            assert len(losses) == len(ref) and worst < 1e-12, (method, ref, losses)
        print(f"driver {method} CP=4 (U=2 x R=2): losses {got[0][0]}, CP=1 {ref}, "
              f"max |diff| {worst:.1e}")


@pytest.mark.parametrize("argv, match", [
    (["--hierarchical-context-parallel-sizes", "2", "2"], "needs --seqpar-method"),
    (["--seqpar-method", "lightseq", "--hierarchical-context-parallel-sizes", "3", "1"],
     "U\\*R = --context-parallel-size 4"),
    (["--seqpar-method", "rsa", "--hierarchical-context-parallel-sizes", "4", "1",
      "--num-attention-heads", "2", "--hidden-size", "64"], "does not divide the 2 query heads"),
    (["--seqpar-method", "mqsp", "--hierarchical-context-parallel-sizes", "2", "2",
      "--seqpar-head-parallel", "4"], "disagrees"),
])
def test_driver_bad_two_level_flags(argv, match):
    from megatron_seqpar.training.arguments import ConfigError, parse_args

    with pytest.raises(ConfigError, match=match):
        parse_args(["--context-parallel-size", "4", "--seq-length", "64", *argv], world_size=4)
