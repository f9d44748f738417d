"""Bad input to the pretraining driver stops before training with one ``error:`` line.

Unit checks of ``training.preflight`` (file-system only, no process group) and of the train
state reader, then a few real runs of ``examples/pretrain_gpt.py`` on one process: a missing
data path, plain text given as ``--data-path`` (built into the indexed format on first use), a
crafted checkpoint pickle (refused, never run) and a diverging run (stopped at the first
non-finite loss, keeping the last good checkpoint).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from megatron_seqpar.training import checkpoint, preflight
from megatron_seqpar.training.arguments import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2",
        "--seq-length", "64", "--global-batch-size", "1", "--no-progress-bar", "--no-plot",
        "--cpu-threads", "1"]


def cfg(tmp_path, *argv):
    return parse_args([*TINY, "--data-cache-path", str(tmp_path / "cache"), *argv],
                      world_size=1)


# --------------------------------------------------------------------------- data path
def test_missing_data_path_names_the_fix(tmp_path):
    with pytest.raises(preflight.InputError, match="no such file.*tools/preprocess_data.py"):
        preflight.data_kind(str(tmp_path / "nope"))
    (tmp_path / "half.bin").write_bytes(b"x")
    with pytest.raises(preflight.InputError, match="must both exist"):
        preflight.data_kind(str(tmp_path / "half"))


def test_text_and_indexed_data_paths(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("Some text.\n\n\nAnother document.\n")
    assert preflight.data_kind(str(text)) == ("text", [str(text)])
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "b.txt").write_text("b")
    (tmp_path / "dir" / "a.md").write_text("a")
    kind, files = preflight.data_kind(str(tmp_path / "dir"))
    assert kind == "text" and [os.path.basename(f) for f in files] == ["a.md", "b.txt"]
    (tmp_path / "c_text_document.bin").write_bytes(b"")
    (tmp_path / "c_text_document.idx").write_bytes(b"")
    prefix = str(tmp_path / "c_text_document")
    assert preflight.data_kind(prefix) == ("indexed", prefix)
    assert preflight.data_kind(prefix + ".idx") == ("indexed", prefix)
    c = cfg(tmp_path)
    key = preflight.text_prefix(c, [str(text)])
    assert key.endswith("_text_document") and os.path.basename(key).startswith("notes-")
    text.write_text("Edited, so the cached dataset is rebuilt.")
    assert preflight.text_prefix(c, [str(text)]) != key


@pytest.mark.parametrize("content, match", [
    (b"\x00\x01binary", "not text"),
    (b"\xff\xfe\xfa latin" + b"x" * 100, "not UTF-8"),
    (b"  \n", "is empty"),
])
def test_unusable_text_is_refused(tmp_path, content, match):
    path = tmp_path / "f.txt"
    path.write_bytes(content)
    with pytest.raises(preflight.InputError, match=match):
        preflight.data_kind(str(path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(preflight.InputError, match="holds no text files"):
        preflight.data_kind(str(tmp_path / "empty"))


# ------------------------------------------------------------------------- checkpoints
def _fake_checkpoint(root, step, meta=None):
    d = root / f"iter_{step:07d}"
    (d / "model").mkdir(parents=True)
    if meta is not None:
        (d / "model.json").write_text(json.dumps(meta))
    (root / checkpoint.TRACKER).write_text(str(step))


def test_load_directory_states(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert "starting from step 0" in preflight.load_note(cfg(tmp_path, "--load", str(ckpt)))
    ckpt.mkdir()
    assert "starting from step 0" in preflight.load_note(cfg(tmp_path, "--load", str(ckpt)))
    c = cfg(tmp_path, "--load", str(ckpt))
    _fake_checkpoint(ckpt, 4, preflight.model_signature(c))
    assert preflight.load_note(c) is None
    (ckpt / checkpoint.TRACKER).write_text("4\x00garbage")
    with pytest.raises(preflight.InputError, match="latest_checkpointed_iteration.txt is damaged"):
        preflight.load_note(c)
    (ckpt / checkpoint.TRACKER).write_text("8")
    with pytest.raises(preflight.InputError, match="names step 8.*iter_0000008/model is missing"):
        preflight.load_note(c)


def test_checkpoint_of_another_model_names_the_sizes(tmp_path):
    ckpt = tmp_path / "ckpt"
    _fake_checkpoint(ckpt, 2, preflight.model_signature(cfg(tmp_path)))
    other = cfg(tmp_path, "--load", str(ckpt), "--hidden-size", "64", "--num-layers", "2")
    with pytest.raises(preflight.InputError,
                       match=r"--num-layers 1 \(saved\) vs 2.*--hidden-size 32 \(saved\) vs 64"):
        preflight.load_note(other)


def test_unwritable_save_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(preflight.InputError, match="--save .* is not writable"):
        preflight.check_save(cfg(tmp_path, "--save", str(blocker / "ckpt")))


class _Payload:
    """Unpickling this would create ``path``: what a crafted checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_train_state_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    file = tmp_path / "rank00000.pt"
    with open(file, "wb") as f:
        pickle.dump({"step": 1, "optimizer": {}, "rng": _Payload(str(marker))}, f)
    with pytest.raises(checkpoint.CheckpointError, match="refused to load"):
        checkpoint.read_train_state(str(file))
    assert not marker.exists()
    file.write_bytes(b"\x80\x04garbage")
    with pytest.raises(checkpoint.CheckpointError, match="damaged|refused"):
        checkpoint.read_train_state(str(file))


def test_rng_state_round_trips_as_plain_data(tmp_path):
    import random

    import numpy as np

    state = checkpoint._rng_state()
    torch.save(state, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    a = (np.random.rand(), random.random(), torch.rand(1).item())
    checkpoint._set_rng_state(loaded)
    assert (np.random.rand(), random.random(), torch.rand(1).item()) == a


# ------------------------------------------------------------------------------ runs
def _run(tmp_path, *argv, timeout=180):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # one process of its own, also under a torchrun-launched pytest
    cmd = [sys.executable, os.path.join(ROOT, "examples", "pretrain_gpt.py"), *TINY,
           "--data-cache-path", str(tmp_path / "cache"), "--log-dir", str(tmp_path / "log"),
           *argv]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _error_lines(proc):
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]


@pytest.mark.megatron
def test_run_with_missing_data_stops_with_one_line(tmp_path):
    proc = _run(tmp_path, "--data-path", "/nonexistent/file", "--train-iters", "2")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = _error_lines(proc)
    assert len(lines) == 1 and "--data-path /nonexistent/file: no such file" in lines[0]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.megatron
def test_text_data_path_trains_and_crafted_checkpoint_is_refused(tmp_path):
    import megatron_seqpar

    notes = tmp_path / "notes.txt"
    notes.write_text(megatron_seqpar.__doc__ * 3)
    ckpt = tmp_path / "ckpt"
    proc = _run(tmp_path, "--data-path", str(notes), "--train-iters", "2", "--save", str(ckpt))
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = list((tmp_path / "cache" / "text").glob("notes-*_text_document.bin"))
    assert len(built) == 1, "the text was not built into the indexed format"
    assert json.loads((ckpt / "iter_0000002" / "model.json").read_text())["hidden_size"] == 32

    marker = tmp_path / "pwned"
    state = ckpt / "iter_0000002" / "train_state" / "rank00000.pt"
    with open(state, "wb") as f:
        pickle.dump({"step": 2, "optimizer": {}, "rng": _Payload(str(marker))}, f)
    proc = _run(tmp_path, "--data-path", str(notes), "--train-iters", "3", "--load", str(ckpt))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = _error_lines(proc)
    assert len(lines) == 1 and "rank00000.pt: refused to load" in lines[0], proc.stderr[-2000:]
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.megatron
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # lr 1e30: the first Adam step moves every weight by ~1e30, so step 2's loss overflows.
    ckpt = tmp_path / "ckpt"
    proc = _run(tmp_path, "--lr", "1e30", "--train-iters", "6", "--save", str(ckpt),
                "--save-interval", "1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = _error_lines(proc)
    assert len(lines) == 1 and "at step 2" in lines[0], proc.stderr[-2000:]
    assert "the last good checkpoint is step 1" in lines[0]
    assert (ckpt / checkpoint.TRACKER).read_text() == "1"
