"""Flags fill a frozen, validated TrainConfig; bad combinations stop with one clear line."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from megatron_seqpar.training.arguments import ConfigError, TrainConfig, build_parser, parse_args
from megatron_seqpar.training.driver import lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_methods_match_the_package():
    import megatron_seqpar as msp
    from megatron_seqpar.training import arguments

    assert arguments.METHODS is msp.METHODS  # one list, from the registry


def test_megatron_names_fill_the_config():
    cfg = parse_args(["--num-layers", "3", "--hidden-size", "96", "--num-attention-heads", "6",
                      "--num-query-groups", "2", "--seq-length", "512", "--micro-batch-size",
                      "2", "--global-batch-size", "8", "--lr", "3e-4", "--train-iters", "7",
                      "--context-parallel-size", "2", "--seqpar-method", "mqsp",
                      "--recompute-granularity", "selective", "--save", "ck",
                      "--save-interval", "5", "--device", "cpu"], world_size=4)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_query_groups) == (3, 96, 2)
    assert (cfg.data_parallel_size, cfg.num_microbatches) == (2, 2)
    assert cfg.seqpar_method == "mqsp" and cfg.save == "ck" and cfg.lr == 3e-4
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0


@pytest.mark.parametrize("argv, world, match", [
    (["--seq-length", "4098", "--context-parallel-size", "2", "--seqpar-method", "rsa"], 2,
     r"--seq-length 4098 is not divisible by 2\*CP = 4"),
    (["--num-attention-heads", "3", "--hidden-size", "96", "--tensor-model-parallel-size",
      "2"], 2, "--num-attention-heads 3 is not divisible by --tensor-model-parallel-size 2"),
    (["--context-parallel-size", "2", "--seqpar-method", "lss"], 3,
     "world size 3 is not a multiple of TP\\*CP"),
    (["--context-parallel-size", "2"], 2, "needs --seqpar-method"),
    (["--num-attention-heads", "4", "--num-query-groups", "3"], 1, "--num-query-groups 3"),
    (["--global-batch-size", "3", "--micro-batch-size", "2"], 1, "--global-batch-size 3"),
    (["--bf16", "--device", "cpu"], 1, "--bf16 needs a CUDA device"),
    (["--use-distributed-optimizer"], 1, "our driver runs on CUDA only"),
    (["--device", "cuda", "--use-distributed-optimizer", "--save", "ckpt"], 1,
     "--use-distributed-optimizer with --save/--load is not supported by our driver yet"),
    (["--device", "cuda", "--use-distributed-optimizer", "--context-parallel-size", "2",
      "--seqpar-method", "lss", "--no-seqpar-lss-assemble-position-grads"], 2,
     "drop --no-seqpar-lss-assemble-position-grads"),
    (["--seqpar-method", "mqsp", "--no-seqpar-lightseq-balance"], 1,
     "--seqpar-lightseq-balance given without the method they belong to"),
    (["--seqpar-mqsp-micro-q", "4"], 1, "given without --seqpar-method"),
    (["--seqpar-method", "mqsp", "--seqpar-mqsp-micro-q", "0"], 1,
     "micro_q must be a positive integer"),
    (["--recompute-granularity", "full"], 1, "--recompute-method"),
    (["--sequence-parallel"], 1, "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (["--sequence-parallel", "--tensor-model-parallel-size", "2", "--seq-length", "4097"], 2,
     "local sequence length 4097 .* not divisible by --tensor-model-parallel-size 2"),
])
def test_bad_combinations_raise_one_line(argv, world, match):
    with pytest.raises(ConfigError, match=match) as err:
        parse_args(["--device", "cpu", *argv], world_size=world)
    assert "\n" not in str(err.value)


def test_cli_error_is_one_line_before_any_process_group():
    env = dict(os.environ, WORLD_SIZE="3", PYTHONWARNINGS="ignore")
    env.pop("MASTER_ADDR", None)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "pretrain_gpt.py"),
                        "--context-parallel-size", "2", "--seqpar-method", "lightseq"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert lines == ["error: world size 3 is not a multiple of TP*CP = 1*2; launch a multiple "
                     "of 2 processes or change --tensor-model-parallel-size/"
                     "--context-parallel-size"], p.stderr


def test_sequence_parallel_flag():
    cfg = parse_args(["--device", "cpu", "--tensor-model-parallel-size", "2",
                      "--sequence-parallel"], world_size=2)
    assert cfg.sequence_parallel and not parse_args(["--device", "cpu"]).sequence_parallel


def test_seqpar_flags_are_megatron_lm_s():
    from megatron_seqpar.megatron_lm import option_flags

    cfg = parse_args(["--device", "cpu", "--context-parallel-size", "2", "--seqpar-method",
                      "mqsp", "--seqpar-mqsp-micro-q", "4", "--seqpar-backend", "reference"],
                     world_size=2)
    opts = cfg.method_options()
    assert (opts.micro_q, opts.backend) == (4, "reference")
    help_text = build_parser().format_help()
    assert all(flag in help_text for flag, *_ in option_flags())


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(device="cpu", lr=1e-3, min_lr=1e-4, lr_warmup_iters=10, train_iters=110)
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 60) == pytest.approx(5.5e-4)
    assert lr_at(cfg, 110) == pytest.approx(1e-4)


def test_preprocess_tool_round_trips_bytes(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_seqpar.training.data import EOD

    text = "Hello, world. Second sentence!\n\n\nA second document, caf\u00e9."
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
                        "--input", str(tmp_path / "in.txt"), "--output-prefix",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert p.returncode == 0, p.stderr
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert len(ds) == 2
    docs = [bytes(ds[i][:-1].tolist()).decode("utf-8") for i in range(2)]
    assert docs == ["Hello, world. Second sentence!", "A second document, caf\u00e9."]
    assert all(ds[i][-1] == EOD for i in range(2))


def test_cpu_shims_are_scoped():
    """The CPU workarounds exist only inside ``cpu_shims()`` (test workers are reused)."""
    import torch
    from megatron.core.models.common.embeddings import rotary_pos_embedding as rope
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_seqpar import cpu_workarounds

    tracker = get_cuda_rng_tracker()
    before = (torch.cuda.current_device, torch.cuda.synchronize, rope.get_pos_emb_on_this_cp_rank,
              mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state,
              vars(WrappedTorchNorm)["__new__"])
    with cpu_workarounds.cpu_shims():
        assert torch.cuda.current_device() == torch.device("cpu")
        assert rope.get_pos_emb_on_this_cp_rank is cpu_workarounds.pos_emb_on_this_cp_rank
        with tracker.fork():
            pass
    after = (torch.cuda.current_device, torch.cuda.synchronize, rope.get_pos_emb_on_this_cp_rank,
             mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state,
             vars(WrappedTorchNorm)["__new__"])
    assert before == after and "fork" not in vars(tracker)
