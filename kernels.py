"""kernels.py: the two CPU speed measures that the model and the tools share.

    linear(x, W, b)        y = x W^T + b, through oneDNN for fp32 on CPU (torch's F.linear uses MKL there)
    Linear                 nn.Linear whose forward is `linear`: llama.py builds every projection with it
    keep_freed_memory()    glibc mallopt so large activations reuse heap memory (called by the CLIs)
    Dropout                nn.Dropout whose CPU mask is drawn from Geometric gaps (dropout_positions)
    lora_linear(...)       a LoRA layer's y = W0 x + b + s B A dropout(x) with its backward written out

Each is measured by bench.py (--linear mkl, --no-keep-freed-memory turn them off) and checked by
test_linear_onednn_matches_f_linear and test_keep_freed_memory_keeps_large_blocks_resident in test_all.py;
the last two by test_dropout_positions_are_bernoulli, test_dropout_module_zeroes_drawn_entries and
test_lora_fast_path_matches_autograd (against lora.LoRALinear's plain-autograd path).
On a GPU, in bf16 or under autocast, `linear` is F.linear itself.

Shape legend: N rows (tokens), d_in / d_out the layer's input / output width.
"""
import ctypes
import math

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


# ----------------------------------------------------------------------------------------------------
# LoRA: dropout and the layer's product (lora.py builds the layers; these are its CPU fast path)

def dropout_positions(n, p, device=None, gaps=None):
    """Sorted flat indices (int64) of the entries that dropout zeroes in a tensor of n entries: each one
    independently with probability p. Drawn as running sums of Geometric(p) gaps between dropped entries,
    the same Bernoulli process from ~p n random numbers instead of n: on CPU, generating the n-entry mask
    is what dropout costs (measured ~5 ms for a (1024, 576) input at p = 0.05; bench.py --lora-dropout)."""
    mean = n * p
    k = gaps or int(mean + 6 * math.sqrt(mean) + 16)                          # gaps that pass n, almost always
    pos = torch.empty(k, dtype=torch.float64, device=device).geometric_(p).cumsum_(0).sub_(1)  # 0-based, exact
    while pos[-1] < n:                                                        # rarely: draw further gaps
        more = torch.empty(k, dtype=torch.float64, device=device).geometric_(p).cumsum_(0).add_(pos[-1])
        pos = torch.cat((pos, more))
    return pos[:int((pos < n).sum())].long()                                  # (~p n,)


def _zeroed_at(x, idx):
    """A contiguous copy of x with the entries at flat indices idx set to 0."""
    xd = x.clone(memory_format=torch.contiguous_format)
    xd.view(-1).index_fill_(0, idx, 0.0)
    return xd


class _ZeroAt(torch.autograd.Function):
    """y = keep * x with the entries at flat indices idx set to 0; dx = keep * dy, zeroed at idx alike."""

    @staticmethod
    def forward(ctx, x, idx, keep):
        ctx.save_for_backward(idx)
        ctx.keep = keep
        return _zeroed_at(x, idx).mul_(keep)

    @staticmethod
    def backward(ctx, dy):
        return _zeroed_at(dy, ctx.saved_tensors[0]).mul_(ctx.keep), None, None


class Dropout(nn.Dropout):
    """nn.Dropout (same p, same train()/eval() switch): y = x / (1-p) with entries zeroed with probability p.
    On CPU the zeroed entries come from dropout_positions: forward + backward 2.6-2.8x faster than torch's
    kernel at p = 0.05 on (1024, 576) and (1024, 1536) inputs (measured); elsewhere torch's dropout is
    already cheap and is used as it is."""

    def positions(self, x):
        """The flat indices of x to zero now, or None (eval(), p = 0, or not on CPU)."""
        on = self.training and self.p > 0 and x.device.type == "cpu"
        return dropout_positions(x.numel(), self.p, x.device) if on else None

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        return _ZeroAt.apply(x, self.positions(x), 1.0 / (1.0 - self.p))


class _LoRALinear(torch.autograd.Function):
    """y = x W0^T + b + s (xd A^T) B^T on CPU for a frozen W0, b, with the backward written out.

    xd = dropout(x) = keep * x0, where x0 is x with the entries at flat indices idx zeroed (keep = 1/(1-p);
    idx None: no dropout, keep = 1). Only x is saved; x0 is rebuilt in the backward:

        h  = keep x0 A^T        (N, r)       saved for dB
        dB = s dy^T h           (d_out, r)
        dh = s dy B             (N, r)
        dA = keep dh^T x0       (r, d_in)
        dx = dy W0 + keep dh A  (N, d_in)    except at idx, where dx = dy W0 (those entries never reached A)

    Plain autograd gives the same numbers with five graph nodes, a saved dropout output, and fresh
    temporaries for the LoRA terms; here they go into y and dx in place (a temporary plus an add is one
    more pass over memory), and the dropped entries of dx are restored from a copy of k values rather
    than masking an (N, d_in) tensor. Measured on SmolLM2-135M, batch 4 x 256, all 7 projections: the
    LoRA step 1.01-1.07x faster at p = 0; at p = 0.05 its peak memory 1.7 GB instead of 2.7 GB (no
    dropout outputs saved). test_lora_fast_path_matches_autograd checks values and
    gradients."""

    @staticmethod
    def forward(ctx, x, W, b, A, B, s, idx, keep):  # x (N, d_in), W (d_out, d_in), idx (k,) or None
        keep = keep if idx is not None else 1.0
        h = linear(x if idx is None else _zeroed_at(x, idx), A)           # (N, r) x0 A^T
        h.mul_(keep)
        y = linear(x, W, b)                                               # (N, d_out)
        y.addmm_(h, B.t(), alpha=s)                                       # y += s h B^T, in place
        ctx.s, ctx.keep = s, keep
        ctx.save_for_backward(x, h, W, A, B, idx)
        return y

    @staticmethod
    def backward(ctx, dy):  # dy (N, d_out)
        x, h, W, A, B, idx = ctx.saved_tensors
        dh = linear(dy, B.t() * ctx.s)                                    # (N, r) = s dy B
        x0 = x if idx is None else _zeroed_at(x, idx)                     # (N, d_in)
        dA = (dh.t() @ x0).mul_(ctx.keep)                                 # (r, d_in)
        dB = (dy.t() @ h).mul_(ctx.s)                                     # (d_out, r)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = linear(dy, W.t())                                        # (N, d_in) dy W0
            kept = dx.view(-1).index_select(0, idx) if idx is not None else None  # (k,) dy W0 there
            dx.addmm_(dh, A, alpha=ctx.keep)                              # dx += keep dh A, in place
            if idx is not None:
                dx.view(-1).index_copy_(0, idx, kept)                     # the dropped entries: dy W0 only
        return dx, None, None, dA, dB, None, None, None


def lora_linear(x, W, b, A, B, s, idx=None, keep=1.0):
    """y = x W^T + b + s (dropout(x) A^T) B^T (N, d_out) for x (N, d_in), W frozen; dropout zeroes the
    entries at flat indices idx (from dropout_positions) and scales by keep = 1/(1-p). lora.LoRALinear
    calls it on CPU in fp32 and checks it against its plain-autograd path (test_all.py)."""
    return _LoRALinear.apply(x, W, b, A, B, s, idx, keep)
