"""LoRA, rsLoRA and DoRA adapters for the Llama in llama.py: the layers, injection, merging, LoRA+ groups.

References
  LoRA     Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685, sec. 4.1
  rsLoRA   Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", arXiv 2312.03732
  DoRA     Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353, eq. 5 and sec. 4.3
  LoRA+    Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv 2402.12354
  Reference behaviour (MoE-PEFT / mixlora) and where we depart from it: ../shared/reference/mixlora.md sec. 1, 2, 8.

The LoRA branch around one frozen projection (x: (N, d_in), s = alpha/r, or alpha/sqrt(r) with rsLoRA):

    x ──────────────────────► W0 x (+ b) ──────────────┐          frozen nn.Linear `base`
    │                                                   (+) ──► y   LoRA:  y = W0 x + b + s B A drop(x)
    └─► dropout ─► A (r, d_in) ─► * s ─► B (d_out, r) ──┘          DoRA:  y = m / ||W0 + sBA||_row
                  Kaiming-uniform         zeros                              * (W0 x + s B A drop(x)) + b

Usage (load the base model first, then inject):
    model = llama.from_pretrained(path); inject_lora(model, LoraConfig(r=16, target_modules=[...]))
    mark_trainable(model); ...train...; adapter_files.save_adapter(model, "out/adapter")
The adapter folders are PEFT's (adapter_config.json + adapter_model.safetensors), written and read by
adapter_files.py: PEFT loads ours with the same logits and PEFT adapters load here (test_peft_interop).
Checked in test_all.py (TestLora): exact no-ops at init, hand-computed outputs, DoRA's row norm against
the naive one, merging.
Run `python lora.py` for a tiny demo. Shape legend: N tokens (any leading dims), d_in/d_out layer sizes,
r rank, D hidden, C classes.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import llama


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_KEYS = ("lora_", "magnitude", "moe_gate", "quality_gate", "score")  # see mark_trainable

# ----------------------------------------------------------------------------------------------------
# config


@dataclass
class LoraConfig:
    """LoRA hyper-parameters, named as the keys of PEFT's adapter_config.json."""

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: str = "original"  # "original" (Kaiming-uniform A) or "gaussian" (A ~ N(0, 1/r^2))
    bias: str = "none"  # only "none": base biases stay frozen and are not saved
    task_type: str = "CAUSAL_LM"

    def __post_init__(self):
        if isinstance(self.target_modules, str):  # PEFT allows one name, or "all-linear"
            self.target_modules = list(PROJECTIONS) if self.target_modules == "all-linear" else [self.target_modules]
        self.target_modules = list(self.target_modules)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.init_lora_weights not in ("original", "gaussian"):
            raise ValueError(f"init_lora_weights must be 'original' or 'gaussian', got {self.init_lora_weights!r}")
        if self.bias != "none":
            raise ValueError(f"bias must be 'none', got {self.bias!r}")
        if not self.target_modules:
            raise ValueError("target_modules is empty")


def projection_names(target_modules):
    """The target projections as a list: from a list, or the reference's {name: bool} dict. Every name must
    be one of PROJECTIONS (the MoE adapters use it; LoraConfig also takes PEFT's one name / "all-linear")."""
    if isinstance(target_modules, dict):
        target_modules = [k for k, v in target_modules.items() if v]
    names = list(target_modules)
    if not names or any(t not in PROJECTIONS for t in names):
        raise ValueError(f"target_modules: expected names from {PROJECTIONS}, got {names}")
    return names


def lora_scaling(lora_alpha, r, use_rslora=False):
    """s = alpha / r (Hu et al. 2021 sec. 4.1), or alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023 thm. 3.2)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def lora_pair(d_in, d_out, r, init="original", device=None):
    """(A, B) fp32 Parameters of one LoRA: A (r, d_in) Kaiming-uniform(a=sqrt(5)), i.e.
    U(-1/sqrt(d_in), 1/sqrt(d_in)) (or N(0, std=1/r) for "gaussian", the reference's std, not 1/sqrt(r)),
    and B (d_out, r) zeros, so that s B A = 0 at init (Hu et al. 2021 sec. 4.1)."""
    A = nn.Parameter(torch.empty(r, d_in, device=device, dtype=torch.float32))   # (r, d_in)
    B = nn.Parameter(torch.zeros(d_out, r, device=device, dtype=torch.float32))  # (d_out, r)
    if init == "gaussian":
        nn.init.normal_(A, std=1.0 / r)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    return A, B


@torch.no_grad()
def dora_row_norm(W0, A, B, s, w0_sq=None):
    """n = ||W0 + s B A||_row (d_out,) fp32, the L2 norm over d_in of each row (DoRA eq. 5), without
    materialising the (d_out, d_in) matrix W0 + sBA:

        n^2 = ||W0||^2 + 2 s rowsum(B * (W0 A^T)) + s^2 rowsum(B * (B A A^T))

    W0 A^T is one (d_out, d_in) x (d_in, r) product and A A^T is (r, r); w0_sq = ||W0||^2 (d_out,) when
    the caller caches it. Detached (no_grad): DoRA sec. 4.3 treats the norm as a constant. Checked against
    torch.linalg.norm(W0 + s*B@A, dim=1) in test_all.py. NOTE: cancellation makes it inaccurate only for
    rows where W0 + sBA is ~0 relative to W0."""
    W0A = F.linear(W0.to(A.dtype), A)  # (d_out, r) = W0 A^T
    T = torch.addmm(W0A, B, A @ A.t(), beta=2, alpha=s)  # (d_out, r) = 2 W0 A^T + s B A A^T
    w0_sq = W0.to(A.dtype).square().sum(1) if w0_sq is None else w0_sq  # (d_out,)
    return (w0_sq + s * torch.linalg.vecdot(B, T)).clamp_min(0).sqrt()  # the formula above, factored


def classification_head(hidden_size, num_labels, device=None):
    """HF LlamaForSequenceClassification's `score` head (C, D), no bias, fp32 like the other adapter
    tensors, initialised as the reference does (Kaiming-normal, a=sqrt(5)); load_* overwrite it."""
    head = nn.Linear(hidden_size, num_labels, bias=False, device=device)
    nn.init.kaiming_normal_(head.weight, a=math.sqrt(5))
    return head


# ----------------------------------------------------------------------------------------------------
# the layer


class LoRALinear(nn.Module):
    """y = W0 x + b + s * B A drop(x), or with DoRA y = m / ||W0 + sBA||_row * (W0 x + s B A drop(x)) + b.

    W0 (d_out, d_in) and b stay frozen inside `self.base`. A = `lora_A` (r, d_in), Kaiming-uniform(a=sqrt(5)),
    i.e. U(-1/sqrt(d_in), 1/sqrt(d_in)) (or N(0, std=1/r) for "gaussian", the reference's std, not 1/sqrt(r));
    B = `lora_B` (d_out, r) zeros, so the layer is an exact no-op at init. Dropout acts on the LoRA input only
    and is a Dropout (nn.Dropout) submodule, so model.eval() turns it off (NOTE: the reference keeps it on at eval).
    Adapter tensors are fp32 even when the base is bf16: LoRA updates are ~lr * 1e-3 relative to values of
    ~1e-2, below bf16's 8-bit mantissa resolution, so Adam steps on bf16 A/B would round away to nothing.

    DoRA (Liu et al. 2024 eq. 5): `magnitude` m (d_out,) starts at the row norms ||W0 + sBA||_row (L2 over
    d_in), computed when the layer is built on the loaded base weights, so DoRA is also a no-op at init.
    The norm is detached (DoRA sec. 4.3: treated as a constant, no gradient). The bias is outside the
    rescaled term, as in HF PEFT. NOTE: the reference (MoE-PEFT, mixlora) puts b inside: (m/n) * (W0 x + b)
    + ...; and it never trains nor saves m (m/n = 1 after reload), while we train m and save it.
    NOTE: PEFT in training mode with dropout rescales W0 drop(x), not W0 x; identical in eval.
    """

    def __init__(self, base, *, r, lora_alpha, lora_dropout=0.0, use_rslora=False, use_dora=False,
                 init_lora_weights="original"):
        super().__init__()
        d_out, d_in = base.weight.shape
        if r <= 0 or r > min(d_in, d_out):
            raise ValueError(f"r={r} must be in [1, min(d_in, d_out)={min(d_in, d_out)}]")
        self.base = base.requires_grad_(False)
        self.r, self.scaling, self.use_dora = r, lora_scaling(lora_alpha, r, use_rslora), use_dora
        dev = base.weight.device
        self.lora_A, self.lora_B = lora_pair(d_in, d_out, r, init_lora_weights, dev)  # (r, d_in), (d_out, r)
        self.dropout = nn.Dropout(lora_dropout)  # off in eval()
        self.merged = False
        self._w0_sq, self._w0_key = None, None  # cache of ||W0||_row^2, see w0_row_sq
        if use_dora:
            self.magnitude = nn.Parameter(self.weight_norm())  # (d_out,) fp32

    def w0_row_sq(self):
        """||W0||_row^2 (d_out,) fp32, cached; recomputed whenever W0 is modified in place or moved.

        A tensor's `_version` counter increases on every in-place write (load_state_dict, merge), so the
        cache can never go stale without needing a hook."""
        w = self.base.weight
        key = (w.data_ptr(), w._version, w.dtype)
        if key != self._w0_key:
            self._w0_sq, self._w0_key = w.detach().float().square().sum(1), key  # (d_out,)
        return self._w0_sq

    def weight_norm(self):
        """n = ||W0 + s B A||_row (d_out,), detached (dora_row_norm, with ||W0||^2 cached)."""
        return dora_row_norm(self.base.weight, self.lora_A, self.lora_B, self.scaling, self.w0_row_sq())

    def delta_weight(self):
        """s B A (d_out, d_in) fp32, the weight update that merging adds to W0."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x, wx=None):  # x: (..., d_in) -> (..., d_out); wx = W0 x when already computed (multi.py)
        if self.merged:
            return self.base(x)
        A, B, s, W, b = self.lora_A, self.lora_B, self.scaling, self.base.weight, self.base.bias
        h = F.linear(self.dropout(x).to(A.dtype), A)  # (..., r) A drop(x), in the adapter's fp32
        # W0 x + b for LoRA (the wrapped layer itself); W0 x for DoRA, whose bias comes after the rescaling
        if wx is None:
            y = F.linear(x, W) if self.use_dora and b is not None else self.base(x)  # (..., d_out)
        else:
            y = wx if self.use_dora or b is None else wx + b
        y = y + F.linear(h * s, B).to(y.dtype)  # bf16 base: the fp32 LoRA product is rounded once
        if self.use_dora:
            scale = self.magnitude / self.weight_norm()  # (d_out,) m / ||W0 + sBA||, n detached
            # bias outside the rescaling (HF PEFT convention, see docstring); addcmul = b + scale * y
            y = scale * y if b is None else torch.addcmul(b.to(scale.dtype), scale, y)  # (..., d_out) fp32
        return y.to(x.dtype)

    @torch.no_grad()
    def merge(self):
        """W0 <- W0 + sBA (LoRA) or m/n * (W0 + sBA) (DoRA); forward then runs the base layer only."""
        if self.merged:
            return
        w = self.base.weight
        merged = w.float() + self.delta_weight()  # (d_out, d_in)
        if self.use_dora:
            self._merge_scale = self.magnitude / self.weight_norm()  # (d_out,), kept to unmerge
            merged = merged * self._merge_scale[:, None]
        w.copy_(merged.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Undo merge(): W0 <- W - sBA (LoRA) or W * n/m - sBA (DoRA); exact up to rounding."""
        if not self.merged:
            return
        w = self.base.weight
        merged = w.float()
        if self.use_dora:
            merged = merged / self._merge_scale[:, None]
        w.copy_((merged - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self):
        return f"r={self.r}, scaling={self.scaling:.4g}, dora={self.use_dora}, merged={self.merged}"


class LoRAExpert(nn.Module):
    """One expert's LoRA factors without a base layer (the E experts of a projection share its frozen W0:
    moe_lora.py, moe_linear.py): A (r, d_in), B (d_out, r) initialised as every LoRA (lora_pair); the
    owner adds a DoRA magnitude m (d_out,) when it needs one."""

    def __init__(self, d_in, d_out, r, init, device):
        super().__init__()
        self.lora_A, self.lora_B = lora_pair(d_in, d_out, r, init, device)  # (r, d_in), (d_out, r) fp32


# ----------------------------------------------------------------------------------------------------
# injection, trainable parameters, LoRA+ groups, merging


def inject_lora(model, cfg):
    """Replace every nn.Linear whose name ends in one of cfg.target_modules by a LoRALinear, in place.

    Call it after the base weights are loaded (DoRA's m is initialised from them). Returns the model,
    with the config kept as `model.adapter_config`."""
    found = set()
    for name, module in list(model.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        if leaf not in cfg.target_modules:
            continue
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter; inject into a fresh base model")
        if not isinstance(module, nn.Linear):
            continue
        d_out, d_in = module.weight.shape
        if cfg.r > min(d_in, d_out):
            raise ValueError(f"r={cfg.r} is larger than min(d_in, d_out)={min(d_in, d_out)} of {name}")
        layer = LoRALinear(module, r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, init_lora_weights=cfg.init_lora_weights)
        layer.train(module.training)
        setattr(model.get_submodule(parent_name), leaf, layer)
        found.add(leaf)
    for target in cfg.target_modules:
        if target not in found:
            raise ValueError(f"target module {target!r} not found in the model (expected names like {PROJECTIONS})")
    model.adapter_config = cfg
    return model


def lora_layers(model):
    """(name, LoRALinear) pairs of the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def mark_trainable(model):
    """Train exactly the parameters whose name contains one of ADAPTER_KEYS; return (trainable, total) counts."""
    trainable = total = 0
    for name, p in model.named_parameters():  # shared (tied) tensors are listed once
        p.requires_grad_(any(k in name for k in ADAPTER_KEYS))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def lora_plus_param_groups(model, lr, ratio, weight_decay=0.0):
    """AdamW parameter groups for LoRA+ (Hayou et al. 2024): lr for A-like tensors, lr * ratio for B.

    Group B holds every trainable tensor named "lora_B" or of ndim 1 (DoRA's m), as both the reference
    (MoE-PEFT `_optimizer_grouped_parameters`) and HF PEFT `create_loraplus_optimizer` do; the router
    `moe_gate`, `quality_gate` and the `score` head are in group A. NOTE: we exempt 1-D tensors from weight
    decay (decaying m would shrink the weight norms); the reference decays them."""
    if ratio < 1.0:
        raise ValueError(f"loraplus_lr_ratio must be >= 1.0, got {ratio}")
    a, b, vec = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (vec if p.ndim == 1 else b if "lora_B" in name else a).append(p)
    groups = [dict(params=a, lr=lr, weight_decay=weight_decay), dict(params=b, lr=lr * ratio, weight_decay=weight_decay),
              dict(params=vec, lr=lr * ratio, weight_decay=0.0)]
    return [g for g in groups if g["params"]]


def adamw(groups, **kw):
    """torch.optim.AdamW on these parameter groups, in its fused implementation (one kernel over all the
    tensors per step) where torch has one for the parameters' device: the same update to float rounding;
    one step over MixLoRA's 1,710 tensors took 54 ms instead of 176 on this CPU (LoRA's 210: 11 vs 43)."""
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, fused=fused, **kw)


def merge_adapters(model):
    """Merge every LoRALinear into its base weight (inference speed: no extra matmuls)."""
    for _, m in lora_layers(model):
        m.merge()
    return model


def unmerge_adapters(model):
    """Undo merge_adapters (training can resume)."""
    for _, m in lora_layers(model):
        m.unmerge()
    return model


def save_merged(model, out_dir, tokenizer_src=None):
    """Write a plain HF Llama checkpoint folder (config.json + model.safetensors + tokenizer files) with the
    adapters merged in; llama.from_pretrained loads it. The model is left as it was (unmerged, wrapped).
    NOTE: a `score` classification head is not part of a causal-LM checkpoint; keep it in the adapter."""
    layers, score = lora_layers(model), getattr(model, "score", None)
    was_merged = [m.merged for _, m in layers]
    try:
        for name, m in layers:  # swap each wrapper for its (merged) base nn.Linear
            m.merge()
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, m.base)
        if score is not None:
            del model.score
        llama.save_pretrained(model, out_dir, tokenizer_src=tokenizer_src)
    finally:
        for (name, m), merged in zip(layers, was_merged):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, m)
            if not merged:
                m.unmerge()
        if score is not None:
            model.score = score


# ----------------------------------------------------------------------------------------------------
# demo

if __name__ == "__main__":
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 32), r=4, lora_alpha=8, use_dora=True)
    x = torch.randn(5, 64)
    print("no-op at init:", torch.allclose(layer(x), layer.base(x), atol=1e-6))
    nn.init.normal_(layer.lora_B, std=0.1)
    naive = torch.linalg.norm(layer.base.weight + layer.delta_weight(), dim=1)
    print("efficient DoRA norm - naive:", (layer.weight_norm() - naive).abs().max().item())
    y = layer(x)
    layer.merge()
    print("merged - unmerged output:", (layer(x) - y).abs().max().item())
