"""Pretrain a byte-level GPT on megatron-core with sequence-parallel attention.

Thin wrapper over ``megatron_seqpar.training.driver.main``; flags are Megatron-LM's plus
``--seqpar-method {rsa,mqsp,lss,lightseq}`` (see ``--help``). One process per rank:

    torchrun --standalone --nproc-per-node 2 examples/pretrain_gpt.py \\
        --context-parallel-size 2 --seqpar-method lightseq --train-iters 100
"""

import sys

from megatron_seqpar.training.driver import main_gpt

if __name__ == "__main__":
    sys.exit(main_gpt())
