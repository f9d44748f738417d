"""Installable as a Megatron plugin: ``pip install .`` (extras: bench, dev).

The dependency ranges are the ones the test suite runs on (torch 2.13, megatron-core 0.16.1).
Transformer Engine and NVIDIA's apex are optional and imported lazily; neither is published on
PyPI under a name that pip could resolve to the right package for every CUDA setup, so install
them as their own documentation says (README, "On GPUs").
"""

from setuptools import find_packages, setup

setup(
    name="megatron-seqpar",
    version="0.1.0",
    description="Sequence-parallel attention (RSA, MQSP, LSS, LightSeq) for NVIDIA Megatron",
    packages=find_packages(include=["megatron_seqpar", "megatron_seqpar.*"]),
    python_requires=">=3.10",
    # einops: megatron-core builds hierarchical CP groups (two levels) with it, undeclared;
    # psutil: megatron-core's dist_checkpointing needs it on CPU, undeclared
    install_requires=["torch>=2.13,<2.14", "megatron-core>=0.16.1,<0.17", "psutil>=5.9",
                      "einops>=0.6", "tqdm>=4.60", "numpy>=1.24", "matplotlib>=3.7"],
    extras_require={
        "bench": ["deepspeed>=0.14"],  # make bench-deps: DS_BUILD_OPS=0
        "dev": ["pytest>=8", "ruff>=0.5"],
    },
    entry_points={"console_scripts": [
        "megatron-seqpar-pretrain-gpt = megatron_seqpar.training.driver:main_gpt",
        "megatron-seqpar-pretrain-bert = megatron_seqpar.training.driver:main_bert",
    ]},
)
