"""Pretrain a byte-level GPT on megatron-core with sequence-parallel attention.

Thin wrapper over ``megatron_seqpar.training.driver.main``; flags are Megatron-LM's plus
``--seqpar-method {rsa,mqsp,lss,lightseq}`` (see ``--help``). One process per rank:

    torchrun --standalone --nproc-per-node 2 examples/pretrain_gpt.py \\
        --context-parallel-size 2 --seqpar-method lightseq --train-iters 100
"""

import sys

import torch

if not torch.cuda.is_available():  # a CPU run: megatron-core imported with its fusions eager
    from megatron_seqpar.cpu_workarounds import import_megatron_core  # (shim 0 there)

    import_megatron_core()

from megatron_seqpar.training.driver import main_gpt  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_gpt())
