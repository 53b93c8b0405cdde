"""
routers.py: the MixLoRA routers (top-k, top-p, Switch top-1 with capacity), LoRAMoE's dense router and
MoLA's top-k, in fp32, and the table of routing strategies.

A router maps each token's FFN input x_t (the post-attention RMSNorm output) to a DENSE row of
routing weights over the E experts; the MoE FFN (moe_lora.py) then computes
    y_t = sum_e weights[t, e] * expert_e(x_t)
and skips the experts whose weight is 0. One module, `Router`, serves every strategy of the table
`STRATEGIES` (the reference implementation's, MoE-PEFT `routing_strategy`):

    "mixlora"          top-k, weights renormalised over the k      (Mixtral; MixLoRA paper, Li et al.
                                                                    2024, arXiv 2404.15159, sec. 3)
    "mixlora-dynamic"  top-p, raw probabilities, no renormalisation (Huang et al. 2024, "Harder Tasks
                                                                    Need More Experts", sec. 3)
    "mixlora-switch"   top-1 with expert capacity, weight = p_max   (Switch Transformer, Fedus et al.
                                                                    2021, sec. 2.1-2.2)
    "loramoe"          dense softmax over all experts               (LoRAMoE, Dou et al. 2023, sec. 3.1)
    "mola"             top-k as "mixlora", Kaiming-uniform init     (MoLA, Gao et al. 2024, sec. 3)

The last two route inside each adapted projection (moe_linear.py), the others once per FFN (moe_lora.py).
A row of the table holds a strategy's rule (router logits -> weights, and the experts each token
selected), its router init, the most experts a token passes through (memory.py's estimate), and its
defaults: router init range, jitter, and which router losses apply with what coefficient (a coefficient
0 switches a loss off). `RouterConfig` fills the settings left at None from the row, so the command line,
bench.py and the Python API train the same thing. Adding a router = a rule and a row here, and its
tests; a loss of its own, if it needs one, in losses.py.

How a strategy names its balance loss: it does not need to. losses.py is a leaf (no project imports)
and every strategy here balances with the same formula, E * sum_e f_e P_e (Switch eq. 4), whose f_e
counts the experts each token SELECTED: the top-k set, the top-p set, the argmax before the capacity
cut. So the router returns that selection with its weights, and losses.load_balancing_loss reads it:
the loss uses what the router computed, the top-p rule exists once (here), and losses.py has no
per-strategy code to keep in step (an unknown strategy fails here, in RouterConfig).

Routing always runs in fp32 whatever the model dtype (the reference keeps gate weights, softmax and
accumulation in fp32). The selection rules are exposed as pure functions (`top_k_weights`,
`top_p_weights`, `switch_weights`, `expert_capacity`) so that the FFN and the tests can call them.
The router losses live in losses.py; `router_stats` sums up the routing of a forward pass for the
log lines (each layer's expert load and routing entropy, the mean quality gate).

Checked by test_all.py's router tests (rows sum to 1 for top-k, the crossing expert is kept by
top-p, capacity drops exactly the tokens past capacity and padding consumes none, jitter only in
training, every row of the table complete). Run `python routers.py` for a small demo.

Shape legend: B batch, T time, D hidden, N = B*T tokens, E experts, K top-k.
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# The config keys whose default depends on the strategy: left at None, they take the table's value.
STRATEGY_DEFAULTS = ("router_init_range", "jitter_noise", "router_aux_loss_coef", "router_z_loss_coef")

# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class RouterConfig:
    """The router's settings; field names are the reference's adapter_config.json keys.

    Settings left at None take the strategy's defaults from STRATEGIES (router_init_range,
    jitter_noise, router_aux_loss_coef, router_z_loss_coef); the others have one default for every
    strategy and are read only by the strategies that use them (top_k by "mixlora", top_p and
    temperature by "mixlora-dynamic", capacity_factor and expert_capacity by "mixlora-switch").
    The loss coefficients are not read by the router: they sit here because they are the
    strategy's defaults too (losses.adapter_losses reads them from the adapter config).
    moe_lora.MixLoRAConfig extends this class, so its constructor resolves the same defaults.
    Bad values raise a one-line ValueError naming the setting.
    """

    num_experts: int = 8
    routing_strategy: str = "mixlora"          # a key of STRATEGIES
    top_k: int = 2
    top_p: float = 0.8
    temperature: float = 0.0                   # 0 = off (reference: divides the probabilities)
    expert_capacity: int | None = None         # None: ceil(capacity_factor * tokens / E), see Router
    capacity_factor: float = 1.0
    router_init_range: float | None = None     # std of the router weight init
    jitter_noise: float | None = None          # router input noise U(1 - eps, 1 + eps), training only
    router_aux_loss_coef: float | None = None  # load balancing (the reference's code default 0.001)
    router_z_loss_coef: float | None = None    # ST-MoE z-loss (the reference: Switch only)

    def __post_init__(self):
        if self.routing_strategy not in STRATEGIES:
            raise ValueError(f"routing_strategy: unknown {self.routing_strategy!r}, "
                             f"expected one of {', '.join(STRATEGIES)}")
        strategy = STRATEGIES[self.routing_strategy]
        for key in STRATEGY_DEFAULTS:
            if getattr(self, key) is None:
                setattr(self, key, getattr(strategy, key))
        e = self.num_experts
        if not isinstance(e, int) or e < 1:
            raise ValueError(f"num_experts: expected an integer >= 1, got {e!r}")
        # top_k is checked only where it is read (a default top_k=2 with one expert is fine elsewhere)
        if "top_k" in strategy.settings and (not isinstance(self.top_k, int) or not 1 <= self.top_k <= e):
            raise ValueError(f"top_k: expected an integer in [1, num_experts={e}], got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: expected a value in (0, 1], got {self.top_p!r}")
        if self.temperature < 0.0:
            raise ValueError(f"temperature: expected >= 0 (0 disables it), got {self.temperature!r}")
        if not self.capacity_factor > 0.0:
            raise ValueError(f"capacity_factor: expected > 0, got {self.capacity_factor!r}")
        c = self.expert_capacity
        if c is not None and (not isinstance(c, int) or c < 1):
            raise ValueError(f"expert_capacity: expected None or an integer >= 1, got {c!r}")
        if not 0.0 <= self.jitter_noise < 1.0:
            raise ValueError(f"jitter_noise: expected a value in [0, 1), got {self.jitter_noise!r}")
        for key in ("router_init_range", "router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, key) < 0.0:
                raise ValueError(f"{key}: expected >= 0, got {getattr(self, key)!r}")


# ----------------------------------------------------------------------------------------------------
# Pure selection rules: router logits (N, E) fp32 -> dense routing weights (N, E) fp32


def top_k_weights(logits, k):
    """Top-k routing with renormalisation (Mixtral; MixLoRA sec. 3, reference step 3).

        p = softmax(z)                          over all E experts, fp32
        S = the k experts with the largest p    (ties: torch.topk's choice)
        w_e = p_e / sum_{j in S} p_j  for e in S,   0 otherwise

    Every row sums to 1 and has exactly k non-zero entries (unless a p underflows to 0). Gradients
    flow into the kept probabilities, as in the reference.
    """
    p = F.softmax(logits.float(), dim=-1)                       # (N, E)
    top_w, top_i = torch.topk(p, k, dim=-1)                     # (N, K), (N, K)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)             # renormalise over the k
    return torch.zeros_like(p).scatter(-1, top_i, top_w)        # (N, E) dense


def top_p_mask(scores, top_p):
    """Smallest prefix of experts, by descending score, whose cumulative score exceeds top_p.

    Sort descending, c = cumsum; let t be the first sorted position with c > top_p; keep sorted
    positions 0..t (the crossing expert is included). If no c exceeds top_p (e.g. top_p = 1.0) every
    expert is kept, so at least one expert is always kept. Returns a bool mask (N, E) in expert order.
    Ties are broken by expert index (stable sort), which the reference leaves unspecified.
    """
    sorted_s, order = torch.sort(scores, dim=-1, descending=True, stable=True)  # (N, E), (N, E)
    c = sorted_s.cumsum(dim=-1)                                                 # (N, E)
    # A sorted position is kept if the cumulative score BEFORE it has not yet exceeded top_p.
    # (Shifted rather than c - sorted_s, so the comparison sees the very same sums as c > top_p.)
    before = F.pad(c[..., :-1], (1, 0))                                         # exclusive cumsum
    keep_sorted = before <= top_p                                               # (N, E); pos 0 kept
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)        # (N, E) expert order


def top_p_weights(logits, top_p, temperature=0.0):
    """Top-p (dynamic) routing as MoE-PEFT's `DynamicSparseMoe` does it (reference sec. 4).

        p = softmax(z)                                    fp32
        q = p / temperature   if temperature > 0,  else p
        S = top_p_mask(q, top_p)                          crossing expert kept, >= 1 expert
        w_e = q_e for e in S,   0 otherwise               NO renormalisation

    With temperature 0 (the default) the weights are the raw softmax probabilities of the kept
    experts, so a row sums to at most 1 (exactly 1 when every expert is kept).

    NOTE: Huang et al. (2024) keep the smallest set whose probability mass exceeds p and weight
    the experts by their raw probabilities; they have no temperature. The reference adds one in an
    unusual way that we follow: it divides the PROBABILITIES (not the logits, and with no
    re-softmax) by the temperature, uses those divided values both for the cumulative threshold and
    as the combination weights. So with temperature T > 0 the kept weights are p/T and need not sum
    to 1 (T < 1 keeps fewer experts and amplifies them, T > 1 keeps more and damps them).
    """
    p = F.softmax(logits.float(), dim=-1)                       # (N, E)
    q = p / temperature if temperature > 0.0 else p             # reference: probabilities / T
    return q * top_p_mask(q, top_p)                             # (N, E) dense, zeros elsewhere


def expert_capacity(n_tokens, num_experts, capacity_factor):
    """Switch expert capacity: ceil(capacity_factor * n_tokens / E) (Fedus et al. 2021, sec. 2.2).

    n_tokens counts the real (non-padding) tokens of the routing group. The product is rounded to 6
    decimals before the ceiling so that e.g. 1.1 * 10 does not become 12 through float error.
    """
    return math.ceil(round(capacity_factor * n_tokens / num_experts, 6))


def switch_weights(logits, token_mask, capacity, group_size=None):
    """Switch top-1 routing with a hard expert capacity (Fedus et al. 2021, sec. 2.1-2.2).

        p = softmax(z),  e_t = argmax_e p_t,e                           fp32, ties: lowest index
        pos_t = 1 + number of earlier REAL tokens of the same group routed to e_t
        w_t,e_t = p_t,e_t  if token t is real and pos_t <= capacity,    0 otherwise

    Capacity is assigned first come, first served, in token order (row-major over (B, T), i.e. the
    order of the flattened batch), as the Switch Transformer and the reference do with a cumulative
    sum over tokens. A token past capacity ("overflow") gets an all-zero row: it skips the experts
    and keeps only the residual connection. Padding tokens (token_mask False) are never routed and
    consume no capacity (their FFN output is 0, which nobody reads). token_mask None = all real.

    group_size: None = the N tokens form one group (the default, capacity counted over the batch);
    an integer G = consecutive groups of G tokens each with its own capacity (the reference's
    per-sequence `expert_capacity`, G = T). N must be a multiple of G.

    Routed tokens are weighted by their router probability p_max, which is what trains the router
    (the argmax itself has no gradient).

    NOTE: the reference (and HF SwitchTransformers) gives overflow tokens p_max * x instead (the FFN
    returns its input, scaled), and its per-sequence capacity counts padding tokens too.
    """
    p = F.softmax(logits.float(), dim=-1)                               # (N, E)
    n, e = p.shape
    real = torch.ones(n, 1, dtype=torch.long, device=p.device) if token_mask is None \
        else token_mask.reshape(n, 1).long()                            # (N, 1) None = all real
    top = F.one_hot(p.argmax(dim=-1), e) * real                         # (N, E) 0/1, padding -> 0
    g = n if group_size is None else group_size
    if g == 0 or n % g != 0:
        raise ValueError(f"switch_weights: {n} tokens do not split into groups of {group_size}")
    pos = top.reshape(n // g, g, e).cumsum(dim=1).reshape(n, e)         # (N, E) 1-based queue place
    kept = (top > 0) & (pos <= capacity)                                # (N, E) first come first served
    return p * kept                                                     # (N, E) p_max or all-zero row


# ----------------------------------------------------------------------------------------------------
# The strategy table. A rule maps (logits (N, E) fp32, token_mask (N,) bool, group, cfg) to
# (weights (N, E) fp32, selected (N, E) bool): the routing weights and the experts each token chose,
# which is what its load-balancing loss counts (losses.load_balancing_loss). group is the tokens per
# sequence T when the router saw (B, T, D), else None.


def route_top_k(logits, token_mask, group, cfg):
    """Top-k; selected = the k experts with a weight.

    NOTE: w > 0 is the top-k set unless a probability underflows to 0 in fp32 (a logit gap above
    ~100), where that expert counts as unselected; HF's loss would count it."""
    w = top_k_weights(logits, cfg.top_k)
    return w, w > 0


def route_top_p(logits, token_mask, group, cfg):
    """Top-p; selected = the top-p set (the experts with a weight)."""
    w = top_p_weights(logits, cfg.top_p, cfg.temperature)
    return w, w > 0


def route_switch(logits, token_mask, group, cfg):
    """Switch top-1 with capacity; selected = the argmax BEFORE the capacity cut (the reference's
    "recompute expert indexes": a dropped token still counts for its expert in the balance loss)."""
    if cfg.expert_capacity is not None:
        # Reference rule: a fixed capacity per sequence (but padding consumes none here).
        w = switch_weights(logits, token_mask, cfg.expert_capacity, group_size=group)
    else:
        # One sync per layer to read the real-token count; capacity is a plain Python int.
        cap = expert_capacity(int(token_mask.sum()), cfg.num_experts, cfg.capacity_factor)
        w = switch_weights(logits, token_mask, cap)
    return w, F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).bool()


def route_dense(logits, token_mask, group, cfg):
    """Dense softmax (LoRAMoE): every expert on every token, weighted by its probability; selected = all."""
    w = F.softmax(logits.float(), dim=-1)
    return w, torch.ones_like(w, dtype=torch.bool)


def top_k_experts(cfg, num_experts):
    """The most experts a token passes through (memory.py's activation estimate): top-k's k."""
    return cfg.top_k


def every_expert(cfg, num_experts):
    """All E: dense routing; and top-p, whose near-uniform routers keep most experts early in training."""
    return num_experts


def one_expert(cfg, num_experts):
    """Switch: one expert a token (none for a token past capacity)."""
    return 1


def init_normal(weight, init_range):
    """The reference's MixLoRA router init: N(0, init_range^2)."""
    nn.init.normal_(weight, mean=0.0, std=init_range)


def init_kaiming_uniform(weight, init_range):
    """The reference's LoRAMoE / MoLA router init: kaiming_uniform_(a=sqrt(init_range)), i.e. U(-b, b) with
    b = sqrt(6 / ((1 + init_range) D)); the default 5.0 gives nn.Linear's own b = 1/sqrt(D)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(init_range))


@dataclass(frozen=True)
class Strategy:
    """One routing strategy: its rule, the settings the rule reads (shown by Router's repr, range-
    checked by RouterConfig), its router init, how many experts a token passes through at most, and its
    defaults for the STRATEGY_DEFAULTS keys."""

    rule: Callable               # (logits, token_mask, group, cfg) -> (weights, selected)
    settings: tuple              # RouterConfig fields the rule reads
    init: Callable               # (weight (E, D), router_init_range) -> None, in place
    experts_per_token: Callable  # (cfg, E) -> the most experts a token passes through (memory.py)
    router_init_range: float
    jitter_noise: float
    router_aux_loss_coef: float  # 0 = no load-balancing loss
    router_z_loss_coef: float    # 0 = no z-loss


# Defaults are the reference code's (mixlora.md sec. 3-5): the MixLoRA paper text says 1e-2 for the
# balance coefficient, the code and the paper's ablation (Table 9) 1e-3; only Switch adds a z-loss.
STRATEGIES = {
    "mixlora": Strategy(route_top_k, ("top_k",), init_normal, top_k_experts, router_init_range=0.02, jitter_noise=0.0,
                        router_aux_loss_coef=0.001, router_z_loss_coef=0.0),
    "mixlora-dynamic": Strategy(route_top_p, ("top_p", "temperature"), init_normal, every_expert, router_init_range=0.02,
                                jitter_noise=0.0, router_aux_loss_coef=0.001, router_z_loss_coef=0.0),
    "mixlora-switch": Strategy(route_switch, ("capacity_factor", "expert_capacity"), init_normal, one_expert,
                               router_init_range=1.0, jitter_noise=0.01, router_aux_loss_coef=0.001,
                               router_z_loss_coef=0.001),
    # a router in every adapted projection (moe_linear.py); the reference has no LoRAMoE router loss and
    # MoLA's is off unless asked for (`router_loss`, then 0.001)
    "loramoe": Strategy(route_dense, (), init_kaiming_uniform, every_expert, router_init_range=5.0, jitter_noise=0.0,
                        router_aux_loss_coef=0.0, router_z_loss_coef=0.0),
    "mola": Strategy(route_top_k, ("top_k",), init_kaiming_uniform, top_k_experts, router_init_range=5.0, jitter_noise=0.0,
                     router_aux_loss_coef=0.0, router_z_loss_coef=0.0),
}


# ----------------------------------------------------------------------------------------------------
# The router module


class Router(nn.Module):
    """A bias-free linear router W (E, D) in fp32 plus its strategy's rule (STRATEGIES).

        z = jitter(x) @ W^T             (N, E) fp32 logits, returned for the router losses
        weights, selected = rule(z)     (N, E) fp32 dense routing matrix, (N, E) bool

    `config` is a RouterConfig (or the moe_lora.MixLoRAConfig that extends it); the router reads its
    settings from it. Parameter `weight` (E, D), init by the strategy: N(0, router_init_range^2),
    0.02 for "mixlora"/"mixlora-dynamic" and 1.0 for "mixlora-switch" by default (the reference's).
    In the MixLoRA FFN the module is attribute `moe_gate`, so its tensor is `...mlp.moe_gate.weight`
    as in the reference's adapter files.

    Jitter (Fedus et al. 2021, sec. 2.4; reference `jitter_noise`): in training only, the router
    INPUT is multiplied by noise U(1 - eps, 1 + eps), out of place.
    NOTE: the reference's top-k and top-p blocks multiply x in place, so their experts see the
    jittered input too; here (as in the reference's Switch block) the experts see the clean x.

    Capacity for "mixlora-switch": by default ceil(capacity_factor * n_real / E) with n_real the
    number of real tokens in the batch. With `expert_capacity` set, that fixed integer is the
    capacity of each sequence (the reference's rule; its default there is 32): pass x as (B, T, D)
    so the router knows where sequences start, otherwise the N tokens count as one sequence.
    The same rule runs at inference (NOTE: the reference's Switch block returns its input unchanged
    at inference, discarding the experts; we do not copy that bug).
    """

    def __init__(self, hidden_size, config):
        super().__init__()
        self.hidden_size, self.config = hidden_size, config
        self.strategy = STRATEGIES[config.routing_strategy]
        # fp32 even inside a bf16 model: forward casts anyway, but an fp32 master copy routes exactly.
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size, dtype=torch.float32))
        self.strategy.init(self.weight, config.router_init_range)

    def forward(self, x, token_mask=None):
        """x (N, D) or (B, T, D); token_mask (N,) or (B, T) bool, True = real token (None: all real).

        Returns (logits (N, E) fp32, weights (N, E) fp32, selected (N, E) bool), flattened to N rows.
        """
        d = x.shape[-1]
        group = x.shape[-2] if x.dim() == 3 else None                   # tokens per sequence (T)
        h = x.reshape(-1, d).float()                                    # (N, D) fp32
        n = h.shape[0]
        if token_mask is None:
            mask = torch.ones(n, dtype=torch.bool, device=h.device)     # (N,)
        else:
            mask = token_mask.reshape(n).bool()                         # (N,)
        eps = self.config.jitter_noise
        if self.training and eps > 0.0:
            h = h * torch.empty_like(h).uniform_(1.0 - eps, 1.0 + eps)  # out of place
        with torch.autocast(h.device.type, enabled=False):              # routing stays fp32 under autocast
            logits = F.linear(h, self.weight.float())                   # (N, E)
        weights, selected = self.strategy.rule(logits, mask, group, self.config)  # (N, E), (N, E)
        return logits, weights, selected

    def extra_repr(self):
        c = self.config
        rule = ", ".join(f"{k}={getattr(c, k)}" for k in self.strategy.settings)
        return (f"hidden_size={self.hidden_size}, num_experts={c.num_experts}, "
                f"strategy={c.routing_strategy!r}, {rule}, jitter_noise={c.jitter_noise}")


# ----------------------------------------------------------------------------------------------------
# Router statistics for log lines


@torch.no_grad()
def router_stats(aux_list, token_mask=None):
    """Per MoE layer: "load" (L, E), the fraction of routed (token, expert) assignments of real tokens that
    went to each expert (each row sums to 1; for a dense router (LoRAMoE), which sends every token to every
    expert, the fraction of the routing weight instead); "experts" (L,), each layer's expert count (a layer
    with fewer than E experts has zeros after them: MoLA's per-layer counts); "entropy" (L,), the mean over
    real tokens of the entropy (nats) of softmax(router logits) (log E = uniform); "gate" (L,), the mean
    sigmoid quality gate, if present. A layer's aux may pool several routers ("routers": P, moe_linear.py)."""
    load, ent, gate = [], [], []
    for a in aux_list:
        if not a or "router_logits" not in a:
            continue                                                # not a MoE layer
        n = a["router_logits"].shape[0] // a.get("routers", 1)      # tokens per router
        m0 = torch.ones(n, dtype=torch.bool) if token_mask is None else token_mask.reshape(n).bool().cpu()
        m = m0.repeat(a.get("routers", 1))                          # (P*N,) the mask of every router
        w = a["router_weights"].detach().float().cpu()[m]           # (n', E)
        c = w.sum(0) if a.get("dense") else (w > 0).float().sum(0)  # (E,) weight mass or assignments
        load.append(c / c.sum().clamp(min=1e-12 if a.get("dense") else 1.0))
        logp = F.log_softmax(a["router_logits"].detach().float().cpu()[m], dim=-1)   # (n, E)
        ent.append(-(logp.exp() * logp).sum(-1).mean())
        if "gate_logits" in a:
            gate.append(torch.sigmoid(a["gate_logits"].detach().float().cpu().reshape(n)[m0]).mean())
    E = max((len(c) for c in load), default=0)
    out = {"load": torch.stack([F.pad(c, (0, E - len(c))) for c in load]) if load else torch.zeros(0),
           "experts": torch.tensor([len(c) for c in load]),
           "entropy": torch.stack(ent) if ent else torch.zeros(0)}
    if gate:
        out["gate"] = torch.stack(gate)
    return out


# ----------------------------------------------------------------------------------------------------
# Demo

if __name__ == "__main__":
    torch.manual_seed(0)
    B, T, D, E = 2, 5, 16, 4
    x = torch.randn(B, T, D)                                    # (B, T, D)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    for strategy in STRATEGIES:
        cfg = RouterConfig(num_experts=E, routing_strategy=strategy, top_p=0.6, router_init_range=0.5)
        router = Router(D, cfg).eval()
        logits, weights, selected = router(x, mask)             # (N, E), (N, E), (N, E)
        print(router)
        print("  experts per token:", (weights > 0).sum(-1).tolist())
        print("  row sums:         ", [round(v, 3) for v in weights.sum(-1).tolist()])
