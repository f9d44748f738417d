"""Specs are megatron-core ModuleSpecs that differ from Megatron's only in core attention;
the provider refuses unsupported features with a clear error; helpers behave."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util

import pytest
import torch
from distributed import run_on_ranks

from megatron_seqpar import METHODS

pytestmark = pytest.mark.megatron
pytest.importorskip("megatron.core")



def _strip_core(spec):
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = None
    return spec


def test_module_level_specs_import():
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    import megatron_seqpar.specs as specs
    from megatron_seqpar.megatron.core_attention import SeqParCoreAttention
    from megatron_seqpar.specs import (  # noqa: F401 - the import itself is the contract
        bert_lightseq,
        bert_lss,
        bert_mqsp,
        bert_rsa,
        gpt_lightseq,
        gpt_lss,
        gpt_mqsp,
        gpt_rsa,
    )

    for model, base in (("gpt", get_gpt_layer_local_spec()), ("bert", bert_layer_local_spec)):
        for m in METHODS:
            spec = getattr(specs, f"{model}_{m}")
            assert isinstance(spec, ModuleSpec)
            core = spec.submodules.self_attention.submodules.core_attention
            assert isinstance(core, ModuleSpec) and core.module is SeqParCoreAttention
            assert core.params["method"] == m
            assert _strip_core(spec) == _strip_core(base)  # nothing else swapped
    # megatron's own spec objects are left untouched
    assert bert_layer_local_spec.submodules.self_attention.submodules.core_attention.__name__ \
        == "DotProductAttention"


def test_te_specs_need_transformer_engine():
    import megatron_seqpar.specs as specs

    if importlib.util.find_spec("transformer_engine") is None:
        with pytest.raises(ImportError, match="transformer_engine"):
            specs.gpt_te_lightseq  # noqa: B018
        with pytest.raises(ImportError, match="transformer_engine"):
            specs.get_bert_layer_spec("rsa", transformer_engine=True)
        pytest.skip("transformer_engine not installed: TE variants refused with ImportError")
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    for name in ("gpt_te_rsa", "bert_te_lss"):
        spec = getattr(specs, name)
        core = spec.submodules.self_attention.submodules.core_attention
        assert core.module is not TEDotProductAttention


def test_spec_builder_validation():
    from megatron_seqpar.specs import get_gpt_layer_spec, with_core_attention

    with pytest.raises(ValueError, match="unknown method"):
        get_gpt_layer_spec("ulysses-typo")
    mla = get_gpt_layer_spec("rsa", multi_latent_attention=True)  # MLA: our provider inside
    assert mla.submodules.self_attention.module.__name__ == "MLASelfAttention"
    assert mla.submodules.self_attention.submodules.core_attention.params["method"] == "rsa"
    with pytest.raises(ValueError, match="core_attention"):
        with_core_attention(object(), "rsa")
    spec = get_gpt_layer_spec("mqsp", qk_layernorm=True, remat=False)
    core = spec.submodules.self_attention.submodules.core_attention
    assert core.params == {"method": "mqsp", "options": None, "remat": False}


def test_key_padding_from_mask():
    from megatron_seqpar.megatron.core_attention import key_padding_from_mask

    pad = torch.tensor([[False, False, True, True], [False, True, True, True]])
    b11s = pad[:, None, None, :]
    b1ss = (pad[:, None, :, None] | pad[:, None, None, :])
    for m in (b11s, b1ss, pad[:, None, None, :].expand(2, 1, 4, 4)):
        assert torch.equal(key_padding_from_mask(m, sq=4, b=2, cp_rank=0, cp_size=1), pad)
    # full-length key axis at CP=2, rank 1 holds zigzag chunks 1 and 2 of 4 (length 2 each)
    full = torch.tensor([[False] * 6 + [True] * 2])  # S = 8
    got = key_padding_from_mask(full[:, None, None, :], sq=4, b=1, cp_rank=1, cp_size=2)
    assert got.tolist() == [[False, False, False, False]]
    got = key_padding_from_mask(full[:, None, None, :], sq=4, b=1, cp_rank=0, cp_size=2)
    assert got.tolist() == [[False, False, True, True]]
    arbitrary = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    arbitrary[0, 0, 0, 1] = True
    with pytest.raises(ValueError, match="key-padding"):
        key_padding_from_mask(arbitrary, sq=4, b=1, cp_rank=0, cp_size=1)
    with pytest.raises(ValueError, match="bool"):
        key_padding_from_mask(b11s.float(), sq=4, b=2, cp_rank=0, cp_size=1)
    with pytest.raises(ValueError, match="key length"):
        key_padding_from_mask(b11s[..., :3], sq=4, b=2, cp_rank=0, cp_size=1)


def test_owned_rows_and_positions():
    from megatron_seqpar.megatron.bert import zigzag_positions
    from megatron_seqpar.megatron.lss_grad import owned_position_rows

    rows = [owned_position_rows(12, r, 3).tolist() for r in range(3)]
    assert rows == [[0, 1, 10, 11], [2, 3, 8, 9], [4, 5, 6, 7]]
    assert [zigzag_positions(4, r, 3).tolist() for r in range(3)] == rows
    assert sorted(sum(rows, [])) == list(range(12))


def _provider_errors(rank, world_size):
    from megatron.core import parallel_state as ps
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from test_megatron_parity import init_parallel, make_config

    from megatron_seqpar import cpu_workarounds
    from megatron_seqpar.megatron.core_attention import SeqParCoreAttention
    from megatron_seqpar.megatron.parallel_state import (
        data_parallel_group,
        sequence_axis,
        sequence_world_size,
    )

    errors = {}

    def expect(name, fn):
        try:
            fn()
        except ValueError as e:
            errors[name] = str(e)
        else:
            errors[name] = None

    with cpu_workarounds.cpu_shims():
        try:
            expect("uninitialised", lambda: sequence_world_size())
            init_parallel()
            axis = sequence_axis()
            assert (axis.rank, axis.world_size) == (0, 1)
            assert data_parallel_group().size() == 1
            cfg = make_config()
            mk = lambda config=cfg, **kw: SeqParCoreAttention(
                config=config, layer_number=kw.pop("layer_number", 1),
                attn_mask_type=kw.pop("mask", AttnMaskType.causal),
                attention_type=kw.pop("attention_type", "self"), method=kw.pop("method", "rsa"),
                **kw)
            expect("dropout", lambda: mk(config=make_config(attention_dropout=0.1)))
            expect("dropout-arg", lambda: mk(attention_dropout=0.1))
            expect("cross", lambda: mk(attention_type="cross"))
            expect("method", lambda: mk(method="nope"))
            expect("arbitrary", lambda: mk(mask=AttnMaskType.arbitrary))
            bogus = make_config()
            bogus.softmax_type = "sparsemax"  # TransformerConfig does not check it itself
            expect("softmax", lambda: mk(config=bogus))
            # windows follow window_attn_skip_freq (layer 2 of every 2 keeps full attention)
            windowed = make_config(window_size=(8, 0), window_attn_skip_freq=2)
            assert mk(config=windowed).window == (8, 0)
            assert mk(config=windowed, layer_number=2).window is None
            sinks = mk(config=make_config(softmax_type="learnable"))
            assert isinstance(sinks.softmax_offset, torch.nn.Parameter)
            assert sinks.softmax_offset.shape == (4,)
            assert not isinstance(mk(config=make_config(softmax_type="off-by-one"))
                                  .softmax_offset, torch.nn.Parameter)
            core = mk()
            q = torch.randn(8, 1, 4, 16, dtype=torch.float64)
            k = torch.randn(8, 1, 2, 16, dtype=torch.float64)
            expect("packed", lambda: core(q, k, k, None, packed_seq_params=PackedSeqParams()))
            expect("bias", lambda: core(q, k, k, None, attention_bias=torch.zeros(1)))
            out = core(q, k, k, None)
            assert out.shape == (8, 1, 64)
            # layer scaling keeps the effective scale (Megatron multiplies it back in fp32)
            scaled = mk(config=make_config(apply_query_key_layer_scaling=True,
                                           attention_softmax_in_fp32=True), layer_number=2)
            assert scaled.softmax_scale == core.softmax_scale == 16 ** -0.5
            assert torch.equal(scaled(q, k, k, None), out)
        finally:
            ps.destroy_model_parallel()
    return errors


def test_provider_errors():
    errors = run_on_ranks(_provider_errors, 1, timeout=180)[0]
    hints = {"uninitialised": "initialize_model_parallel", "dropout": "attention_dropout=0.0",
             "dropout-arg": "attention_dropout", "cross": "self attention",
             "method": "unknown method", "arbitrary": "attn_mask_type", "softmax": "vanilla",
             "packed": "THD", "bias": "attention_bias"}
    for name, hint in hints.items():
        assert errors[name] is not None, f"{name}: no error raised"
        assert hint in errors[name], (name, errors[name])


def test_frozen_axis():
    from megatron_seqpar.megatron.parallel_state import SequenceAxis

    with pytest.raises(ValueError):
        SequenceAxis(group=None, rank=2, world_size=2)
    ax = SequenceAxis(group=None, rank=0, world_size=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ax.rank = 1


def test_provider_padding_hint_matches_every_ranks_shard():
    """``padded_key_ranges``: from a full-length Megatron mask, each CP rank's padded local key
    ranges in the zigzag layout, the same on every rank (what ``key_padding_ranges`` must be);
    None for a mask holding only this rank's keys."""
    import torch

    from megatron_seqpar.hostread import true_runs
    from megatron_seqpar.megatron.core_attention import padded_key_ranges

    P, S = 3, 36
    pad = torch.zeros(2, S, dtype=torch.bool)
    pad[0, 29:] = True
    pad[1, 4:7] = True
    mask = (pad[:, None, None, :]).expand(2, 1, S // P, S)  # [b, 1, sq, S]
    got = padded_key_ranges(mask, sq=S // P, cp_size=P)
    for r in range(P):
        zig = torch.cat([c for i, c in enumerate(pad.chunk(2 * P, 1)) if i in (r, 2 * P - 1 - r)],
                        1)
        assert got[r] == true_runs(zig)
    assert padded_key_ranges(mask[..., : S // P], sq=S // P, cp_size=P) is None
    assert padded_key_ranges(mask[..., : S // P], sq=S // P, cp_size=1) == (true_runs(pad[:, :12]),)
