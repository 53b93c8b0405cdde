"""onednn.py: the oneDNN linear (a private torch op, guarded, with F.linear as its fallback) and the measured
choice between it and torch's default MKL product, per regime (train, forward, decode), on the model's own
shapes. kernels.accelerate uses both: FastLinear where choose_linear finds oneDNN faster, the same product
function (linear_for) inside the LoRA layer's written-out product.

Why measured and not assumed: on the earlier 2-core AMD EPYC oneDNN won every regime; on the 2-core Intel
Xeon (AVX-512) MKL wins all three for SmolLM2-135M's shapes (README, "Speed and memory").

Checked by test_all.py (TestKernels): test_fast_linear_matches_f_linear (values and every gradient, the
regimes, FastLinear taking oneDNN only where its plan says; skipped where the op is missing).

Shape legend: N rows, d_in / d_out the layer's input / output width.
"""
import json
import os
import platform
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# The oneDNN linear: a private torch op, guarded, with F.linear as its fallback

def _onednn(x, w, b=None):  # (..., d_in) x (d_out, d_in) -> (..., d_out)
    # torch.ops.mkldnn._linear_pointwise is the op torch.compile's CPU backend emits for nn.Linear; it is
    # private (no stability promise), so onednn_available() tries it once before anything relies on it.
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


_ONEDNN_OK = None


def onednn_available():
    """Whether this torch build has the oneDNN linear op and it computes F.linear (tried once)."""
    global _ONEDNN_OK
    if _ONEDNN_OK is None:
        _ONEDNN_OK = False
        if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            try:
                x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
                _ONEDNN_OK = torch.allclose(_onednn(x, w, b), F.linear(x, w, b), rtol=1e-4, atol=1e-5)
            except (RuntimeError, TypeError):  # a signature change in a later torch: fall back to F.linear
                pass
    return _ONEDNN_OK


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


def onednn_linear(x, weight, bias=None):
    """F.linear through oneDNN (values equal to float rounding); the graph-free op when nothing needs a
    gradient (decoding), the autograd.Function above otherwise."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn(x, weight, bias)


REGIMES = ("train", "forward", "decode")  # a product in a graph; no graph, many rows; no graph, <= 4 rows
DECODE_ROWS = 4


def regime(x, weight, bias=None):
    """Which of REGIMES a product x (..., d_in) W^T is in, or None where only F.linear applies
    (not CPU fp32, or under autocast)."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu")):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return "train"
    return "decode" if x.numel() <= DECODE_ROWS * x.shape[-1] else "forward"


def linear_for(plan):
    """The product function for a plan {regime: "onednn" | "mkl"}: onednn_linear where the plan says so."""
    def fn(x, weight, bias=None):
        return onednn_linear(x, weight, bias) if plan.get(regime(x, weight, bias)) == "onednn" else F.linear(x, weight, bias)
    return fn


class FastLinear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) whose product takes oneDNN in the regimes that
    `plan` names (set by accelerate from choose_linear); F.linear in the others."""

    plan = {}

    def forward(self, x):
        return linear_for(self.plan)(x, self.weight, self.bias)


# ----------------------------------------------------------------------------------------------------
# The measured choice between MKL (F.linear) and oneDNN, per regime, on the model's own shapes

def cpu_model():
    """The CPU's model name (/proc/cpuinfo), or platform.processor() elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def cache_path():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moe-lora", "kernels.json")


def _time_products(shapes, backend, mode, rows):
    """Seconds for one product of every (d_out, d_in, count) in shapes: no-grad, or forward + dx."""
    fn = F.linear if backend == "mkl" else onednn_linear
    t = 0.0
    for (d_out, d_in), count in shapes.items():
        w = torch.randn(d_out, d_in)
        x = torch.randn(rows, d_in, requires_grad=mode == "train")
        reps = 20 if rows <= DECODE_ROWS else 1
        t0 = time.perf_counter()
        for _ in range(reps):
            if mode == "train":
                fn(x, w).backward(torch.ones(rows, d_out))
            else:
                with torch.no_grad():
                    fn(x, w)
        t += (time.perf_counter() - t0) * count / reps
    return t


def choose_linear(shapes, rounds=3, rows=256, min_gain=0.05):
    """{regime: "onednn" | "mkl"}: oneDNN only in the regimes where it is at least min_gain faster than
    MKL on these (d_out, d_in) -> count shapes (rows tokens for train/forward, 1 for decode), timed in
    interleaved rounds, medians. Cached in cache_path(), keyed by CPU model, torch version, threads and
    shapes, so the measurement (a few seconds on SmolLM2-135M) runs once per machine and setting."""
    if not onednn_available():
        return {r: "mkl" for r in REGIMES}
    key = f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | " + \
          ",".join(f"{o}x{i}*{c}" for (o, i), c in sorted(shapes.items()))
    try:
        with open(cache_path()) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    plan = {}
    for r in REGIMES:
        mode, n = ("train", rows) if r == "train" else ("forward", rows if r == "forward" else 1)
        times = {"mkl": [], "onednn": []}
        for _ in range(rounds + 1):                                   # the first round warms up
            for backend in times:
                times[backend].append(_time_products(shapes, backend, mode, n))
        mkl, one = (statistics.median(times[b][1:]) for b in ("mkl", "onednn"))
        plan[r] = "onednn" if one < (1 - min_gain) * mkl else "mkl"
    cache[key] = plan
    try:
        os.makedirs(os.path.dirname(cache_path()), exist_ok=True)
        tmp = cache_path() + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, cache_path())
    except OSError:                                                   # a read-only home: measure next time
        pass
    return plan
