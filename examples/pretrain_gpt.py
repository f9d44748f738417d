"""Pretrain a byte-level GPT on megatron-core with sequence-parallel attention.

Thin wrapper over ``megatron_seqpar.training.driver.main``; flags are Megatron-LM's plus
``--seqpar-method {rsa,mqsp,lss,lightseq}`` (see ``--help``). One process per rank:

    torchrun --standalone --nproc-per-node 2 examples/pretrain_gpt.py \\
        --context-parallel-size 2 --seqpar-method lightseq --train-iters 100
"""

import os
import sys

# megatron-core's CPU workarounds live in one test-support module (never in the library); the
# driver applies them only when the device is CPU.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from megatron_cpu import cpu_shims  # noqa: E402

from megatron_seqpar.training.driver import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], model="gpt", cpu_shims=cpu_shims))
