"""Several adapters trained at once on one frozen base model: MoE-PEFT's multi-adapter batches.

Reference: MoE-PEFT (../shared/seeds/002_*.txt sec. 4.3, `batch_configs_`; ../shared/reference/mixlora.md):
one process holds one frozen base model and K adapters (LoRA, DoRA, MixLoRA, each with its own settings);
every batch is the concatenation of the adapters' micro-batches, and each adapter owns a contiguous slice
of its rows. The MixLoRA paper (sec. 4.5) reports -41% memory and -17% latency for two MixLoRA adapters
trained this way against two separate jobs.

The mechanism, for K adapters a_1..a_K and a micro-batch X of B rows (every adapter here trains on the
same data, in the same order, so its slice is X itself):

    X_all = [X; X; ...; X]                    (K*B, T) the batch plan: adapter a_k owns rows [(k-1)B, kB)

    shared layers (embedding, RMSNorm, attention softmax, residuals, LM head), once over all K*B rows:
        h_all = f(x_all)                      row-wise, so slice k of the output is f(slice k)
    adapted sites (an attention projection, a layer's FFN), each adapter's own module on its own slice:
        y_all[k] = site_k(x_all[k])           site_k = LoRA:    W0 x + b + s B_k A_k drop(x)
                                                       DoRA:    m_k / ||W0 + s B_k A_k|| (W0 x + s B_k A_k drop(x)) + b
                                                       MixLoRA: sum_e w_e(x) expert_{k,e}(x), routed per slice
    loss = sum_k L_k(slice k)                 one backward; L_k depends on a_k's parameters only, so each
                                              adapter gets exactly its own gradient; each has its own AdamW

Every W0 (and the embedding, norms, LM head) is one tensor shared by all K adapters: that is the memory
saving. W0 x is row-separable, so W0 applied to slice k is the same arithmetic as W0 applied to all
K*B rows and then sliced (the same flops); we run each adapter's own module (lora.LoRALinear,
moe_lora.MixLoRAFFN, or what kernels.accelerate made of them) on its slice, so the K-adapter model
computes what K single-adapter models compute, by the same code. NOTE: MoE-PEFT instead computes W0 x_all
in one product and adds each adapter's delta on its slice; the arithmetic is the same, ours keeps one
definition of each adapter (and its fast path).

MixLoRA routing, expert capacity (Switch), load balancing, the z-loss, the quality gate and the expert
load are computed per adapter on its own slice: the FFN site hands slice k to adapter k's MixLoRAFFN
with slice k of the token mask, so padding never counts and no adapter's statistics see another's rows.
Its aux outputs come back as `PerAdapter({name: aux_k})`, and `aux_of(out.aux, name)` picks one.

Randomness: adapter k's dropout, router jitter and trash noise draw from its own random stream
(`Streams`), seeded at each step exactly as a single-adapter run seeds the global generator, so each
adapter sees the dropout masks it would see trained alone. NOTE: torch.utils.checkpoint replays the
global generator, not these streams, so several adapters refuse gradient checkpointing.

Each adapter also has a `view`: a model object sharing every tensor and every adapter module with the
K-adapter model, in which only that adapter exists. Its save_adapter, evaluation, router statistics and
state_dict are the single-adapter code's, unchanged.

Checked in test_all.py (multi-adapter tests): K adapters trained together give each the losses and final
weights of training it alone (LoRA, DoRA, MixLoRA, with dropout), also across --resume, and with 2 processes
the losses of 1; the K-row forward equals each adapter's own model slice by slice; bad specifications are
one-line errors.
Shape legend: B batch (one adapter's rows), K adapters, T time, D hidden, N tokens.
"""

import copy
from contextlib import contextmanager

import torch
import torch.nn as nn

from moe_lora import inject_adapter

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
    """One random-number stream per adapter, swapped into the global generator while its module runs."""

    def __init__(self, names):
        self.names, self.states = list(names), {}

    def fork(self, device):
        """Every stream starts from the global generator's current state (train.py seeds it per step)."""
        state = rng_state(device)
        self.states = {n: state for n in self.names}

    @contextmanager
    def use(self, name, device):
        """Run a block on `name`'s stream; outside training (no fork yet) the global generator is used."""
        if name not in self.states:
            yield
            return
        outer = rng_state(device)
        set_rng_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = rng_state(device)
            set_rng_state(outer)


# ----------------------------------------------------------------------------------------------------
# One adapted site of the model, holding every adapter's module


class PerAdapter(dict):
    """{adapter name: aux} of one layer, as an FFN site returns it (so it is not mistaken for one aux)."""


class AdapterSite(nn.Module):
    """An attention projection or FFN of the base model, adapted by K adapters: the input's rows are K
    equal contiguous slices, slice k goes through adapter k's own module, the outputs are concatenated.

    forward(x (K*B, ..., d_in), token_mask (K*B, T) | None) -> y (K*B, ..., d_out), or (y, PerAdapter)
    when a branch returns aux outputs (a MixLoRA FFN). A branch that does not adapt this site is the
    plain base module itself (its slice gets W0 x)."""

    def __init__(self, branches, streams):
        super().__init__()
        self.branches = nn.ModuleDict(branches)                             # {name: module}, batch-plan order
        self.streams = streams                                              # shared by every site (not a module)

    def forward(self, x, *rest):
        K = len(self.branches)
        if x.shape[0] % K:
            raise ValueError(f"{x.shape[0]} rows cannot be split among {K} adapters")
        n = x.shape[0] // K
        ys, aux = [], PerAdapter()
        for k, (name, module) in enumerate(self.branches.items()):
            rows = slice(k * n, (k + 1) * n)                                # the batch plan: adapter k's rows
            args = [r[rows] if torch.is_tensor(r) else r for r in rest]     # the token mask's slice
            with self.streams.use(name, x.device):
                out = module(x[rows], *args)
            y, a = out if isinstance(out, tuple) else (out, None)
            ys.append(y)
            aux[name] = a
        y = torch.cat(ys)                                                   # (K*B, ..., d_out)
        return (y, aux) if any(a is not None for a in aux.values()) else y


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
    streams = Streams(configs)
    for path in site_names(model):
        branches = {name: view.get_submodule(path) for name, view in views.items()}
        if any(p.requires_grad for m in branches.values() for p in m.parameters()):  # some adapter acts here
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent), leaf, AdapterSite(branches, streams))
    model.adapter_views, model.streams = views, streams
    return views

