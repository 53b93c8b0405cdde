"""
losses.py: every loss of the project, as pure functions returning scalar tensors.

    router losses     load_balancing_loss (every     (MixLoRA / MoE-PEFT, Switch, ST-MoE)
                      router's), router_z_loss
    quality losses    quality_loss(kind=...)          (Select-MoE quality gate)
    task losses       lm_loss, lm_loss_from_hidden,   (next-token CE, the second fused with the LM head;
                      classification_loss             sequence classification)
    the objective     adapter_losses                  CE + aux_coef * (LB + w_q * L_q) + z_coef * Z

References: Switch Transformer (Fedus et al. 2021, arXiv 2101.03961, sec. 2.2 eq. 4-6), ST-MoE
(Zoph et al. 2022, arXiv 2202.08906, sec. 3.1 eq. 5), Mixtral / HF `load_balancing_loss_func`,
MixLoRA (Li et al. 2024, arXiv 2404.15159, sec. 3, auxiliary loss) as coded in MoE-PEFT,
Huang et al. 2024 (dynamic routing), and Select-MoE (FGinfinite/Qualitiy-Gate, no paper; see
../shared/reference/select_moe.md sec. 3). Every docstring states what is averaged and how padding
is masked. The losses return UNSCALED values; adapter_losses applies the coefficients of the adapter
config (their defaults, per routing strategy, are in routers.STRATEGIES). The balance loss reads the
experts each token selected from the router's output (routers.py says why), so this file has no
per-strategy code and imports no project file.

Checked by test_all.py's loss tests against hand-worked values (3 tokens x 2 experts for each router,
a 2 x 3 batch for each quality loss and averaging), uniform routing giving k, masked padding
changing nothing, gradients reaching a gate weight through every quality loss, and the objective's
formula on a hand-built case.
Run `python losses.py` for a small demo.

Shape legend: B batch, T time, N = B*T tokens, L layers, E experts, K top-k, V vocab, C classes.
"""

import torch
import torch.nn.functional as F

# Select-MoE quality_loss_weight: 0.5 in its config class but 1.0 in stage_1_warmup.yaml (the value in effect).
QUALITY_LOSS_WEIGHT = 1.0
# Select-MoE moment-matching defaults (SelectMoeConfig): Beta(2,2) has mean 0.5 and variance 0.05.
BETA_TARGET_MEAN, BETA_TARGET_VAR, W_MEAN, W_VAR, LAMBDA_VAR = 0.5, 0.05, 1.0, 1.0, 0.1
QUALITY_LOSS_KINDS = ("sigmoid", "mse", "bce", "beta_moment_matching", "mean_variance_regularization")

# ----------------------------------------------------------------------------------------------------
# Helpers


def _pool_layers(router_logits, token_mask):
    """Concatenate the layers' router logits along the token axis, and tile the mask to match.

    router_logits: a list over layers of (N, E) (any (..., E) is flattened), or one tensor; a layer may
    hold P routers' logits one after the other, (P*N, E) (moe_linear.py: a router per projection).
    token_mask: (N,) or (B, T) bool/0-1, True = real token; None = every token counts.
    Returns z (M, E) fp32 and m (M,) fp32 0/1, M = L*N (or the sum of the layers' P*N).
    """
    layers = [router_logits] if torch.is_tensor(router_logits) else list(router_logits)
    if not layers:
        raise ValueError("router_logits: expected at least one layer, got an empty list")
    e = layers[0].shape[-1]
    z = torch.cat([l.reshape(-1, e).float() for l in layers])         # (L*N, E)
    if token_mask is None:
        return z, torch.ones(z.shape[0], device=z.device)
    m = token_mask.reshape(-1).to(z)                                   # (N,)
    rows = [l.numel() // e for l in layers]
    if any(n % m.shape[0] for n in rows):
        raise ValueError(f"token_mask: {m.shape[0]} tokens but the layers have {rows} router rows")
    return z, torch.cat([m.repeat(n // m.shape[0]) for n in rows])     # (M,) tiled per router


def _masked_mean(v, m):
    """Mean of v (M, ...) over its first axis, counting only rows with m (M,) = 1; 0 if none."""
    m = m.reshape(-1, *([1] * (v.dim() - 1)))
    return (v * m).sum(0) / m.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------------------------------
# Router losses (inputs: lists over layers of router logits (N, E) fp32 and of the router's
# selection (N, E) bool, token_mask (N,))


def load_balancing_loss(router_logits, selected, token_mask=None):
    """Load-balancing loss of every router (Switch eq. 4; in its top-k form HF Mixtral's
    `load_balancing_loss_func`), counting the experts the router selected.

        p_t = softmax(z_t);   S_t = {e : selected[t, e]}
        f_e = sum_t m_t [e in S_t] / sum_t m_t          fraction of real tokens that selected e
        P_e = sum_t m_t p_t,e / sum_t m_t                mean router probability of e
        L_LB = E * sum_e f_e P_e

    `selected` is what routers.Router returns beside its weights, so the loss counts exactly what the
    router did (uniform routing, p_t,e = 1/E, gives the mean number of experts selected per token):
        "mixlora"          the top-k set (MoE-PEFT `_mixtral_load_balancing_loss_func`)    uniform: k
        "mixlora-dynamic"  the top-p set of p / temperature                                 uniform: all E
                           (`_dynamic_load_balancing_loss_func`; P uses the untempered p)   at top_p 0.8
        "mixlora-switch"   the argmax BEFORE the capacity cut: dropped tokens still count   uniform: 1
                           for their expert (`SwitchRouterLoss`, written E^2 mean_e f_e P_e)

    Averaged over: the real tokens of ALL layers pooled. Like the reference and HF Mixtral, the
    layers' logits are concatenated along the token axis and the loss is computed once, so it is a
    mean over layers in its normalisation (never a sum), but f and P are pooled before the product:
    it is not the mean of per-layer losses (the tests show a 2-layer case where the two differ).
    Padding: m_t = token_mask, tiled over layers; padding rows count in neither sum.
    Reference top-k f is per slot j (k, E) and summed in the product; summing over j first is identical.
    NOTE: the reference's dynamic and Switch losses pass no mask and count padding tokens;
    token_mask=None reproduces them. Huang et al. (2024, sec. 3.2) pair the top-p loss with an
    entropy loss that the reference does not use.
    Routers with different expert counts (MoLA's per-layer counts, moe_linear.py) are pooled per count
    g and the losses weighted by each group's share of the router rows: L = sum_g (n_g / n) L_LB(g).
    With one count (MixLoRA; MoLA as the reference has it, which pools every projection's logits of
    every layer) that is the single pooled loss above. NOTE: the grouping is ours (one count there).
    """
    layers = [router_logits] if torch.is_tensor(router_logits) else list(router_logits)
    chosen = [selected] if torch.is_tensor(selected) else list(selected)
    counts = sorted({l.shape[-1] for l in layers})
    if len(counts) > 1:
        rows = [l.numel() // l.shape[-1] for l in layers]
        groups = [[i for i, l in enumerate(layers) if l.shape[-1] == e] for e in counts]
        return sum(sum(rows[i] for i in g) / sum(rows) *
                   load_balancing_loss([layers[i] for i in g], [chosen[i] for i in g], token_mask) for g in groups)
    z, m = _pool_layers(layers, token_mask)                            # (L*N, E), (L*N,)
    layers = chosen
    s = torch.cat([x.reshape(-1, z.shape[-1]) for x in layers]).float()  # (L*N, E) 0/1
    if s.shape != z.shape:
        raise ValueError(f"selected: expected {tuple(z.shape)} (the router logits' shape), "
                         f"got {tuple(s.shape)}")
    f = _masked_mean(s, m)                                             # (E,) sum_e f_e = experts/token
    p_mean = _masked_mean(F.softmax(z, dim=-1), m)                     # (E,)
    return z.shape[-1] * (f * p_mean).sum()


def router_z_loss(router_logits, token_mask=None):
    """Router z-loss (ST-MoE, Zoph et al. 2022, sec. 3.1, eq. 5): keeps router logits small.

        L_z = (1/N) sum_t (log sum_e exp z_t,e)^2

    Averaged over: real tokens of all layers pooled (with equal tokens per layer this is exactly the
    mean over layers of the per-layer z-loss). Padding: masked by token_mask.
    NOTE: the reference (SwitchRouterLoss) does not mask padding; token_mask=None reproduces it.
    """
    z, m = _pool_layers(router_logits, token_mask)                     # (L*N, E), (L*N,)
    return _masked_mean(torch.logsumexp(z, dim=-1) ** 2, m)


def localized_balancing_loss(router_weights, token_mask, sample_types, blc_alpha):
    """LoRAMoE's localized balancing constraint (Dou et al. 2023, sec. 3.2), as the authors' code has it.

        Q_b,e = sum_t m_b,t w_b,t,e           importance of expert e for sample b        (B, E)
        I_b,e = 1 + delta  if expert e is in sample b's group, else 1 - delta
                group of type-1 samples: the first floor(E/2) experts; type 0: the others
        L_lbc = Var(Z) / Mean(Z)^2,  Z = I * Q over its B*E entries (unbiased variance, eps 1e-10)

    Z is balanced when the experts of each group share their samples' weight evenly, while delta > 0
    lets a group take more of its own type's weight. router_weights: a list over routers (projections)
    of dense routing weights (N, E), N = B*T; token_mask (B, T), True = real token (None: all real);
    sample_types (B,) 0/1; delta = blc_alpha. Averaged over the routers (a mean, so the coefficient
    does not depend on depth). Padding: m_b,t = 0, so pads add nothing to Q.
    NOTE: the authors' code (Ablustrund/LoRAMoE `cv_squared`) sums padding into Q and, for an odd E,
    builds a mask of E - 1 columns (an error); the second group takes the odd expert here. MoE-PEFT,
    the reference, leaves the constraint out.
    """
    types = torch.as_tensor(sample_types).reshape(-1)                          # (B,)
    B = types.shape[0]
    out = []
    for w in router_weights:
        E = w.shape[-1]
        w = w.float().reshape(B, -1, E)                                        # (B, T, E)
        m = torch.ones(w.shape[:2], device=w.device) if token_mask is None else \
            token_mask.reshape(B, -1).to(w)                                    # (B, T)
        Q = (w * m[..., None]).sum(1)                                          # (B, E)
        first = torch.arange(E, device=w.device) < E // 2                      # (E,) the type-1 group
        same = first[None, :] == (types.to(w.device)[:, None] == 1)            # (B, E)
        Z = (Q * torch.where(same, 1.0 + blc_alpha, 1.0 - blc_alpha)).reshape(-1)  # (B*E,)
        out.append(Z.var() / (Z.mean() ** 2 + 1e-10) if Z.numel() > 1 else Z.sum() * 0.0)
    return torch.stack(out).mean()


# ----------------------------------------------------------------------------------------------------
# Quality (Select-MoE) losses (inputs: list over layers of gate logits s (B, T), token_mask (B, T))


def _mean_over_tokens(r, m, sample_wise):
    """Average per-token values r (B, T) over valid tokens m (B, T) (Select-MoE sec. 3.2).

    token-wise:  sum_{b,t} m r / sum_{b,t} m                                 (0 if no valid token)
    sample-wise: mean over samples with >= 1 valid token of (sum_t m r / sum_t m)
    """
    if not sample_wise:
        return (r * m).sum() / m.sum().clamp(min=1.0)
    n_b = m.sum(dim=1)                                                 # (B,) valid tokens per sample
    per_sample = (r * m).sum(dim=1) / n_b.clamp(min=1.0)               # (B,)
    has = (n_b > 0).to(r)                                              # (B,)
    return (per_sample * has).sum() / has.sum().clamp(min=1.0)


def _moments(g, m, sample_wise):
    """Mean and unbiased variance of the pooled gate values, differentiable.

    Pooling unit: token-wise, every valid token of the micro-batch (the reference as coded);
    sample-wise, one value per sample with >= 1 valid token, the mean gate over its valid tokens.
    The second unit is the one that matters for data selection: the score ranks SAMPLES, so a
    target distribution (Beta(2,2), or "spread around 0.5") should hold across samples, not across
    one sample's tokens (which is what the reference pools with its batch size of 1, where the
    loss cannot make samples differ). With fewer than 2 pooled values the variance is taken as 0.
    """
    if sample_wise:
        n_b = m.sum(dim=1)                                             # (B,)
        vals = ((g * m).sum(dim=1) / n_b.clamp(min=1.0))[n_b > 0]      # (B',) per-sample mean gate
    else:
        vals = g[m > 0]                                                # (M,) valid tokens
    if vals.numel() == 0:
        return g.sum() * 0.0, g.sum() * 0.0                            # no valid token: 0, still a graph
    mu = vals.mean()
    var = vals.var(unbiased=True) if vals.numel() > 1 else vals.sum() * 0.0
    return mu, var


def quality_loss(gate_logits, token_mask, kind="sigmoid", *, sample_wise=False, labels=None,
                 beta_target_mean=BETA_TARGET_MEAN, beta_target_var=BETA_TARGET_VAR,
                 w_mean=W_MEAN, w_var=W_VAR, lambda_var=LAMBDA_VAR):
    """Select-MoE quality-gate loss L_q (select_moe.md sec. 3), averaged with equal weight over layers.

    g_{l,b,t} = sigmoid(s_{l,b,t}) is the layer-l gate of token t of sample b; m_{b,t} the token mask.
    Per-layer loss L_l by kind:
        "sigmoid"   r = g                      mean gate value (the reference's default): pushes
                                               tokens to the trash, against the LM loss
        "mse"       r = g^2                    squared penalty, target 0
        "bce"       r = BCE(s, y_b)            = -(y_b log g + (1 - y_b) log(1 - g)), with per-sample
                                               quality labels y (B,) in [0, 1] broadcast over tokens
                                               (the form the design note describes; BCE-with-logits
                                               for numerical stability)
        for these, L_l = token-wise or sample-wise mean of r (see below)
        "beta_moment_matching"          L_l = w_mean (mu - beta_target_mean)^2
                                              + w_var (v - beta_target_var)^2
        "mean_variance_regularization"  L_l = (mu - 0.5)^2 - lambda_var * v
        where mu, v are the mean and unbiased variance of the pooled gate values: every valid token
        (token-wise) or every sample's mean gate (sample-wise); see _moments for why.
    L_q = (1/L) sum_l L_l.

    Averaging (sample_wise, the reference's `sample_wise_averaging`): token-wise is the mean of r
    over all valid tokens of the batch; sample-wise is the mean over each sample's valid tokens,
    then over the samples that have any. Padding (token_mask False) is masked out everywhere;
    a layer with no valid token contributes 0.
    Defaults (SelectMoeConfig): beta_target_mean 0.5, beta_target_var 0.05, w_mean 1.0, w_var 1.0,
    lambda_var 0.1; kind "sigmoid"; sample_wise False in the config class but True in the
    reference's stage-1 yaml.
    NOTE: the reference computes both moment losses through `.item()`, so they carry no gradient
    (its bug B2); here every kind is differentiable in the gate logits.
    """
    if kind not in QUALITY_LOSS_KINDS:
        raise ValueError(f"quality_loss_type: unknown {kind!r}, "
                         f"expected one of {', '.join(QUALITY_LOSS_KINDS)}")
    layers = [gate_logits] if torch.is_tensor(gate_logits) else list(gate_logits)
    if not layers:
        raise ValueError("gate_logits: expected at least one layer, got an empty list")
    s0 = layers[0]
    m = (torch.ones(s0.shape[:2], device=s0.device) if token_mask is None
         else token_mask.reshape(s0.shape[0], -1).float())             # (B, T)
    if kind == "bce":
        if labels is None or labels.numel() != m.shape[0]:
            got = None if labels is None else tuple(labels.shape)
            raise ValueError(f"quality_loss: kind 'bce' needs per-sample quality labels ({m.shape[0]},), "
                             f"got {got}")
        y = labels.reshape(-1, 1).float().expand_as(m)                 # (B, T) label broadcast
    per_layer = []
    for s in layers:
        s = s.reshape(m.shape).float()                                 # (B, T) ((B, T, 1) accepted)
        g = torch.sigmoid(s)                                           # (B, T)
        if kind == "sigmoid":
            per_layer.append(_mean_over_tokens(g, m, sample_wise))
        elif kind == "mse":
            per_layer.append(_mean_over_tokens(g * g, m, sample_wise))
        elif kind == "bce":
            r = F.binary_cross_entropy_with_logits(s, y, reduction="none")  # (B, T)
            per_layer.append(_mean_over_tokens(r, m, sample_wise))
        else:
            mu, v = _moments(g, m, sample_wise)
            if kind == "beta_moment_matching":
                per_layer.append(w_mean * (mu - beta_target_mean) ** 2
                                 + w_var * (v - beta_target_var) ** 2)
            else:
                per_layer.append((mu - 0.5) ** 2 - lambda_var * v)
    return torch.stack(per_layer).mean()                               # equal weight per layer


# ----------------------------------------------------------------------------------------------------
# Task losses


def lm_loss(logits, targets, reduction="sum"):
    """Next-token cross-entropy in fp32: -sum_i log softmax(logits_i)[targets_i].

    logits (M, V) are the LM-head outputs at the M positions that have a target (already shifted:
    row i predicts targets[i]); targets (M,) long, -100 = ignored. reduction "sum" (default: train.py
    divides by the number of target tokens of the whole optimiser step, so that gradient accumulation
    weighs every token equally), "mean" or "none".
    """
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction=reduction)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T, t_i) over (M, D) rows h, chunk by chunk: the (M, V) logits never exist at once.

    For a chunk, z = h W^T (c, V) fp32, m = max_v z, e = exp(z - m) (in place of z), s = sum_v e:
        loss_i = m_i + log s_i - z_i[t_i]
        dL/dz = e / s - onehot(t),  so  dL/dh = (e W) / s - W[t]  and  dL/dW = e^T (h / s) - onehot(t)^T h
    The gradient is known in the forward, so it is formed there and the backward only scales it by the
    incoming scalar; dividing by s and subtracting the one-hot happen on (c, D) tensors, not (c, V). This
    is the "fused linear cross-entropy" of Liger Kernel (Hsu et al. 2024) and Cut Cross-Entropy (Wijmans
    et al. 2024): on a 49k vocabulary it replaces ~10 passes over an (M, V) tensor (logits, log-softmax,
    its gradient, the one-hot) with 4 passes over one (c, V) chunk and no (M, V) allocation."""

    @staticmethod
    def forward(ctx, h, w, targets, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_h else None  # (M, D)
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None  # (V, D)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], chunk):
            hc, t = h[i:i + chunk], targets[i:i + chunk]                 # (c, D), (c,)
            valid = (t != -100)[:, None]                                 # (c, 1)
            tc = t.clamp(min=0)                                          # ignored rows: any index
            z = F.linear(hc, w).float()                                  # (c, V) logits
            zt = z.gather(1, tc[:, None])                                # (c, 1) target logit
            m = z.amax(-1, keepdim=True)                                 # (c, 1)
            e = z.sub_(m).exp_()                                         # (c, V) exp(z - m), in place of z
            se = e.sum(-1, keepdim=True)                                 # (c, 1)
            total += ((m + se.log() - zt) * valid).sum()
            scale = valid / se                                           # (c, 1) 1/s, 0 on ignored rows
            if need_h:
                dh[i:i + chunk] = F.linear(e.to(w.dtype), w.t()) * scale - w[tc].float() * valid  # (c, D)
            if need_w:
                hf = hc.float()
                dw.addmm_(e.t(), hf * scale).index_add_(0, tc, -hf * valid)  # (V, D)
        ctx.save_for_backward(dh, dw)
        return total

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        return (None if dh is None else (dh * grad)), (None if dw is None else (dw * grad)), None, None


def lm_loss_from_hidden(hidden, weight, targets, reduction="sum", chunk=512):
    """lm_loss(hidden @ weight^T, targets) without the (M, V) logits tensor: same value, same gradients.

    hidden (M, D) final normed states at the M positions with a target, weight (V, D) the LM head,
    targets (M,) long, -100 = ignored; reduction "sum" or "mean" (over non-ignored targets). Rows are
    processed `chunk` at a time (512 x 49k fp32 = 100 MB). Peak memory falls from ~3 (M, V) tensors to
    one (chunk, V). The loss is fp32 whatever the dtype of hidden (as lm_loss). Checked against lm_loss,
    values and gradients, by test_lm_loss_from_hidden_matches_lm_loss_on_full_logits."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction={reduction!r}: lm_loss_from_hidden supports 'sum' or 'mean'")
    total = _LinearCrossEntropy.apply(hidden, weight, targets, chunk)
    if reduction == "mean":
        total = total / (targets != -100).sum().clamp(min=1)
    return total


def classification_loss(logits, labels, multi_label=False):
    """Sequence-classification loss on pooled logits (B, C) (MoE-PEFT `ClassificationOutputLayer`).

    single-label: cross-entropy, labels (B,) long class ids, mean over the batch;
    multi-label:  binary cross-entropy with logits, labels (B, C) in {0, 1}, mean over B*C entries
                  (torch's BCEWithLogitsLoss default, as the reference uses it). fp32.
    """
    logits = logits.float()
    if multi_label:
        if labels.shape != logits.shape:
            raise ValueError(f"multi-label labels: expected shape {tuple(logits.shape)}, "
                             f"got {tuple(labels.shape)}")
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    return F.cross_entropy(logits, labels.reshape(-1).long())


# ----------------------------------------------------------------------------------------------------
# The training objective


def adapter_losses(aux, token_mask, cfg, quality=None, quality_mask=None, sample_types=None):
    """The adapter's terms of the training objective, each multiplied by its coefficient, as a dict for
    logging; train.py and bench.py add their sum to the task loss:

        loss = CE + router_aux_loss_coef * (L_LB + quality_loss_weight * L_q) + router_z_loss_coef * L_z

    "aux" = router_aux_loss_coef * L_LB (load_balancing_loss on the router's own selection),
    "z" = router_z_loss_coef * L_z, "quality" = router_aux_loss_coef * quality_loss_weight * L_q; a term
    whose coefficient is 0 is left out (which router losses apply is the strategy's default, see
    routers.STRATEGIES: the z-loss for Switch only, as in the reference). The bracket is Select-MoE's
    total loss exactly as coded (its README leaves out the factor router_aux_loss_coef, which is 0.01
    there; quality_loss_weight 1.0 in its stage-1 yaml, 0.5 in its config class); the z term is MoE-PEFT's
    Switch loss (z_coef * z + aux_coef * aux), mixlora.md section 5.
    aux: the model's per-layer outputs (None for plain layers: no terms), each {"router_logits",
    "router_selected", "gate_logits" when gated}; cfg: the adapter config (coefficients, quality
    settings); token_mask (N,) or None; quality: the micro-batch's per-sample labels (bce only);
    quality_mask: the (N,) tokens L_q averages over (default token_mask; train.py's --quality-tokens).
    LoRAMoE (moe_linear.py): "blc" = blc_weight * localized_balancing_loss when blc_weight > 0, which needs
    sample_types, the micro-batch's (B,) sample types 0/1; a layer's aux there pools its P routers."""
    aux = [x for x in aux if x is not None]
    if not aux or "router_logits" not in aux[0]:
        return {}
    logits = [x["router_logits"] for x in aux]                                   # L x (N,E)
    terms = {}
    if cfg.router_aux_loss_coef:
        lb = load_balancing_loss(logits, [x["router_selected"] for x in aux], token_mask)
        terms["aux"] = cfg.router_aux_loss_coef * lb
    if cfg.router_z_loss_coef:
        terms["z"] = cfg.router_z_loss_coef * router_z_loss(logits, token_mask)
    if getattr(cfg, "quality_gate", False) and "gate_logits" in aux[0]:  # Select-MoE gate, when present
        labels = torch.tensor(quality, device=logits[0].device) if cfg.quality_loss_type == "bce" else None
        q = quality_loss([x["gate_logits"] for x in aux], token_mask if quality_mask is None else quality_mask,
                         cfg.quality_loss_type, sample_wise=cfg.sample_wise_averaging, labels=labels,
                         beta_target_mean=cfg.beta_target_mean, beta_target_var=cfg.beta_target_var,
                         w_mean=cfg.w_mean, w_var=cfg.w_var, lambda_var=cfg.lambda_var)
        terms["quality"] = cfg.router_aux_loss_coef * cfg.quality_loss_weight * q
    if getattr(cfg, "blc_weight", 0.0):  # LoRAMoE's localized balancing constraint
        if sample_types is None:
            raise ValueError("blc_weight > 0 needs a sample type (0 or 1) for every training sample")
        weights = [w for x in aux for w in x["router_weights"].chunk(x.get("routers", 1))]  # (L*P) x (N, E)
        terms["blc"] = cfg.blc_weight * localized_balancing_loss(weights, token_mask, sample_types, cfg.blc_alpha)
    return terms


# ----------------------------------------------------------------------------------------------------
# Demo

if __name__ == "__main__":
    torch.manual_seed(0)
    L, B, T, E = 2, 2, 4, 4
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)  # (B, T)
    logits = [torch.randn(B * T, E) for _ in range(L)]                  # L x (N, E)
    top2 = [torch.zeros(B * T, E, dtype=torch.bool).scatter(-1, z.topk(2).indices, True) for z in logits]
    top1 = [F.one_hot(z.argmax(-1), E).bool() for z in logits]           # as routers.py selects them
    print(f"top-2 LB         = {load_balancing_loss(logits, top2, mask).item():.4f}")
    print(f"top-1 (switch) LB= {load_balancing_loss(logits, top1, mask).item():.4f}")
    print(f"uniform, top-2   = {load_balancing_loss(torch.zeros(B * T, E), top2[0], mask).item():.4f} (k)")
    print(f"z-loss           = {router_z_loss(logits, mask).item():.4f}")
    gates = [torch.randn(B, T) for _ in range(L)]                       # L x (B, T)
    for kind in QUALITY_LOSS_KINDS:
        q = quality_loss(gates, mask, kind, sample_wise=True, labels=torch.tensor([1.0, 0.0]))
        print(f"quality {kind:<29}= {q.item():+.4f}")
