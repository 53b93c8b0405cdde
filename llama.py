"""Llama from scratch: the decoder (with its KV cache) and a Hugging Face checkpoint loader and writer.

One file, plain PyTorch. It reads a Hugging Face checkpoint folder (config.json, *.safetensors,
tokenizer.json) with no `transformers`, for the Llama family as users have it on disk: Llama 2,
Llama 3/3.1/3.2 (rope_scaling "llama3"), "linear" rope scaling, TinyLlama, SmolLM/SmolLM2, Mistral and
Qwen2/2.5 (bias on q/k/v).

    x -> embed -> [ RMSNorm -> GQA attention (RoPE) -> + -> RMSNorm -> SwiGLU MLP -> + ] x L -> RMSNorm -> lm_head

References: Touvron et al. 2023 (Llama 2), Dubey et al. 2024 (Llama 3, its rope scaling), Su et al. 2021
(RoPE), Ainslie et al. 2023 (GQA), Shazeer 2020 (SwiGLU), Zhang & Sennrich 2019 (RMSNorm).

Checked against: the logits, NLL and greedy tokens of transformers' LlamaForCausalLM on
SmolLM2-135M-Instruct (golden/smollm2-135m-instruct.json, logits to 1e-3 in fp32), see test_golden_parity in test_all.py.

The tokenizer and chat template are tokenizer.py's; KV-cached generation and its command line (generate,
chat, with an adapter) are generate.py's:
    python generate.py [--model PATH] --prompt "The capital of France is" [--chat] [--adapter DIR]

Shape legend: B batch, T time (new tokens), S keys (past + new), D hidden, H query heads, KV key/value
heads, hd head dim, I FFN width, V vocab, M selected positions.
"""
import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints  # GGUF files become checkpoint folders there; the default model's routes
import guards  # atomic_folder: every save writes beside and renames into place
from progress import track

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


# ----------------------------------------------------------------------------------------------------
# Config: the keys of the checkpoint's config.json, nothing renamed

@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    use_sliding_window: bool = True
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | list | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"
    architectures: list = field(default_factory=lambda: ["LlamaForCausalLM"])
    torch_dtype: str | None = None

    def __post_init__(self):
        check_config_types(self)
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"config.json: hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}")
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        arch = (self.architectures or ["?"])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"config.json: architectures={arch!r} is not supported (expected one of {', '.join(ARCHITECTURES)})")
        if self.hidden_act != "silu":
            raise ValueError(f"config.json: hidden_act={self.hidden_act!r} is not supported (expected 'silu')")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config.json: num_attention_heads={self.num_attention_heads} is not a multiple of num_key_value_heads={self.num_key_value_heads}")
        rope_inv_freq(self)  # validates rope_scaling early, with a one-line error

    @property
    def qkv_bias(self):
        # Qwen2 has a bias on q/k/v (and none on o) without saying so in config.json.
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def context_length(self):
        # NOTE: Mistral's sliding-window attention equals full causal attention up to the window length,
        # so we attend fully and refuse longer sequences instead of implementing the window.
        window = self.sliding_window if (self.sliding_window and self.use_sliding_window and self.model_type != "qwen2") else None
        return min(self.max_position_embeddings, window or self.max_position_embeddings)

    @classmethod
    def from_json(cls, path):
        raw = read_json_object(path)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def to_dict(self):
        return dataclasses.asdict(self)


SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "max_position_embeddings")


def check_config_types(cfg):
    """One-line errors for values of config.json that would otherwise fail deep inside torch: sizes must
    be positive integers (head counts and head_dim too, when given), eps and theta positive numbers."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    for name in SIZES + ("num_key_value_heads", "head_dim"):
        v = getattr(cfg, name)
        if (v is not None or name in SIZES) and not (number(v) and v == int(v) and v > 0):
            raise ValueError(f"config.json: {name}={v!r} is not a positive integer")
        if v is not None:
            setattr(cfg, name, int(v))  # 576.0 -> 576
    for name in ("rms_norm_eps", "rope_theta"):
        if not (number(getattr(cfg, name)) and getattr(cfg, name) > 0):
            raise ValueError(f"config.json: {name}={getattr(cfg, name)!r} is not a positive number")
    if cfg.sliding_window is not None and not (number(cfg.sliding_window) and cfg.sliding_window >= 0):
        raise ValueError(f"config.json: sliding_window={cfg.sliding_window!r} is not a non-negative integer")
    if cfg.rope_scaling is not None and not isinstance(cfg.rope_scaling, dict):
        raise ValueError(f"config.json: rope_scaling={cfg.rope_scaling!r} is not an object")


# ----------------------------------------------------------------------------------------------------
# Small pure functions: rotary embeddings

def rope_inv_freq(cfg, device=None):
    """Inverse frequencies theta^(-2i/hd), i < hd/2, with the checkpoint's rope_scaling applied.

    linear:  inv_freq / factor                  (Chen et al. 2023, position interpolation)
    llama3:  long wavelengths (> original_ctx / low_freq_factor) divided by factor, short ones
             (< original_ctx / high_freq_factor) kept, and a smooth blend in between (Llama 3.1).
    """
    hd = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd)  # (hd/2,)
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / rs["factor"]
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old_ctx / wavelen - lo) / (hi - lo)).clamp(0, 1)  # 0 at long wavelengths, 1 at short
        return (1 - smooth) * inv / factor + smooth * inv
    raise ValueError(f"config.json: rope_scaling type {kind!r} is not supported (expected linear or llama3)")


def rotate_half(x):
    # HF's split-halves RoPE: pairs are (x_i, x_{i+hd/2}), so q/k weights load without permutation.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x (B,H,T,hd) rotated by the angles in cos/sin (B,1,T,hd): x cos + rotate_half(x) sin."""
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------------
# Modules, smallest first

class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back (as HF does)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache:
    """Pre-allocated keys/values per layer, (B, KV, S_max, hd); `length` tokens are filled."""

    def __init__(self, cfg, batch, max_len, dtype, device):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.length = 0

    def update(self, i, k, v):
        """Write k, v (B,KV,T,hd) after the cached tokens; return all keys/values (B,KV,S,hd)."""
        end = self.length + k.shape[2]
        self.k[i][:, :, self.length:end] = k
        self.v[i][:, :, self.length:end] = v
        return self.k[i][:, :, :end], self.v[i][:, :, :end]


class Attention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023): H query heads share KV key/value heads."""

    def __init__(self, cfg):
        super().__init__()
        self.H, self.KV, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.H * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.KV * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.KV * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.H * self.hd, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x, cos, sin, mask, *, cache=None, i=0):  # i: this layer's index in the cache
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.hd).transpose(1, 2)   # (B,H,T,hd)
        k = self.k_proj(x).view(B, T, self.KV, self.hd).transpose(1, 2)  # (B,KV,T,hd)
        v = self.v_proj(x).view(B, T, self.KV, self.hd).transpose(1, 2)  # (B,KV,T,hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(i, k, v)                                  # (B,KV,S,hd)
        causal = mask is None and T > 1  # the model builds an explicit mask whenever past > 0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.H != self.KV)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.hd))  # (B,T,D)


class LlamaMLP(nn.Module):
    """SwiGLU FFN (Shazeer 2020): down(silu(gate(u)) * up(u)). D -> I -> D."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, u, token_mask=None):
        # token_mask (B,T) is unused here; MoE replacements use it to skip padding in routing.
        return self.down_proj(self.swiglu(self.gate_proj(u), self.up_proj(u)))

    def swiglu(self, g, v):  # (B,T,I), (B,T,I) -> (B,T,I)
        """The gated hidden silu(g) * v of gate and up outputs (a method of its own so that multi.py's
        shared-product FFN computes it the same way)."""
        return F.silu(g) * v


class DecoderLayer(nn.Module):
    """Pre-norm block. The MLP may return (y, aux): aux (router/gate logits) is passed up untouched."""

    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, mask, token_mask, *, cache=None, i=0):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache=cache, i=i)
        out = self.mlp(self.post_attention_layernorm(h), token_mask)
        y, aux = out if isinstance(out, tuple) else (out, None)
        return h + y, aux


@dataclass
class LlamaOutput:
    logits: torch.Tensor          # (B,T,V), or (M,V) at the positions of logits_mask
    aux: list                     # per layer: what its MLP returned besides y, or None
    hidden: torch.Tensor          # (B,T,D) final normed hidden states
    cache: KVCache | None = None


class LlamaModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)  # (hd/2,)
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, logits_mask=None, cache=None):
        """input_ids (B,T); attention_mask (B,S) 1 = token, 0 = padding, left or right (S = past + T
        when a cache is used); logits_mask (B,T) bool: compute the LM head only there."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.context_length:
            raise ValueError(f"sequence of {past + T} tokens is longer than the model's context ({self.config.context_length})")
        dev = input_ids.device
        mask = None
        if attention_mask is not None:
            am = attention_mask.to(device=dev, dtype=torch.long)
            pos = (am.cumsum(-1) - 1).clamp(min=0)[:, past:]                  # (B,T) positions skip padding
            token_mask = am[:, past:].bool()                                   # (B,T)
            if not bool(am.all()):
                q_idx = torch.arange(past, past + T, device=dev)[:, None]      # (T,1)
                k_idx = torch.arange(past + T, device=dev)[None, :]            # (1,S)
                # Causal & key is not padding; a padding query also sees itself so no row is empty (no NaN).
                mask = ((k_idx <= q_idx) & am[:, None, :].bool()) | (k_idx == q_idx)  # (B,T,S)
                mask = mask[:, None]                                           # (B,1,T,S)
        else:
            pos = torch.arange(past, past + T, device=dev).expand(B, T)       # (B,T)
            token_mask = torch.ones(B, T, dtype=torch.bool, device=dev)
        if mask is None and cache is not None and T > 1 and past > 0:
            mask = (torch.arange(past + T, device=dev)[None, :] <= torch.arange(past, past + T, device=dev)[:, None])[None, None]

        x = self.model.embed_tokens(input_ids)                                 # (B,T,D)
        ang = pos[..., None].float() * self.inv_freq                           # (B,T,hd/2)
        ang = torch.cat((ang, ang), dim=-1)[:, None]                           # (B,1,T,hd)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        aux = []
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training:
                # context_fn: a model whose modules keep their own random streams replays them (multi.py)
                ctx = getattr(self, "checkpoint_context", torch.utils.checkpoint.noop_context_fn)
                x, a = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, token_mask, cache=cache, i=i,
                                                         use_reentrant=False, context_fn=ctx)
            else:
                x, a = layer(x, cos, sin, mask, token_mask, cache=cache, i=i)
            aux.append(a)
        if cache is not None:
            cache.length += T
        hidden = self.model.norm(x)                                            # (B,T,D)
        logits = self.lm_head(hidden if logits_mask is None else hidden[logits_mask])  # (B,T,V) or (M,V)
        return LlamaOutput(logits, aux, hidden, cache)


# ----------------------------------------------------------------------------------------------------
# Loading and saving Hugging Face checkpoint folders

def read_json_object(fn):
    """The JSON object in file fn, with one-line errors naming the file."""
    with open(fn, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{fn}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{fn}: expected a JSON object, got a {type(raw).__name__}")
    return raw


def _safetensors_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            try:
                files = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a valid shard index ({e})") from None
        return [os.path.join(path, n) for n in files]
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    return [single]


def _read_tensors(files, dtype):
    """Yield (name, tensor in `dtype`) one tensor at a time. Each tensor is read through its own
    memory map that is closed before the next, so loading never holds the file and the model at once."""
    from safetensors import safe_open
    for fn in files:
        if not os.path.exists(fn):
            raise FileNotFoundError(f"{fn}: shard named in the index does not exist")
        try:
            with safe_open(fn, framework="pt") as f:
                names = list(f.keys())
            for name in track(names, f"load {fn}", unit="tensors"):
                with safe_open(fn, framework="pt") as f:
                    t = f.get_tensor(name)
                if not t.is_floating_point():  # an integer tensor would be cast silently, and mean nothing
                    raise ValueError(f"{fn}: tensor {name!r} has dtype {t.dtype}, expected a floating-point type")
                yield name, t.to(dtype)
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            if isinstance(e, (ValueError, FileNotFoundError)) and str(e).startswith(fn):
                raise
            raise ValueError(f"{fn}: not a readable safetensors file ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def from_pretrained(path, dtype=torch.float32, device="cpu"):
    """Load a Hugging Face checkpoint folder (or a .gguf file, or a folder holding one: converted once by
    checkpoints.gguf_folder). The model is built on the meta device and the tensors are assigned as they
    are read, so no randomly initialised copy is ever allocated. Integer-typed and non-finite tensors are
    refused with an error naming them."""
    path = checkpoints.gguf_folder(path)
    guards.recover_folder(path)  # an interrupted save_pretrained left the previous version as path.prev
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: checkpoint folder does not exist")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face checkpoint folder)")
    cfg = LlamaConfig.from_json(cfg_path)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    sd = {}
    for name, t in _read_tensors(_safetensors_files(path), dtype):
        if name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue  # recomputed from config / tied to the embedding
        if name not in expected:
            raise ValueError(f"{path}: unexpected tensor {name!r} (not part of a {cfg.architectures[0]})")
        if tuple(t.shape) != tuple(expected[name]):
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(expected[name])}")
        if not bool(torch.isfinite(t).all()):  # a NaN weight poisons every output; refuse it here, by name
            raise ValueError(f"{path}: tensor {name!r} holds NaN or inf values (in {str(dtype).removeprefix('torch.')})")
        sd[name] = t.to(device)
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise ValueError(f"{path}: missing tensor {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    model.load_state_dict(sd, strict=not cfg.tie_word_embeddings, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg, device=device)
    model.path = path
    return model.eval()


def save_pretrained(model, path, tokenizer_src=None, dtype=None):
    """Write config.json + model.safetensors (+ tokenizer files copied from tokenizer_src) with
    guards.atomic_folder: the previous folder stays whole until the new one is in place."""
    from safetensors.torch import save_file
    cfg = model.config.to_dict()
    sd = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    cfg["torch_dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    with guards.atomic_folder(path) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name in TOKENIZER_FILES if tokenizer_src else ():
            if os.path.exists(os.path.join(tokenizer_src, name)):
                shutil.copy(os.path.join(tokenizer_src, name), tmp)
    return path


# ----------------------------------------------------------------------------------------------------
# The command line is generate.py's (it also applies kernels.accelerate, which this file never imports)

if __name__ == "__main__":  # `python llama.py ...` is `python generate.py ...`
    import generate
    generate.main()
