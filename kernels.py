"""kernels.py: the two CPU speed measures that the model and the tools share.

    linear(x, W, b)        y = x W^T + b, through oneDNN for fp32 on CPU (torch's F.linear uses MKL there)
    Linear                 nn.Linear whose forward is `linear`: llama.py builds every projection with it
    keep_freed_memory()    glibc mallopt so large activations reuse heap memory (called by the CLIs)

Each is measured by bench.py (--linear mkl, --no-keep-freed-memory turn them off) and checked by
test_linear_onednn_matches_f_linear and test_keep_freed_memory_keeps_large_blocks_resident in test_all.py.
On a GPU, in bf16 or under autocast, `linear` is F.linear itself.

Shape legend: N rows (tokens), d_in / d_out the layer's input / output width.
"""
import ctypes

import torch
import torch.nn as nn
import torch.nn.functional as F


ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn(x, w, b=None):  # (..., d_in) x (d_out, d_in) -> (..., d_out)
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b;  dx = dy W,  dW = dy^T x,  db = sum_rows dy.  dx also goes through oneDNN (W^T is
    a strided view, no copy); x is saved only when W needs its gradient (frozen bases do not)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w)
        return _onednn(x, w, b)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx = _onednn(dy, w.t()) if ctx.needs_input_grad[0] else None             # (..., d_in)
        dy2 = dy.reshape(-1, dy.shape[-1])                                         # (N, d_out)
        dw = dy2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None  # (d_out, d_in)
        db = dy2.sum(0) if ctx.needs_input_grad[2] else None                       # (d_out,)
        return dx, dw, db


def linear(x, weight, bias=None):
    """F.linear, except fp32 on CPU: torch sends that to MKL, while oneDNN (also inside torch, the path
    torch.compile uses on CPU) is faster on this project's 2-core AMD EPYC: ~200 vs ~140-160 GFLOP/s on
    the model's (1024, 576) x (576, 1536)-like products, and 1.2-2.4x on single-token products, where
    MKL's gemv uses one core. `bench.py --linear mkl` measures the whole model both ways. Values agree
    with F.linear to float rounding (test_linear_onednn_matches_f_linear)."""
    if (not ONEDNN or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu")):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn(x, weight, bias)  # no graph: skip the autograd.Function's overhead (decoding)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) whose forward is `linear` above."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


def keep_freed_memory():
    """glibc hands every freed block over 32 MB back to the OS (munmap), so each step page-faults fresh
    zeroed pages for its large activations (the (B*T, V) logits, attention buffers): measured ~10% of a
    forward and of a LoRA step here (bench.py --no-keep-freed-memory). mallopt(M_MMAP_MAX = 0) serves
    them from the heap and M_TRIM_THRESHOLD = 2 GiB keeps that much freed memory for reuse, so the
    process's RSS does not shrink back. The command-line tools call this; importing a module does not.
    Returns whether it applied (False where the C library is not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt(-4, 0) == 1 and libc.mallopt(-1, 2**31 - 1) == 1  # M_MMAP_MAX, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False
