"""Megatron-LM route (issue 7): ``--seqpar-*`` flags, their validation, the patches.

Layout follows Megatron's ``tests/unit_tests``: plain pytest classes, and where a parallel
state is needed the ``setup_method`` / ``teardown_method`` initialise / destroy pair, so the
file also runs under Megatron's ``torchrun ... -m pytest`` runner.

* ``TestSeqparFlags`` needs only megatron-seqpar: the flag table, ``options_from_args`` and
  the conflict checks on plain namespaces.
* ``TestBertHelpers`` checks the CP loss helpers of the patched ``pretrain_bert.py`` on 2 gloo
  ranks against the single-process loss and gradient.
* ``TestMegatronLM`` runs only when ``MEGATRON_LM_PATH`` points at a Megatron-LM checkout
  (tag ``core_v0.16.1``), and is skipped with that reason otherwise: the patches apply and
  revert cleanly (on an overlay of the checkout, which stays untouched); Megatron-LM's own
  ``parse_args`` + ``validate_args`` accept our flags and reject bad ones (in a subprocess,
  since the checkout's ``megatron`` package must come first on ``sys.path``); the patched
  ``pretrain_gpt.py`` builds our model; and Megatron-LM's own ``pretrain()`` loop runs on CPU
  through ``tools/megatron_lm_cpu.py``: CP=2 (each method) and TP=2 x CP=2 log CP=1's losses,
  GPT and BERT, and checkpoints resume and load into another method.
  ``megatron.training`` imports ``six``, ``regex``, ``yaml``, ``triton`` and ``pydantic``
  (``make megatron-lm-deps``); without them those tests skip with that reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed import run_on_ranks

import megatron_seqpar as msp
from megatron_seqpar import megatron_lm as mlm

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "megatron_lm_patches.py"
MLM_PATH = os.environ.get("MEGATRON_LM_PATH")
NEEDS_MLM = pytest.mark.skipif(
    not MLM_PATH or not Path(MLM_PATH, "pretrain_gpt.py").is_file(),
    reason="MEGATRON_LM_PATH is not set to a Megatron-LM checkout (tag core_v0.16.1); set it "
    "to run the Megatron-LM route tests",
)


def parse(argv):
    return mlm.add_seqpar_args(argparse.ArgumentParser()).parse_args(argv)


def megatron_like(**over):
    """A namespace with the Megatron-LM attributes the validator reads, valid for lightseq."""
    ns = dict(vars(parse(["--seqpar-method", "lightseq"])), context_parallel_size=2,
              cp_comm_type=["p2p"], attention_dropout=0.0, transformer_impl="local", spec=None)
    ns.update(over)
    return argparse.Namespace(**ns)


class TestSeqparFlags:
    def test_every_options_field_has_a_flag(self):
        from megatron_seqpar.method import BaseOptions

        flags = {flag for flag, *_ in mlm.option_flags()}
        shared = {f.name for f in dataclasses.fields(BaseOptions)}
        assert {"--seqpar-backend", "--seqpar-head-parallel"} <= flags
        for m in msp.METHODS:  # fields every method shares have one flag, the others one each
            for f in dataclasses.fields(msp.method_options(m)):
                name = f.name.replace('_', '-')
                assert (f"--seqpar-{name}" if f.name in shared else f"--seqpar-{m}-{name}") in flags

    def test_defaults_are_the_dataclass_defaults(self):
        for m in msp.METHODS:
            assert mlm.options_from_args(parse(["--seqpar-method", m])) == msp.method_options(m)()
        assert mlm.options_from_args(parse([])) is None

    def test_method_options_reach_the_dataclass(self):
        args = parse(["--seqpar-method", "lightseq", "--no-seqpar-lightseq-balance",
                      "--seqpar-backend", "reference"])
        assert mlm.options_from_args(args) == msp.method_options("lightseq")(
            balance=False, backend="reference")
        args = parse(["--seqpar-method", "mqsp", "--seqpar-mqsp-micro-q", "4"])
        assert mlm.options_from_args(args).micro_q == 4
        args = parse(["--seqpar-method", "rsa", "--seqpar-rsa-colossalai-compat"])
        assert mlm.options_from_args(args).colossalai_compat is True

    @pytest.mark.parametrize("argv, match", [
        (["--seqpar-method", "lightseq", "--seqpar-mqsp-micro-q", "2"], "seqpar-mqsp-micro-q"),
        (["--seqpar-lightseq-balance"], "without --seqpar-method"),
        (["--seqpar-method", "mqsp", "--seqpar-mqsp-micro-q", "0"], "micro_q"),
    ])
    def test_bad_option_flags_are_named(self, argv, match):
        with pytest.raises(mlm.SeqParArgumentError, match=match):
            mlm.options_from_args(parse(argv))

    def test_unknown_method_is_an_argparse_error(self, capsys):
        with pytest.raises(SystemExit):
            parse(["--seqpar-method", "ulysses"])
        assert "invalid choice" in capsys.readouterr().err

    def test_works_on_an_argument_group(self):
        parser = argparse.ArgumentParser()
        mlm.add_seqpar_args(parser.add_argument_group("ours"))
        assert parser.parse_args(["--seqpar-method", "lss"]).seqpar_method == "lss"

    def test_chain_args_providers_skips_none(self):
        def extra(p):
            p.add_argument("--other", type=int, default=3)
            return p

        parser = mlm.chain_args_providers(None, extra, mlm.extra_args_provider)(
            argparse.ArgumentParser())
        ns = parser.parse_args(["--seqpar-method", "rsa"])
        assert (ns.other, ns.seqpar_method) == (3, "rsa")

    def test_valid_namespace_passes(self):
        assert mlm.validate_seqpar_args(megatron_like()) == msp.method_options("lightseq")()
        for dp in (1, 2):  # LSS + distributed optimizer: one instance per DP replica
            assert mlm.validate_seqpar_args(megatron_like(
                seqpar_method="lss", use_distributed_optimizer=True, data_parallel_size=dp,
                num_distributed_optimizer_instances=dp)) == msp.method_options("lss")()
        assert mlm.validate_seqpar_args(argparse.Namespace(seqpar_method=None)) is None

    @pytest.mark.parametrize("over, match", [
        ({"context_parallel_size": 1, "multi_latent_attention": True, "attention_dropout": 0.1},
         "--attention-dropout 0"),  # MLA: the method runs at CP=1 too, so its rules apply
        ({"cp_comm_type": ["a2a"]}, "drop --cp-comm-type"),
        ({"attention_dropout": 0.1}, "--attention-dropout 0"),
        ({"spec": ["megatron_seqpar.specs", "gpt_lightseq"]}, "drop --spec"),
        ({"sft": True}, "THD"),
        ({"hybrid_context_parallel": True}, "THD"),
        ({"transformer_impl": "inference_optimized"}, "--transformer-impl"),
        ({"reset_attention_mask": True}, "--no-create-attention-mask-in-dataloader"),
        ({"reset_attention_mask": True, "create_attention_mask_in_dataloader": False,
          "pipeline_model_parallel_size": 2}, "--pipeline-model-parallel-size 1"),
        ({"seqpar_method": "lss", "reset_attention_mask": True,
          "create_attention_mask_in_dataloader": False,
          "seqpar_lss_assemble_position_grads": False}, "assemble-position-grads"),
        ({"use_legacy_models": True}, "--use-legacy-models"),
        ({"seqpar_method": "lss", "use_distributed_optimizer": True, "data_parallel_size": 2},
         "--num-distributed-optimizer-instances 2"),
        ({"seqpar_method": "lss", "use_distributed_optimizer": True,
          "seqpar_lss_assemble_position_grads": False},
         "drop --no-seqpar-lss-assemble-position-grads"),
    ])
    def test_conflicts_name_the_fix(self, over, match):
        with pytest.raises(mlm.SeqParArgumentError, match=match):
            mlm.validate_seqpar_args(megatron_like(**over))

    def test_all_conflicts_reported_at_once(self):
        problems = mlm.seqpar_conflicts(megatron_like(cp_comm_type=["a2a"],
                                                      attention_dropout=0.1))
        assert len(problems) == 2
        assert mlm.seqpar_conflicts(megatron_like(context_parallel_size=1,
                                                  attention_dropout=0.1)) == []  # inactive

    def test_local_linears_without_apex(self):
        if mlm._has_module("fused_weight_gradient_mlp_cuda"):
            pytest.skip("APEX's fused_weight_gradient_mlp_cuda is installed here")
        with pytest.raises(mlm.SeqParArgumentError, match="--no-gradient-accumulation-fusion"):
            mlm.validate_seqpar_args(megatron_like(gradient_accumulation_fusion=True))
        if not mlm._has_module("apex"):
            with pytest.raises(mlm.SeqParArgumentError, match="--no-persist-layer-norm"):
                mlm.validate_seqpar_args(megatron_like(persist_layer_norm=True))

    def test_te_without_transformer_engine(self):
        if mlm._has_module("transformer_engine"):
            pytest.skip("transformer_engine is installed here")
        with pytest.raises(mlm.SeqParArgumentError, match="--transformer-impl local"):
            mlm.validate_seqpar_args(megatron_like(transformer_impl="transformer_engine"))


def _bert_loss_case(rank, world_size):
    """BERT LM + binary loss via the helpers on CP=world_size vs the same on one process."""
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(context_parallel_size=world_size,
                                 create_gloo_process_groups=False)
    try:
        g = torch.Generator().manual_seed(0)
        per_token = torch.rand(2, 16, generator=g, dtype=torch.float64)
        mask = (torch.rand(2, 16, generator=g) < 0.4).double()
        sop = torch.tensor(0.7, dtype=torch.float64)
        full = (per_token * mask).sum() / mask.sum()
        tokens = torch.arange(32).view(2, 16)
        shards = mlm.bert_batch_on_this_cp_rank(tokens, tokens, mask, tokens, tokens)
        idx = shards[0][0]  # global positions of this rank's tokens (row 0)
        x = per_token[:, idx].clone().requires_grad_(True)
        s = sop.clone().requires_grad_(True)
        loss = mlm.bert_lm_loss(x, shards[2]) + mlm.bert_binary_loss(s)
        (loss * world_size).backward()  # Megatron scales a 2-tuple loss by the CP size
        grad = x.grad / world_size  # DDP's 1/P, seen from this rank's tokens
        grad_s = s.grad.clone()
        torch.distributed.all_reduce(grad_s)
        want = torch.zeros_like(per_token)
        want[:, idx] = 1.0
        want = want * mask / mask.sum()
        err = (grad - want[:, idx]).abs().max()
        value = float(loss.detach() - sop - full)
        return {"value": value, "grad": float(err), "sop_grad": float(grad_s)}
    finally:
        ps.destroy_model_parallel()


@pytest.mark.megatron
class TestBertHelpers:
    def test_cp_loss_equals_single_process(self):
        for out in run_on_ranks(_bert_loss_case, 2):
            assert abs(out["value"]) < 1e-12  # every CP rank reports the whole-sequence loss
            assert out["grad"] < 1e-12  # d loss / d token = mask / N_total, this rank's tokens
            # summed over the P ranks: P * (P * 1/P) = P; DDP's 1/P leaves the true 1
            assert abs(out["sop_grad"] - 2.0) < 1e-12


def _document_batch_case(rank, world_size, layout="zigzag"):
    """The patched get_batch's document packing on CP=world_size: this rank's THD share."""
    from megatron.core import parallel_state as ps

    from megatron_seqpar.training.data import EOD, pack_documents

    ps.initialize_model_parallel(context_parallel_size=world_size,
                                 create_gloo_process_groups=False)
    try:
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(9, 256, (2, 24), generator=g)
        tokens[0, [3, 4, 10]] = EOD
        tokens[1, [20]] = EOD
        batch = {"tokens": tokens, "labels": tokens.roll(-1, 1),
                 "loss_mask": (tokens != EOD).float(), "attention_mask": None,
                 "position_ids": torch.arange(24).expand(2, 24)}
        got, params = mlm.document_batch_on_this_cp_rank(dict(batch), eod=EOD, layout=layout)
        full = pack_documents({k: v for k, v in batch.items() if k != "attention_mask"},
                              eod=EOD, unit=2 * world_size if layout == "zigzag" else 1)
        back = {k: msp.gather_sequence(got[k], dim=1, layout=layout,
                                       group=ps.get_context_parallel_group(),
                                       cu_seqlens=params.cu_seqlens_q_padded)
                for k in ("tokens", "labels", "loss_mask", "position_ids")}
        return {"keys": list(got), "mask": got["attention_mask"] is None,
                "format": params.qkv_format, "local": got["tokens"].size(1),
                "total": int(full["cu_seqlens_padded"][-1]),
                "same": all(torch.equal(back[k], full[k]) for k in back),
                "cu": params.cu_seqlens_q.tolist() == full["cu_seqlens"].tolist(),
                "cu_pad": params.cu_seqlens_q_padded.tolist(),
                "layout": getattr(params, "layout", "zigzag")}
    finally:
        ps.destroy_model_parallel()


@pytest.mark.megatron
def test_document_batch_on_this_cp_rank():
    """``--reset-attention-mask`` in the patched ``pretrain_gpt.get_batch``: Megatron's key
    order with ``attention_mask`` None, THD ``PackedSeqParams`` whose padded pieces are
    multiples of 2*CP, each rank holding its zigzag half of the stream (gathered back, the
    stream ``pack_documents`` builds)."""
    outs = run_on_ranks(_document_batch_case, 2)
    for out in outs:
        assert out["keys"] == ["tokens", "labels", "loss_mask", "attention_mask",
                               "position_ids"] and out["mask"] and out["format"] == "thd"
        assert out["same"] and out["cu"] and out["local"] * 2 == out["total"]
        assert all((b - a) % 4 == 0 for a, b in zip(out["cu_pad"], out["cu_pad"][1:]))


@pytest.mark.megatron
def test_document_batch_balanced():
    """``--seqpar-packing balanced``: no per-document padding (the pieces are the documents:
    lengths 4, 1, 6, 13 and 21, 3 on the two rows), each rank holds half of the stream in the
    balanced layout, and the params say so (the provider reads the layout from them)."""
    outs = run_on_ranks(_document_batch_case, 2, "balanced")
    for out in outs:
        assert out["mask"] and out["format"] == "thd" and out["layout"] == "balanced"
        assert out["same"] and out["cu"] and out["local"] * 2 == out["total"] == 48
        assert out["cu_pad"] == [0, 4, 5, 11, 24, 45, 48]


# ------------------------------------------------------------------------------ Megatron-LM
CHILD = r"""
import contextlib, io, json, os, sys
sys.path.insert(0, os.environ["MEGATRON_LM_PATH"])
os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
import megatron.training.arguments as A
# CPU shim (test only): validate_args asks the GPU architecture whenever TP or CP > 1.
A.get_device_arch_version = lambda: 9
from megatron.core.transformer.spec_utils import import_module
from megatron_seqpar import megatron_lm as seqpar
out = []
for case in json.load(sys.stdin):
    sys.argv = ["pretrain_gpt.py", *case["argv"]]
    os.environ["WORLD_SIZE"] = str(case.get("world_size", 2))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            provider = seqpar.extra_args_provider if case.get("patched", True) else None
            args = A.parse_args(provider)
            A.validate_args(args, {})
            opts = seqpar.validate_seqpar_args(args, model=case.get("model", "gpt"))
            spec = import_module(args.spec) if args.spec else None
        core = spec.submodules.self_attention.submodules.core_attention if spec else None
        out.append({"ok": True, "options": f"{type(opts).__module__}.{opts!r}", "core": repr(core)})
    except SystemExit:
        out.append({"ok": False, "error": err.getvalue()[-400:]})
    except (AssertionError, ValueError) as e:
        out.append({"ok": False, "error": f"{type(e).__name__}: {e}"})
print("RESULTS " + json.dumps(out))
"""

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "128", "--max-position-embeddings", "128", "--micro-batch-size", "1",
        "--global-batch-size", "1", "--train-iters", "3", "--lr", "1e-4", "--mock-data",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--transformer-impl",
        "local", "--no-gradient-accumulation-fusion", "--no-persist-layer-norm",
        "--attention-dropout", "0",
        "--context-parallel-size", "2"]

CP4, HCP22 = ["--context-parallel-size", "4"], ["--hierarchical-context-parallel-sizes", "2", "2"]

# (name, argv after BASE, extra case keys, expected: ("ok", substring of options/core) or
# ("error", substring of the message))
CASES = [
    ("lightseq", ["--seqpar-method", "lightseq"], {}, ("ok", "balance=True")),
    ("lightseq-opts", ["--seqpar-method", "lightseq", "--no-seqpar-lightseq-balance",
                       "--seqpar-backend", "reference"], {}, ("ok", "balance=False")),
    ("mqsp", ["--seqpar-method", "mqsp", "--seqpar-mqsp-micro-q", "2"], {}, ("ok", "micro_q=2")),
    ("rsa", ["--seqpar-method", "rsa", "--seqpar-rsa-colossalai-compat"], {},
     ("ok", "colossalai_compat=True")),
    ("lss", ["--seqpar-method", "lss"], {}, ("ok", "lss.Options")),
    ("lss-dist-opt", ["--seqpar-method", "lss", "--use-distributed-optimizer"], {},
     ("ok", "lss.Options")),  # DP=1: the one optimizer instance is the CP group
    ("lss-dist-opt-dp2", ["--seqpar-method", "lss", "--use-distributed-optimizer"],
     {"world_size": 4}, ("error", "--num-distributed-optimizer-instances 2")),
    ("lss-dist-opt-instances", ["--seqpar-method", "lss", "--use-distributed-optimizer",
                                "--num-distributed-optimizer-instances", "2"],
     {"world_size": 4}, ("ok", "lss.Options")),
    ("lss-dist-opt-owned", ["--seqpar-method", "lss", "--use-distributed-optimizer",
                            "--no-seqpar-lss-assemble-position-grads"], {},
     ("error", "drop --no-seqpar-lss-assemble-position-grads")),
    ("bert", ["--seqpar-method", "lss"], {"model": "bert"}, ("ok", "lss.Options")),
    ("bad-method", ["--seqpar-method", "ulysses"], {}, ("error", "invalid choice")),
    ("bad-value", ["--seqpar-method", "mqsp", "--seqpar-mqsp-micro-q", "0"], {},
     ("error", "micro_q")),
    ("other-method-flag", ["--seqpar-method", "rsa", "--seqpar-lightseq-balance"], {},
     ("error", "--seqpar-lightseq-balance")),
    ("cp1", ["--seqpar-method", "lightseq", "--context-parallel-size", "1"],  # inactive: local
     {"world_size": 1}, ("ok", "lightseq.Options")),
    ("te-cp-comm", ["--seqpar-method", "lightseq", "--cp-comm-type", "a2a"], {},
     ("error", "drop --cp-comm-type")),
    ("dropout", ["--seqpar-method", "lightseq", "--attention-dropout", "0.1"], {},
     ("error", "--attention-dropout 0")),
    ("spec-and-method", ["--seqpar-method", "lightseq", "--spec", "megatron_seqpar.specs",
                         "gpt_lightseq"], {}, ("error", "drop --spec")),
    ("megatron-own-check", ["--seqpar-method", "lightseq", "--seq-length", "130",
                            "--max-position-embeddings", "130"], {},
     ("error", "multiple of 2 * context-parallel-size")),
    ("unpatched-spec", ["--spec", "megatron_seqpar.specs", "gpt_lightseq"], {"patched": False},
     ("ok", "SeqParCoreAttention")),
    ("unpatched-method", ["--seqpar-method", "lightseq"], {"patched": False},
     ("error", "unrecognized arguments: --seqpar-method")),
    # two levels (issue 15): Megatron-LM's --hierarchical-context-parallel-sizes U R
    ("two-level", ["--seqpar-method", "lightseq", *CP4, *HCP22], {"world_size": 4},
     ("ok", "lightseq.Options")),
    ("two-level-te-comm", ["--seqpar-method", "mqsp", *CP4, *HCP22, "--cp-comm-type", "a2a+p2p"],
     {"world_size": 4}, ("ok", "mqsp.Options")),
    ("two-level-bert", ["--seqpar-method", "lss", *CP4, *HCP22], {"world_size": 4, "model": "bert"},
     ("ok", "lss.Options")),
    ("two-level-heads", ["--seqpar-method", "rsa", *CP4, "--num-attention-heads", "2",
                         "--hierarchical-context-parallel-sizes", "4", "1"], {"world_size": 4},
     ("error", "does not divide the 2 query heads")),
    ("two-level-head-parallel", ["--seqpar-method", "rsa", *CP4, *HCP22,
                                 "--seqpar-head-parallel", "4"], {"world_size": 4},
     ("error", "disagrees with --hierarchical-context-parallel-sizes 2 2")),
]

# Run under torchrun (2 gloo ranks, CPU) from a patched overlay: Megatron-LM's parser and
# checks, then the patched ``pretrain_gpt.py``'s own model provider builds the model.
BUILD_CHILD = r"""
import json, os, sys
import torch, torch.distributed as dist
os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
import megatron.training.arguments as A
A.get_device_arch_version = lambda: 9  # CPU shim (test only), as in the parsing test
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.utils import get_batch_on_this_cp_rank, get_model_config
from megatron.training.global_vars import set_args
from megatron_seqpar import cpu_workarounds
import pretrain_gpt
from megatron_seqpar import megatron_lm as seqpar

dist.init_process_group("gloo")
report = []
for argv in json.loads(os.environ["SEQPAR_ARGVS"]):
    sys.argv = ["pretrain_gpt.py", *argv]
    args = A.parse_args(seqpar.chain_args_providers(None, seqpar.extra_args_provider))
    A.validate_args(args, {})
    args.padded_vocab_size = args.vocab_size  # set by the tokenizer in a real run
    set_args(args)
    ps.initialize_model_parallel(context_parallel_size=args.context_parallel_size,
                                 create_gloo_process_groups=False)
    with cpu_workarounds.cpu_shims():
        model = pretrain_gpt.model_provider(pretrain_gpt.gpt_builder, True, True)
        core = model.decoder.layers[0].self_attention.core_attention
        config = get_model_config(model)
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
        config.finalize_model_grads_func = "stock"  # what Megatron-LM's train() sets
        step = seqpar.wrap_forward_step(lambda it, m: m(**next(it)))  # patched forward_step
        tokens = torch.randint(0, args.vocab_size, (1, args.seq_length),
                               generator=torch.Generator().manual_seed(0))
        pos = torch.arange(args.seq_length).unsqueeze(0)
        b = get_batch_on_this_cp_rank({"input_ids": tokens, "labels": tokens,
                                       "position_ids": pos})
        loss = step(iter([dict(b, attention_mask=None)]), ddp).sum()
        loss.backward()
        finalize = config.finalize_model_grads_func
        if callable(finalize):
            finalize([ddp])
    report.append({"core": type(core).__name__, "method": core.method,
                   "options": repr(core.options), "finalize": getattr(finalize, "__qualname__",
                   finalize), "loss": float(loss)})
    ps.destroy_model_parallel()
if dist.get_rank() == 0:
    print("BUILT " + json.dumps(report))
dist.destroy_process_group()
"""


def _overlay(tmp_path: Path) -> Path:
    """A copy of the checkout's patched files, everything else symlinked (checkout untouched)."""
    root = tmp_path / "mlm"
    root.mkdir()
    for entry in Path(MLM_PATH).iterdir():
        if entry.name in ("pretrain_gpt.py", "pretrain_bert.py", "gpt_builders.py"):
            shutil.copy2(entry, root / entry.name)
        else:
            (root / entry.name).symlink_to(entry)
    return root


def _tool(*argv):
    return subprocess.run([sys.executable, str(TOOL), *argv], capture_output=True, text=True,
                          timeout=120, check=False)


# Megatron-LM's own training loop on CPU: tools/megatron_lm_cpu.py under torchrun, tiny
# models, 10 iterations; every run is launched once per session and shared by the tests.
LAUNCHER = REPO / "tools" / "megatron_lm_cpu.py"
ITERS, SAVE_AT = 10, 5
LSS_LOG = mlm.LSS_INSTALLED_LOG
# Megatron-LM prints losses as ``{:.6E}`` (7 significant digits, +-0.5 unit of the last digit)
# and the grad norm as ``{:.3f}``. A CP=2 run adds the same fp32 terms in another order
# (blockwise attention with lse merges, loss and gradient all-reduces of partial sums), which
# moves a loss by ~1e-7 relative per step; Adam carries that into later steps. Measured over
# 10 iterations, GPT and BERT, every method, CP=2 and TP=2 x CP=2: at most 1 unit of the last
# printed digit. 3 units allow for it; a real difference is larger (LSS's partial grad norm
# under clipping with position-embedding rows owned per segment: 9 units by iteration 8).
LOSS_UNITS = 3
GRAD_NORM_TOL = 2e-3  # 2 units of the printed grad norm's last digit
MLM_DEPS = ("six", "regex", "yaml", "triton", "pydantic")
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "128", "--max-position-embeddings", "128", "--micro-batch-size", "1",
        "--global-batch-size", "2", "--train-iters", str(ITERS), "--lr", "1e-4", "--seed", "1234",
        "--attention-dropout", "0", "--hidden-dropout", "0",
        "--transformer-impl", "local", "--use-cpu-initialization", "--distributed-backend", "gloo",
        "--no-gradient-accumulation-fusion", "--no-persist-layer-norm", "--no-bias-gelu-fusion",
        "--no-bias-dropout-fusion", "--no-bias-swiglu-fusion", "--no-masked-softmax-fusion",
        "--eval-iters", "0", "--eval-interval", "1000", "--log-interval", "1"]
WINDOW_FLAGS = ("--window-size", "64,0", "--window-attn-skip-freq", "2", "--softmax-type",
                "learnable", "--position-embedding-type", "rope", "--no-rope-fusion")
MLA_FLAGS = ("--multi-latent-attention", "--kv-lora-rank", "16", "--qk-head-dim", "16",
             "--qk-pos-emb-head-dim", "8", "--v-head-dim", "24", "--position-embedding-type",
             "rope", "--rope-type", "rope", "--no-rope-fusion")
# vocabulary 255 (+ eod) pads to 256 rows at TP=1 and TP=2 alike
# --disable-bias-linear as MoE recipes (Mixtral) pass it: with biases, megatron-core 0.16.1's
# SequentialMLP experts at TP=1 add the bias in place to a custom Function's returned input
# ("Output 0 of _ReduceFromModelParallelRegion is a view and is being modified inplace"), any CP.
# Stand-ins for Slurm's commands on one machine: ``srun`` starts one copy of its command per
# node of $SLURM_NNODES (SLURM_NODEID/SLURM_PROCID set) and fails if any copy fails;
# ``scontrol show hostnames`` lists this machine once per node.
SRUN_STANDIN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift 2; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i "$@" &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
SCONTROL_STANDIN = """#!/bin/bash
for ((i = 0; i < SLURM_NNODES; i++)); do echo 127.0.0.1; done
"""
INTERLEAVED_FLAGS = ("--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "1")
# bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per element). At CP=2 the
# attention output is rounded to bf16 after fp32 merges of partial blocks, where Megatron's
# local attention rounds once after one softmax, so per-token losses move by ~1e-3 of their size
# with random sign; over the 256 tokens of a step and 10 Adam steps (lr 1e-4) that moved the
# logged loss (~5.5) by at most 7.5e-5, every method (measured 2026-12-07). 5e-4 is 6.7x that; a
# wrong mask or a missing gradient term moves the loss by >= 1e-2 within a few steps.
BF16_LOSS_TOL = 5e-4
MOE_FLAGS = ("--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0",
             "--disable-bias-linear")
GPT_DATA = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "255"]


def _bert_data(where: Path) -> list[str]:
    """A sentence-level indexed dataset (tools/preprocess_data.py, byte tokens) and a vocab
    file naming ids 0-255 for Megatron's legacy BERT tokenizer (ids 0-4 its specials)."""
    subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--output-prefix",
                    str(where / "pydoc"), "--split-sentences"], check=True, capture_output=True,
                   timeout=300)
    names = ["[PAD]", "[CLS]", "[SEP]", "[unused3]", "[MASK]"]
    names += [f"[unused{i}]" for i in range(5, 9)] + [f"b{i}" for i in range(9, 256)]
    (where / "vocab.txt").write_text("\n".join(names) + "\n")
    return ["--data-path", str(where / "pydoc_text_sentence"), "--split", "100,0,0",
            "--legacy-tokenizer", "--tokenizer-type", "BertWordPieceLowerCase",
            "--vocab-file", str(where / "vocab.txt")]


# GPT documents (issue 12): short byte-level documents ending in NullTokenizer's EOD (id 255,
# a byte UTF-8 text never holds), so every 128-token row crosses several document boundaries.
DOC_FLAGS = ["--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss",
             "--calculate-per-token-loss"]


def _docs_data(where: Path) -> list[str]:
    """An indexed GPT dataset of short documents (``test_training_packed.short_documents``),
    each followed by EOD 255; NullTokenizer with --vocab-size 255 names 255 its EOD."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from test_training_packed import short_documents

    prefix = str(where / "short_docs_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint8)
    for doc in short_documents():
        ids = np.frombuffer(doc.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        builder.add_item(torch.from_numpy(np.append(ids, 255)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return ["--data-path", prefix, "--split", "100,0,0", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", "255"]


@dataclasses.dataclass
class LoopRun:
    """One launcher run: its log and what Megatron-LM logged per iteration."""

    log: str
    lm: dict
    sop: dict
    grad_norm: dict

    @property
    def tail(self) -> str:
        return self.log[-3000:]

    @classmethod
    def parse(cls, log: str) -> LoopRun:
        import re

        out = {"lm loss": {}, "sop loss": {}, "grad norm": {}}
        for line in log.splitlines():
            m = re.search(r"iteration\s+(\d+)/\s*\d+ \|", line)
            if not m:
                continue
            for key, table in out.items():
                v = re.search(rf"\| {key}: ([-+0-9.Ee]+) \|", line)
                if v:
                    table[int(m.group(1))] = float(v.group(1))
        return cls(log, out["lm loss"], out["sop loss"], out["grad norm"])


class MegatronLoop:
    """Launches ``torchrun tools/megatron_lm_cpu.py <overlay>/pretrain_{gpt,bert}.py`` (each
    configuration once) on a patched overlay of the checkout."""

    def __init__(self, work: Path):
        self.work, self.root = work, _overlay(work)
        assert _tool("--apply", str(self.root)).returncode == 0
        self.bert_data = self.docs_data = None
        self.runs = {}

    def _launch(self, script: str, nproc: int, argv: list[str]) -> LoopRun:
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1")
        cmd = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), str(LAUNCHER), str(self.root / script), *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                              check=False, cwd=self.work)
        run = LoopRun.parse(proc.stdout + proc.stderr)
        assert proc.returncode == 0, f"{' '.join(cmd[-len(argv):])}\n{run.tail}"
        return run

    def _argv(self, model, cp, method, clip, tp):
        if model == "bert" and self.bert_data is None:
            (self.work / "data").mkdir()
            self.bert_data = _bert_data(self.work / "data")
        if model == "gpt-docs" and self.docs_data is None:
            (self.work / "docs").mkdir()
            self.docs_data = _docs_data(self.work / "docs")
        data = {"gpt": GPT_DATA, "bert": self.bert_data, "gpt-docs": self.docs_data}[model]
        argv = [*TINY, *data,
                "--clip-grad", str(clip), "--context-parallel-size", str(cp),
                "--tensor-model-parallel-size", str(tp)]
        if method:
            argv += ["--seqpar-method", method]
        elif model == "bert":
            argv += ["--spec", "local"]  # Megatron's local BERT layers (default needs TE)
        return argv

    def run(self, model, cp, method=None, *, clip=1.0, tp=1, dp=1, pp=1, extra=()) -> LoopRun:
        """CP=1 is plain Megatron-LM (its local core attention); CP=2 GPT runs without
        ``extra`` flags save at iteration ``SAVE_AT`` for the checkpoint tests (saving changes
        no number)."""
        key = (model, cp, method, clip, tp, dp, pp, tuple(extra))
        if key not in self.runs:
            argv = self._argv(model, cp, method, clip, tp) + list(extra)
            if pp > 1:
                argv += ["--pipeline-model-parallel-size", str(pp)]
            if model == "gpt" and cp == 2 and tp == 1 and dp == 1 and pp == 1 and not extra:
                argv += ["--save", str(self.work / f"ckpt-{method}-{clip}"),
                         "--save-interval", str(SAVE_AT)]
            script = "pretrain_bert.py" if model == "bert" else "pretrain_gpt.py"
            self.runs[key] = self._launch(script, cp * tp * dp * pp, argv)
        return self.runs[key]

    def resume(self, saved_by: str, method: str, *, clip=1.0) -> LoopRun:
        """GPT at CP=2 with ``method``, ``--load`` from the ``saved_by`` run's checkpoint of
        iteration ``SAVE_AT`` (``--ckpt-step``: the run also saved its last iteration)."""
        self.run("gpt", 2, saved_by, clip=clip)
        argv = self._argv("gpt", 2, method, clip, 1)
        argv += ["--load", str(self.work / f"ckpt-{saved_by}-{clip}"), "--ckpt-step", str(SAVE_AT)]
        return self._launch("pretrain_gpt.py", 2, argv)


@pytest.fixture(scope="class")
def loop(tmp_path_factory):
    missing = [m for m in MLM_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"megatron.training needs {', '.join(missing)}: run make megatron-lm-deps")
    return MegatronLoop(tmp_path_factory.mktemp("megatron_loop"))


def _unit(x: float) -> float:
    """One unit of the last digit Megatron-LM prints of ``x`` (``{:.6E}``)."""
    import math

    return 10.0 ** (math.floor(math.log10(abs(x))) - 6) if x else 1e-12


class LossMismatch(AssertionError):
    """A logged value differs beyond the tolerance (a missing iteration is a plain failure)."""


def _assert_same(got: dict, want: dict, iterations, tol=None):
    for it in iterations:
        assert it in got and it in want, (it, got, want)
        limit = tol if tol is not None else LOSS_UNITS * _unit(want[it])
        if abs(got[it] - want[it]) > limit:
            raise LossMismatch(f"iteration {it}: {got[it]} != {want[it]} (+-{limit:.1e}); "
                               f"got {got}, want {want}")


def _print_rows(what: str, method: str, ref: LoopRun, run: LoopRun) -> None:
    """The compatibility-matrix row (docs/megatron_lm.md): CP=1 and CP=2 losses, the largest
    difference (pytest -s shows it)."""
    diff = max(abs(run.lm[i] - ref.lm[i]) for i in ref.lm if i in run.lm)
    print(f"{what} {method}: CP=1 lm loss {[ref.lm[i] for i in sorted(ref.lm)]}, CP=2 "
          f"{[run.lm[i] for i in sorted(run.lm)]}, max |diff| {diff:.1e}")


def _assert_row(what: str, method: str, ref: LoopRun, run: LoopRun) -> None:
    """A compatibility-matrix row: print it, then ``run``'s losses and grad norm against
    ``ref``'s over every iteration."""
    _print_rows(what, method, ref, run)
    _assert_same_losses(run, ref, range(1, ITERS + 1))
    _assert_same(run.grad_norm, ref.grad_norm, range(1, ITERS + 1), GRAD_NORM_TOL)


def _assert_same_losses(run: LoopRun, ref: LoopRun, iterations):
    _assert_same(run.lm, ref.lm, iterations)
    if ref.sop:  # BERT's sentence-order loss
        _assert_same(run.sop, ref.sop, iterations)


def _assert_resumed(resumed: LoopRun, full: LoopRun):
    """Iterations SAVE_AT+1.. of a resumed run against the uninterrupted one. Megatron-LM logs
    a run's first iteration without resetting its loss accumulator (``training_log``:
    ``should_reset = not is_first_iteration``), so the second logged value of any run is the
    mean of its first two iterations; the resumed run's iteration SAVE_AT+2 is compared as such.
    """
    first, second = SAVE_AT + 1, SAVE_AT + 2
    want = dict(full.lm)
    want[second] = (full.lm[first] + full.lm[second]) / 2
    _assert_same(resumed.lm, want, range(first, ITERS + 1))


@NEEDS_MLM
@pytest.mark.megatron
@pytest.mark.own_world
class TestMegatronLM:
    def test_patches_apply_and_revert_cleanly(self, tmp_path):
        root = _overlay(tmp_path)
        res = _tool("--revert", str(root))  # a checkout that already carries them is fine too
        assert res.returncode == 0, res.stdout + res.stderr
        original = {p: (root / p).read_text() for p in ("pretrain_gpt.py", "gpt_builders.py",
                                                        "pretrain_bert.py")}
        res = _tool("--check", str(root))
        assert res.returncode == 0 and res.stdout.count(": applicable") == 2, res.stdout
        assert "warning" not in res.stdout, "checkout is not core_v0.16.1: " + res.stdout
        res = _tool("--apply", str(root))
        assert res.returncode == 0 and res.stdout.count(": applied") == 2, res.stdout
        assert "seqpar.extra_args_provider" in (root / "pretrain_gpt.py").read_text()
        assert "gpt_layer_spec_from_args" in (root / "gpt_builders.py").read_text()
        assert "bert_layer_spec_from_args" in (root / "pretrain_bert.py").read_text()
        assert _tool("--apply", str(root)).returncode == 0  # idempotent
        res = _tool("--revert", str(root))
        assert res.returncode == 0 and res.stdout.count(": applicable") == 2, res.stdout
        assert {p: (root / p).read_text() for p in original} == original

    def test_conflict_is_reported(self, tmp_path):
        root = _overlay(tmp_path)
        path = root / "gpt_builders.py"
        path.write_text(path.read_text().replace("import_module(args.spec)", "None"))
        res = _tool("--check", str(root), "--only", "gpt")
        assert res.returncode == 1 and "conflict" in res.stdout, res.stdout

    def test_megatron_argument_parsing(self):
        cases = [{"argv": BASE + argv, **extra} for _, argv, extra, _ in CASES]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (MLM_PATH, str(REPO), env.get("PYTHONPATH")) if p)
        proc = subprocess.run([sys.executable, "-W", "ignore", "-c", CHILD],
                              input=json.dumps(cases), capture_output=True, text=True,
                              env=env, timeout=300, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
        if not lines and "No module named" in proc.stderr:
            pytest.skip("Megatron-LM's megatron.training is not importable here ("
                        + proc.stderr.strip().splitlines()[-1] + "); it needs six, regex, "
                        "pyyaml and triton")
        assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
        results = json.loads(lines[0][len("RESULTS "):])
        for (name, _, _, (kind, text)), got in zip(CASES, results):
            if kind == "ok":
                assert got["ok"], f"{name}: rejected: {got['error']}"
                assert text in got["options"] + got["core"], f"{name}: {got}"
            else:
                assert not got["ok"], f"{name}: accepted, expected an error with {text!r}"
                assert text in got["error"], f"{name}: {got['error']}"

    @pytest.mark.slow
    def test_patched_pretrain_gpt_builds_our_model(self, tmp_path):
        """CPU, 2 gloo ranks: the patched script's model provider picks our spec + options,
        and for LSS the wrapped forward step installs double gradient averaging."""
        root = _overlay(tmp_path)
        assert _tool("--apply", str(root)).returncode == 0
        (tmp_path / "child.py").write_text(BUILD_CHILD)
        cpu = ["--use-cpu-initialization", "--hidden-dropout", "0"]
        argvs = [BASE + cpu + ["--seqpar-method", "mqsp", "--seqpar-mqsp-micro-q", "2"],
                 BASE + cpu + ["--seqpar-method", "lss", "--seqpar-backend", "reference"]]
        env = dict(os.environ, SEQPAR_ARGVS=json.dumps(argvs), OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(root), str(REPO), str(REPO / "tests"), env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(tmp_path / "child.py")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                              check=False, cwd=tmp_path)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BUILT ")]
        if not lines and "No module named" in proc.stderr:
            pytest.skip("Megatron-LM's pretrain_gpt.py is not importable here: "
                        + proc.stderr.strip().splitlines()[-1])
        assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
        mqsp, lss = json.loads(lines[0][len("BUILT "):])
        assert (mqsp["core"], mqsp["method"]) == ("SeqParCoreAttention", "mqsp"), mqsp
        assert "micro_q=2" in mqsp["options"] and mqsp["finalize"] == "stock", mqsp
        assert lss["method"] == "lss" and "backend='reference'" in lss["options"], lss
        assert "lss_finalize_model_grads" in lss["finalize"], lss

    # ---------------------------------------------- Megatron-LM's own loop on CPU (issue 14)
    @pytest.mark.slow
    @pytest.mark.parametrize("model", ["gpt", "bert"])
    @pytest.mark.parametrize("method", ["rsa", "mqsp", "lightseq"])
    def test_cp2_losses_equal_cp1(self, loop, model, method):
        """10 iterations of ``pretrain()`` at Megatron-LM's defaults (Adam, clip-grad 1.0):
        each method at CP=2 logs CP=1's ``lm loss`` (and BERT's ``sop loss``) and grad norm."""
        ref, run = loop.run(model, 1), loop.run(model, 2, method)
        _assert_same_losses(run, ref, range(1, ITERS + 1))
        _assert_same(run.grad_norm, ref.grad_norm, range(1, ITERS + 1), GRAD_NORM_TOL)
        assert LSS_LOG not in run.log

    @pytest.mark.slow
    @pytest.mark.parametrize("model", ["gpt", "bert"])
    def test_lss_double_averaging_is_exact(self, loop, model):
        """LSS at CP=2 at Megatron-LM's defaults (clip-grad 1.0) logs CP=1's losses and grad
        norm, with double gradient averaging active (the hook's log line names the LSS
        finalize function and the assembled position-embedding gradients): every CP rank
        holds every position row's gradient, so Megatron's norm and clipping are CP=1's."""
        ref, run = loop.run(model, 1), loop.run(model, 2, "lss")
        _assert_same_losses(run, ref, range(1, ITERS + 1))
        _assert_same(run.grad_norm, ref.grad_norm, range(1, ITERS + 1), GRAD_NORM_TOL)
        assert f"{LSS_LOG}: CP=2 average in lss_finalize_model_grads" in run.log, run.tail
        assert "position-embedding gradients assembled over CP" in run.log, run.tail

    @pytest.mark.slow
    def test_lss_owned_rows_exact_without_clipping(self, loop):
        """``--no-seqpar-lss-assemble-position-grads`` (rows owned per segment) is exact on
        this route only with ``--clip-grad 0``; its logged grad norm is the signature of the
        position rows skipping the sequence-group average (rank 0's, whose position-embedding
        gradient holds only its own segments' rows, so it is smaller)."""
        ref = loop.run("gpt", 1, clip=0)
        run = loop.run("gpt", 2, "lss", clip=0, extra=("--no-seqpar-lss-assemble-position-grads",))
        _assert_same_losses(run, ref, range(1, ITERS + 1))
        assert "position-embedding gradients owned per segment" in run.log, run.tail
        for it in range(1, ITERS + 1):
            assert run.grad_norm[it] < ref.grad_norm[it] - GRAD_NORM_TOL, (it, run.grad_norm)

    # ---------------------------------------------- MoE x CP (27)
    @pytest.mark.slow
    @pytest.mark.parametrize("ep", [1, 2], ids=["ep1", "ep2"])
    @pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
    @pytest.mark.parametrize("method", msp.METHODS)
    def test_moe_cp2_equals_cp1(self, loop, method, dispatcher, ep):
        """MoE (4 experts, top-2) in every layer, Megatron's router and experts, our core
        attention: CP=2 logs the losses and grad norm of CP=1 on the same world size (EP=2 at
        CP=1 is DP=2; at CP=2 the two CP ranks hold one expert pair each). LSS leaves the
        expert gradients on Megatron's expert-data-parallel reduction."""
        flags = (*MOE_FLAGS, "--moe-token-dispatcher-type", dispatcher,
                 "--expert-model-parallel-size", str(ep))
        ref = loop.run("gpt", 1, dp=ep, extra=flags)
        run = loop.run("gpt", 2, method, extra=flags)
        _assert_row(f"moe {dispatcher} EP={ep}", method, ref, run)

    # ---------------------------------------------- multi-node launch (27)
    @pytest.mark.slow
    def test_slurm_script_two_nodes_equal_one_node(self, loop, tmp_path):
        """``examples/slurm/pretrain_gpt.sbatch`` under a stand-in ``srun`` that starts one
        torchrun agent per "node" on this machine (c10d rendezvous on the first node's address):
        2 nodes x 2 ranks, CP=2 inside each node, DP=2 across them, log the losses of the same
        flags on one node of 4 ranks."""
        from megatron_seqpar.comm import free_port

        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for name, text in (("srun", SRUN_STANDIN), ("scontrol", SCONTROL_STANDIN)):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        argv = loop._argv("gpt", 2, "lightseq", 1.0, 1)
        env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                   SLURM_NNODES="2", SLURM_JOB_NODELIST="node[0-1]", SLURM_JOB_ID="27",
                   MEGATRON_LM_PATH=str(loop.root), GPUS_PER_NODE="2",
                   MASTER_PORT=str(free_port()), LAUNCHER=str(LAUNCHER),
                   TORCHRUN=str(Path(sys.executable).parent / "torchrun"), OMP_NUM_THREADS="1")
        proc = subprocess.run(["bash", str(REPO / "examples" / "slurm" / "pretrain_gpt.sbatch"),
                               *argv], capture_output=True, text=True, env=env, timeout=600,
                              check=False, cwd=tmp_path)
        run = LoopRun.parse(proc.stdout + proc.stderr)
        assert proc.returncode == 0, run.tail
        ref = loop.run("gpt", 2, "lightseq", dp=2)
        _assert_row("slurm 2 nodes", "lightseq", ref, run)

    # ---------------------------------------------- pipeline stages (27)
    @pytest.mark.slow
    @pytest.mark.parametrize("method", msp.METHODS)
    def test_pp2_cp2_equals_pp2_cp1(self, loop, method):
        """World 4: two pipeline stages (one layer each) x CP=2 log the losses and grad norm
        of the same two stages at CP=1 (Megatron-LM's 1F1B schedule, gloo point-to-point
        between stages)."""
        ref, run = loop.run("gpt", 1, pp=2), loop.run("gpt", 2, method, pp=2)
        _assert_row("PP=2", method, ref, run)

    @pytest.mark.slow
    @pytest.mark.parametrize("method", msp.METHODS)
    def test_interleaved_pp2_cp2_equals_cp1(self, loop, method):
        """Interleaved stages (4 layers, one per virtual stage, PP=2): CP=2 logs the same
        stages' losses at CP=1 (Megatron-LM's interleaved 1F1B schedule)."""
        ref = loop.run("gpt", 1, pp=2, extra=INTERLEAVED_FLAGS)
        run = loop.run("gpt", 2, method, pp=2, extra=INTERLEAVED_FLAGS)
        _assert_row("interleaved PP=2", method, ref, run)

    # ---------------------------------------------- the full grid, bf16, TP sequence parallel
    @pytest.mark.slow
    @pytest.mark.parametrize("method", ["lightseq", "lss"])
    @pytest.mark.parametrize("grid", ["tp2xpp2", "dp2xpp2"])
    def test_world8_grid_cp2_equals_cp1(self, loop, method, grid):
        """World 8: TP=2 x PP=2 x CP=2 and DP=2 x PP=2 x CP=2 log the losses and grad norm of
        the same grid at CP=1 (world 4)."""
        kw = dict(tp=2, pp=2) if grid == "tp2xpp2" else dict(dp=2, pp=2)
        ref, run = loop.run("gpt", 1, **kw), loop.run("gpt", 2, method, **kw)
        _assert_row(grid, method, ref, run)

    @pytest.mark.slow
    @pytest.mark.parametrize("method", msp.METHODS)
    def test_bf16_cp2_within_bf16_bound(self, loop, method):
        """``--bf16`` (bf16 weights and activations, fp32 main grads and Adam, Megatron's
        mixed-precision optimizer): CP=2 logs CP=1's ``lm loss`` within ``BF16_LOSS_TOL``."""
        ref, run = loop.run("gpt", 1, extra=("--bf16",)), loop.run("gpt", 2, method,
                                                                   extra=("--bf16",))
        _print_rows("bf16", method, ref, run)
        _assert_same(run.lm, ref.lm, range(1, ITERS + 1), BF16_LOSS_TOL)

    @pytest.mark.slow
    @pytest.mark.parametrize("method", ["lightseq", "lss"])
    def test_sequence_parallel_tp2_cp2_equals_cp1(self, loop, method):
        """``--sequence-parallel`` (Megatron's TP sequence parallelism) with TP=2 x CP=2: the
        losses and grad norm of TP=2 x CP=1 with the same flag."""
        ref = loop.run("gpt", 1, tp=2, extra=("--sequence-parallel",))
        run = loop.run("gpt", 2, method, tp=2, extra=("--sequence-parallel",))
        _assert_row("TP=2 sequence parallel", method, ref, run)

    # ---------------------------------------------- LSS with the distributed optimizer (27)
    @pytest.mark.slow
    @pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
    def test_lss_distributed_optimizer_cp2_equals_cp1(self, loop, overlap):
        """``--use-distributed-optimizer`` (with and without ``--overlap-grad-reduce
        --overlap-param-gather``): at DP=1 the one optimizer instance is the CP group, so
        Megatron's reduce-scatter is LSS's level 1; CP=2 logs CP=1's losses and grad norm."""
        flags = ("--use-distributed-optimizer",) + (
            ("--overlap-grad-reduce", "--overlap-param-gather") if overlap else ())
        ref, run = loop.run("gpt", 1, extra=flags), loop.run("gpt", 2, "lss", extra=flags)
        _assert_row(f"lss distributed optimizer{' overlap' if overlap else ''}", "lss", ref, run)
        assert (f"{LSS_LOG}: CP=2 reduce-scatter in each distributed-optimizer instance (the CP "
                "group), then the shard all-reduced over DP=1") in run.log, run.tail

    @pytest.mark.slow
    @pytest.mark.parametrize("method", [m for m in msp.METHODS if m != "lss"])
    def test_distributed_optimizer_cp2_equals_cp1(self, loop, method):
        """The other methods with ``--use-distributed-optimizer`` (Megatron's own reduction
        over DP x CP, nothing of ours on the gradients): CP=2 logs CP=1's losses."""
        flags = ("--use-distributed-optimizer",)
        ref, run = loop.run("gpt", 1, extra=flags), loop.run("gpt", 2, method, extra=flags)
        _assert_row("distributed optimizer", method, ref, run)

    @pytest.mark.slow
    def test_lss_distributed_optimizer_dp2_cp2_equals_dp2(self, loop):
        """World 4, DP=2 x CP=2, ``--num-distributed-optimizer-instances 2``: one optimizer
        instance per DP replica, sharded over its CP group (level 1), the shards all-reduced
        over DP (level 2); the same losses and grad norm as DP=2 x CP=1."""
        ref = loop.run("gpt", 1, dp=2, extra=("--use-distributed-optimizer",))
        run = loop.run("gpt", 2, "lss", dp=2, extra=(
            "--use-distributed-optimizer", "--num-distributed-optimizer-instances", "2"))
        _assert_row("lss distributed optimizer DP=2", "lss", ref, run)
        assert "then the shard all-reduced over DP=2 across instances" in run.log, run.tail

    # ---------------------------------------------- today's attention (issue 26), CP=1 (27)
    @pytest.mark.slow
    def test_method_at_cp1_is_inactive(self, loop):
        """``--seqpar-method`` at CP=1 is accepted, says in one line that it is inactive, and
        the run is plain Megatron-LM's (the same losses), so a CP sweep keeps one command."""
        ref, run = loop.run("gpt", 1), loop.run("gpt", 1, "lightseq")
        _assert_same(run.lm, ref.lm, range(1, ITERS + 1), tol=0.0)
        assert f"{mlm.INACTIVE_LOG}: --seqpar-method lightseq is inactive at CP=1" in run.log

    @pytest.mark.slow
    @pytest.mark.parametrize("method", msp.METHODS)
    def test_window_and_sinks_cp2_equal_cp1(self, loop, method):
        """Sliding windows on alternating layers with learnable sinks: CP=1 is Megatron-LM's
        own local attention, CP=2 each method; the same ``lm loss`` and grad norm."""
        ref, run = (loop.run("gpt", cp, m, extra=WINDOW_FLAGS) for cp, m in ((1, None),
                                                                           (2, method)))
        _assert_row("window+sinks", method, ref, run)

    @pytest.mark.slow
    @pytest.mark.parametrize("method", msp.METHODS)
    def test_mla_cp2_equal_cp1(self, loop, method):
        """MLA: megatron-core's local attention cannot run it, so CP=1 runs our provider
        (LightSeq on a group of one, said in one line); CP=2 each method logs the same."""
        ref = loop.run("gpt", 1, "lightseq", extra=MLA_FLAGS)
        assert "our provider runs MLA as plain local attention" in ref.log, ref.tail
        run = loop.run("gpt", 2, method, extra=MLA_FLAGS)
        _assert_row("mla", method, ref, run)

    @pytest.mark.slow
    def test_checkpoint_resume_same_method(self, loop):
        """``--save`` at iteration 5 of the CP=2 LightSeq run, ``--load`` with LightSeq:
        iterations 6-10 log the uninterrupted run's losses."""
        full = loop.run("gpt", 2, "lightseq")
        resumed = loop.resume("lightseq", "lightseq")
        assert sorted(resumed.lm) == list(range(SAVE_AT + 1, ITERS + 1)), resumed.tail
        _assert_resumed(resumed, full)
        assert "resumed with the same method" in resumed.log, resumed.tail

    @pytest.mark.slow
    def test_checkpoint_into_another_method(self, loop):
        """The LightSeq checkpoint loads into RSA (the methods add no parameters), says so, and
        continues with the uninterrupted LightSeq run's losses (both methods are exact)."""
        full = loop.run("gpt", 2, "lightseq")
        resumed = loop.resume("lightseq", "rsa")
        _assert_resumed(resumed, full)
        assert ("saved with --seqpar-method lightseq (CP=2), loaded into --seqpar-method rsa "
                "(CP=2): a different method") in resumed.log, resumed.tail

    @pytest.mark.slow
    def test_lss_checkpoint_resume(self, loop):
        """An LSS checkpoint (Megatron-LM's torch_dist, CP rank 0's copy of the position table
        and its moments, equal on every CP rank since the rows are assembled) resumes onto the
        uninterrupted run's losses, at Megatron-LM's default clip-grad 1.0."""
        full = loop.run("gpt", 2, "lss")
        _assert_resumed(loop.resume("lss", "lss"), full)

    @pytest.mark.slow
    def test_two_level_cp4_losses_equal_cp1(self, loop):
        """World 4: ``--context-parallel-size 4 --hierarchical-context-parallel-sizes 2 2
        --seqpar-method lightseq`` (a head all-to-all inside CP rank pairs, LightSeq across
        the two pairs, on megatron-core's hierarchical CP groups) logs CP=1's losses and grad
        norm (tolerance as above)."""
        ref = loop.run("gpt", 1)
        run = loop.run("gpt", 4, "lightseq", extra=("--hierarchical-context-parallel-sizes",
                                                    "2", "2"))
        _assert_same_losses(run, ref, range(1, ITERS + 1))
        _assert_same(run.grad_norm, ref.grad_norm, range(1, ITERS + 1), GRAD_NORM_TOL)
        assert "hierarchical context-parallel sizes: [2, 2]" in run.log, run.tail
        print(f"two levels CP=4 (U=2 x R=2) lightseq lm loss {run.lm}, grad norm "
              f"{run.grad_norm}; CP=1 lm loss {ref.lm}, grad norm {ref.grad_norm}")
        assert (f"{mlm.TWO_LEVEL_LOG}: head all-to-all inside groups of U=2 consecutive CP "
                "ranks, --seqpar-method lightseq across R=2 groups") in run.log, run.tail

    @pytest.mark.slow
    def test_tp2_cp2_losses_equal_cp1(self, loop):
        """World 4: tensor parallel 2 x context parallel 2 (MQSP) logs CP=1's losses (the
        vocabulary pads to the same 256 rows at TP=1 and 2, and CPU initialisation splits
        the same full weights, so both start from one model)."""
        ref, run = loop.run("gpt", 1), loop.run("gpt", 2, "mqsp", tp=2)
        _assert_same_losses(run, ref, range(1, ITERS + 1))
        _assert_same(run.grad_norm, ref.grad_norm, range(1, ITERS + 1), GRAD_NORM_TOL)

    @pytest.mark.slow
    @pytest.mark.parametrize("method", ["lightseq", "lss"])
    def test_documents_cp2_equal_cp1(self, loop, method):
        """``--reset-attention-mask --reset-position-ids --eod-mask-loss`` on short documents:
        CP=1 is Megatron-LM's own path (the dataset's dense document mask, local attention);
        CP=2 with ``--seqpar-method`` and ``--no-create-attention-mask-in-dataloader`` packs
        each micro-batch into a THD stream in the patched ``get_batch`` (cu_seqlens, no dense
        mask). Both use ``--calculate-per-token-loss`` (otherwise Megatron divides each CP
        rank's loss by its own token count, and pads and EOD masks make those differ), and
        log the same losses and grad norms (tolerance as above)."""
        ref = loop.run("gpt-docs", 1, extra=DOC_FLAGS)
        run = loop.run("gpt-docs", 2, method,
                       extra=(*DOC_FLAGS, "--no-create-attention-mask-in-dataloader"))
        worst = max(abs(run.lm[i] - ref.lm[i]) for i in ref.lm)
        print(f"documents {method}: lm loss CP=1 {ref.lm[1]} -> {ref.lm[ITERS]}, CP=2 "
              f"{run.lm[1]} -> {run.lm[ITERS]}, max |diff| {worst:.1e}")
        _assert_same_losses(run, ref, range(1, ITERS + 1))
        _assert_same(run.grad_norm, ref.grad_norm, range(1, ITERS + 1), GRAD_NORM_TOL)
        plain = loop.run("gpt-docs", 1, extra=("--calculate-per-token-loss",))
        with pytest.raises(LossMismatch):  # the document mask really changes the run
            _assert_same_losses(plain, ref, range(1, ITERS + 1))

    @pytest.mark.slow
    @pytest.mark.parametrize("method, cp", [(m, 2) for m in msp.METHODS]
                             + [("lightseq", 4), ("mqsp", 4)])
    def test_documents_balanced_equal_cp1(self, loop, method, cp):
        """``--seqpar-packing balanced``: documents whole on one rank or split, no
        per-document padding; CP=2 (every method) and CP=4 log CP=1's losses and grad norms
        (Megatron-LM's own dense document mask at CP=1; tolerance as above)."""
        ref = loop.run("gpt-docs", 1, extra=DOC_FLAGS)
        run = loop.run("gpt-docs", cp, method,
                       extra=(*DOC_FLAGS, "--no-create-attention-mask-in-dataloader",
                              "--seqpar-packing", "balanced"))
        worst = max(abs(run.lm[i] - ref.lm[i]) for i in ref.lm)
        print(f"documents balanced {method} CP={cp}: lm loss CP=1 {ref.lm[1]} -> "
              f"{ref.lm[ITERS]}, max |diff| {worst:.1e}")
        _assert_same_losses(run, ref, range(1, ITERS + 1))
        _assert_same(run.grad_norm, ref.grad_norm, range(1, ITERS + 1), GRAD_NORM_TOL)


    @pytest.mark.slow
    @pytest.mark.parametrize("method, cp", [("lightseq", 2), ("lss", 2), ("mqsp", 4)])
    def test_documents_balanced_rope_equal_cp1(self, loop, method, cp):
        """``--seqpar-packing balanced --position-embedding-type rope``: the patched builder
        makes ``GPTModel`` without RoPE and our provider rotates at each token's position in
        its document (``megatron.rope``); CP=2 and CP=4 log the losses and grad norms of
        Megatron-LM's own CP=1 RoPE run with its dense document mask (RoPE is relative, so its
        stream positions give the same scores; tolerance as above)."""
        rope = ("--position-embedding-type", "rope", "--no-rope-fusion")
        ref = loop.run("gpt-docs", 1, extra=(*DOC_FLAGS, *rope))
        run = loop.run("gpt-docs", cp, method,
                       extra=(*DOC_FLAGS, "--no-create-attention-mask-in-dataloader",
                              "--seqpar-packing", "balanced", *rope))
        worst = max(abs(run.lm[i] - ref.lm[i]) for i in ref.lm)
        print(f"documents balanced rope {method} CP={cp}: lm loss CP=1 {ref.lm[1]} -> "
              f"{ref.lm[ITERS]}, max |diff| {worst:.1e}")
        _assert_same_losses(run, ref, range(1, ITERS + 1))
        _assert_same(run.grad_norm, ref.grad_norm, range(1, ITERS + 1), GRAD_NORM_TOL)


class _Crafted:
    """A pickle that would run code when unpickled without weights_only."""

    def __reduce__(self):
        return (open, (os.environ.get("CRAFTED_MARKER", "/tmp/crafted_marker"), "w"))


def test_loaded_checkpoint_note_never_unpickles_code(tmp_path, monkeypatch):
    """The note reads a checkpoint's saved args with ``weights_only=True``: a plain
    ``argparse.Namespace`` is read; a crafted ``common.pt`` is refused in one line and runs
    nothing."""
    import argparse

    import torch

    from megatron_seqpar import megatron_lm as mlm

    marker = tmp_path / "marker"
    monkeypatch.setenv("CRAFTED_MARKER", str(marker))
    step = tmp_path / "ckpt" / "iter_0000002"
    step.mkdir(parents=True)
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("2")
    args = argparse.Namespace(load=str(tmp_path / "ckpt"), seqpar_method="lightseq",
                              context_parallel_size=2)
    from megatron.core.transformer.enums import AttnBackend  # Megatron-LM saves such enums

    torch.save({"args": argparse.Namespace(seqpar_method="lss", context_parallel_size=2,
                                           attention_backend=AttnBackend.auto,
                                           params_dtype=torch.float32)},
               step / "common.pt")
    note = mlm.loaded_checkpoint_note(args)
    assert "saved with --seqpar-method lss (CP=2)" in note and "different method" in note
    torch.save({"args": _Crafted()}, step / "common.pt")
    note = mlm.loaded_checkpoint_note(args)
    assert "safe load refuses" in note and "\n" not in note, note
    assert not marker.exists()  # nothing in the file ran
