"""Checkpoint save/resume such that a resumed run repeats the uninterrupted run's losses.

Layout (Megatron-LM's names where it has them)::

    SAVE/latest_checkpointed_iteration.txt      the last complete step, written last
    SAVE/iter_0000050/model/                     megatron-core dist_checkpointing (torch_dist)
    SAVE/iter_0000050/train_state/rank00001.pt   torch.save of this rank's optimizer state,
                                                 step, consumed samples and RNG states

The model goes through ``dist_checkpointing`` (``sharded_state_dict`` of the GPTModel /
BertModel, replicas deduplicated across DP and CP ranks), which runs on CPU/gloo and CUDA/NCCL
alike. The optimizer is saved per rank with ``torch.save`` (the documented format above): on
CPU it is a ``torch.optim.AdamW`` (``driver.SUBSTITUTIONS``), whose state has no Megatron
sharded form;
each rank's copy is small (two moments of the parameters it holds). Data needs no state: batches
are a pure function of the step (``data.BatchSource``). Together these make a resumed run
continue with bit-identical losses on the same world size and thread count.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

TRACKER = "latest_checkpointed_iteration.txt"


def iter_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def latest_step(root: str) -> int | None:
    """The last complete checkpoint's step under ``root`` (None if there is none)."""
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return int(f.read().strip())


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(root: str, step: int, module, optimizer, extra: dict | None = None) -> str:
    """Collective over all ranks: write step ``step`` under ``root``; returns its directory."""
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    path = iter_dir(root, step)
    model_dir = os.path.join(path, "model")
    if rank == 0:
        os.makedirs(model_dir, exist_ok=True)
        os.makedirs(os.path.join(path, "train_state"), exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(module.sharded_state_dict(), model_dir)
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": _rng_state(),
             "extra": extra or {}}
    torch.save(state, os.path.join(path, "train_state", f"rank{rank:05d}.pt"))
    dist.barrier()
    if rank == 0:
        tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(step))
        os.replace(tmp, os.path.join(root, TRACKER))
    dist.barrier()
    return path


def load_checkpoint(root: str, module, optimizer) -> tuple[int, dict]:
    """Collective: restore the latest checkpoint under ``root``; returns (step, extra).

    Returns (0, {}) when ``root`` holds no checkpoint (a fresh start).
    """
    from megatron.core import dist_checkpointing

    step = latest_step(root)
    if step is None:
        return 0, {}
    path = iter_dir(root, step)
    state_dict = dist_checkpointing.load(module.sharded_state_dict(), os.path.join(path, "model"))
    module.load_state_dict(state_dict)
    rank = dist.get_rank()
    file = os.path.join(path, "train_state", f"rank{rank:05d}.pt")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} is missing: resume with the world size that saved it")
    state = torch.load(file, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    dist.barrier()
    return int(state["step"]), state.get("extra", {})
