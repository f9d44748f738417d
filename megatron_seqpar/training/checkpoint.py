"""Checkpoint save/resume such that a resumed run repeats the uninterrupted run's losses.

Layout (Megatron-LM's names where it has them)::

    SAVE/latest_checkpointed_iteration.txt      the last complete step, written last
    SAVE/iter_0000050/model/                     megatron-core dist_checkpointing (torch_dist)
    SAVE/iter_0000050/model.json                 the model-defining flags (checked on --load)
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

Crash safety: every file of a step is complete before the tracker names that step (each
``train_state`` file is written to a temporary name and renamed; the tracker is written last,
by rename), so a crash during a save leaves ``latest`` at the previous complete step.
Untrusted checkpoints: ``train_state`` holds only tensors and plain Python values (the numpy
and Python RNG states are stored as tensors and tuples), and is read with
``torch.load(weights_only=True)``: a crafted pickle is refused (``CheckpointError``) instead
of run.
"""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import torch
import torch.distributed as dist

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(ValueError):
    """A checkpoint file cannot be used (damaged, or not plain data); names the file."""


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
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                       float(gauss)),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(root: str, step: int, module, optimizer, extra: dict | None = None,
                    model_meta: dict | None = None) -> str:
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
    file = os.path.join(path, "train_state", f"rank{rank:05d}.pt")
    torch.save(state, file + ".tmp")
    os.replace(file + ".tmp", file)
    if rank == 0 and model_meta is not None:
        with open(os.path.join(path, "model.json.tmp"), "w") as f:
            json.dump(model_meta, f, indent=1)
        os.replace(os.path.join(path, "model.json.tmp"), os.path.join(path, "model.json"))
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
    rank = dist.get_rank()
    file = os.path.join(path, "train_state", f"rank{rank:05d}.pt")
    state, problem = None, ""
    try:  # before any other collective, so that every rank stops together on a bad file
        if not os.path.exists(file):
            raise CheckpointError(f"{file} is missing: resume with the world size and "
                                  "--tensor-model-parallel-size that saved it")
        state = read_train_state(file)
    except CheckpointError as e:
        problem = str(e)
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    if any(problems):
        raise CheckpointError(next(p for p in problems if p))
    state_dict = dist_checkpointing.load(module.sharded_state_dict(), os.path.join(path, "model"))
    module.load_state_dict(state_dict)
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    dist.barrier()
    return int(state["step"]), state.get("extra", {})


def read_train_state(file: str) -> dict:
    """``torch.load(weights_only=True)`` of one rank's train state; ``CheckpointError`` when the
    file is damaged or holds anything but tensors and plain values (a crafted pickle)."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file}: refused to load: it holds more than tensors and plain "
                              f"values ({first[:160]}); only --load checkpoints this driver "
                              "wrote") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{file} is damaged ({str(e).splitlines()[0][:160]}); resume "
                              "from another step or start fresh") from None
    if not isinstance(state, dict) or not {"step", "optimizer", "rng"} <= state.keys():
        raise CheckpointError(f"{file} is not a train state of this driver; start fresh")
    return state
