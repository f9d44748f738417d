"""The main job outlives a killed rank, runs as two "nodes" and never hangs on a stalled peer.

All runs are ``examples/pretrain_gpt.py`` at CP=2 with LightSeq on 2 CPU processes, tiny model:

* ``torchrun --max-restarts 2``: rank 1 is killed with SIGKILL mid-run; torchrun restarts the
  group, which resumes from the last checkpoint (``--save D --load D``) and finishes with the
  losses of an uninterrupted run (the same layout and threads: bit for bit).
* two torchrun agents of one process each, rendezvous on 127.0.0.1 (``--nnodes 2
  --rdzv-backend c10d``), give the single-node 2-process run's losses.
* a rank that stalls (a test wrapper makes rank 1 sleep in its second step) ends the job within
  ``--distributed-timeout-minutes`` with one ``error:`` line naming the rank and the operation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from distributed import kill_process_tree

from megatron_seqpar.comm import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "pretrain_gpt.py")
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2",
        "--seq-length", "128", "--global-batch-size", "1", "--context-parallel-size", "2",
        "--seqpar-method", "lightseq", "--no-progress-bar", "--no-plot", "--cpu-threads", "1"]

pytestmark = [pytest.mark.slow, pytest.mark.megatron, pytest.mark.own_world]


def _env():
    return dict(os.environ, PYTHONWARNINGS="ignore")


def _losses(log_dir):
    path = os.path.join(log_dir, "train_log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Losses of 8 steps on one node of 2 processes, nothing in the way."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", SCRIPT, *TINY, "--train-iters", "8", "--data-cache-path", str(tmp / "data"),
           "--log-dir", str(tmp / "log")]
    proc = subprocess.run(cmd, cwd=tmp, env=_env(), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = _losses(tmp / "log")
    assert len(losses) == 8
    return losses


def _worker(agent_pid: int, local_rank: int):
    import psutil

    for child in psutil.Process(agent_pid).children(recursive=True):
        try:
            if child.environ().get("LOCAL_RANK") == str(local_rank) and any(
                    "pretrain_gpt.py" in part for part in child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def test_killed_rank_restarts_and_resumes(tmp_path, uninterrupted):
    ckpt, log = tmp_path / "ckpt", tmp_path / "log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "--max-restarts", "2", SCRIPT, *TINY, "--train-iters", "8",
           "--data-cache-path", str(tmp_path / "data"), "--log-dir", str(log),
           "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "3"]
    out = open(tmp_path / "stdout.txt", "w")
    p = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and p.poll() is None and len(_losses(log)) < 5:
            time.sleep(0.1)
        assert p.poll() is None, "the run ended before it could be killed"
        victim = _worker(p.pid, 1)
        assert victim is not None, "rank 1's process not found"
        died_after = len(_losses(log))
        victim.send_signal(signal.SIGKILL)
        assert p.wait(timeout=300) == 0, (tmp_path / "stdout.txt").read_text()[-4000:]
    finally:
        if p.poll() is None:
            kill_process_tree(p)
        out.close()
    text = (tmp_path / "stdout.txt").read_text()
    assert "resuming from step 3 of" in text or "resuming from step 6 of" in text, text[-3000:]
    losses = _losses(log)
    assert losses == uninterrupted, (f"killed after step {died_after}: {losses} vs "
                                     f"{uninterrupted}")


def test_two_agents_as_two_nodes(tmp_path, uninterrupted):
    port = free_port()
    agents = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "seqpar-two-nodes",
               "--max-restarts", "0", SCRIPT, *TINY, "--train-iters", "8",
               "--data-cache-path", str(tmp_path / "data"),  # shared, as across real nodes
               "--log-dir", str(tmp_path / f"log{node}")]
        agents.append(subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True,
                                       start_new_session=True))
    try:
        outs = [a.communicate(timeout=300)[0] for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                kill_process_tree(a)
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-2000:] for o in outs)
    logs = [_losses(tmp_path / f"log{n}") for n in range(2)]
    got = [x for x in logs if x]  # the log is written by global rank 0, on either agent
    assert len(got) == 1 and got[0] == uninterrupted, (logs, uninterrupted)


STALL = r"""
import os, sys, time
from megatron_seqpar.training import driver
forward, calls = driver._forward, []
def stalling_forward(cfg, model, batch):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        time.sleep(3600)  # a hung peer: never answers the next collective
    return forward(cfg, model, batch)
driver._forward = stalling_forward
sys.exit(driver.main(sys.argv[2:], model="gpt"))
"""


def test_stalled_rank_ends_the_job_with_a_message(tmp_path):
    (tmp_path / "stall.py").write_text(STALL)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(tmp_path / "stall.py"), ROOT, *TINY, "--train-iters", "4",
           "--data-cache-path", str(tmp_path / "data"), "--log-dir", str(tmp_path / "log"),
           "--distributed-timeout-minutes", "0.15"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:  # the hour-long sleep would outlast this: ending at all shows the bound works
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            kill_process_tree(proc)
    assert proc.returncode != 0
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error: rank 0")]
    assert len(lines) == 1, stderr[-3000:]
    assert "a collective timed out after 0.15 min" in lines[0], lines[0]
    assert "recv operation" in lines[0], lines[0]  # gloo's own words name the operation
