"""CUDA block kernels in the ``(out, lse)`` contract of ``megatron_seqpar.kernels``, and the
pure dispatch rule that picks a backend for a block.

Nothing here touches CUDA at import: the ops are looked up when a block runs.

``cuda_flash``: ``aten._scaled_dot_product_flash_attention`` and its ``_backward`` (FlashAttention
2 inside PyTorch): fp16/bf16, no explicit mask, full blocks and square causal diagonals, head
dim a multiple of 8 up to 256. GQA natively: K/V keep their ``hkv`` heads, dK/dV come back
with ``hkv`` heads (no expanded copy). ``lse`` is ``[b, h, sq]`` fp32.

``cuda_efficient``: ``aten._efficient_attention_forward`` / ``_backward`` (the CUTLASS
memory-efficient kernel behind ``_scaled_dot_product_efficient_attention``, called one level
down so that it reads our ``[b, s, h, d]`` storage as is): fp32, fp16, bf16, an additive bias
for masks, and the causal diagonal as the kernel's own top-left mask (no bias for it). It
never materialises scores; the bias is built at the size of the bool mask it is given (a key
padding mask ``[b, 1, 1, sk]`` is broadcast over heads and rows with stride 0; only the rare
offset-diagonal ``mask`` blocks, which the planner never emits for the contiguous and zigzag
layouts, carry a ``[1, 1, sq, sk]`` bias). Its ``lse`` is padded to a multiple of 32 rows
(``kAlignLSE``): the forward trims it, the backward pads the final lse back. The kernel needs
equal head counts, so GQA K/V are expanded for the duration of ONE call (a temporary, freed
when the call returns; dK/dV are summed over each group of ``hq/hkv`` query heads).

``cuda_cudnn`` (opt-in: ``backend="cuda_cudnn"``; ``auto`` does not pick it until the device
check has measured it): ``aten._scaled_dot_product_cudnn_attention`` and its ``_backward``,
fp16/bf16 blocks without a mask, head dim up to 128, GQA natively. Its lse comes as
``[b, h, sq, 1]`` in this torch; the backward hands it back in the rank the real forward
returned (remembered per device type; the op's meta kernel answers before any forward), so a
torch that changes it keeps working.

Rows with no visible key (padding, a causal row whose keys are all padded): whatever the
kernel writes there (0 or NaN, lse -inf or +inf), the forward sets out = 0 and lse = -inf,
from the mask alone (device ops, no host sync). In the backward such rows get lse = +inf, so
``exp(s - lse) = 0`` and they contribute nothing.

Dispatch (``choose_backend``, pure: device type, dtype, mask, causal, head dim, available
ops -> name):

| device | dtype | block | backend |
|---|---|---|---|
| cpu | any | any | ``cpu_flash`` |
| cuda | fp16, bf16 | full, causal diagonal (no mask), sm80+ | ``cuda_flash`` |
| cuda | fp16, bf16 | padded, partially masked; any below sm80 | ``cuda_efficient`` |
| cuda | fp32 | any | ``cuda_efficient`` |
| cuda | fp64, or head dim not a multiple of 8 / above 256 | any | ``reference`` |

(``cuda_cudnn`` serves fp16/bf16 blocks without a mask when asked for by name.)
"""

from __future__ import annotations

import functools

import torch

NEG_INF, POS_INF = float("-inf"), float("inf")
LSE_ALIGN = 32  # the efficient kernel pads its lse rows to this multiple
BIAS_ALIGN = 16  # ... and wants bias rows aligned (PyTorch's own sdpa pads to 16)

CPU_ORDER = ("cpu_flash",)
CUDA_ORDER = ("cuda_flash", "cuda_efficient")
_OPS = {
    "cpu_flash": ("_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_flash_attention_for_cpu_backward"),
    "cuda_flash": ("_scaled_dot_product_flash_attention",
                   "_scaled_dot_product_flash_attention_backward"),
    "cuda_efficient": ("_efficient_attention_forward", "_efficient_attention_backward"),
    "cuda_cudnn": ("_scaled_dot_product_cudnn_attention",
                   "_scaled_dot_product_cudnn_attention_backward"),
}


@functools.cache
def available_backends() -> frozenset[str]:
    """Backends whose aten ops exist in this torch build (schema lookup only, no CUDA call;
    cached: the build cannot change in a process, and the lookup ran once per block)."""
    return frozenset(name for name, ops in _OPS.items()
                     if all(hasattr(torch.ops.aten, op) for op in ops)) | {"reference"}


def capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA device's compute capability (a cached host query: no device sync), or None
    when it cannot be asked (no CUDA in this build: fake or meta tensors in tests)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def supports(name: str, device_type: str, dtype: torch.dtype, has_mask: bool, causal: bool,
             head_dim: int, capability: tuple[int, int] | None = None) -> bool:
    """Whether backend ``name`` serves a block of this kind (pure: no tensors). ``capability``:
    the CUDA device's (None = not known, taken as able): flash and cuDNN need sm80 or newer
    (Ampere), the efficient kernel runs from sm50."""
    if name == "reference":
        return True
    if name == "cpu_flash":
        return device_type == "cpu"
    if device_type != "cuda" or head_dim % 8 or head_dim > 256:
        return False
    modern = capability is None or tuple(capability) >= (8, 0)
    if name == "cuda_flash":
        return modern and not has_mask and dtype in (torch.float16, torch.bfloat16)
    if name == "cuda_efficient":
        return dtype in (torch.float16, torch.bfloat16, torch.float32)
    if name == "cuda_cudnn":
        return (modern and not has_mask and dtype in (torch.float16, torch.bfloat16)
                and head_dim <= 128)
    return False


@functools.cache
def choose_backend(device_type: str, dtype: torch.dtype, has_mask: bool, causal: bool,
                   head_dim: int, available=None, capability=None) -> str:
    """The backend ``auto`` runs for one block: the first of the device's preference order
    that is available and serves the block, else ``reference``. Pure, so cached (a handful
    of block kinds per run; ``available`` must be hashable, e.g. a frozenset)."""
    available = available_backends() if available is None else available
    order = CUDA_ORDER if device_type == "cuda" else CPU_ORDER if device_type == "cpu" else ()
    for name in order:
        if name in available and supports(name, device_type, dtype, has_mask, causal, head_dim,
                                          capability):
            return name
    return "reference"


# ----------------------------------------------------------------------------- helpers
def _groups(q, k) -> int:
    return q.size(1) // k.size(1)


def _bmhk(x, g: int = 1):
    """``[b, h, s, d]`` view -> ``[b, s, h*g, d]`` for the kernel: a view of the public storage,
    or (GQA, ``g > 1``) a temporary with each kv head repeated for its ``g`` query heads."""
    x = x.transpose(1, 2)
    return x if g == 1 else x.repeat_interleave(g, dim=2)


def _bias(mask, dtype, b: int, h: int, sq: int, sk: int):
    """Additive bias for a bool mask ``[b|1, 1, sq|1, sk]``, broadcast (stride 0) to
    ``[b, h, sq, sk]``; rows stored padded to ``BIAS_ALIGN`` elements."""
    if mask is None:
        return None
    mb, _, mq, _ = mask.shape
    width = -(-sk // BIAS_ALIGN) * BIAS_ALIGN
    bias = torch.zeros(mb, 1, mq, width, dtype=dtype, device=mask.device).narrow(-1, 0, sk)
    bias.masked_fill_(mask, NEG_INF)
    return bias.expand(b, h, sq, sk)


def dead_rows(mask, causal: bool, sq: int):
    """``[b|1, 1, sq]`` bool: rows that see no key (None when no mask). A causal block with a
    key padding mask ``[b, 1, 1, sk]`` (square) has row ``i`` dead when keys ``0..i`` are all
    padded: a running product, no ``sq x sk`` tensor."""
    if mask is None:
        return None
    if causal and mask.size(2) == 1:
        run = mask.select(2, 0).to(torch.int32).cumprod(-1).bool()  # keys 0..j all padded
        n = run.size(-1)
        if sq <= n:
            return run.narrow(-1, 0, sq)
        return torch.cat([run, run.narrow(-1, n - 1, 1).expand(*run.shape[:-1], sq - n)], -1)
    if causal:
        tri = torch.ones(sq, mask.size(-1), dtype=torch.bool, device=mask.device).triu_(1)
        mask = mask | tri
    return mask.all(-1).expand(mask.size(0), 1, sq)


def _op(name: str):
    """The aten op ``name``, looked up at call time (tests substitute CPU emulations here)."""
    return getattr(torch.ops.aten, name)


def _zeros_int64(device):
    return torch.zeros((), dtype=torch.int64, device=device)


# ----------------------------------------------------------------------------- cuda_flash
def flash_forward(q, k, v, scale, causal, mask):
    res = _op("_scaled_dot_product_flash_attention")(q, k, v, 0.0, causal, False,
                                                              scale=scale)
    return res[0], res[1]


def flash_backward(dout, q, k, v, out, lse, scale, causal, mask):
    sq, sk = q.size(2), k.size(2)
    zero = _zeros_int64(q.device)
    # no row is empty here; the kernel reads lse as a dense [b, h, sq] (no strides)
    lse = lse.float().masked_fill(torch.isneginf(lse), POS_INF).contiguous()
    dq, dk, dv = _op("_scaled_dot_product_flash_attention_backward")(
        dout.to(q.dtype), q, k, v, out.to(q.dtype), lse, None, None, sq, sk, 0.0, causal,
        zero, zero, scale=scale)
    return dq, dk, dv


# ----------------------------------------------------------------------------- cuda_efficient
def efficient_forward(q, k, v, scale, causal, mask):
    b, hq, sq, _ = q.shape
    sk, g = k.size(2), _groups(q, k)
    bias = _bias(mask, q.dtype, b, hq, sq, sk)
    out, lse = _op("_efficient_attention_forward")(
        _bmhk(q), _bmhk(k, g), _bmhk(v, g), bias, None, None, None, None, 0.0, int(causal),
        True, scale=scale)[:2]
    out, lse = out.transpose(1, 2), lse.narrow(2, 0, sq)
    dead = dead_rows(mask, causal, sq)
    if dead is not None:
        out = out.masked_fill_(dead.unsqueeze(-1), 0.0)
        lse = lse.masked_fill(dead, NEG_INF)
    return out, lse


def efficient_backward(dout, q, k, v, out, lse, scale, causal, mask):
    b, hq, sq, d = q.shape
    hkv, sk, g = k.size(1), k.size(2), _groups(q, k)
    bias = _bias(mask, q.dtype, b, hq, sq, sk)
    padded = -(-sq // LSE_ALIGN) * LSE_ALIGN
    lse_p = torch.nn.functional.pad(lse.float().masked_fill(torch.isneginf(lse), POS_INF),
                                    (0, padded - sq), value=POS_INF).contiguous()
    zero = _zeros_int64(q.device)
    dq, dk, dv, _ = _op("_efficient_attention_backward")(
        _bmhk(dout.to(q.dtype)).contiguous(), _bmhk(q), _bmhk(k, g), _bmhk(v, g), bias,
        _bmhk(out.to(q.dtype)).contiguous(), None, None, sq, sk, lse_p, 0.0, zero, zero,
        int(causal), False, scale=scale)
    if g > 1:  # sum each kv head's group of query heads (the expanded copies are gone)
        dk = dk.view(b, sk, hkv, g, d).sum(3)
        dv = dv.view(b, sk, hkv, g, -1).sum(3)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# ----------------------------------------------------------------------------- cuda_cudnn
_CUDNN_LSE_DIMS: dict[str, int] = {}  # lse rank the real forward returned (3 or 4), by device


def _cudnn_lse_dims(device_type: str) -> int:
    """How many dims the cuDNN op's lse has: as the real forward returned it in this process,
    else (no forward seen) as the op's meta kernel says."""
    if device_type not in _CUDNN_LSE_DIMS:
        x = torch.empty(1, 1, 8, 8, device="meta", dtype=torch.bfloat16)
        return _op("_scaled_dot_product_cudnn_attention")(x, x, x, None, True, 0.0, False,
                                                           False)[1].dim()
    return _CUDNN_LSE_DIMS[device_type]


def cudnn_forward(q, k, v, scale, causal, mask):
    res = _op("_scaled_dot_product_cudnn_attention")(q, k, v, None, True, 0.0, causal, False,
                                                      scale=scale)
    _CUDNN_LSE_DIMS[q.device.type] = res[1].dim()
    return res[0], res[1].reshape(q.shape[:3])


def cudnn_backward(dout, q, k, v, out, lse, scale, causal, mask):
    sq, sk = q.size(2), k.size(2)
    zero = _zeros_int64(q.device)
    lse = lse.float().masked_fill(torch.isneginf(lse), POS_INF)
    if _cudnn_lse_dims(q.device.type) == 4:
        lse = lse.unsqueeze(-1)
    dq, dk, dv = _op("_scaled_dot_product_cudnn_attention_backward")(
        dout.to(q.dtype), q, k, v, out.to(q.dtype), lse, zero, zero, None, None, None, sq, sk,
        0.0, causal, scale=scale)
    return dq, dk, dv
