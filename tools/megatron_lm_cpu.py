#!/usr/bin/env python3
"""Run a Megatron-LM training script on CPU (gloo), with megatron-seqpar's CPU workarounds.

    torchrun --standalone --nproc-per-node N tools/megatron_lm_cpu.py \\
        /path/to/Megatron-LM/pretrain_gpt.py <Megatron-LM flags> --distributed-backend gloo

The script's directory goes first on ``sys.path`` (so the checkout's ``megatron`` package is
the one imported, as when the script runs itself), the CPU workarounds of
``megatron_seqpar.cpu_workarounds`` are installed (megatron-core's, ``cpu_shims``, and
``megatron.training``'s, ``training_cpu_shims``; that module documents each one), and the
script runs as ``__main__`` through ``runpy``. ``import megatron_seqpar`` alone never installs
or imports them.
Pass the flags a CPU run needs (see docs/megatron_lm.md): ``--transformer-impl local
--no-gradient-accumulation-fusion --no-persist-layer-norm --use-cpu-initialization
--no-bias-swiglu-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion --no-masked-softmax-fusion
--no-rope-fusion --distributed-backend gloo``.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    if not argv or not argv[0].endswith(".py"):
        sys.exit("usage: torchrun ... tools/megatron_lm_cpu.py SCRIPT.py [Megatron-LM flags]")
    script = Path(argv[0]).resolve()
    if not script.is_file():
        sys.exit(f"error: {script} is not a file")
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.parent))
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    from megatron_seqpar import cpu_workarounds as shims  # after the checkout's megatron

    shims.import_megatron_core()  # the checkout's megatron-core, its fusions eager (shim 0)
    with shims.cpu_shims(), shims.training_cpu_shims():
        runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
