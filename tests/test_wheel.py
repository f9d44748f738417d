"""The main job runs from an installed wheel, not only from a checkout.

Builds the wheel from the package's files (copied out of the checkout, so the build leaves
nothing behind), installs it into a fresh virtual environment whose only other packages are
this environment's (made visible read-only by a ``.pth`` line: nothing is downloaded, and
``pip install --no-index`` checks the declared ranges against them), then runs two steps of
GPT pretraining with ``python -m megatron_seqpar.pretrain_gpt`` and the console script, from a
directory outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2",
       "--seq-length", "64", "--train-iters", "2", "--seqpar-method", "lightseq",
       "--no-progress-bar", "--cpu-threads", "1"]


def _run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert p.returncode == 0, f"{cmd}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.mark.slow
def test_the_wheel_installs_and_pretrains(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "megatron_seqpar"), src / "megatron_seqpar",
                    ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "--wheel-dir", str(tmp_path / "dist"), str(src)])
    wheel, = (tmp_path / "dist").glob("megatron_seqpar-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)  # pip itself comes from the visible packages
    py = env_dir / "bin" / "python"
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    deps = [p for p in site.getsitepackages() if os.path.isdir(p)]
    with open(os.path.join(purelib.stdout.strip(), "host_packages.pth"), "w") as f:
        f.write("\n".join(deps) + "\n")  # after the venv's own site-packages on sys.path
    _run([str(py), "-m", "pip", "install", "--no-index", "-q", str(wheel)])

    work = tmp_path / "work"
    work.mkdir()
    where = _run([str(py), "-c", "import megatron_seqpar; print(megatron_seqpar.__file__)"],
                 cwd=work)
    assert where.stdout.strip().startswith(str(env_dir)), where.stdout  # the wheel's copy
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)
    for i, cmd in enumerate([[str(py), "-m", "megatron_seqpar.pretrain_gpt"],
                             [str(env_dir / "bin" / "megatron-seqpar-pretrain-gpt")]]):
        logs = work / f"run{i}"
        _run([*cmd, *RUN, "--log-dir", str(logs), "--data-cache-path", str(work / "data")],
             cwd=work, env=env)
        with open(logs / "train_log.jsonl") as f:
            losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
        assert len(losses) == 2 and all(0 < x < 10 for x in losses), losses
        print(f"{' '.join(cmd[-1:])}: losses {losses}")
