#!/usr/bin/env python3
"""Run a Megatron-LM training script on CPU (gloo), with megatron-seqpar's CPU workarounds.

    torchrun --standalone --nproc-per-node N tools/megatron_lm_cpu.py \\
        /path/to/Megatron-LM/pretrain_gpt.py <Megatron-LM flags> --distributed-backend gloo

The script's directory goes first on ``sys.path`` (so the checkout's ``megatron`` package is
the one imported, as when the script runs itself), the CPU workarounds of
``tests/megatron_cpu.py`` are installed (megatron-core's, ``cpu_shims``, and
``megatron.training``'s, ``training_cpu_shims``; that module documents each one), and the
script runs as ``__main__`` through ``runpy``. The workarounds are test support: they live in
``tests/``, are imported from there by path, and never enter the ``megatron_seqpar`` package.
Pass the flags a CPU run needs (see docs/megatron_lm.md): ``--transformer-impl local
--no-gradient-accumulation-fusion --no-persist-layer-norm --use-cpu-initialization
--no-bias-swiglu-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion --no-masked-softmax-fusion
--no-rope-fusion --distributed-backend gloo``.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys
from pathlib import Path

SHIMS = Path(__file__).resolve().parent.parent / "tests" / "megatron_cpu.py"


def load_shims():
    """``tests/megatron_cpu.py`` as the module ``megatron_cpu`` (imported by path)."""
    if "megatron_cpu" in sys.modules:
        return sys.modules["megatron_cpu"]
    spec = importlib.util.spec_from_file_location("megatron_cpu", SHIMS)
    module = importlib.util.module_from_spec(spec)
    sys.modules["megatron_cpu"] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str]) -> None:
    if not argv or not argv[0].endswith(".py"):
        sys.exit("usage: torchrun ... tools/megatron_lm_cpu.py SCRIPT.py [Megatron-LM flags]")
    script = Path(argv[0]).resolve()
    if not script.is_file():
        sys.exit(f"error: {script} is not a file")
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.parent))
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    shims = load_shims()
    with shims.cpu_shims(), shims.training_cpu_shims():
        runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
