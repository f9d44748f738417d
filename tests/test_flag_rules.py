"""The --seqpar-* flag rules are written once (megatron_seqpar/flag_rules.py) and read by both
routes: our driver stops at the first broken one, the Megatron-LM route lists them all."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys

import pytest

from megatron_seqpar import flag_rules, megatron_lm
from megatron_seqpar.megatron.rope import DocumentRope
from megatron_seqpar.training.arguments import ConfigError, TrainConfig

TINY = dict(num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=32,
            micro_batch_size=1, global_batch_size=1, world_size=2, context_parallel_size=2,
            progress_bar=False, plot=False, device="cpu")
MLM = dict(context_parallel_size=2, num_attention_heads=4, tensor_model_parallel_size=1,
           attention_dropout=0.0, transformer_impl="local")

# (driver config changes, Megatron-LM namespace changes, model, message fragment): one rule
# each, broken the same way on both routes
SHARED = [
    (dict(hierarchical_context_parallel_sizes=(3, 1)),
     dict(hierarchical_context_parallel_sizes=[3, 1]), "gpt", "U*R = --context-parallel-size 2"),
    (dict(context_parallel_size=4, world_size=4, hierarchical_context_parallel_sizes=(4, 1),
          num_attention_heads=2, hidden_size=32),
     dict(context_parallel_size=4, hierarchical_context_parallel_sizes=[4, 1],
          num_attention_heads=2), "gpt", "does not divide the 2 query heads"),
    (dict(hierarchical_context_parallel_sizes=(2, 1), seqpar_options=(("head_parallel", 1),)),
     dict(hierarchical_context_parallel_sizes=[2, 1], seqpar_head_parallel=1), "gpt",
     "disagrees with --hierarchical-context-parallel-sizes 2 1"),
    (dict(seqpar_method="lss", reset_position_ids=True,
          seqpar_options=(("assemble_position_grads", False),)),
     dict(seqpar_method="lss", reset_position_ids=True, seqpar_lss_assemble_position_grads=False),
     "gpt", "drop --no-seqpar-lss-assemble-position-grads"),
    (dict(reset_attention_mask=True, sequence_parallel=True, tensor_model_parallel_size=2,
          world_size=4, seq_length=32),
     dict(reset_attention_mask=True, sequence_parallel=True,
          create_attention_mask_in_dataloader=False), "gpt", "drop --sequence-parallel"),
    (dict(attention_dropout=0.1), dict(attention_dropout=0.1), "gpt", "--attention-dropout 0"),
    (dict(position_embedding_type="rope"), dict(position_embedding_type="rope"), "bert",
     "learned_absolute only"),
    (dict(eod_mask_loss=True), dict(eod_mask_loss=True), "bert", "GPT flags"),
    (dict(seqpar_packing="balanced"), dict(seqpar_packing="balanced"), "gpt",
     "add --reset-attention-mask"),
    (dict(seqpar_packing="balanced", reset_attention_mask=True, position_embedding_type="rope",
          multi_latent_attention=True),
     dict(seqpar_packing="balanced", reset_attention_mask=True, position_embedding_type="rope",
          create_attention_mask_in_dataloader=False, multi_latent_attention=True), "gpt",
     "balanced with --multi-latent-attention: not yet"),
]


@pytest.mark.parametrize("cfg, ns, model, fragment", SHARED,
                         ids=[case[-1][:30] for case in SHARED])
def test_a_shared_rule_reads_the_same_on_both_routes(cfg, ns, model, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("*", r"\*")):
        TrainConfig(**{**TINY, "seqpar_method": "lightseq", "model": model, **cfg})
    args = argparse.Namespace(**{**MLM, "seqpar_method": "lightseq", **ns})
    problems = megatron_lm.seqpar_conflicts(args, model=model)
    assert any(fragment in p for p in problems), problems


def test_balanced_rope_rotates_in_the_provider_on_both_routes():
    """RoPE under the balanced packing: both routes build the model without megatron-core's
    RoPE (the patched GPT builder asks ``megatron_lm.position_embedding_type``) and give the
    provider ``rope=`` (``megatron.rope``); zigzag keeps megatron-core's RoPE."""
    base = {**TINY, "seqpar_method": "lightseq", "reset_attention_mask": True,
            "position_embedding_type": "rope"}
    assert TrainConfig(**base, seqpar_packing="balanced").rope_in_provider
    assert not TrainConfig(**base).rope_in_provider  # zigzag
    mlm_args = dict(MLM, seqpar_method="lightseq", reset_attention_mask=True,
                    position_embedding_type="rope", create_attention_mask_in_dataloader=False,
                    rotary_percent=0.5, rotary_base=500, use_rope_scaling=False)
    balanced = argparse.Namespace(**mlm_args, seqpar_packing="balanced")
    assert megatron_lm.seqpar_conflicts(balanced, model="gpt") == []
    assert megatron_lm.position_embedding_type(balanced) == "none"
    assert megatron_lm._document_rope(balanced) == DocumentRope(rotary_percent=0.5,
                                                                rotary_base=500)
    zigzag = argparse.Namespace(**mlm_args, seqpar_packing="zigzag")
    assert megatron_lm.position_embedding_type(zigzag) == "rope"
    assert megatron_lm._document_rope(zigzag) is None
    inactive = argparse.Namespace(**{**mlm_args, "context_parallel_size": 1},
                                  seqpar_packing="balanced")  # Megatron-LM's own attention
    assert megatron_lm.position_embedding_type(inactive) == "rope"


def test_the_driver_stops_at_the_first_the_megatron_lm_route_lists_all():
    args = argparse.Namespace(**{**MLM, "seqpar_method": "lss", "attention_dropout": 0.1,
                                 "context_parallel_size": 1, "use_distributed_optimizer": True,
                                 "data_parallel_size": 2, "multi_latent_attention": True})
    names = [n for n, _ in flag_rules.broken(flag_rules.View(flag_rules.MEGATRON_LM, "bert",
                                                               args))]
    assert names == ["no_attention_dropout", "mla_is_gpt",
                     "lss_gradient_reduction"]
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{**TINY, "seqpar_method": None, "attention_dropout": 0.1,
                       "reset_attention_mask": True})
    assert "\n" not in str(e.value) and "needs --seqpar-method" in str(e.value)


def test_no_method_means_nothing_to_check_on_the_megatron_lm_route():
    args = argparse.Namespace(attention_dropout=0.1, context_parallel_size=1)
    assert megatron_lm.seqpar_conflicts(args) == []


def test_every_rule_names_its_routes_and_the_module_imports_no_torch():
    assert all(r.routes and set(r.routes) <= set(flag_rules.BOTH) for r in flag_rules.RULES)
    assert len({r.name for r in flag_rules.RULES}) == len(flag_rules.RULES)
    path = importlib.util.find_spec("megatron_seqpar.flag_rules").origin
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('fr', "
            f"{path!r}); m = importlib.util.module_from_spec(s); sys.modules['fr'] = m; "
            "s.loader.exec_module(m); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'megatron')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_a_method_at_cp1_is_inactive_on_the_megatron_lm_route():
    """At CP=1 the run is plain Megatron-LM: nothing to check (the patched builders print one
    line and use Megatron's own spec), except with MLA, which our provider runs there."""
    args = argparse.Namespace(**{**MLM, "seqpar_method": "lightseq", "attention_dropout": 0.1,
                                 "context_parallel_size": 1})
    assert not flag_rules.method_active(args) and megatron_lm.seqpar_conflicts(args) == []
    args.multi_latent_attention = True
    assert flag_rules.method_active(args) and megatron_lm.seqpar_conflicts(args) != []
