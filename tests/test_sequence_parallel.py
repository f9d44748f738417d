"""Megatron's TP+SP baseline (``--sequence-parallel``) is the same model as TP without SP.

With ``sequence_parallel=True`` megatron-core keeps the norms, dropout and residual stream of
each TP rank on 1/TP of the tokens and swaps the TP all-reduces for all-gather /
reduce-scatter pairs; the loss and every gradient after ``finalize_model_grads`` (which sums
the norms' partial gradients over the TP group) must equal the TP run without SP. On CPU it
needs shim 6 of ``megatron_seqpar/cpu_workarounds.py`` (megatron-core's torch norm refuses SP).

Tolerance: float64; the runs differ only in the order of a few sums (the norm gradients are
two half-sums all-reduced instead of one sum; the output layer's gradient is reduce-scattered
instead of all-reduced), so 1e-12 relative is ~5000 ulp of headroom.
"""

from __future__ import annotations

import pytest
from distributed import run_on_ranks

from megatron_seqpar.training.arguments import TrainConfig

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64, fp64=True,
            device="cpu", progress_bar=False, plot=False, tensor_model_parallel_size=2)


def _step(rank, world_size, sequence_parallel, position_embedding_type):
    """Loss and every parameter's reduced gradient of one forward+backward at TP=2."""
    import warnings

    import torch
    from megatron.core import parallel_state as ps

    from megatron_seqpar.cpu_workarounds import cpu_shims
    from megatron_seqpar.training.driver import _forward
    from megatron_seqpar.training.model import build_model, unwrap

    warnings.filterwarnings("ignore", category=UserWarning)
    cfg = TrainConfig(world_size=world_size, sequence_parallel=sequence_parallel,
                      position_embedding_type=position_embedding_type, **TINY)
    with cpu_shims():
        ps.initialize_model_parallel(2, 1, create_gloo_process_groups=False)
        try:
            torch.manual_seed(cfg.seed)
            model, config, finalize = build_model(cfg, "cpu")
            assert config.sequence_parallel is sequence_parallel
            tokens = torch.randint(0, 256, (1, cfg.seq_length + 1),
                                   generator=torch.Generator().manual_seed(0))
            batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                     "position_ids": torch.arange(cfg.seq_length)[None]}
            model.zero_grad_buffer()
            loss = _forward(cfg, model, batch).mean()
            loss.backward()
            finalize([model])
            return float(loss), {n: p.main_grad.clone()
                                 for n, p in unwrap(model).named_parameters()}
        finally:
            ps.destroy_model_parallel()


@pytest.mark.megatron
@pytest.mark.parametrize("pos", ["learned_absolute", "rope"])
def test_tp2_sequence_parallel_matches_tp2(pos):
    ref = run_on_ranks(_step, 2, False, pos)
    sp = run_on_ranks(_step, 2, True, pos)
    for rank in range(2):
        (l0, g0), (l1, g1) = ref[rank], sp[rank]
        assert abs(l0 - l1) <= 1e-12 * abs(l0), (rank, l0, l1)
        assert g0.keys() == g1.keys()
        for name in g0:
            scale = g0[name].abs().max().item()
            assert scale > 0, f"{name}: no gradient"
            err = (g0[name] - g1[name]).abs().max().item()
            assert err <= 1e-12 * scale, f"rank {rank} {name}: {err:.2e} vs scale {scale:.2e}"
