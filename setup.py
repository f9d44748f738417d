"""Installable as a Megatron plugin: ``pip install -e .`` (extras: te, apex, bench, dev)."""

from setuptools import find_packages, setup

setup(
    name="megatron-seqpar",
    version="0.1.0",
    description="Sequence-parallel attention (RSA, MQSP, LSS, LightSeq) for NVIDIA Megatron",
    packages=find_packages(include=["megatron_seqpar", "megatron_seqpar.*"]),
    python_requires=">=3.10",
    # einops: megatron-core builds hierarchical CP groups (two levels) with it, undeclared
    install_requires=["torch>=2.4", "megatron-core>=0.13", "psutil>=5.9", "einops>=0.6",
                      "tqdm>=4.60"],
    extras_require={
        "te": ["transformer-engine>=1.9"],
        "apex": ["apex"],
        "bench": ["deepspeed>=0.14", "matplotlib>=3.7"],  # make bench-deps: DS_BUILD_OPS=0,
        "dev": ["pytest>=8", "ruff>=0.5", "matplotlib>=3.7"],
    },
)
