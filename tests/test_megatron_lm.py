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
  since the checkout's ``megatron`` package must come first on ``sys.path``); and, with two or
  more CUDA devices, a few iterations of the patched ``pretrain_gpt.py`` per method.
  ``megatron.training`` imports ``six``, ``regex``, ``yaml`` and ``triton`` at import time; the
  subprocess inherits ``PYTHONPATH``, so a side directory holding them works.
"""

from __future__ import annotations

import argparse
import dataclasses
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
        flags = {flag for flag, *_ in mlm.option_flags()}
        assert "--seqpar-backend" in flags
        for m in msp.METHODS:
            for f in dataclasses.fields(msp.method_options(m)):
                if f.name != "backend":
                    assert f"--seqpar-{m}-{f.name.replace('_', '-')}" in flags

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
        assert mlm.validate_seqpar_args(argparse.Namespace(seqpar_method=None)) is None

    @pytest.mark.parametrize("over, match", [
        ({"context_parallel_size": 1}, "--context-parallel-size is 1"),
        ({"cp_comm_type": ["a2a"]}, "drop --cp-comm-type"),
        ({"attention_dropout": 0.1}, "--attention-dropout 0"),
        ({"spec": ["megatron_seqpar.specs", "gpt_lightseq"]}, "drop --spec"),
        ({"sft": True}, "THD"),
        ({"hybrid_context_parallel": True}, "THD"),
        ({"transformer_impl": "inference_optimized"}, "--transformer-impl"),
        ({"num_experts": 8}, "MoE"),
        ({"use_legacy_models": True}, "--use-legacy-models"),
    ])
    def test_conflicts_name_the_fix(self, over, match):
        with pytest.raises(mlm.SeqParArgumentError, match=match):
            mlm.validate_seqpar_args(megatron_like(**over))

    def test_all_conflicts_reported_at_once(self):
        problems = mlm.seqpar_conflicts(megatron_like(context_parallel_size=1,
                                                      attention_dropout=0.1))
        assert len(problems) == 2

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
     ("error", "drop --use-distributed-optimizer")),
    ("bert", ["--seqpar-method", "lss"], {"model": "bert"}, ("ok", "lss.Options")),
    ("bad-method", ["--seqpar-method", "ulysses"], {}, ("error", "invalid choice")),
    ("bad-value", ["--seqpar-method", "mqsp", "--seqpar-mqsp-micro-q", "0"], {},
     ("error", "micro_q")),
    ("other-method-flag", ["--seqpar-method", "rsa", "--seqpar-lightseq-balance"], {},
     ("error", "--seqpar-lightseq-balance")),
    ("cp1", ["--seqpar-method", "lightseq", "--context-parallel-size", "1"],
     {"world_size": 1}, ("error", "--context-parallel-size is 1")),
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
import megatron_cpu
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
    with megatron_cpu.cpu_shims():
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

    @pytest.mark.slow
    @pytest.mark.parametrize("method", msp.METHODS)
    def test_pretrain_gpt_mock_data(self, tmp_path, method):
        if torch.cuda.device_count() < 2:
            pytest.skip("needs 2 CUDA devices (CP=2, one rank per GPU)")
        root = _overlay(tmp_path)
        assert _tool("--apply", str(root)).returncode == 0
        env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), str(REPO),
                                                        env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(root / "pretrain_gpt.py"), *BASE,
               "--seqpar-method", method, "--eval-iters", "0", "--log-interval", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                              check=False, cwd=root)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        assert "iteration        3/" in log, log[-4000:]
