"""What a method is: its registry entry and the options every method has.

A method module (``rsa.py``, ``mqsp.py``, ...) ends with ONE declaration,

    METHOD = Method("rsa", Options, rsa_forward, rsa_backward)

and ``megatron_seqpar.registry`` lists the modules. ``forward(setup, q, k, v, kpm_all) ->
(out, lse, extra)`` and ``backward(setup, dout, q, k, v, out, lse, kpm_all, *extra) -> (dq, dk,
dv)`` are the free functions over ``[b, h, s, d]`` views described in ``common``; ``apply``
runs them as one differentiable op (``common.run_method``), and recompute
(``megatron.checkpointing``) calls the same pair through ``common.run_forward``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from megatron_seqpar.common import run_method
from megatron_seqpar.kernels import BACKEND_NAMES


@dataclass(frozen=True)
class BaseOptions:
    """Options every method has. ``backend``: block-kernel backend (``auto`` picks).
    ``head_parallel``: ``U``, the two-level split (``megatron_seqpar.headpar``): a head
    all-to-all inside groups of ``U`` consecutive ranks and the method across the ``P/U``
    groups; 1 (default) is the single-level method."""

    backend: str = "auto"
    head_parallel: int = 1

    def __post_init__(self):
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"unknown kernel backend {self.backend!r}; use one of "
                             f"{BACKEND_NAMES}")
        if not isinstance(self.head_parallel, int) or self.head_parallel < 1:
            raise ValueError(f"head_parallel must be a positive integer, got "
                             f"{self.head_parallel!r}")


@dataclass(frozen=True)
class Method:
    """One method's declaration. ``name`` is the file name, the registry key, the CLI choice
    and the pytest id; ``Options`` its frozen options dataclass (a ``BaseOptions``).
    ``remat``: its backward needs only (q, k, v, out, lse), so under Megatron's activation
    recompute the provider keeps out + lse and never re-runs the distributed forward
    (``megatron.checkpointing``; on by default there, and the cost model counts it)."""

    name: str
    Options: type
    forward: Callable
    backward: Callable
    remat: bool = False

    def __post_init__(self):
        if not (isinstance(self.Options, type) and issubclass(self.Options, BaseOptions)):
            raise TypeError(f"{self.name}: Options must subclass method.BaseOptions")

    def apply(self, q, k, v, key_padding_mask, setup, softmax_offset=None):
        """The method as one differentiable op on the public ``[b, s, h, d]`` shards."""
        return run_method(self.forward, self.backward, q, k, v, key_padding_mask, setup,
                          softmax_offset)
