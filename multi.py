"""Several adapters trained at once on one frozen base model: MoE-PEFT's multi-adapter batches.

Reference: MoE-PEFT (../shared/seeds/002_*.txt sec. 4.3, `batch_configs_`; ../shared/reference/mixlora.md):
one process holds one frozen base model and K adapters (LoRA, DoRA, MixLoRA, each with its own settings);
every batch is the concatenation of the adapters' micro-batches, and each adapter owns a contiguous slice
of its rows. The MixLoRA paper (sec. 4.5) reports -41% memory and -17% latency for two MixLoRA adapters
trained this way against two separate jobs.

The mechanism, for K adapters a_1..a_K and a micro-batch X of B rows (every adapter here trains on the
same data, in the same order, so its slice is X itself):

    X_all = [X; X; ...; X]                    (K*B, T) the batch plan (`batch_plan`, MoE-PEFT's
                                              batch_configs_): adapter a_k owns rows [(k-1)B, kB)
    shared layers (embedding, RMSNorm, attention softmax, residuals, LM head), once over all K*B rows:
        h_all = f(x_all)                      row-wise, so slice k of the output is f(slice k)
    an attention projection (ProjectionSite): the frozen product once, each adapter's delta on its slice:
        wx = W0 x_all                         (K*B, T, d_out), one product for all adapters
        y[k] = wx[k] + b + s B_k A_k drop(x[k])                        LoRA
        y[k] = m_k / ||W0 + s B_k A_k||_row (wx[k] + s B_k A_k drop(x[k])) + b   DoRA
        y[k] = wx[k] + b                                               an adapter that leaves it frozen
    a layer's FFN (FFNSite): the base gate/up products once over all rows, each adapter's hidden on its
    slice (a LoRA-wrapped SwiGLU, or MixLoRA's routed experts adding their LoRA deltas to G, U), the base
    down product once over every adapter's hidden, each adapter's down deltas on its slice:
        G, U = W_gate u_all, W_up u_all       (K*B*T, I)
        h[k] = silu(G[k] + dG_k) * (U[k] + dU_k)          or MixLoRA's sum_e w_e a_e  (B*T, I)
        y = W_down [h[1]; ...; h[K]]          (K*B*T, D), then slice k + its down deltas (and gate)
    loss = sum_k L_k(slice k)                 one backward; L_k depends on a_k's parameters only, so each
                                              adapter gets exactly its own gradient; each has its own AdamW

Every W0 (and the embedding, norms, LM head) is one tensor shared by all K adapters: that is the memory
saving; each W0 enters one product per forward, over all K*B rows (test_multi_adapter_base_products_once).
W0 x is row-separable, so slice k of W0 x_all is what adapter k alone computes: the K-adapter model
computes what K single-adapter models compute. Each adapter layer finishes from the shared product by its
own code: lora.LoRALinear(x, wx), moe_linear.MoELoRALinear(x, wx), MixLoRAFFN's route / grouped_hidden /
grouped_down / gated (the steps of its own forward). Two branches cannot take the shared FFN products and
run whole on their slice: a MixLoRA FFN with DoRA down experts (m_e / n_e breaks the linearity its
grouped down product needs) and an MLP with LoRAMoE / MoLA experts (a forward hook hands their routing
out). With kernels.accelerate, a LoRA/DoRA branch finishes its slice by kernels.lora_linear given wx (the
written-out backward: only x[k], shared with the other adapters' slices, is saved, not a dropout copy
per adapter and projection), so K adapters together save for backward what the K alone save in all;
one adapter alone never goes through this file (nothing is wrapped).

MixLoRA routing, expert capacity (Switch), load balancing, the z-loss, the quality gate and the expert
load are computed per adapter on its own slice: adapter k's MixLoRAFFN routes slice k with slice k of the
token mask, so padding never counts and no adapter's statistics see another's rows.
Its aux outputs come back as `PerAdapter({name: aux_k})`, and `aux_of(out.aux, name)` picks one.

Randomness: adapter k's dropout, router jitter and trash noise draw from its own random stream
(`Streams`), seeded at each step exactly as a single-adapter run seeds the global generator, so each
adapter sees the dropout masks it would see trained alone. Gradient checkpointing recomputes a layer in
the backward; `Streams.checkpoint_contexts` (torch.utils.checkpoint's context_fn, set by llama.py from
model.checkpoint_context) replays each stream from where the forward started it.

Each adapter also has a `view`: a model object sharing every tensor and every adapter module with the
K-adapter model, in which only that adapter exists. Its save_adapter, evaluation, router statistics and
state_dict are the single-adapter code's, unchanged.

Checked in test_all.py (multi-adapter tests, TestMultiAdapterFeatures): K adapters trained together give
each the losses and final weights of training it alone (LoRA, DoRA, MixLoRA, with dropout), also across
--resume, with classification heads and with bf16 autocast (its rounding), and with 2 processes the losses
of 1; gradient checkpointing changes nothing; the K-row forward equals each adapter's own model slice by
slice; each W0 enters one product; bad specifications are one-line errors.
Shape legend: B batch (one adapter's rows), K adapters, T time, D hidden, N tokens.
"""

import copy
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from adapter_files import load_adapter
from moe_lora import MixLoRAFFN, inject_adapter

# ----------------------------------------------------------------------------------------------------
# Random streams: each adapter draws its dropout masks as if it were trained alone


def rng_state(device):
    """The global generator's state on CPU, plus the current CUDA device's when `device` is CUDA."""
    return (torch.get_rng_state(), torch.cuda.get_rng_state() if device.type == "cuda" else None)


def set_rng_state(state):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


class Streams:
    """One random-number stream per adapter, swapped into the global generator while its module runs.

    Under gradient checkpointing a decoder layer runs twice, once in the forward and again in the backward
    (torch.utils.checkpoint): `checkpoint_contexts` is its context_fn. The forward records, per (site,
    step, adapter), the state the stream had when that module started; the recomputation starts each from
    that recorded state and leaves the streams where the forward left them, so it redraws the same masks."""

    def __init__(self, names):
        self.names, self.states = list(names), {}
        self.recorded, self.replayed = None, None       # {(site, step, name): state} while a checkpoint runs

    def fork(self, device):
        """Every stream starts from the global generator's current state (train.py seeds it per step)."""
        state = rng_state(device)
        self.states = {n: state for n in self.names}

    @contextmanager
    def use(self, name, device, key=None):
        """Run a block on `name`'s stream; outside training (no fork yet) the global generator is used.
        key (site, step) names the block for checkpointing's replay."""
        if name not in self.states:
            yield
            return
        outer = rng_state(device)
        replay = self.replayed is not None
        if self.recorded is not None:
            self.recorded[key, name] = self.states[name]
        set_rng_state(self.replayed[key, name] if replay else self.states[name])
        try:
            yield
        finally:
            if not replay:
                self.states[name] = rng_state(device)
            set_rng_state(outer)

    def checkpoint_contexts(self):
        """torch.utils.checkpoint's context_fn: (forward context, recomputation context) of one checkpoint."""
        states = {}
        return self.phase("recorded", states), self.phase("replayed", states)

    @contextmanager
    def phase(self, attr, states):
        setattr(self, attr, states)
        try:
            yield
        finally:
            setattr(self, attr, None)


# ----------------------------------------------------------------------------------------------------
# Adapted sites: the frozen base product once over all rows, each adapter finishing its own slice


class PerAdapter(dict):
    """{adapter name: aux} of one layer, as an FFN site returns it (so it is not mistaken for one aux)."""


def project(module, x, wx):
    """One adapter's output of a projection from its rows x (n, ..., d_in) and wx = W0 x (n, ..., d_out):
    the plain nn.Linear adds its bias, an adapter layer (LoRA, DoRA, LoRAMoE) adds its delta."""
    if isinstance(module, nn.Linear):
        return wx if module.bias is None else wx + module.bias
    return module(x, wx)


def base_weight(module):
    """W0 of a projection branch: an adapter layer's `.base` (LoRA, LoRAMoE), else its own (nn.Linear, a
    MixLoRA ExpertProjection)."""
    return module.base.weight if hasattr(module, "base") else module.weight


class ProjectionSite(nn.Module):
    """An attention projection adapted by K adapters. Rows [kB, (k+1)B) of x belong to adapter k:

        wx = W0 x_all                            (K*B, T, d_out)  once, for every adapter
        y[k] = project(branch_k, x[k], wx[k])    LoRA: wx + b + s B_k A_k drop(x);  DoRA: m_k/n_k (wx + ...) + b
    A branch that does not adapt this site is the base nn.Linear itself (y[k] = wx[k] + b)."""

    def __init__(self, branches, streams):
        super().__init__()
        self.branches = nn.ModuleDict(branches)                             # {name: module}, batch-plan order
        self.streams = streams                                              # shared by every site (not a module)

    def forward(self, x):
        W = base_weight(next(iter(self.branches.values())))                 # (d_out, d_in) shared by all
        wx = F.linear(x, W)                                                 # (K*B, T, d_out) the base product
        ys = []
        for name, rows, module in batch_plan(self.branches, x.shape[0]):
            with self.streams.use(name, x.device, (id(self), 0)):
                ys.append(project(module, x[rows], wx[rows]))
        return torch.cat(ys)                                                # (K*B, T, d_out)


class FFNSite(nn.Module):
    """A layer's FFN adapted by K adapters: LoRA-wrapped SwiGLUs (llama.LlamaMLP) and MixLoRA FFNs.

        G, U = W_gate u_all, W_up u_all          (K*B, T, I)  once, for every adapter
        h[k] = hidden_k(u[k], G[k], U[k])        SwiGLU: silu(gate_k) * up_k;  MixLoRA: sum_e w_e a_e, routed
                                                 on adapter k's slice and its token mask (padding never counts)
        Wh = W_down [h[1]; ...; h[K]]            (K*B*T, D)   once, for every adapter
        y[k] = down_k(h[k], Wh[k])               + the down LoRA deltas (+ MixLoRA's quality gate)
    A branch whose algebra cannot take the shared products (MixLoRA with DoRA down experts, an MLP with
    LoRAMoE/MoLA experts, whose routing a forward hook hands out) runs whole on its slice instead."""

    def __init__(self, branches, streams):
        super().__init__()
        self.branches = nn.ModuleDict(branches)
        self.streams = streams

    def forward(self, u, token_mask=None):
        first = next(iter(self.branches.values()))
        W_gate, W_up, W_down = (base_weight(getattr(first, p)) for p in ("gate_proj", "up_proj", "down_proj"))
        G, U = F.linear(u, W_gate), F.linear(u, W_up)                       # (K*B, T, I) base products
        plan, hs, states = batch_plan(self.branches, u.shape[0]), [], []
        for name, rows, m in plan:                                          # 1. each adapter's hidden h
            mask = None if token_mask is None else token_mask[rows]
            with self.streams.use(name, u.device, (id(self), 1)):
                h, state = ffn_hidden(m, u[rows], mask, G[rows], U[rows])   # h (n_k, I) or None
            hs.append(h)
            states.append(state)
        shared = [h for h in hs if h is not None]
        Wh = F.linear(torch.cat(shared), W_down).split([len(h) for h in shared]) if shared else []  # once
        Wh = iter(Wh)                                                       # (n_k, D) per sharing adapter
        ys, aux = [], PerAdapter()
        for (name, rows, m), h, state in zip(plan, hs, states):             # 2. each adapter's output
            with self.streams.use(name, u.device, (id(self), 2)):
                y, aux[name] = ffn_output(m, u[rows], state, None if h is None else next(Wh))
            ys.append(y)
        y = torch.cat(ys)                                                   # (K*B, T, D)
        return (y, aux) if any(a is not None for a in aux.values()) else y


def shares_products(m):
    """Whether an FFN branch takes the shared base products (see FFNSite)."""
    if isinstance(m, MixLoRAFFN):
        return not m.down_proj.use_dora
    return not m._forward_hooks and all(isinstance(getattr(m, p), (nn.Linear, lora.LoRALinear))
                                        for p in ("gate_proj", "up_proj", "down_proj"))


def ffn_hidden(m, u, mask, G, U):
    """Step 1 of FFNSite for one adapter: (h (n, I) or None, state for ffn_output)."""
    if not shares_products(m):
        return None, m(u, mask)
    if isinstance(m, MixLoRAFFN):
        x = u.reshape(-1, u.shape[-1])                                      # (n, D)
        r = m.route(u, mask)
        h, d = m.grouped_hidden(x, r, G.reshape(x.shape[0], -1), U.reshape(x.shape[0], -1))
        return h, (r, d)
    h = m.swiglu(project(m.gate_proj, u, G), project(m.up_proj, u, U))    # (B, T, I), llama.LlamaMLP
    return h.reshape(-1, h.shape[-1]), h


def ffn_output(m, u, state, Wh):
    """Step 2 of FFNSite for one adapter: (y (B, T, D), aux or None) from its state and W_down h."""
    if Wh is None:                                                          # it ran whole in step 1
        return state if isinstance(state, tuple) else (state, None)
    if isinstance(m, MixLoRAFFN):
        r, d = state
        return m.gated(u, m.grouped_down(r, Wh, d).view(u.shape), r)
    return project(m.down_proj, state, Wh.view(*state.shape[:-1], -1)), None


def batch_plan(branches, rows):
    """[(name, row slice, module)]: MoE-PEFT's batch_configs_, K equal contiguous slices of the rows."""
    K = len(branches)
    if rows % K:
        raise ValueError(f"{rows} rows cannot be split among {K} adapters")
    n = rows // K
    return [(name, slice(k * n, (k + 1) * n), m) for k, (name, m) in enumerate(branches.items())]


def aux_of(aux, name):
    """One adapter's per-layer aux list from a K-adapter forward's out.aux."""
    return [a.get(name) if isinstance(a, PerAdapter) else a for a in aux]


# ----------------------------------------------------------------------------------------------------
# Building the K-adapter model


def shared_copy(model):
    """A new module tree with the same tensors: every parameter and buffer is shared, not copied."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def site_names(model):
    """Where adapters act: each layer's four attention projections and its FFN (an FFN is one site, so
    a MixLoRA FFN of one adapter sits beside a LoRA-wrapped SwiGLU of another)."""
    out = []
    for i in range(len(model.model.layers)):
        out += [f"model.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        out.append(f"model.layers.{i}.mlp")
    return out


def add_adapters(model, configs, seed, prepare=None):
    """Turn a loaded base `model` into a K-adapter model, in place; returns {name: view}.

    configs: {name: LoraConfig | MixLoRAConfig}, in batch-plan order. Each adapter is injected into its
    own shared_copy of the base with torch.manual_seed(seed) first, so its initial weights are those it
    would have alone; prepare(view, name), when given, runs before the injection (a classification
    head). Move the model to its device before calling this (views share tensors, not later moves)."""
    if len(configs) < 2:
        raise ValueError("add_adapters needs at least two adapters (one adapter: moe_lora.inject_adapter)")
    views = {}
    for name, cfg in configs.items():
        view = shared_copy(model)
        torch.manual_seed(seed)
        if prepare is not None:
            prepare(view, name)
        try:
            inject_adapter(view, cfg)
        except ValueError as e:
            raise ValueError(f"adapter {name!r}: {e}") from None
        views[name] = view
    return wire(model, views)


def wire(model, views):
    """Put K adapter views of `model` into it, in place: a ProjectionSite or FFNSite wherever some adapter
    acts, one random stream per adapter; returns views ({name: view}, in batch-plan order)."""
    streams = Streams(views)
    for path in site_names(model):
        branches = {name: view.get_submodule(path) for name, view in views.items()}
        if any(p.requires_grad for m in branches.values() for p in m.parameters()):  # some adapter acts here
            parent, _, leaf = path.rpartition(".")
            site = FFNSite if leaf == "mlp" else ProjectionSite
            setattr(model.get_submodule(parent), leaf, site(branches, streams))
    model.adapter_views, model.streams = views, streams
    model.checkpoint_context = streams.checkpoint_contexts  # llama.py's gradient checkpointing replays the streams
    return views


def load_views(model, paths, seed=None, then=None):
    """{path: view}: each adapter folder loaded (adapter_files.load_adapter) onto its own shared_copy of one
    loaded base model, so K adapters hold one copy of the base weights (--eval-only; wire() them to train).
    seed: torch.manual_seed(seed) before each load and then(path, view) right after it, so that each view
    draws the random numbers one run with that --adapter-path draws (the warm-up's gate init)."""
    if len(set(paths)) < len(paths):
        raise ValueError(f"--adapter-path names a folder twice: {','.join(paths)}")
    views = {}
    for path in paths:
        if seed is not None:
            torch.manual_seed(seed)
        views[path] = load_adapter(shared_copy(model), path)
        if then is not None:
            then(path, views[path])
    return views
