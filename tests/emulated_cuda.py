"""CPU stand-ins for the CUDA attention kernels, and a context that runs the CUDA plan on CPU.

``EMULATED``: float64 emulations of the aten CUDA attention ops our ``kernels_cuda`` glue calls
(same signatures and return tuples, the efficient kernel's lse padded to 32 rows, its layout
and bias-alignment requirements asserted), substituted for ``kernels_cuda._op``.

``cuda_plan_on_cpu()``: inside it, CPU tensors take the CUDA path of the package: the
dispatch (``kernels.device_kind`` answers "cuda"), RSA's CUDA tiling, the CUDA backends' glue
around these emulations, with fp32 standing in for bf16 in the flash and cuDNN emulations
(so unmasked fp32 blocks run ``cuda_flash`` and the results are checked at fp32 precision).
It yields a ``Counter`` of the backends the blocks ran. Test support only.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch

F16S = (torch.float16, torch.bfloat16)


def _emul(q, k, v, bias, causal, scale, lse=None, dout=None, out=None):
    """float64 attention over ``[b, h, s, d]`` with equal head counts (what the CUDA kernels
    compute); forward -> (out, lse), with NaN rows where nothing is visible (worst case);
    backward (``dout``, ``out``, ``lse`` given) -> (dq, dk, dv)."""
    assert q.size(1) == k.size(1) == v.size(1)
    q, k, v = q.double(), k.double(), v.double()
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.double()
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    if dout is None:
        lse = torch.logsumexp(s, -1)
        return torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v), lse
    p = torch.exp(s - lse.double().unsqueeze(-1))
    do = dout.double()
    dp = torch.matmul(do, v.transpose(-1, -2))
    ds = p * (dp - (do * out.double()).sum(-1, keepdim=True))
    return torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-1, -2), q) * scale, \
        torch.matmul(p.transpose(-1, -2), do)


def _eff_fwd(q, k, v, bias, cu_q, cu_k, mq, mk, p, mask_type, lse_on, *, scale):
    assert q.size(2) == k.size(2) and mask_type in (0, 1) and lse_on and p == 0
    assert bias is None or (bias.dtype == q.dtype and bias.stride(-1) == 1
                            and bias.shape == (q.size(0), q.size(2), q.size(1), k.size(1)))
    out, lse = _emul(*(x.transpose(1, 2) for x in (q, k, v)),
                     bias, mask_type == 1, scale)
    m = q.size(1)
    padded = torch.full((q.size(0), q.size(2), -(-m // 32) * 32), float("inf"))
    padded[:, :, :m] = lse
    return out.transpose(1, 2).to(q.dtype).contiguous(), padded, None, None, m, k.size(1)


def _eff_bwd(dout, q, k, v, bias, out, cu_q, cu_k, mq, mk, lse, p, seed, off, mask_type,
             bias_grad, *, scale):
    assert lse.size(2) % 32 == 0 and lse.size(2) >= q.size(1) and out.is_contiguous()
    assert q.size(2) == k.size(2) and not bias_grad
    t = lambda x: x.transpose(1, 2)
    g = _emul(t(q), t(k), t(v), bias, mask_type == 1, scale, lse=lse[:, :, :q.size(1)],
              dout=t(dout), out=t(out))
    return (*(t(x).to(q.dtype) for x in g), None)


def _expand(q, x):
    return x.repeat_interleave(q.size(1) // x.size(1), 1)


def _flash_fwd(q, k, v, p, causal, debug, *, scale):
    assert q.dtype in F16S or q.dtype == torch.float32  # fp32 only in this emulation
    out, lse = _emul(q, _expand(q, k), _expand(q, v), None, causal, scale)
    return out.to(q.dtype), lse.float(), None, None, q.size(2), k.size(2), None, None, None


def _flash_bwd(dout, q, k, v, out, lse, cq, ck, mq, mk, p, causal, seed, off, *, scale):
    assert lse.is_contiguous()  # the kernel reads a dense [b, h, sq], ignoring strides
    dq, dk, dv = _emul(q, _expand(q, k), _expand(q, v), None, causal, scale, lse=lse,
                       dout=dout, out=out)
    g = q.size(1) // k.size(1)
    b, hkv, sk, d = k.shape
    return dq.to(q.dtype), *(x.view(b, hkv, g, sk, d).sum(2).to(q.dtype) for x in (dk, dv))


def _cudnn_fwd(q, k, v, bias, lse_on, p, causal, debug, *, scale=None):
    assert bias is None and lse_on
    out, lse = _flash_fwd(q, k, v, p, causal, debug, scale=scale or q.size(-1) ** -0.5)[:2]
    return out, lse.unsqueeze(-1), None, None, q.size(2), k.size(2), None, None, None


def _cudnn_bwd(dout, q, k, v, out, lse, seed, off, bias, cq, ck, mq, mk, p, causal, *, scale):
    assert lse.shape == (*q.shape[:3], 1) and bias is None  # the forward's [b, h, sq, 1]
    return _flash_bwd(dout, q, k, v, out, lse[..., 0].contiguous(), cq, ck, mq, mk, p, causal,
                      seed, off, scale=scale)


def _cudnn_fwd_3d(*args, **kwargs):
    """A cuDNN build whose lse is ``[b, h, sq]`` (the meta kernel still says 4 dims)."""
    res = _cudnn_fwd(*args, **kwargs)
    return (res[0], res[1][..., 0], *res[2:])


def _cudnn_bwd_3d(dout, q, k, v, out, lse, *args, **kwargs):
    assert lse.shape == q.shape[:3]  # what that forward returned
    return _cudnn_bwd(dout, q, k, v, out, lse.unsqueeze(-1), *args, **kwargs)


EMULATED = {"_efficient_attention_forward": _eff_fwd, "_efficient_attention_backward": _eff_bwd,
            "_scaled_dot_product_flash_attention": _flash_fwd,
            "_scaled_dot_product_flash_attention_backward": _flash_bwd,
            "_scaled_dot_product_cudnn_attention": _cudnn_fwd,
            "_scaled_dot_product_cudnn_attention_backward": _cudnn_bwd}


@contextlib.contextmanager
def cuda_plan_on_cpu(*, flash_fp32: bool = True):
    """Run the package's CUDA plan on CPU tensors (see the module docstring); undone on exit.
    Yields a ``Counter`` of backend name -> blocks run."""
    from megatron_seqpar import kernels, kernels_cuda

    used: Counter = Counter()
    saved = {(kernels, "device_kind"): kernels.device_kind,
             (kernels_cuda, "_op"): kernels_cuda._op,
             (kernels_cuda, "supports"): kernels_cuda.supports,
             (kernels, "pick_backend"): kernels.pick_backend}
    supports, pick = kernels_cuda.supports, kernels.pick_backend

    def supports_fp32(name, device_type, dtype, *args, **kw):
        if flash_fp32 and dtype == torch.float32 and name in ("cuda_flash", "cuda_cudnn"):
            dtype = torch.bfloat16
        return supports(name, device_type, dtype, *args, **kw)

    def counting_pick(name, q, mask, causal=False):
        backend = pick(name, q, mask, causal)
        used[backend.name] += 1
        return backend

    kernels.device_kind = lambda x: "cuda" if x.device.type == "cpu" else x.device.type
    kernels_cuda._op = EMULATED.__getitem__
    kernels_cuda.supports = supports_fp32
    kernels.pick_backend = counting_pick
    try:
        yield used
    finally:
        for (mod, name), value in saved.items():
            setattr(mod, name, value)
