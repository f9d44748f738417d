"""Convergence parity: 30 training steps at CP=2 repeat the CP=1 loss curve, for every method.

The CP=1 reference is megatron-core's own local attention on one process; the CP=2 runs use
our specs on 2 gloo ranks, the same seed (identical init: CPU initialisation from the default
generator), the same global batches (every CP rank reads the full sample and keeps its zigzag
shard) and the same optimizer. GPT (causal) and BERT (masked LM, padded samples, so the padding
mask crosses ranks) are both covered.

Tolerance: everything is fp32, and the runs differ only in the order of floating-point sums
(attention partial results merged across blocks and ranks instead of one softmax, loss and
gradient sums split over two ranks and then all-reduced, the gradient norm for clipping). Each
such sum carries a relative error of a few 2^-24 ~ 6e-8, about 0.1 ulp of a loss near 5
(1 ulp = 4.8e-7; the logged loss is a float64 sum of fp32 per-token losses). Adam feeds that
noise back through 30 updates; measured on this machine (2026-11-30, LSS owned rows included),
every method stays within 1.4e-7 (GPT) and 1.5e-7 (BERT) of the CP=1 curve over all 30 steps.
We allow 2e-6, 13x the worst measured drift and still 0.4e-6 relative. Two real bugs this test
caught, for scale: a gradient-norm clip computed from one rank's share of the LSS
position-embedding gradient moved the GPT curve by 2e-4 (the default LSS now assembles those
rows over CP; the owned-rows variant, ``test_lss_owned_rows_cp2_matches_cp1``, still relies on
the driver's split norm); a masked-LM replacement token equal to the pad id (which turns a loss
position into a padded query row, defined differently by Megatron's local softmax and by our
methods) moved the BERT curve by 1.1e-5 in one step. A wrong mask, scale or missing gradient
term moves it by >= 1e-2 within a few steps.
"""

from __future__ import annotations

import pytest
from distributed import run_on_ranks

from megatron_seqpar.training.arguments import METHODS, TrainConfig

STEPS = 30
TOL = {"gpt": 2e-6, "bert": 2e-6}
TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
            micro_batch_size=1, global_batch_size=2, train_iters=STEPS, lr=1e-3,
            lr_warmup_iters=3, min_lr=1e-4, seed=1234, progress_bar=False, plot=False,
            device="cpu")


def _train(rank, world_size, kwargs):
    import warnings

    from megatron_seqpar.cpu_workarounds import cpu_shims
    from megatron_seqpar.training import driver

    warnings.filterwarnings("ignore", category=UserWarning)
    cfg = TrainConfig(world_size=world_size, **kwargs)
    with cpu_shims():
        return driver.train(cfg, device="cpu", quiet=True)


def _check(ref, got, tol):
    assert len(ref) == len(got) == STEPS
    worst = max(abs(a - b) for a, b in zip(ref, got))
    for i, (a, b) in enumerate(zip(ref, got)):
        assert abs(a - b) <= tol, f"step {i + 1}: CP=1 {a!r} vs CP=2 {b!r}"
    assert ref[-1] < ref[0] - 0.3, "the tiny model must actually learn in 30 steps"
    return worst


@pytest.fixture(scope="module")
def gpt_ref(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpt")
    common = dict(TINY, model="gpt", seq_length=128, data_cache_path=str(tmp / "data"))
    return tmp, run_on_ranks(_train, 1, dict(common, log_dir=str(tmp / "ref")))[0]


@pytest.mark.megatron
@pytest.mark.parametrize("method", METHODS)
def test_gpt_cp2_matches_cp1(method, gpt_ref):
    tmp, ref = gpt_ref
    common = dict(TINY, model="gpt", seq_length=128, data_cache_path=str(tmp / "data"))
    cp2 = run_on_ranks(_train, 2, dict(common, context_parallel_size=2, seqpar_method=method,
                                       log_dir=str(tmp / method)))
    assert cp2[0] == cp2[1], "both CP ranks must report the same (all-reduced) loss"
    worst = _check(ref, cp2[0], TOL["gpt"])
    print(f"gpt {method}: max |loss(CP=2) - loss(CP=1)| over {STEPS} steps = {worst:.2e}")


@pytest.fixture(scope="module")
def bert_ref(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bert")
    common = dict(TINY, model="bert", seq_length=128, data_cache_path=str(tmp / "data"))
    return tmp, run_on_ranks(_train, 1, dict(common, log_dir=str(tmp / "ref")))[0]


@pytest.mark.megatron
@pytest.mark.parametrize("method", METHODS)
def test_bert_padded_cp2_matches_cp1(method, bert_ref):
    tmp, ref = bert_ref
    common = dict(TINY, model="bert", seq_length=128, data_cache_path=str(tmp / "data"))
    cp2 = run_on_ranks(_train, 2, dict(common, context_parallel_size=2, seqpar_method=method,
                                       log_dir=str(tmp / method)))
    assert cp2[0] == cp2[1]
    worst = _check(ref, cp2[0], TOL["bert"])
    print(f"bert {method}: max |loss(CP=2) - loss(CP=1)| over {STEPS} steps = {worst:.2e}")


@pytest.mark.megatron
@pytest.mark.parametrize("model", ["gpt", "bert"])
def test_lss_owned_rows_cp2_matches_cp1(model, gpt_ref, bert_ref):
    """LSS with position-embedding rows owned per segment
    (``--no-seqpar-lss-assemble-position-grads``): the driver's split clipping norm (summed
    over CP) keeps it on the CP=1 curve too (same tolerance and reasoning as above)."""
    tmp, ref = gpt_ref if model == "gpt" else bert_ref
    common = dict(TINY, model=model, seq_length=128, data_cache_path=str(tmp / "data"))
    cp2 = run_on_ranks(_train, 2, dict(common, context_parallel_size=2, seqpar_method="lss",
                                       seqpar_options=(("assemble_position_grads", False),),
                                       log_dir=str(tmp / "lss-owned")))
    assert cp2[0] == cp2[1]
    worst = _check(ref, cp2[0], TOL[model])
    print(f"{model} lss (owned rows): max |loss(CP=2) - loss(CP=1)| over {STEPS} steps = "
          f"{worst:.2e}")


def _count_pads(rank, world_size, cache):
    from megatron_seqpar.training import data

    cfg = TrainConfig(**dict(TINY, model="bert", seq_length=128, world_size=world_size,
                             data_cache_path=cache))
    ds = data.build_train_dataset(cfg, data.prepare_data_prefix(cfg))
    src = data.BatchSource(ds, cfg, 0, None, "cpu")
    batches = [src.full(s, m) for s in range(STEPS) for m in range(cfg.num_microbatches)]
    return (sum(int((b["padding_mask"] == 0).sum()) for b in batches),
            sum(int(b["loss_mask"].sum()) for b in batches))


def test_bert_samples_are_padded(tmp_path):
    """The BERT parity runs really contain padding (short samples) and masked tokens."""
    pads, masked = run_on_ranks(_count_pads, 1, str(tmp_path))[0]
    assert pads > 0 and masked > 0


@pytest.mark.megatron
def test_method_at_cp1_is_inactive(gpt_ref):
    """Issue 27: ``--seqpar-method`` at CP=1 is accepted and inactive on our driver too: the
    run is megatron-core's local attention (the CP=1 reference's losses, exactly), and rank 0's
    one line says so; a CP sweep keeps one command line."""
    from megatron_seqpar.training.driver import inactive_line

    tmp, ref = gpt_ref
    kw = dict(TINY, model="gpt", seq_length=128, data_cache_path=str(tmp / "data"),
              seqpar_method="lightseq", log_dir=str(tmp / "inactive"))
    cfg = TrainConfig(world_size=1, **kw)
    assert cfg.attention_method is None
    assert "--seqpar-method lightseq is inactive at CP=1" in inactive_line(cfg)
    assert run_on_ranks(_train, 1, kw)[0] == ref  # the same code path: bit for bit
    assert inactive_line(TrainConfig(world_size=2, **dict(kw, context_parallel_size=2))) is None
    mla = TrainConfig(world_size=1, **dict(kw, multi_latent_attention=True))
    assert mla.attention_method == "lightseq" and inactive_line(mla) is None
