"""Checkpoints outlive the parallel layout that wrote them (issue 16, item 5).

A run of ``examples/pretrain_gpt.py`` at CP=2 with LSS in its owned-rows variant
(``--no-seqpar-lss-assemble-position-grads``: the most resume state, each rank's
position-embedding rows and their Adam moments are its own and are assembled at save) saves
steps 2 and 3;
its tracker is then pointed back at step 2 and the run is resumed at CP=1 (plain megatron-core
attention), CP=4 with LSS, TP=2 x CP=2 with LightSeq and CP=2 with LightSeq. Model and
optimizer go through megatron-core ``dist_checkpointing``, which reshards them, so each
resumed step 3 must give the uninterrupted run's step-3 loss to fp32 round-off, and the log
line must say which layout was loaded into which.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from distributed import kill_process_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2",
        "--seq-length", "64", "--global-batch-size", "1", "--train-iters", "3",
        "--no-progress-bar", "--no-plot", "--cpu-threads", "1"]


def _torchrun(tmp, nproc, *argv):
    """Start one ``torchrun`` of the example; ``.communicate()`` it for (stdout, stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(nproc), os.path.join(ROOT, "examples", "pretrain_gpt.py"), *TINY,
           "--data-cache-path", str(tmp / "data"), *argv]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _losses(log_dir):
    with open(os.path.join(log_dir, "train_log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.mark.slow
@pytest.mark.megatron
@pytest.mark.own_world
def test_resume_into_other_layouts_and_methods(tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = _torchrun(tmp_path, 2, "--context-parallel-size", "2", "--seqpar-method", "lss",
                     "--no-seqpar-lss-assemble-position-grads",
                     "--save", str(ckpt), "--save-interval", "2",
                     "--log-dir", str(tmp_path / "full"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    want = _losses(tmp_path / "full")[3]
    (ckpt / "latest_checkpointed_iteration.txt").write_text("2")  # resume from step 2

    targets = {  # name: (processes, flags)
        "CP=1 local": (1, []),
        "CP=4 lss": (4, ["--context-parallel-size", "4", "--seqpar-method", "lss"]),
        "TP=2 x CP=2 lightseq": (4, ["--tensor-model-parallel-size", "2",
                                     "--context-parallel-size", "2",
                                     "--seqpar-method", "lightseq"]),
        "CP=2 lightseq": (2, ["--context-parallel-size", "2", "--seqpar-method", "lightseq"]),
    }
    # the four resumes read the checkpoint and nothing else they share: they run at once (each
    # rank is mostly single-threaded start-up, so together they fill the cores better)
    procs = {name: _torchrun(tmp_path, nproc, *flags, "--load", str(ckpt),
                             "--log-dir", str(tmp_path / f"resumed{i}"))
             for i, (name, (nproc, flags)) in enumerate(targets.items())}
    got = {}
    try:
        for i, (name, proc) in enumerate(procs.items()):
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"{name}: " + err[-3000:]
            assert "resuming step 2 saved with TP=1 CP=2 lss (world 2)" in out, out
            losses = _losses(tmp_path / f"resumed{i}")
            assert sorted(losses) == [3], losses  # a fresh log dir: only the resumed step
            got[name] = losses[3]
    finally:  # a failed or hung resume takes the others down with it
        for proc in procs.values():
            if proc.poll() is None:
                kill_process_tree(proc)
    for name, loss in got.items():
        # fp32 round-off: the layouts sum the same terms in other orders (CP/TP partial sums,
        # another attention kernel); over 3 steps that moves a loss of ~5.5 by ~1e-6 at most.
        assert abs(loss - want) <= 1e-5 * abs(want), f"{name}: {loss} vs uninterrupted {want}"
