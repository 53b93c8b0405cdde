"""moe_linear.py: a mixture of LoRA experts inside one projection: LoRAMoE and MoLA.

References
  LoRAMoE  Dou et al. 2023, "LoRAMoE: Alleviate World Knowledge Forgetting in Large Language Models via
           MoE-Style Plugin", arXiv 2312.09979, sec. 3: E LoRA experts in each FFN linear layer, weighted
           by a dense softmax router, and a localized balancing constraint between two expert groups.
  MoLA     Gao et al. 2024, "Higher Layers Need More LoRA Experts", arXiv 2402.08562 (NAACL Findings 2025),
           sec. 3: E LoRA experts in every adapted projection, top-k routing, and expert counts that differ
           by layer (the paper's allocations such as 2-4-6-8 experts from the bottom group to the top).
  Reference code: MoE-PEFT 2.0.2 `moe_peft/adapters/{loramoe,mola}` (../shared/reference/moe_peft_oracle.md).

MixLoRA (moe_lora.py) routes once per FFN block and its experts are whole FFNs; here every adapted
projection has its own router over its own LoRA experts, which share the projection's frozen W0
(s = lora_alpha / r, or alpha / sqrt(r) with rsLoRA; the router runs in fp32):

    x ──────────────────────────────► W0 x (+ b) ───────────────────┐
    │                                                                (+) ──► y
    ├─► moe_gate (router, fp32) ─► w (N, E)                          │
    └─► for each expert e, on the tokens with w_e > 0:                │
           w_e * s B_e A_e drop(x)    (B_e, A_e: the expert's LoRA) ──┘   summed over e

    LoRAMoE: w = softmax(W_g x)                       dense: every expert on every token; experts on
                                                      the FFN projections, one plain LoRA on attention
    MoLA:    w = top-k(softmax(W_g x)), renormalised   on every targeted projection; E can differ per layer

A projection returns a plain tensor (it sits inside the attention or the MLP), so each MoELoRALinear keeps
its last router outputs and a forward hook on the layer's MLP (the last module a decoder layer calls)
hands them out as the layer's aux output, as MixLoRAFFN does: returned tensors keep their gradients
under activation checkpointing.

Checked by test_all.py (section moe_linear.py): hand-worked 2-expert 3-token outputs for both routers,
MoLA with one expert per layer equals plain LoRA, LoRAMoE with identical experts equals one LoRA,
per-layer counts take effect, gradients reach routers and experts, save/load round trips in both layouts,
and, where `moe_peft` is importable, MoE-PEFT 2.0.2's logits, losses and adapter files.
Run `python moe_linear.py` for a tiny demo.

Shape legend: N tokens (any leading dims), d_in/d_out the projection's sizes, E experts, K top-k,
r rank, B batch, T time, L layers, P adapted projections of one layer.
"""

import functools
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from routers import Router, RouterConfig

FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# The reference's loaders assert lora_dropout > 0 and MoE-PEFT keeps dropout on at evaluation, so a 0 is
# written as this: the smallest sensible value, which scales its LoRA outputs by 1 + 1e-9 there.
REFERENCE_MIN_DROPOUT = 1e-9

# ----------------------------------------------------------------------------------------------------
# Configs: the keys of MoE-PEFT's adapter_config.json (LoraConfig.export + LoraMoeConfig / MolaConfig)


@dataclass
class ExpertLoRAConfig:
    """Hyper-parameters shared by LoRAMoE and MoLA; field names are the adapter_config.json keys.

    The router settings left at None take the strategy's defaults from routers.STRATEGIES ("loramoe",
    "mola"): router_init_range 5.0, the a^2 of the router's kaiming_uniform_ init (U(-b, b) with
    b = sqrt(6 / ((1 + range) d_in)), so 5.0 is nn.Linear's 1/sqrt(d_in); MixLoRA's is a normal std),
    and the router loss coefficients, 0 (off) as in the reference.
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: list(lora.PROJECTIONS))
    use_rslora: bool = False
    init_lora_weights: str = "original"    # reference key `lora_init`
    num_experts: int = 8
    router_init_range: float | None = None
    router_aux_loss_coef: float | None = None
    router_z_loss_coef: float | None = None
    task_type: str = "CAUSAL_LM"
    base_model_name_or_path: str = ""

    def __post_init__(self):
        self.target_modules = lora.projection_names(self.target_modules)  # the reference also takes {name: bool}
        lora.LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, target_modules=["x"],
                        init_lora_weights=self.init_lora_weights)  # r, dropout, init checks
        counts = self.num_experts if isinstance(self.num_experts, (list, tuple)) else [self.num_experts]
        if not counts or any(not isinstance(e, int) or isinstance(e, bool) or e < 1 for e in counts):
            raise ValueError(f"num_experts: expected an integer >= 1 (MoLA: or a list of them), got {self.num_experts!r}")
        resolved = self.router_config(min(counts))  # the strategy's defaults; range checks, top_k <= fewest
        for key in ("router_init_range", "router_aux_loss_coef", "router_z_loss_coef"):
            setattr(self, key, getattr(resolved, key))
        if not self.moe_targets():
            raise ValueError(f"target_modules: {self.peft_type} needs experts on one of {self.expert_modules()}, "
                             f"got {self.target_modules}")

    def router_config(self, num_experts):
        """The routers.RouterConfig of a router over num_experts experts (one layer's count)."""
        return RouterConfig(num_experts=num_experts, routing_strategy=self.routing_strategy,
                            top_k=getattr(self, "top_k", num_experts), router_init_range=self.router_init_range,
                            router_aux_loss_coef=self.router_aux_loss_coef, router_z_loss_coef=self.router_z_loss_coef)

    def moe_targets(self):
        """The targeted projections that get experts (the others get one plain LoRA)."""
        return [t for t in self.target_modules if t in self.expert_modules()]

    def attention_config(self):
        """lora.LoraConfig for the targets without experts, or None when there are none."""
        plain = [t for t in self.target_modules if t not in self.expert_modules()]
        return lora.LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                               target_modules=plain, use_rslora=self.use_rslora,
                               init_lora_weights=self.init_lora_weights) if plain else None

    def layer_experts(self, num_layers):
        """Expert count of each layer, bottom to top: an int for every layer, a list of num_layers counts,
        or a list of G counts for G equal groups of consecutive layers (MoLA's "2-4-6-8" on 32 layers)."""
        if not isinstance(self.num_experts, (list, tuple)):
            return [self.num_experts] * num_layers
        g = len(self.num_experts)
        if num_layers % g:
            raise ValueError(f"num_experts: a list of {g} counts does not fit {num_layers} layers "
                             f"(give {num_layers} counts, or a number of groups that divides {num_layers})")
        return [e for e in self.num_experts for _ in range(num_layers // g)]

    @classmethod
    def from_dict(cls, d):
        """From an adapter_config.json dict (ours or the reference's); unknown keys are ignored."""
        d = dict(d)
        if "lora_init" in d:
            d.setdefault("init_lora_weights", d.pop("lora_init"))
        if d.get("use_dora"):
            raise ValueError(f"use_dora: not supported for {cls.peft_type} (the reference's experts ignore it too)")
        if "router_loss" in d:  # the reference's switch for MoLA's loss; here a coefficient of 0 is off
            d["router_aux_loss_coef"] = float(d.get("router_aux_loss_coef", 0.001)) if d["router_loss"] else 0.0
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self, reference=False):
        """adapter_config.json contents; reference=True writes what MoE-PEFT's loader asserts: an int
        lora_alpha, a float lora_dropout > 0, one expert count."""
        d = asdict(self)
        d.update(peft_type=self.peft_type, routing_strategy=self.routing_strategy, bias="none",
                 lora_init=self.init_lora_weights, router_init_range=float(self.router_init_range),
                 router_loss=self.router_aux_loss_coef > 0, router_aux_loss_coef=float(self.router_aux_loss_coef))
        if reference:
            if not float(self.lora_alpha).is_integer():
                raise ValueError(f"lora_alpha={self.lora_alpha}: the reference format needs an integer")
            if isinstance(self.num_experts, (list, tuple)):
                raise ValueError("num_experts: per-layer expert counts cannot be written in the reference "
                                 "layout (MoE-PEFT has one count); save with format='peft'")
            d["lora_alpha"] = int(self.lora_alpha)
            d["lora_dropout"] = float(max(self.lora_dropout, REFERENCE_MIN_DROPOUT))  # NOTE: see the constant
        return d


@dataclass
class LoRAMoEConfig(ExpertLoRAConfig):
    """LoRAMoE (Dou et al. 2023): a dense softmax router over E experts on each targeted FFN projection;
    targeted attention projections get one plain LoRA (the reference's rule).

    Localized balancing constraint (LoRAMoE sec. 3.2, losses.localized_balancing_loss), off by default:
    blc_weight is its coefficient beta (0 = off), blc_alpha its delta; it needs a type per training
    sample (1: the first half of the experts, 0: the rest). NOTE: the reference (MoE-PEFT) does not
    implement it and has no router loss for LoRAMoE at all.
    """

    peft_type, routing_strategy = "LORAMOE", "loramoe"  # class attributes, not fields
    blc_weight: float = 0.0
    blc_alpha: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.num_experts, (list, tuple)):
            raise ValueError("num_experts: LoRAMoE has one expert count; per-layer counts are MoLA's")
        if self.blc_weight < 0 or not 0 <= self.blc_alpha < 1:
            raise ValueError(f"blc_weight >= 0, 0 <= blc_alpha < 1 expected, got {self.blc_weight}, {self.blc_alpha}")

    @staticmethod
    def expert_modules():
        return FFN_PROJECTIONS


@dataclass
class MoLAConfig(ExpertLoRAConfig):
    """MoLA (Gao et al. 2024): a top-k router over E_l experts on every targeted projection of layer l.

    num_experts: one count, or a list per layer / per group of layers, bottom to top (layer_experts).
    router_aux_loss_coef > 0 adds the Mixtral top-k load-balancing loss (losses.load_balancing_loss, pooled
    per expert count); it is off by default as in the reference (its `router_loss`, then 0.001). top_k
    must fit the fewest experts of a layer.
    """

    peft_type, routing_strategy = "MOLA", "mola"
    top_k: int = 2

    @staticmethod
    def expert_modules():
        return lora.PROJECTIONS


# ----------------------------------------------------------------------------------------------------
# The layer


class MoELoRALinear(nn.Module):
    """y = W0 x + b + sum_e w_e(x) s B_e A_e drop(x), w = moe_gate(x) (N, E) fp32, dense or top-k.

    W0 (d_out, d_in) and b stay frozen inside `self.base` (as in lora.LoRALinear). Expert e is
    `experts.{e}` with lora_A (r, d_in) Kaiming-uniform(a=sqrt(5)) and lora_B (d_out, r) zeros, so the
    layer is an exact no-op at init; the router `moe_gate` (E, d_in) is Kaiming-uniform with
    a = sqrt(router_init_range) (reference; see ExpertLoRAConfig). The module and tensor names give the
    reference's file names (`...q_proj.experts.3.lora_A`, `...q_proj.moe_gate.weight`).
    Dropout acts on each expert's input, drawn per expert as in the reference, and is off in eval()
    (NOTE: the reference keeps it on at evaluation). Deltas add up in an fp32 buffer (the reference's
    MoLA buffer), rounded once to the output dtype.
    """

    def __init__(self, base, router_config, r, lora_alpha, lora_dropout=0.0, use_rslora=False,
                 init_lora_weights="original"):
        """base: the nn.Linear to adapt; router_config: a routers.RouterConfig ("loramoe" or "mola")."""
        super().__init__()
        d_out, d_in = base.weight.shape
        if r > min(d_in, d_out):
            raise ValueError(f"r={r} is larger than min(d_in, d_out)={min(d_in, d_out)}")
        self.base = base.requires_grad_(False)
        self.scaling = lora.lora_scaling(lora_alpha, r, use_rslora)
        dev, E = base.weight.device, router_config.num_experts
        self.experts = nn.ModuleList(lora.LoRAExpert(d_in, d_out, r, init_lora_weights, dev) for _ in range(E))
        self.moe_gate = Router(d_in, router_config).to(dev)                # the strategy's rule and init
        self.dropout = nn.Dropout(lora_dropout)  # returns x itself at p = 0 and in eval()
        self.routing = None  # (logits, weights, selected) of the last forward, handed out by the layer's hook

    def forward(self, x, wx=None):  # x: (..., d_in) -> (..., d_out); wx = W0 x when already computed (multi.py)
        x2 = x.reshape(-1, x.shape[-1])                                     # (N, d_in)
        logits, w, selected = self.moe_gate(x2)                             # (N, E) fp32, fp32, bool
        self.routing = (logits, w, selected)
        y = self.base(x2) if wx is None else wx.reshape(x2.shape[0], -1)    # (N, d_out) W0 x (+ b)
        if wx is not None and self.base.bias is not None:
            y = y + self.base.bias
        delta = torch.zeros(y.shape, dtype=torch.float32, device=y.device)  # (N, d_out) sum_e w_e s B_e A_e x
        for e, ex in enumerate(self.experts):
            t = w[:, e].nonzero().squeeze(1)                                # (n_e,) tokens routed to e
            if len(t) == 0:
                continue
            xe = self.dropout(x2.index_select(0, t)).to(ex.lora_A.dtype)   # (n_e, d_in) the expert's own mask
            d = F.linear(F.linear(xe, ex.lora_A) * self.scaling, ex.lora_B)  # (n_e, d_out) s B_e A_e x
            delta.index_add_(0, t, (d * w.index_select(0, t)[:, e:e + 1]).float())
        return (y + delta.to(y.dtype)).view(*x.shape[:-1], y.shape[-1])

    def extra_repr(self):
        return f"experts={len(self.experts)}, scaling={self.scaling:.4g}"


def hand_out_routing(projections, dense, mlp, args, y):
    """Forward hook on a decoder layer's MLP: return (y, aux) with the router outputs of the layer's P
    MoE projections (attention ones ran earlier in the same layer call), concatenated along the tokens:
    aux = {"router_logits": (P*N, E) fp32, "router_weights": (P*N, E) fp32, "router_selected": (P*N, E)
    bool, "routers": P, "dense": bool}, the keys losses.adapter_losses and routers.router_stats read."""
    logits, weights, selected = zip(*(p.routing for p in projections))
    for p in projections:
        p.routing = None                                                   # nothing kept past the step
    return y, {"router_logits": torch.cat(logits), "router_weights": torch.cat(weights),
               "router_selected": torch.cat(selected), "routers": len(projections), "dense": dense}


# ----------------------------------------------------------------------------------------------------
# Injection


def inject_moe_linear(model, cfg):
    """Give every decoder layer of a loaded llama.py model the adapter of a LoRAMoEConfig / MoLAConfig, in
    place: a MoELoRALinear on each expert target of layer l (with cfg.layer_experts(L)[l] experts), a
    lora.LoRALinear on the other targets, and the hook that returns the layer's router outputs.
    Freezing is the caller's (moe_lora.inject_adapter). Returns the model with model.adapter_config = cfg."""
    layers = model.model.layers
    counts = cfg.layer_experts(len(layers))
    if cfg.attention_config() is not None:
        lora.inject_lora(model, cfg.attention_config())
    found = set()
    for layer, E in zip(layers, counts):
        projections = []
        for parent in (layer.self_attn, layer.mlp):
            for name in cfg.moe_targets():
                base = getattr(parent, name, None)
                if isinstance(base, (MoELoRALinear, lora.LoRALinear)):
                    raise ValueError(f"{name} already has an adapter; inject into a fresh base model")
                if not isinstance(base, nn.Linear):
                    continue
                m = MoELoRALinear(base, cfg.router_config(E), cfg.r, cfg.lora_alpha, cfg.lora_dropout,
                                  cfg.use_rslora, cfg.init_lora_weights).train(base.training)
                setattr(parent, name, m)
                projections.append(m)
                found.add(name)
        if projections:
            layer.mlp.register_forward_hook(functools.partial(hand_out_routing, tuple(projections),
                                                              cfg.peft_type == "LORAMOE"))
    missing = [t for t in cfg.moe_targets() if t not in found]
    if missing:
        raise ValueError(f"target module(s) {missing} not found in the model (expected names like {lora.PROJECTIONS})")
    model.adapter_config = cfg
    return model


# ----------------------------------------------------------------------------------------------------
# Demo

if __name__ == "__main__":
    import llama

    torch.manual_seed(0)
    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2)
    for adapter in (LoRAMoEConfig(r=4, num_experts=4), MoLAConfig(r=4, num_experts=[2, 4, 6, 8])):
        model = inject_moe_linear(llama.LlamaForCausalLM(cfg), adapter)
        trainable, _ = lora.mark_trainable(model)
        out = model(torch.randint(0, 64, (2, 8)))
        print(f"{adapter.peft_type}: logits {tuple(out.logits.shape)}, trainable {trainable}, "
              f"router logits per layer {[tuple(a['router_logits'].shape) for a in out.aux]}")
