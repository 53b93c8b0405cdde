"""MixLoRA (a mixture of LoRA experts in every FFN), the Select-MoE quality gate and trash expert, and
one injection entry point for every adapter of the project (LoRA, DoRA, MixLoRA, and LoRAMoE / MoLA,
whose experts sit inside each projection: moe_linear.py). Their files: adapter_files.py.

References
  MixLoRA     Li et al. 2024, "MixLoRA: Enhancing LLMs Fine-Tuning with LoRA-based Mixture of Experts",
              arXiv 2404.15159, sec. 3 (shared frozen FFN, per-expert LoRA, top-k router, aux loss) and
              Table 6 (the optimisation: base W1/W3 computed once for all tokens); reference code
              MoE-PEFT / the `mixlora` package, specified in ../shared/reference/mixlora.md sec. 3, 4, 8.
  Switch      Fedus et al. 2021, arXiv 2101.03961 (top-1 routing with expert capacity, see routers.py).
  Select-MoE  FGinfinite/Qualitiy-Gate ("MyGO", no paper), ../shared/reference/select_moe.md sec. 1-3:
              a per-layer quality gate g = sigmoid(w_q u) mixing the MoE output with a trash expert.

The MoE-LoRA FFN (u: the post-attention RMSNorm output; s = lora_alpha / r; the routers run in fp32):

    u ──► moe_gate (router) ──► weights (N, E): K non-zero per token (top-k), fewer (top-p, Switch)
    │
    ├──► W_gate u, W_up u            frozen base, computed ONCE for all tokens
    │      for each expert e, on the tokens routed to it:
    │        g_e = W_gate u + s B_g,e A_g,e u          the expert's own LoRA on gate_proj
    │        v_e = W_up u   + s B_u,e A_u,e u          ... on up_proj
    │        a_e = silu(g_e) * v_e                     (n_e, I)
    │      y_moe = W_down (sum_e w_e a_e) + sum_e w_e s B_d,e A_d,e a_e      base down_proj ONCE
    │
    ├──► quality_gate ──► s_q (B, T) ──► g = sigmoid(s_q)                     (Select-MoE, optional)
    └──► trash expert: 0 | noise N(mean u, std u) | custom f(u)
         y = g * y_moe + (1 - g) * y_trash          the decoder layer adds y to its residual

Attention projections get one ordinary LoRA per adapter (lora.LoRALinear), shared by all experts.

Checked by test_all.py: E=1/k=1 equals a dense LoRA FFN; the grouped computation equals the
reference's per-expert loop in outputs and gradients for every router, with and without the gate; aux tensors
keep their gradients under activation checkpointing (the file round trips and the `mixlora` package's
logits: adapter_files.py). Run `python moe_lora.py` for a tiny demo.

Shape legend: B batch, T time, D hidden, I FFN intermediate, N = B*T tokens, E experts, K top-k,
S routed (token, expert) slots (N*K for top-k), r rank.
"""

import math
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from losses import (BETA_TARGET_MEAN, BETA_TARGET_VAR, LAMBDA_VAR, QUALITY_LOSS_KINDS, QUALITY_LOSS_WEIGHT, W_MEAN,
                    W_VAR)
from moe_linear import REFERENCE_MIN_DROPOUT, ExpertLoRAConfig, inject_moe_linear
from routers import STRATEGIES, Router, RouterConfig

FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
MIXLORA_STRATEGIES = tuple(s for s in STRATEGIES if s.startswith("mixlora"))  # the others: moe_linear.py
TRASH_MODES = ("zero", "noise", "custom")
ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}

# ----------------------------------------------------------------------------------------------------
# Config: the keys of the reference's adapter_config.json (MoE-PEFT MixLoraConfig.export) + Select-MoE


@dataclass
class MixLoRAConfig(RouterConfig):
    """MixLoRA + Select-MoE hyper-parameters; field names are the adapter_config.json keys.

    The router's fields (num_experts, routing_strategy, top_k, top_p, temperature, expert_capacity,
    capacity_factor, router_init_range, jitter_noise, router_aux_loss_coef, router_z_loss_coef) are
    routers.RouterConfig's. Those left at None take the strategy's defaults from routers.STRATEGIES, here
    in this constructor, so that the command line, bench.py and the Python API build the same adapter:
    router init std 1.0, jitter 0.01 and a z-loss (coefficient 0.001) for "mixlora-switch"; 0.02, no
    jitter and no z-loss otherwise; load balancing 0.001 for all three.
    Attention projections in target_modules get one shared LoRA; FFN projections get E expert LoRAs.
    Defaults are the reference code's (mixlora.md sec. 3-5, select_moe.md sec. 1-3); the quality-loss
    defaults are losses.py's.
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: list(lora.PROJECTIONS))
    use_dora: bool = False
    use_rslora: bool = False
    init_lora_weights: str = "original"    # reference key `lora_init`
    expert_lora: dict | None = None        # {r, lora_alpha, lora_dropout, use_dora, use_rslora} for experts
    act_fn: str = "silu"
    # Select-MoE quality gate (select_moe.md sec. 1.3, 2, 3)
    quality_gate: bool = False
    quality_gate_init_mean: float = 0.0
    quality_gate_init_std: float = 0.02
    quality_gate_init_bias: float | None = None  # None: no bias, as the reference (see add_quality_gate)
    trash_expert_mode: str = "zero"
    quality_loss_type: str = "sigmoid"
    # NOTE: the reference's config class says 0.5 and False; its stage-1 yaml (the values in effect) 1 and True.
    quality_loss_weight: float = QUALITY_LOSS_WEIGHT
    sample_wise_averaging: bool = True
    beta_target_mean: float = BETA_TARGET_MEAN
    beta_target_var: float = BETA_TARGET_VAR
    w_mean: float = W_MEAN
    w_var: float = W_VAR
    lambda_var: float = LAMBDA_VAR
    task_type: str = "CAUSAL_LM"
    base_model_name_or_path: str = ""

    def __post_init__(self):
        super().__post_init__()  # the strategy's defaults, router checks (routers.RouterConfig)
        if self.routing_strategy not in MIXLORA_STRATEGIES:
            raise ValueError(f"routing_strategy: {self.routing_strategy!r} routes inside each projection: use "
                             f"moe_linear.LoRAMoEConfig / MoLAConfig (MixLoRA: {', '.join(MIXLORA_STRATEGIES)})")
        self.target_modules = lora.projection_names(self.target_modules)  # the reference also takes {name: bool}
        if set(self.expert_lora or {}) - {"r", "lora_alpha", "lora_dropout", "use_dora", "use_rslora", "bias"}:
            raise ValueError(f"expert_lora: unknown keys in {self.expert_lora}")
        lora.LoraConfig(**self.expert_settings(), target_modules=["x"])  # r, dropout, init checks
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"act_fn: unknown {self.act_fn!r}, expected one of {', '.join(ACTIVATIONS)}")
        if self.trash_expert_mode not in TRASH_MODES:
            raise ValueError(f"trash_expert_mode: unknown {self.trash_expert_mode!r}, expected one of {TRASH_MODES}")
        if self.quality_loss_type not in QUALITY_LOSS_KINDS:
            raise ValueError(f"quality_loss_type: unknown {self.quality_loss_type!r}, expected one of {QUALITY_LOSS_KINDS}")
        if self.quality_gate_init_std < 0 or self.quality_loss_weight < 0:
            raise ValueError("quality_gate_init_std and quality_loss_weight must be >= 0")
        if self.quality_gate and not set(FFN_PROJECTIONS) & set(self.target_modules):
            raise ValueError("quality_gate needs MoE layers: target_modules has none of gate_proj, up_proj, down_proj")

    def expert_settings(self):
        """LoRA settings of the FFN experts: the top-level ones overridden by `expert_lora`."""
        s = dict(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, use_dora=self.use_dora,
                 use_rslora=self.use_rslora, init_lora_weights=self.init_lora_weights)
        s.update({k: v for k, v in (self.expert_lora or {}).items() if k != "bias"})
        return s

    def attention_config(self):
        """lora.LoraConfig for the shared attention LoRA, or None when no attention projection is targeted."""
        attn = [t for t in self.target_modules if t not in FFN_PROJECTIONS]
        return lora.LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                               target_modules=attn, use_rslora=self.use_rslora, use_dora=self.use_dora,
                               init_lora_weights=self.init_lora_weights) if attn else None

    @classmethod
    def from_dict(cls, d):
        """From an adapter_config.json dict (ours or the reference's); unknown keys are ignored."""
        d = dict(d)
        if "lora_init" in d:
            d.setdefault("init_lora_weights", d.pop("lora_init"))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self, reference=False):
        """adapter_config.json contents. reference=True follows the compatibility recipe (mixlora.md sec. 8)
        so that the `mixlora` package and MoE-PEFT read it: int lora_alpha, lora_dropout > 0, floats."""
        d = {k: v for k, v in asdict(self).items() if v is not None}  # the reference chokes on null expert_lora
        d.update(peft_type="MIXLORA", bias="none", lora_init=self.init_lora_weights,
                 router_init_range=float(self.router_init_range), jitter_noise=float(self.jitter_noise))
        if reference:
            if not float(self.lora_alpha).is_integer():
                raise ValueError(f"lora_alpha={self.lora_alpha}: the reference format needs an integer")
            d["lora_alpha"] = int(self.lora_alpha)
            # NOTE: both reference loaders assert lora_dropout > 0; a 0 is written as 1e-9 (off in our eval,
            # negligible in MoE-PEFT's, which keeps dropout on)
            d["lora_dropout"] = float(max(self.lora_dropout, REFERENCE_MIN_DROPOUT))
        return d


# ----------------------------------------------------------------------------------------------------
# Experts: E LoRAs sharing one frozen projection


class ExpertProjection(nn.Module):
    """A frozen FFN projection W0 (d_out, d_in) shared by E experts, each adding its own LoRA or DoRA:

        LoRA:  y_e = W0 x + s B_e A_e drop(x) + b
        DoRA:  y_e = m_e / ||W0 + s B_e A_e||_row * (W0 x + s B_e A_e drop(x)) + b     (norm detached)

    `weight`/`bias` ARE the base nn.Linear's parameters, so the state-dict keys stay HF's
    (`mlp.gate_proj.weight`) and the experts are `mlp.gate_proj.experts.{e}.lora_A`, the reference's
    tensor names. With no experts (projection not targeted) every expert uses W0 alone.
    NOTE: the bias sits outside the DoRA rescaling as in lora.py / HF PEFT (the reference puts it inside).
    """

    def __init__(self, base, num_experts, *, r, lora_alpha, lora_dropout, use_dora, use_rslora, init_lora_weights):
        """base: the nn.Linear to share; the LoRA settings are MixLoRAConfig.expert_settings()."""
        super().__init__()
        base.requires_grad_(False)
        self.weight, self.bias = base.weight, base.bias                     # (d_out, d_in), (d_out,) | None
        d_out, d_in = base.weight.shape
        self.scaling, self.use_dora = lora.lora_scaling(lora_alpha, r, use_rslora), use_dora and num_experts > 0
        self.dropout = nn.Dropout(lora_dropout)                             # x itself at p = 0, in eval()
        self.experts = nn.ModuleList(lora.LoRAExpert(d_in, d_out, r, init_lora_weights, base.weight.device)
                                     for _ in range(num_experts))
        if self.use_dora:
            for e, ex in enumerate(self.experts):
                ex.magnitude = nn.Parameter(self.weight_norm(e))            # (d_out,): DoRA is a no-op at init

    def weight_norm(self, e):
        """||W0 + s B_e A_e||_row (d_out,) for expert e, detached (lora.dora_row_norm)."""
        return lora.dora_row_norm(self.weight, self.experts[e].lora_A, self.experts[e].lora_B, self.scaling)

    def low_rank(self, x, e):
        """s A_e drop(x): (n, d_in) -> (n, r) in the adapters' fp32 (the scaling on the small side)."""
        A = self.experts[e].lora_A
        return F.linear(self.dropout(x).to(A.dtype), A) * self.scaling

    def delta(self, x, e):
        """s B_e A_e drop(x): (n, d_in) -> (n, d_out) fp32."""
        return F.linear(self.low_rank(x, e), self.experts[e].lora_B)

    def forward(self, x, e, wx=None):
        """Expert e on its tokens x (n, d_in) -> (n, d_out); wx = W0 x when already computed (grouped_forward)."""
        wx = F.linear(x, self.weight) if wx is None else wx                 # (n, d_out), no bias yet
        if self.experts:
            h, B = self.low_rank(x, e), self.experts[e].lora_B              # (n, r), (d_out, r)
            if self.use_dora:
                wx = (self.experts[e].magnitude / self.weight_norm(e)) * (wx.to(h.dtype) + F.linear(h, B))
            elif wx.dtype == h.dtype:
                wx = torch.addmm(wx, h, B.t())                              # W0 x + s B A x in one pass
            else:
                wx = wx + F.linear(h, B).to(wx.dtype)
        wx = wx.to(x.dtype)
        return wx if self.bias is None else wx + self.bias


# ----------------------------------------------------------------------------------------------------
# The MixLoRA FFN with the optional Select-MoE quality gate


class Routing(NamedTuple):
    """One MixLoRA FFN's routing of N tokens: router outputs (N, E), the S (expert, token) slots sorted
    by expert (tok (S,), weights w (S,)), tokens per expert (E ints), sum of the weights per token (N,)."""
    logits: torch.Tensor
    weights: torch.Tensor
    selected: torch.Tensor
    tok: torch.Tensor
    w: torch.Tensor
    counts: list
    wsum: torch.Tensor


class MixLoRAFFN(nn.Module):
    """Drop-in replacement of a LlamaMLP: y = sum_e w_e(u) expert_e(u), optionally gated (Select-MoE).

    expert_e(u) = down_e(act(gate_e(u)) * up_e(u)), every projection the frozen base plus expert e's LoRA
    (MixLoRA sec. 3.1). w = moe_gate(u) (N, E) is the dense routing matrix of routers.Router, init
    N(0, router_init_range). Padding tokens (token_mask False) skip the experts: their output is 0.
    NOTE: the reference routes and computes padding too; those outputs are never read.

    Two ways to compute the same y, equal up to float rounding (test_grouped_equals_per_expert_loop checks
    outputs and gradients for every router, with and without the gate):
      per_expert_forward: the reference's `_mixlora_compatible_forward`: per expert, gather its tokens,
          run the whole expert MLP, scale by w, index_add_ into the output.
      grouped_forward (used): W_gate u and W_up u once for all tokens, experts add only their LoRA deltas
          on their tokens, and by linearity W_down is applied ONCE to sum_e w_e a_e (I wide) instead of once
          per (token, expert) slot. Slots are sorted by expert once, so each expert's tokens are a
          contiguous slice and the Python loop only issues the small LoRA matmuls. This is the MixLoRA
          paper's own algorithm (sec. 3.3 and Table 6: the shared base FFN computed once), not speed
          plumbing, so it lives here in plain PyTorch rather than in kernels.py. forward takes the
          per-expert loop only where the algebra needs it: down_proj experts with DoRA (m_e / n_e breaks
          the linearity). Its three steps (base gate/up products, grouped_hidden, grouped_down on W_down h)
          are separate methods so that multi.py can compute each base product once for several adapters.

    Quality gate (Select-MoE sec. 1.2): s_q = quality_gate(u) (B, T) fp32, init N(mean, std) from the
    config (NOTE: the reference overwrites that init with N(0, 0.02) in post_init; here it takes effect),
    g = sigmoid(s_q), y = g * y_moe + (1 - g) * y_trash. Trash expert: "zero" (y_trash = 0), "noise"
    (per token N(mean_d u, std_d u), unbiased std + 1e-8, detached; NOTE: the reference draws it at eval
    too, we use its mean, so scores are deterministic), "custom" (any module or function u -> y_trash).
    forward returns (y (B, T, D), aux) with aux = {"router_logits": (N, E) fp32, "router_weights": (N, E)
    fp32, "router_selected": (N, E) bool (what the balance loss counts, routers.py), "gate_logits": (B, T)
    fp32 when the gate is on}: returned tensors, so they keep their gradients
    under activation checkpointing (NOTE: the reference returned them in a dict that reentrant
    checkpointing detached, so its quality loss had no gradient, bug B1).
    """

    def __init__(self, mlp, cfg, trash_expert=None):
        super().__init__()
        D, dev = mlp.gate_proj.in_features, mlp.gate_proj.weight.device
        for name in FFN_PROJECTIONS:
            E = cfg.num_experts if name in cfg.target_modules else 0
            setattr(self, name, ExpertProjection(getattr(mlp, name), E, **cfg.expert_settings()))
        self.moe_gate = Router(D, cfg).to(dev)                              # the strategy's init, fp32
        self.num_experts, self.act = cfg.num_experts, ACTIVATIONS[cfg.act_fn]
        self.quality_gate, self.trash_mode = None, cfg.trash_expert_mode
        if cfg.quality_gate:
            self.add_quality_gate(cfg.quality_gate_init_mean, cfg.quality_gate_init_std, cfg.quality_gate_init_bias)
            if self.trash_mode == "custom" and not callable(trash_expert):
                raise ValueError("trash_expert_mode='custom' needs a trash_expert module or function")
            self.trash_expert = trash_expert if self.trash_mode == "custom" else None

    def add_quality_gate(self, init_mean, init_std, init_bias=None):
        """The Select-MoE quality gate s_q = w_q u (select_moe.md sec. 1.2): Linear D -> 1, no bias, fp32,
        init N(init_mean, init_std^2). Built here for a new adapter and by selection.add_quality_gates.

        NOTE: with the reference's bias-free gate s = w_q u is spread around 0 at init, so g = sigmoid(s)
        is about 0.5 and, with the zero trash expert, every FFN output is roughly halved: the model starts
        far from the adapter the gates were added to (select_moe.md sec. 1.3, "not function-preserving";
        SmolLM2-135M: warm-up loss 5.6 against the adapter's 2.05) and the warm-up first reopens the gates.
        init_bias = b adds a bias initialised to b: g starts near sigmoid(b) (b = 6: 0.998), so the model
        starts as the adapter it was built on."""
        D, dev = self.gate_proj.weight.shape[1], self.gate_proj.weight.device
        self.quality_gate = nn.Linear(D, 1, bias=init_bias is not None, device=dev)  # (1, D) [+ (1,)] fp32
        nn.init.normal_(self.quality_gate.weight, init_mean, init_std)
        if init_bias is not None:
            nn.init.constant_(self.quality_gate.bias, init_bias)

    def trash(self, u):
        """y_trash (B, T, D) for the (1 - g) branch (select_moe.md sec. 2)."""
        if self.trash_mode == "custom":
            return self.trash_expert(u)
        mu = u.detach().mean(-1, keepdim=True)                              # (B, T, 1)
        if not self.training:
            return mu.expand_as(u)                                          # E[noise]: deterministic at eval
        sd = u.detach().std(-1, keepdim=True) + 1e-8                        # (B, T, 1) unbiased, as reference
        return torch.randn_like(u) * sd + mu                                # (B, T, D), no gradient

    def forward(self, u, token_mask=None):
        B, T, D = u.shape
        x = u.reshape(B * T, D)                                             # (N, D)
        r = self.route(u, token_mask)
        if self.down_proj.use_dora:
            y = self.per_expert_forward(x, r.tok, r.w, r.counts)
        else:
            y = self.grouped_forward(x, r)
        return self.gated(u, y.view(B, T, D), r)

    def route(self, u, token_mask=None):
        """The routing of u (B, T, D) as a Routing: router outputs, the (expert, token) slots sorted by
        expert, their weights, tokens per expert, sum of the weights per token. Padding gets no slot."""
        logits, weights, selected = self.moe_gate(u, token_mask)            # (N, E) fp32, fp32, bool
        routed = weights if token_mask is None else weights * token_mask.reshape(-1, 1)  # padding -> 0
        exp, tok = routed.t().nonzero(as_tuple=True)                        # (S,), (S,) sorted by expert
        w = weights[tok, exp].to(u.dtype)                                   # (S,) differentiable weights
        counts = torch.bincount(exp, minlength=self.num_experts).tolist()   # tokens per expert (1 sync)
        return Routing(logits, weights, selected, tok, w, counts, routed.sum(-1))

    def gated(self, u, y, r):
        """(y, aux): the quality gate applied to the experts' output y (B, T, D), and the router outputs."""
        aux = {"router_logits": r.logits, "router_weights": r.weights, "router_selected": r.selected}
        if self.quality_gate is not None:
            with torch.autocast(u.device.type, enabled=False):              # the gate logit stays fp32
                s = self.quality_gate(u.to(self.quality_gate.weight.dtype)).squeeze(-1)  # (B, T)
            g = torch.sigmoid(s).unsqueeze(-1).to(y.dtype)                  # (B, T, 1)
            y = g * y if self.trash_mode == "zero" else g * y + (1 - g) * self.trash(u)
            aux["gate_logits"] = s
        return y, aux

    def per_expert_forward(self, x, tok, w, counts):
        """Reference path: each expert's full MLP on its tokens, scaled, index_add_ (fp32 buffer)."""
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)      # (N, D)
        for e, (t, we) in enumerate(zip(tok.split(counts), w.split(counts))):
            if len(t):
                xe = x.index_select(0, t)                                   # (n_e, D)
                a = self.act(self.gate_proj(xe, e)) * self.up_proj(xe, e)   # (n_e, I)
                y.index_add_(0, t, (self.down_proj(a, e) * we[:, None]).float())  # (n_e, D)
        return y.to(x.dtype)

    def grouped_forward(self, x, r):
        """Shared base gate/up once, per-expert LoRA deltas only, base down once on sum_e w_e a_e.
        multi.py runs the same three steps with base products shared by several adapters."""
        G, U = F.linear(x, self.gate_proj.weight), F.linear(x, self.up_proj.weight)  # (N, I) W_gate x, W_up x
        h, d = self.grouped_hidden(x, r, G, U)
        return self.grouped_down(r, F.linear(h, self.down_proj.weight), d)

    def grouped_hidden(self, x, r, G, U):
        """h = sum_e w_e a_e (N, I) from x (N, D) and the base products G = W_gate x, U = W_up x (N, I),
        and the down projection's LoRA deltas of the slots, d (list of (n_e, D))."""
        tok, counts = r.tok, r.counts
        # index_select, not G[tok]: its backward is an index_add, several times faster than index_put
        G, U, xs = G.index_select(0, tok), U.index_select(0, tok), x.index_select(0, tok)  # (S, I), (S, I), (S, D)
        h = torch.zeros(x.shape[0], G.shape[1], dtype=G.dtype, device=x.device)  # (N, I) sum_e w_e a_e
        d = []                                                              # down LoRA deltas
        for e, (t, xe, ge, ue, we) in enumerate(zip(tok.split(counts), xs.split(counts), G.split(counts),
                                                    U.split(counts), r.w.split(counts))):
            if len(t):
                a = self.act(self.gate_proj(xe, e, ge)) * self.up_proj(xe, e, ue) * we[:, None]  # (n_e, I) w_e a_e
                h.index_add_(0, t, a.to(h.dtype))                           # autocast: a may be fp32
                if self.down_proj.experts:  # w s B A drop(a) = s B A drop(w a): a row scale passes dropout
                    d.append(self.down_proj.delta(a, e))                    # (n_e, D)
        return h, d

    def grouped_down(self, r, Wh, d):
        """y (N, D) = W_down h + sum_e w_e b + the slots' down deltas d, from Wh = W_down h (N, D)."""
        y = Wh if self.down_proj.bias is None else Wh + r.wsum[:, None].to(Wh.dtype) * self.down_proj.bias
        if d:
            y = y.index_add(0, r.tok, torch.cat(d).to(y.dtype))             # (N, D)
        return y


# ----------------------------------------------------------------------------------------------------
# Injection and freezing


def inject_adapter(model, cfg, trash_expert=None):
    """Add the adapter described by cfg to a loaded base model, in place, and freeze everything else.

    lora.LoraConfig -> LoRA/DoRA on cfg.target_modules (lora.inject_lora). MixLoRAConfig -> shared LoRA on
    the targeted attention projections and a MixLoRAFFN on every layer's mlp. LoRAMoEConfig / MoLAConfig ->
    experts inside the targeted projections (moe_linear.inject_moe_linear). Afterwards only adapters,
    routers, gates (and a `score` head) train (lora.mark_trainable); a custom trash module stays frozen
    unless the caller unfreezes it. The config is kept as model.adapter_config."""
    if isinstance(cfg, lora.LoraConfig):
        if getattr(cfg, "quality_gate", False):
            raise ValueError("quality_gate needs MoE layers: use a MixLoRAConfig, not a LoraConfig")
        lora.inject_lora(model, cfg)
    elif isinstance(cfg, MixLoRAConfig):
        if any(isinstance(layer.mlp, MixLoRAFFN) for layer in model.model.layers):
            raise ValueError("model already has MixLoRA layers; inject into a fresh base model")
        if cfg.attention_config() is not None:
            lora.inject_lora(model, cfg.attention_config())
        for layer in model.model.layers:
            layer.mlp = MixLoRAFFN(layer.mlp, cfg, trash_expert).train(layer.mlp.training)
    elif isinstance(cfg, ExpertLoRAConfig):
        inject_moe_linear(model, cfg)
    else:
        raise ValueError(f"expected a lora.LoraConfig, MixLoRAConfig, LoRAMoEConfig or MoLAConfig, got {type(cfg).__name__}")
    model.adapter_config = cfg
    lora.mark_trainable(model)
    return model


# ----------------------------------------------------------------------------------------------------
# Demo

if __name__ == "__main__":
    import llama
    from routers import router_stats

    torch.manual_seed(0)
    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    model = llama.LlamaForCausalLM(cfg)
    inject_adapter(model, MixLoRAConfig(r=4, num_experts=4, quality_gate=True, trash_expert_mode="noise"))
    ids = torch.randint(0, 64, (2, 8))
    out = model(ids)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"logits {tuple(out.logits.shape)}, trainable {trainable} / {sum(p.numel() for p in model.parameters())}")
    stats = router_stats(out.aux)
    print("expert load, layer 0:", [round(v, 3) for v in stats["load"][0].tolist()])
    print("routing entropy per layer:", [round(v, 3) for v in stats["entropy"].tolist()], "(log E =", round(math.log(4), 3), ")")
    print("mean quality gate per layer:", [round(v, 3) for v in stats["gate"].tolist()])
    for strategy in MIXLORA_STRATEGIES:
        print(strategy, "->", MixLoRAConfig(routing_strategy=strategy).router_init_range, "router init std")
