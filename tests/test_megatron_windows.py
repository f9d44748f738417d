"""megatron-core parity for today's attention: sliding windows on alternating layers with
learnable softmax sinks, and multi-latent attention (MLA), float64 on CPU/gloo.

Windows + sinks: the oracle is stock megatron-core at CP=1 with its own local
``DotProductAttention`` (``window_size=(10, 0)``, ``window_attn_skip_freq=2``: layer 1
windowed, layer 2 full; ``softmax_type="learnable"``); our spec runs every method at CP=2, CP=3
and TP=2 x CP=2. Logits of this rank's tokens and every parameter gradient after DDP's
reduction (the sinks' ``softmax_offset`` included, under megatron-core's own parameter name)
must match to 1e-9 relative (float64 round-off of a two-layer model stays near 1e-13).

MLA: megatron-core's local ``DotProductAttention`` takes no ``k_channels``/``v_channels``, so
with MLA our provider is the core attention at every CP size. The oracle is the same MLA GPT at
CP=1 with a plain-math core attention (``PlainMath`` below: scores, causal mask, softmax,
``P·V``); CP=1, CP=2 and CP=3 with our provider must match it.
"""

from __future__ import annotations

import pytest
import torch
from distributed import run_on_ranks
from test_megatron_parity import (
    GROUPS,
    HEADS,
    TOL,
    B,
    V,
    _rel,
    ddp_wrap,
    forward_loss,
    global_batch,
    grads_of,
    init_parallel,
    report_rows,
    zigzag_index,
)

from megatron_seqpar import METHODS

pytestmark = pytest.mark.megatron
pytest.importorskip("megatron.core")

S = 48
WINDOW = dict(window_size=(10, 0), window_attn_skip_freq=2, softmax_type="learnable")
MLA = dict(multi_latent_attention=True, q_lora_rank=None, kv_lora_rank=32, qk_head_dim=16,
           qk_pos_emb_head_dim=8, v_head_dim=24, rope_type="rope", normalization="RMSNorm")


class PlainMath(torch.nn.Module):
    """A core attention in plain torch math (causal, no CP): the MLA oracle."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type="self",
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None, k_channels=None, v_channels=None, **kw):
        super().__init__()  # (Attention's __init__ builds one first, without the channels)
        self.scale = softmax_scale or (k_channels or config.kv_channels) ** -0.5

    def forward(self, q, k, v, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        s = q.size(0)
        scores = torch.einsum("qbhd,kbhd->bhqk", q, k) * self.scale
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        out = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v)
        return out.reshape(s, q.size(1), -1)


def make_config(kind, tp, cp):
    from megatron.core.transformer.transformer_config import (
        MLATransformerConfig,
        TransformerConfig,
    )

    kw = dict(num_layers=2, hidden_size=64, num_attention_heads=HEADS,
              use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0,
              tensor_model_parallel_size=tp, context_parallel_size=cp)
    if kind == "mla":
        return MLATransformerConfig(**kw, **MLA)
    return TransformerConfig(**kw, num_query_groups=GROUPS, **WINDOW)


def build(kind, method, config):
    """``method=None``: the oracle (megatron's local attention; MLA: ``PlainMath``)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_seqpar.specs import get_gpt_layer_spec, with_core_attention

    mla = dict(multi_latent_attention=True) if kind == "mla" else {}
    torch.manual_seed(1234)
    if method is None:
        spec = get_gpt_layer_local_spec(**mla)
        if kind == "mla":
            spec = with_core_attention(spec, "lightseq")
            spec.submodules.self_attention.submodules.core_attention = ModuleSpec(PlainMath)
    else:
        spec = get_gpt_layer_spec(method, **mla)
    model = GPTModel(config, spec, vocab_size=V, max_sequence_length=S,
                     position_embedding_type="rope", parallel_output=False)
    return model.double()


def run(kind, method, tp, cp):
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    config = make_config(kind, tp, cp)
    model = ddp_wrap(config, build(kind, method, config))
    full = {k: v[:, :S] for k, v in global_batch("gpt-rope", B).items()}
    batch = get_batch_on_this_cp_rank(dict(full))
    model.zero_grad_buffer()
    oracle = method is None and kind != "mla"  # megatron's local attention takes a mask
    loss, logits, _ = forward_loss("gpt-rope", model, batch, full["loss_mask"].sum(), B, 1, cp,
                                   oracle)
    loss.backward()
    model.finish_grad_sync()
    return logits.detach(), grads_of(model), ps.get_context_parallel_rank()


def _worker(rank, world, tp, cp, cases):
    from megatron.core import parallel_state as ps

    from megatron_seqpar import cpu_workarounds

    out = {}
    with cpu_workarounds.cpu_shims():
        init_parallel(tp=tp, cp=cp)
        try:
            for kind, method in cases:
                out[(kind, method)] = run(kind, method, tp, cp)
        finally:
            ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def oracle():
    return run_on_ranks(_worker, 1, 1, 1, [("window", None), ("mla", None)], timeout=300)[0]


def _check(oracle, tp, cp, cases, label):
    results = run_on_ranks(_worker, tp * cp, tp, cp, cases, timeout=420)
    rows, bad = [], []
    for case in cases:
        ref_logits, ref_grads, _ = oracle[(case[0], None)]
        el = eg = 0.0
        for res in results:
            logits, grads, r = res[case]
            el = max(el, _rel(logits, ref_logits[:, zigzag_index(r, cp, S)]))
            assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
            eg = max([eg] + [_rel(g, ref_grads[n]) for n, g in grads.items()])
        rows.append({"config": label, "model": case[0], "method": case[1],
                     "max_rel_err_logits": el, "max_rel_err_grads": eg})
        if not (el < TOL and eg < TOL):
            bad.append(rows[-1])
    report_rows(rows, bad, "window/sink/MLA parity failures")


@pytest.mark.parametrize("tp, cp", [(1, 2), (1, 3), (2, 2)], ids=["cp2", "cp3", "tp2xcp2"])
def test_window_and_sinks_match_megatron_local_attention(oracle, tp, cp):
    _check(oracle, tp, cp, [("window", m) for m in METHODS], f"TP={tp} x CP={cp}")


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_mla_matches_plain_math(oracle, cp):
    _check(oracle, 1, cp, [("mla", m) for m in METHODS], f"CP={cp}")


def test_sink_parameter_has_megatron_name_and_sharded_state(oracle):
    """The learnable offset is ``...core_attention.softmax_offset`` in both models (so
    checkpoints interchange) and its gradient is non-zero (it learns)."""
    _, grads, _ = oracle[("window", None)]
    names = [n for n in grads if n.endswith("core_attention.softmax_offset")]
    assert len(names) == 2 and all(float(grads[n].abs().max()) > 0 for n in names)
