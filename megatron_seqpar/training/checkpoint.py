"""Checkpoint save/resume such that a resumed run repeats the uninterrupted run's losses.

Layout (Megatron-LM's names where it has them)::

    SAVE/latest_checkpointed_iteration.txt      the last complete step, written last
    SAVE/iter_0000050/model/                     megatron-core dist_checkpointing (torch_dist)
    SAVE/iter_0000050/optimizer/                 dist_checkpointing of the optimizer state,
                                                 sharded like the parameters it belongs to
    SAVE/iter_0000050/model.json                 the model-defining flags (checked on --load)
    SAVE/iter_0000050/train_state/rank00001.pt   torch.save of this rank's step, RNG states
                                                 and the layout that saved it

The model goes through ``dist_checkpointing`` (``sharded_state_dict`` of the GPTModel /
BertModel, replicas deduplicated across DP and CP ranks), which runs on CPU/gloo and CUDA/NCCL
alike. So does the optimizer state: each moment tensor is saved as a ``ShardedTensor`` shaped
like its parameter (megatron-core's ``optim_state_to_sharding_state``, the form its own
optimizers use; on CPU the optimizer is ``torch.optim.AdamW``, ``driver.SUBSTITUTIONS``). Both
therefore load into another layout: another CP or TP size, another ``--seqpar-method`` (the
methods add no parameters). LSS position-embedding moments are assembled from their owner
ranks before the save, as the embedding rows themselves are. Data needs no state: batches are a
pure function of the step (``data.BatchSource``). A resumed run on the same layout and thread
count continues with bit-identical losses; on another layout, to fp32 round-off.

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

from megatron_seqpar.training.preflight import TRACKER, checkpoint_step, iter_dir


class CheckpointError(ValueError):
    """A checkpoint file cannot be used (damaged, or not plain data); names the file."""


def latest_step(root: str) -> int | None:
    """The last complete checkpoint's step under ``root`` (None if there is none); a damaged
    tracker raises ``preflight.InputError`` naming it (one reader for both)."""
    return checkpoint_step(root)


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
                    model_meta: dict | None = None, rows_from_owners=None) -> str:
    """Collective over all ranks: write step ``step`` under ``root``; returns its directory.

    ``optimizer`` has ``sharded_state_dict(model_sharded_state_dict, is_loading=False,
    rows_from_owners=None)``; ``rows_from_owners``: ``(params, assemble)`` whose moment rows
    are spread over ranks (LSS position embeddings), assembled by ``assemble(tensor)``.
    """
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    path = iter_dir(root, step)
    model_dir, optim_dir = os.path.join(path, "model"), os.path.join(path, "optimizer")
    if rank == 0:
        for d in (model_dir, optim_dir, os.path.join(path, "train_state")):
            os.makedirs(d, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(module.sharded_state_dict(), model_dir)
    dist_checkpointing.save(optimizer.sharded_state_dict(
        module.sharded_state_dict(), rows_from_owners=rows_from_owners), optim_dir)
    state = {"step": step, "rng": _rng_state(), "extra": extra or {}}
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

    Returns (0, {}) when ``root`` holds no checkpoint (a fresh start). Any layout loads: the
    model and optimizer are resharded by dist_checkpointing; a rank that has no train state
    file of its own (a larger world than the one that saved) takes rank 0's step and RNG.
    """
    from megatron.core import dist_checkpointing

    step = latest_step(root)
    if step is None:
        return 0, {}
    path = iter_dir(root, step)
    rank = dist.get_rank()
    file = os.path.join(path, "train_state", f"rank{rank:05d}.pt")
    if not os.path.exists(file):
        file = os.path.join(path, "train_state", "rank00000.pt")
    state, problem = None, ""
    try:  # before any other collective, so that every rank stops together on a bad file
        if not os.path.exists(file):
            raise CheckpointError(f"{file} is missing: the checkpoint is incomplete; resume "
                                  "from another step or start fresh")
        state = read_train_state(file)
    except CheckpointError as e:
        problem = str(e)
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    if any(problems):
        raise CheckpointError(next(p for p in problems if p))
    state_dict = dist_checkpointing.load(module.sharded_state_dict(), os.path.join(path, "model"))
    module.load_state_dict(state_dict)
    optim_dir = os.path.join(path, "optimizer")
    if os.path.isdir(optim_dir):
        sharded = optimizer.sharded_state_dict(module.sharded_state_dict(), is_loading=True)
        optimizer.load_sharded_state_dict(dist_checkpointing.load(sharded, optim_dir))
    elif "optimizer" in state:  # the earlier per-rank format
        optimizer.load_state_dict(state["optimizer"])
    else:
        raise CheckpointError(f"{optim_dir} is missing: the checkpoint is incomplete; resume "
                              "from another step or start fresh")
    _set_rng_state(state["rng"])
    dist.barrier()
    return int(state["step"]), state.get("extra", {})


def torch_optimizer_sharded_state(opt, model_sharded_state_dict, is_loading=False,
                                  rows_from_owners=None) -> dict:
    """A ``torch.optim`` optimizer's state as a dist_checkpointing state dict: every state
    tensor a ``ShardedTensor`` like its parameter's, the (common) step and hyperparameters
    plain. ``is_loading``: first give every parameter zero state to load into (Adam's keys).
    ``rows_from_owners``: ``(params, assemble)``, see ``save_checkpoint`` (collective)."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    params = [p for g in opt.param_groups for p in g["params"]]
    if is_loading:
        for p in params:
            if not opt.state[p]:
                opt.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                    exp_avg_sq=torch.zeros_like(p))
    sd = opt.state_dict()
    steps = {float(st["step"]) for st in sd["state"].values() if "step" in st}
    if len(steps) > 1:
        raise CheckpointError(f"optimizer parameters are at different steps {sorted(steps)}")
    if rows_from_owners is not None:
        spread, assemble = rows_from_owners
        spread = {id(p) for p in spread}
        for i, p in enumerate(params):
            if id(p) in spread and i in sd["state"]:
                sd["state"][i] = {k: v if k == "step" else assemble(v)
                                  for k, v in sd["state"][i].items()}
    optim_state_to_sharding_state(
        sd, get_param_id_to_sharded_param_map(model_sharded_state_dict, params),
        exclude_keys=("step",))
    sd["common_step"] = steps.pop() if steps else 0.0
    return sd


def load_torch_optimizer_state(opt, loaded: dict) -> None:
    """Inverse of ``torch_optimizer_sharded_state`` after ``dist_checkpointing.load``."""
    step = float(loaded.pop("common_step"))
    for st in loaded["state"].values():
        st["step"] = torch.tensor(step)
    opt.load_state_dict(loaded)


def read_train_state(file: str) -> dict:
    """``torch.load(weights_only=True)`` of one rank's train state; ``CheckpointError`` when the
    file is damaged or holds anything but tensors and plain values (a crafted pickle)."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "WeightsUnpickler error:" in text:  # torch's reason, without its advice to unpickle
            text = text.split("WeightsUnpickler error:", 1)[1]
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
        raise CheckpointError(f"{file}: refused to load: it holds more than tensors and plain "
                              f"values ({first[:160]}); only --load checkpoints this driver "
                              "wrote") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{file} is damaged ({str(e).splitlines()[0][:160]}); resume "
                              "from another step or start fresh") from None
    if not isinstance(state, dict) or not {"step", "rng"} <= state.keys():
        raise CheckpointError(f"{file} is not a train state of this driver; start fresh")
    return state
