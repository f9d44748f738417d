"""Checkpoint resume: a run killed after step N and resumed repeats the uninterrupted losses.

``torchrun`` runs ``examples/pretrain_gpt.py`` on 2 ranks x CP=2 with LSS (double gradient
averaging on top of the attention). The run saves every 4 steps and is killed with SIGKILL
(torchrun and both ranks, mid-step) once step 6 has been logged; relaunched with ``--load`` it
resumes from the last complete checkpoint, and the JSON-lines log must then hold exactly (bit
for bit) the losses of an uninterrupted run: same world size and threads, data a pure function
of the step, model and AdamW state through megatron-core dist_checkpointing, RNG through
torch.save. (The owned-rows LSS variant's save path is covered by test_training_layouts.py.)

(Runs as subprocesses: dist_checkpointing's writer starts a multiprocessing manager, which the
daemonic workers of ``tests/distributed.py`` may not.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from distributed import kill_process_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def _launch(tmp, extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", os.path.join(ROOT, "examples", "pretrain_gpt.py"), "--num-layers", "2",
           "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "256",
           "--global-batch-size", "2", "--train-iters", "12", "--context-parallel-size", "2",
           "--seqpar-method", "lss", "--data-cache-path", str(tmp / "data"),
           "--no-progress-bar", "--no-plot", "--cpu-threads", "1", *extra]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def _losses(path):
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [r["loss"] for r in recs if "loss" in r]


@pytest.mark.slow
@pytest.mark.megatron
@pytest.mark.own_world
def test_kill_and_resume_repeats_losses(tmp_path):
    full_log = tmp_path / "full" / "train_log.jsonl"
    p = _launch(tmp_path, ["--log-dir", str(tmp_path / "full")])
    assert p.wait(timeout=240) == 0, p.stderr.read().decode()[-3000:]
    full = _losses(full_log)
    assert len(full) == 12

    log = tmp_path / "run" / "train_log.jsonl"
    ckpt = str(tmp_path / "ckpt")
    args = ["--log-dir", str(tmp_path / "run"), "--save", ckpt, "--save-interval", "4"]
    p = _launch(tmp_path, args)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.poll() is None:
        if log.exists() and len(_losses(log)) >= 6:
            break
        time.sleep(0.2)
    assert p.poll() is None, "the run ended before it could be killed"
    kill_process_tree(p)  # torchrun and both ranks, mid-step
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")) as f:
        saved = int(f.read())
    assert saved >= 4
    p = _launch(tmp_path, [*args, "--load", ckpt])
    assert p.wait(timeout=240) == 0, p.stderr.read().decode()[-3000:]
    from megatron_seqpar.training import report

    resumed = [r["loss"] for r in report.step_records(str(log))]
    assert resumed == full, f"resumed from step {saved}: {resumed} vs {full}"
