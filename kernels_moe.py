"""kernels_moe.py: the MixLoRA FFN's expert step with its backward written out (speed from outside).

moe_lora.MixLoRAFFN.grouped_hidden is the plain reference: a Python loop over the experts in which each
expert's slice of the routed slots runs its gate/up LoRA, act(g) * v * w and its down LoRA, every op a
node of autograd's graph that saves its own copies of (slots, I) tensors (with E = 8: over a hundred nodes
and 3 E = 24 sparse-dropout draws per layer). Here the same step is ONE
torch.autograd.Function per FFN call, in FastMixLoRAFFN, a subclass that kernels.accelerate swaps in
(same parameters, same state-dict keys; kernels.restore gives the plain class back).

Forward. The S routed (token, expert) slots are sorted by expert (tok (S,), weights w (S,)): expert e
owns the slots [lo_e, hi_e). Per projection P (gate g, up u, down d) with scaling s_P and dropout p,
c_P = s_P / (1 - p) (s_P without dropout), and z0 is z with the entries that P's dropout zeroes set to 0
(drawn once over all S slots by kernels.Dropout.positions: every entry independently with probability
p, as the plain per-expert draws, in 3 draws per layer instead of 3 E):

    xs = x[tok]                                                    (S, D)
    hg = c_g xg0 A_g,e^T        g = G[tok] + hg B_g,e^T + b_g      (S, r), (S, I)   on expert e's slots
    hu = c_u xu0 A_u,e^T        v = U[tok] + hu B_u,e^T + b_u      (S, r), (S, I)
    q  = act(g) * v             a = w q                            (S, I)
    h  = sum_slots a  -> its token's row (index_add)               (N, I)   W_down h: the caller's
    hd = c_d a0 A_d,e^T         dn = sum_slots hd B_d,e^T -> row   (S, r), (N, D)

Backward, from dh (N, I) and ddn (N, D). Saved: x, g, v (S, I), w and the (S, r) products hg, hu, hd
(g and v rather than G and U: rebuilding them would cost two gathers and two rank-r updates); xs, act(g),
q and the dropped inputs are recomputed (one gather and elementwise passes). Then

    dyd = ddn[tok]                                                 (S, D)
    dB_d,e = dyd_e^T hd_e        dhd = c_d dyd B_d,e               (D, r), (S, r)
    dA_d,e = dhd_e^T a0_e                                          (r, I)
    da  = dh[tok] + dhd A_d,e    (except at d's dropped entries, which never reached A_d)     (S, I)
    dw  = rowsum(da * q)         dq = w da                         (S,)  the router's gradient, (S, I)
    dv  = dq * act(g)            dg = dq * v * act'(g)             (S, I)
    dG  = sum_slots dg -> row    dU = sum_slots dv -> row          (N, I)
    dB_g,e = dg_e^T hg_e         dhg = c_g dg B_g,e                dA_g,e = dhg_e^T xg0_e      (up alike)
    dx  = sum_slots (dhg A_g,e + dhu A_u,e), each 0 at its own dropped entries -> row          (N, D)

G = W_gate x, U = W_up x and W_down h stay outside, as in the plain path (multi.py computes them once for
several adapters): dG and dU go back through the caller's products, and dx here is only the LoRA part.
An expert with no slots gets no gradient (None), as in the plain path; act' is autograd's on the one
elementwise act(g), so every activation of moe_lora.ACTIVATIONS works. Each (S, .) result is one buffer
per call (g, v, dxs, dH, ...) that the per-expert products write into, slice by slice, in place.

Where it applies: CPU fp32 without autocast, no DoRA experts (their m_e / n_e rescaling is not in these
equations), and each expert dropout off or sparse (kernels.Dropout). Elsewhere the plain methods run.

Checked against the plain module in test_all.py (TestKernelsMoE): test_fast_mixlora_matches_plain (outputs and
the gradient of x and of every parameter, router and quality gate included, for the three routers, biases,
padding, dropout with the same drawn entries), test_fast_mixlora_unrouted_expert_gets_no_gradient,
test_fast_mixlora_falls_back_where_it_does_not_apply, test_fast_mixlora_in_multi_adapter_model (multi.py's
shared base products) and test_accelerated_model_matches_plain (the whole model).

Shape legend: N tokens, D hidden, I FFN intermediate, S routed (token, expert) slots, E experts, r rank,
k dropped entries.
"""
import itertools
from typing import NamedTuple

import torch

from moe_lora import MixLoRAFFN

# ----------------------------------------------------------------------------------------------------
# One projection's experts as the Function sees them, and the per-expert products on contiguous slots


class Side(NamedTuple):
    """One FFN projection (gate, up or down) in a call: its experts' count (0: not targeted, the base
    alone), c = s / (1 - p) (s when its dropout is off), its dropout module and its frozen bias (or None)."""
    experts: int
    c: float
    dropout: object
    bias: object


def sparse(drop):
    """Whether a dropout module is off now or draws its positions (kernels.Dropout, from accelerate)."""
    return not drop.training or drop.p == 0 or hasattr(drop, "positions")


def drawn(side, z):
    """The flat indices (k,) of z that the projection's dropout zeroes now, or None (off, or no experts)."""
    drop = side.dropout
    return drop.positions(z) if side.experts and drop.training and drop.p > 0 else None


def zeroed(z, idx, inplace=False):
    """z with the entries at flat indices idx set to 0 (a contiguous copy unless inplace); z if idx is None."""
    if idx is None:
        return z
    z = z if inplace else z.clone(memory_format=torch.contiguous_format)
    z.view(-1).index_fill_(0, idx, 0.0)
    return z


def low_rank(z0, A, c, spans):
    """h = c z0 A_e^T (S, r) from the dropped input z0 (S, d_in), on each expert's slots [lo, hi)."""
    h = z0.new_empty(z0.shape[0], A[0].shape[0])                         # (S, r)
    for e, (lo, hi) in enumerate(spans):
        if hi > lo:
            torch.mm(z0[lo:hi], A[e].t(), out=h[lo:hi])
    return h.mul_(c)


def add_up(y, h, B, spans):
    """y += h B_e^T on each expert's slots, in place: y (S, d_out), h (S, r)."""
    for e, (lo, hi) in enumerate(spans):
        if hi > lo:
            y[lo:hi].addmm_(h[lo:hi], B[e].t())
    return y


def lora_back(dy, h, A, B, c, spans, dz=None, idx=None):
    """(dH, dB): dH = c dy_e B_e (S, r) and the experts' dB_e = dy_e^T h_e from dy (S, d_out), h (S, r);
    and dz (S, d_in) += dH A_e in place except at the dropped entries idx (dz None: not needed). dA_e
    follows from dH (a_grads). An expert with no slots gets None."""
    kept = dz.view(-1).index_select(0, idx) if dz is not None and idx is not None else None  # (k,)
    dH, dB = dy.new_empty(h.shape), [None] * len(spans)                  # (S, r)
    for e, (lo, hi) in enumerate(spans):
        if hi > lo:
            dB[e] = (h[lo:hi].t() @ dy[lo:hi]).t()                       # (d_out, r), as h^T dy: faster
            torch.mm(dy[lo:hi], B[e], out=dH[lo:hi])                     # (n_e, r)
            dH[lo:hi].mul_(c)
            if dz is not None:
                dz[lo:hi].addmm_(dH[lo:hi], A[e])                        # (n_e, d_in)
    if kept is not None:
        dz.view(-1).index_copy_(0, idx, kept)                            # dropped entries: as they were
    return dH, dB


def a_grads(dH, z0, spans):
    """The experts' dA_e = dH_e^T z0_e (r, d_in) from dH (S, r) and the dropped input z0 (S, d_in)."""
    return [dH[lo:hi].t() @ z0[lo:hi] if hi > lo else None for lo, hi in spans]


def split(ab, sides):
    """The flat A/B arguments as (As, Bs) per projection (gate, up, down); ((), ()) where not targeted."""
    out, i = [], 0
    for side in sides:
        E = side.experts
        out.append((ab[i:i + E], ab[i + E:i + 2 * E]))
        i += 2 * E
    return out


def slot_input(W0x, tok, z0, A, B, side, spans):
    """(y, h): y = W0 x + h B_e^T + b on the slots (S, d_out) from the base product W0x (N, d_out), and
    h = c z0 A_e^T (S, r) from the dropped input z0 (S, d_in); h None where the projection has no experts."""
    y = W0x.index_select(0, tok)                                         # (S, d_out)
    h = None
    if A:
        h = low_rank(z0, A, side.c, spans)                               # (S, r)
        add_up(y, h, B, spans)
    return (y if side.bias is None else y.add_(side.bias)), h


# ----------------------------------------------------------------------------------------------------
# The expert step: forward and backward written out


class _MixLoRAExperts(torch.autograd.Function):
    """(h (N, I), dn (N, D) or None) = the equations of the module docstring, for x (N, D), G, U (N, I),
    w (S,); `plan` = (tok, spans, act, sides); ab = each targeted projection's A_0..A_E-1, B_0..B_E-1."""

    @staticmethod
    def forward(ctx, x, G, U, w, plan, *ab):
        tok, spans, act, (gate, up, down) = plan
        (Ag, Bg), (Au, Bu), (Ad, Bd) = split(ab, plan[3])
        xs = x.index_select(0, tok)                                      # (S, D)
        idx_g, idx_u = drawn(gate, xs), drawn(up, xs)
        g, hg = slot_input(G, tok, zeroed(xs, idx_g), Ag, Bg, gate, spans)              # (S, I), (S, r)
        v, hu = slot_input(U, tok, zeroed(xs, idx_u, inplace=True), Au, Bu, up, spans)
        a = act(g).mul_(v).mul_(w[:, None])                              # (S, I) w act(g) v
        h = x.new_zeros(G.shape).index_add_(0, tok, a)                   # (N, I)
        idx_d = drawn(down, a)
        dn = hd = None
        if Ad:
            hd = low_rank(zeroed(a, idx_d, inplace=True), Ad, down.c, spans)            # (S, r)
            yd = add_up(x.new_zeros(len(tok), x.shape[1]), hd, Bd, spans)              # (S, D)
            dn = x.new_zeros(x.shape).index_add_(0, tok, yd)             # (N, D)
        ctx.plan, ctx.idx = plan, (idx_g, idx_u, idx_d)
        ctx.save_for_backward(x, g, v, w, hg, hu, hd, *ab)
        return h, dn

    @staticmethod
    def backward(ctx, dh, ddn):  # dh (N, I), ddn (N, D) or None
        x, g, v, w, hg, hu, hd, *ab = ctx.saved_tensors
        tok, spans, act, (gate, up, down) = ctx.plan
        (Ag, Bg), (Au, Bu), (Ad, Bd) = split(ab, ctx.plan[3])
        idx_g, idx_u, idx_d = ctx.idx
        need = ctx.needs_input_grad
        with torch.enable_grad():                                        # act'(g) by autograd, one node
            g = g.detach().requires_grad_()
            ag = act(g)                                                  # (S, I)
        q = ag.detach() * v                                              # (S, I) act(g) v
        da = dh.index_select(0, tok)                                     # (S, I)
        dAd = dBd = ()
        if Ad:                                                           # da += dhd A_d
            dHd, dBd = lora_back(ddn.index_select(0, tok), hd, Ad, Bd, down.c, spans, da, idx_d)
        dw = torch.linalg.vecdot(da, q) if need[3] else None             # (S,) rowsum(da * q)
        if Ad:                                                           # a0 = w q0: dA_d = (w dhd)^T q0
            dAd = a_grads(dHd.mul_(w[:, None]), zeroed(q, idx_d, inplace=True), spans)
        dq = da.mul_(w[:, None])                                         # (S, I)
        dv = dq * ag.detach()                                            # (S, I)
        dg = torch.autograd.grad(ag, g, dq.mul_(v))[0]                   # (S, I) dq v act'(g)
        del ag, q, dq
        dG = x.new_zeros(x.shape[0], g.shape[1]).index_add_(0, tok, dg) if need[1] else None  # (N, I)
        dU = x.new_zeros(x.shape[0], g.shape[1]).index_add_(0, tok, dv) if need[2] else None
        dxs = x.new_zeros(len(tok), x.shape[1]) if need[0] else None     # (S, D)
        dAg = dBg = dAu = dBu = ()
        if Ag or Au:
            xs = x.index_select(0, tok)                                  # (S, D)
            if Ag:
                dHg, dBg = lora_back(dg, hg, Ag, Bg, gate.c, spans, dxs, idx_g)
                dAg = a_grads(dHg, zeroed(xs, idx_g), spans)
            if Au:
                dHu, dBu = lora_back(dv, hu, Au, Bu, up.c, spans, dxs, idx_u)
                dAu = a_grads(dHu, zeroed(xs, idx_u, inplace=True), spans)
        dx = x.new_zeros(x.shape).index_add_(0, tok, dxs) if need[0] else None  # (N, D)
        return (dx, dG, dU, dw, None, *dAg, *dBg, *dAu, *dBu, *dAd, *dBd)


# ----------------------------------------------------------------------------------------------------
# The accelerated module


class FastMixLoRAFFN(MixLoRAFFN):
    """moe_lora.MixLoRAFFN whose grouped hidden step is one _MixLoRAExperts call where it applies (CPU
    fp32, no autocast, no DoRA experts, dropout off or sparse); the plain methods everywhere else. Its
    grouped_hidden returns the down deltas already summed per token, dn (N, D), which grouped_down adds."""

    def applies(self, x, G, U):
        projs = (self.gate_proj, self.up_proj, self.down_proj)
        return (x.device.type == "cpu" and x.dtype == G.dtype == U.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and not any(p.use_dora for p in projs)
                and all(sparse(p.dropout) for p in projs if p.experts))

    def grouped_hidden(self, x, r, G, U):
        """(h (N, I), dn (N, D) or None), as the plain method computes h and the slots' down deltas d."""
        if not self.applies(x, G, U):
            return super().grouped_hidden(x, r, G, U)
        ends = list(itertools.accumulate(r.counts))
        spans = list(zip([0] + ends[:-1], ends))                         # expert e's slots [lo, hi)
        sides, ab = [], []
        for p in (self.gate_proj, self.up_proj, self.down_proj):
            on = p.dropout.training and p.dropout.p > 0
            sides.append(Side(len(p.experts), p.scaling / (1 - p.dropout.p) if on else p.scaling, p.dropout, p.bias))
            ab += [ex.lora_A for ex in p.experts] + [ex.lora_B for ex in p.experts]
        sides[2] = sides[2]._replace(bias=None)                          # down's bias: grouped_down adds it
        return _MixLoRAExperts.apply(x, G, U, r.w, (r.tok, spans, self.act, tuple(sides)), *ab)

    def grouped_down(self, r, Wh, d):
        """y (N, D) = W_down h + sum_e w_e b + dn (the plain method where grouped_hidden ran plain)."""
        if torch.is_tensor(d):
            return super().grouped_down(r, Wh, []) + d
        return super().grouped_down(r, Wh, d)
