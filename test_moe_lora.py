"""Tests for moe_lora.py: the MixLoRA FFN (both paths, every router), the Select-MoE quality gate and trash
expert, adapter injection, file formats and router statistics.

Run: /work/venv/bin/python -m pytest -q test_moe_lora.py
The interop test with the reference `mixlora` package needs mixlora + transformers (e.g. /work/venv-hf).
"""
import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import llama
import lora
from moe_lora import (ExpertProjection, MixLoRAConfig, MixLoRAFFN, adapter_tensors, inject_adapter,
                      load_adapter, router_stats, save_adapter, set_fast_path)
from routers import STRATEGIES

IDS = torch.tensor([[5, 9, 3, 17, 42, 8, 1, 30], [7, 7, 2, 60, 11, 4, 19, 23]])  # (B=2, T=8)
MASK = torch.tensor([[1] * 8, [1] * 5 + [0] * 3], dtype=torch.bool)               # right padding


def tiny_llama(seed=0, **overrides):
    """A 2-layer random Llama (GQA 4/2 heads, tied embeddings) in eval mode."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-5)
    return llama.LlamaForCausalLM(llama.LlamaConfig(**{**kw, **overrides})).eval()


def tiny_ffn(strategy="mixlora", seed=0, D=16, I=24, **kw):
    """A MixLoRA FFN around a random LlamaMLP, every adapter tensor random (non-zero), no dropout."""
    torch.manual_seed(seed)
    mlp = llama.LlamaMLP(llama.LlamaConfig(hidden_size=D, intermediate_size=I, num_attention_heads=1))
    cfg = MixLoRAConfig(**{**dict(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4, routing_strategy=strategy,
                                  router_init_range=0.5), **kw})
    return randomize(MixLoRAFFN(mlp, cfg, trash_expert=lambda u: 0.5 * u).train())


def randomize(module, seed=1):
    """Give every adapter tensor (B, m, routers, gates) random values so that each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(k in name for k in lora.ADAPTER_KEYS):
                p.copy_(p + torch.randn(p.shape, generator=g) * 0.2)
    return module


def trainable_grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------------------
# the FFN


@pytest.mark.parametrize("fast", [True, False])
def test_single_expert_equals_dense_lora_ffn(fast):
    """E=1, k=1 MixLoRA is exactly a LlamaMLP whose three projections carry one ordinary LoRA."""
    ffn = tiny_ffn(num_experts=1, top_k=1)
    ffn.fast_path = fast
    dense = llama.LlamaMLP(llama.LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=1))
    for name in ("gate_proj", "up_proj", "down_proj"):
        proj = getattr(ffn, name)
        layer = lora.LoRALinear(torch.nn.Linear(*proj.weight.shape[::-1], bias=False), r=4, lora_alpha=8)
        with torch.no_grad():
            for mine, theirs in ((layer.base.weight, proj.weight), (layer.lora_A, proj.experts[0].lora_A),
                                 (layer.lora_B, proj.experts[0].lora_B)):
                mine.copy_(theirs)
        setattr(dense, name, layer)
    u = torch.randn(2, 5, 16)
    y, aux = ffn(u)
    assert y.shape == (2, 5, 16) and aux["router_logits"].shape == (10, 1)
    torch.testing.assert_close(y, dense(u), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fast_path_equals_plain_path(strategy, gate):
    """The fast path (shared base gate/up, base down once) equals the reference path, outputs and gradients."""
    fast = tiny_ffn(strategy, quality_gate=gate, trash_expert_mode="noise")
    plain = copy.deepcopy(fast)
    plain.fast_path = False
    u = torch.randn(3, 7, 16)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[2, 4:] = False
    results = []
    for ffn in (fast, plain):
        x = u.clone().requires_grad_()
        torch.manual_seed(5)  # same jitter and trash noise draws
        y, aux = ffn(x, mask)
        loss = (y * torch.linspace(-1, 1, 16)).square().sum() + aux["router_logits"].square().sum()
        if gate:
            loss = loss + aux["gate_logits"].sum()
        loss.backward()
        results.append((y, x.grad, trainable_grads(ffn)))
    (y1, gx1, g1), (y2, gx2, g2) = results
    assert (y1[2, 4:] == 0).all() if not gate else True  # padding skips the experts
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx2, rtol=1e-4, atol=1e-5)
    assert g1.keys() == g2.keys() and any("experts.3.lora_A" in k for k in g1)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-5, msg=k)


def test_dora_experts_fall_back_and_start_as_noop():
    """DoRA experts are a no-op at init (m = ||W0||) and the fast flag then runs the plain path."""
    ffn = tiny_ffn(use_dora=True, num_experts=1, top_k=1)
    for proj in (ffn.gate_proj, ffn.up_proj, ffn.down_proj):
        torch.nn.init.zeros_(proj.experts[0].lora_B)
        proj.experts[0].magnitude.data = proj.weight.norm(dim=1)
    u = torch.randn(2, 3, 16)
    base = ffn.down_proj.weight
    expect = F.linear(F.silu(F.linear(u, ffn.gate_proj.weight)) * F.linear(u, ffn.up_proj.weight), base)
    torch.testing.assert_close(ffn(u)[0], expect, rtol=1e-5, atol=1e-5)


def test_switch_at_inference_uses_the_experts():
    """Switch in eval mode returns p_max * expert(u), not its input (the reference's bug) and not 0."""
    ffn = tiny_ffn("mixlora-switch", capacity_factor=4.0).eval()
    u = torch.randn(1, 6, 16)
    y, aux = ffn(u)
    p = aux["router_logits"].softmax(-1)                                 # (N, E)
    e = p.argmax(-1)
    x = u[0]
    for t in range(6):
        xt = x[t:t + 1]
        a = F.silu(ffn.gate_proj(xt, int(e[t]))) * ffn.up_proj(xt, int(e[t]))
        torch.testing.assert_close(y[0, t], p[t, e[t]] * ffn.down_proj(a, int(e[t]))[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(y, u) and y.abs().sum() > 0


def test_gate_init_mean_std_take_effect():
    """quality_gate_init_mean/std set the gate weight statistics (the reference silently overwrote them)."""
    model = tiny_llama(hidden_size=1024, intermediate_size=16, num_attention_heads=8, num_key_value_heads=8)
    inject_adapter(model, MixLoRAConfig(r=2, num_experts=2, quality_gate=True, quality_gate_init_mean=1.0,
                                        quality_gate_init_std=0.5))
    w = torch.cat([layer.mlp.quality_gate.weight.flatten() for layer in model.model.layers])  # (2048,)
    assert abs(w.mean().item() - 1.0) < 0.05 and abs(w.std().item() - 0.5) < 0.05


def test_trash_noise_only_in_training():
    """Noise trash: fresh draws in training; at eval the deterministic mean g*y + (1-g)*mean(u)."""
    ffn = tiny_ffn(quality_gate=True, trash_expert_mode="noise")
    u = torch.randn(2, 4, 16)
    assert not torch.equal(ffn(u)[0], ffn(u)[0])
    ffn.eval()
    y, aux = ffn(u)
    torch.testing.assert_close(y, ffn(u)[0], rtol=0, atol=0)
    zero = copy.deepcopy(ffn)
    zero.trash_mode = "zero"
    g = torch.sigmoid(aux["gate_logits"]).unsqueeze(-1)                  # (B, T, 1)
    torch.testing.assert_close(y, zero(u)[0] + (1 - g) * u.mean(-1, keepdim=True))


def test_custom_trash_expert():
    """Custom trash: y = g * y_moe + (1 - g) * f(u) with the user's function."""
    ffn = tiny_ffn(quality_gate=True, trash_expert_mode="custom").eval()
    u = torch.randn(2, 4, 16)
    y, aux = ffn(u)
    g = torch.sigmoid(aux["gate_logits"]).unsqueeze(-1)
    ffn.trash_mode = "zero"
    torch.testing.assert_close(y, ffn(u)[0] + (1 - g) * 0.5 * u)


# ----------------------------------------------------------------------------------------------------
# the model


def mixlora_model(seed=0, **kw):
    model = tiny_llama(seed)
    cfg = MixLoRAConfig(**{**dict(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4, quality_gate=True), **kw})
    return randomize(inject_adapter(model, cfg))


def test_gradients_reach_only_adapters_routers_gates():
    """After inject_adapter only LoRA/expert tensors, routers and gates get gradients, and all of them do."""
    model = mixlora_model().train()
    out = model(IDS, attention_mask=MASK)
    (out.logits.square().mean() + sum(a["gate_logits"].sum() for a in out.aux)).backward()
    for name, p in model.named_parameters():
        adapter = any(k in name for k in ("lora_", "moe_gate", "quality_gate"))
        assert p.requires_grad == adapter, name
        assert (p.grad is not None and p.grad.abs().sum() > 0) == adapter, name
    assert isinstance(model.model.layers[0].self_attn.q_proj, lora.LoRALinear)
    assert model.model.layers[1].mlp.up_proj.experts[3].lora_B.shape == (48, 4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_aux_survives_activation_checkpointing(strategy):
    """Router and gate logits returned through checkpointed layers carry the same gradients as without."""
    grads = []
    for ckpt in (False, True):
        model = mixlora_model(routing_strategy=strategy, jitter_noise=0.0).train()
        model.gradient_checkpointing = ckpt
        out = model(IDS, attention_mask=MASK)
        loss = sum(a["router_logits"].logsumexp(-1).square().mean() + a["gate_logits"].sigmoid().mean()
                   for a in out.aux)
        loss.backward()
        layer = model.model.layers[0].mlp
        grads.append((layer.moe_gate.weight.grad, layer.quality_gate.weight.grad))
    for g_plain, g_ckpt in zip(*grads):
        assert g_ckpt is not None and g_ckpt.abs().sum() > 0
        torch.testing.assert_close(g_ckpt, g_plain)


def test_router_stats_sum_to_one():
    """router_stats: per layer the expert load over real tokens sums to 1 and 0 <= entropy <= log E."""
    model = mixlora_model(routing_strategy="mixlora-dynamic")
    out = model(IDS, attention_mask=MASK)
    stats = router_stats(out.aux, MASK)
    assert stats["load"].shape == (2, 4) and stats["gate"].shape == (2,)
    torch.testing.assert_close(stats["load"].sum(-1), torch.ones(2))
    assert (stats["entropy"] >= 0).all() and (stats["entropy"] <= math.log(4) + 1e-6).all()


def test_bad_configs():
    """Bad settings give one-line ValueErrors naming the setting."""
    bad = [dict(trash_expert_mode="bin"), dict(quality_loss_type="hinge"), dict(top_k=9),
           dict(routing_strategy="expert-choice"), dict(num_experts=0), dict(top_p=1.5), dict(capacity_factor=0),
           dict(quality_gate=True, target_modules=["q_proj", "v_proj"]), dict(act_fn="swish"),
           dict(target_modules=["fc1"]), dict(expert_lora={"rank": 4})]
    for kw in bad:
        with pytest.raises(ValueError) as e:
            MixLoRAConfig(**kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="custom"):
        inject_adapter(tiny_llama(), MixLoRAConfig(quality_gate=True, trash_expert_mode="custom"))
    cfg = lora.LoraConfig()
    cfg.quality_gate = True
    with pytest.raises(ValueError, match="MoE layers"):
        inject_adapter(tiny_llama(), cfg)


def test_expert_lora_overrides_rank():
    """expert_lora changes the experts' rank/alpha only; attention LoRA keeps the top-level r."""
    model = inject_adapter(tiny_llama(), MixLoRAConfig(r=4, num_experts=2, expert_lora={"r": 2, "lora_alpha": 6}))
    assert model.model.layers[0].self_attn.v_proj.lora_A.shape == (4, 32)
    proj = model.model.layers[0].mlp.down_proj
    assert proj.experts[1].lora_A.shape == (2, 48) and proj.scaling == 3.0


# ----------------------------------------------------------------------------------------------------
# adapter files


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("fmt", ["peft", "mixlora"])
def test_save_load_roundtrip(tmp_path, fmt, use_dora):
    """save_adapter -> load_adapter into a fresh base model reproduces every tensor and the logits exactly."""
    model = mixlora_model(use_dora=use_dora, routing_strategy="mixlora-dynamic", expert_lora={"r": 2},
                          lora_dropout=0.05).eval()
    save_adapter(model, tmp_path / "a", format=fmt)
    files = sorted(os.listdir(tmp_path / "a"))
    assert files == ["adapter_config.json", "adapter_model.bin" if fmt == "mixlora" else "adapter_model.safetensors"]
    config = json.load(open(tmp_path / "a" / "adapter_config.json"))
    assert config["peft_type"] == "MIXLORA" and config["act_fn"] == "silu"
    loaded = load_adapter(tiny_llama(), tmp_path / "a")
    assert loaded.adapter_config == model.adapter_config
    a, b = adapter_tensors(model), adapter_tensors(loaded)
    assert a.keys() == b.keys() and "mixlora.layers.1.mlp.up_proj.experts.3.lora_B.weight" in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_reference_names_and_config(tmp_path):
    """The reference layout has the names and config values the `mixlora` package requires (mixlora.md sec. 8)."""
    model = mixlora_model(quality_gate=False)
    save_adapter(model, tmp_path / "a", format="mixlora")
    sd = torch.load(tmp_path / "a" / "adapter_model.bin", weights_only=True)
    assert sd["mixlora.layers.0.mlp.moe_gate.weight"].shape == (4, 32)
    assert sd["mixlora.layers.1.self_attn.o_proj.lora_A.weight"].shape == (4, 32)
    assert sd["mixlora.layers.0.mlp.down_proj.experts.2.lora_A.weight"].shape == (4, 48)
    config = json.load(open(tmp_path / "a" / "adapter_config.json"))
    assert config["lora_alpha"] == 8 and isinstance(config["lora_alpha"], int) and config["lora_dropout"] > 0
    assert config["task_type"] == "CAUSAL_LM" and config["routing_strategy"] == "mixlora"


def test_expert_count_mismatch_is_an_error(tmp_path):
    """An adapter whose weights hold a different number of experts than its config is refused."""
    save_adapter(mixlora_model(), tmp_path / "a", format="mixlora")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.load(open(path))
    config["num_experts"] = 3
    json.dump(config, open(path, "w"))
    with pytest.raises(ValueError, match="num_experts=3"):
        load_adapter(tiny_llama(), tmp_path / "a")


def test_plain_lora_goes_through_peft(tmp_path):
    """A LoraConfig adapter saves in the PEFT layout and load_adapter dispatches it back to lora.py."""
    model = inject_adapter(tiny_llama(), lora.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    randomize(model)
    save_adapter(model, tmp_path / "p")
    assert json.load(open(tmp_path / "p" / "adapter_config.json"))["peft_type"] == "LORA"
    loaded = load_adapter(tiny_llama(), tmp_path / "p")
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="MixLoRA"):
        save_adapter(model, tmp_path / "q", format="mixlora")


# ----------------------------------------------------------------------------------------------------
# interop with the reference `mixlora` package (transformers' Llama)


def package_logits(adapter_dir):
    """Logits of the `mixlora` package on transformers' Llama, eval mode, expert dropout off (mixlora.md sec. 8)."""
    from mixlora import MixLoraModelForCausalLM
    hf, _ = MixLoraModelForCausalLM.from_pretrained(str(adapter_dir), torch_dtype=torch.float32)
    hf.eval()
    for layer in hf.model.layers:
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.eval()
    with torch.no_grad():
        return hf(input_ids=IDS).logits


def test_mixlora_package_interop(tmp_path):
    """Our reference-format export gives the package's logits, and a file in the package's layout loads here."""
    pytest.importorskip("transformers")
    pytest.importorskip("mixlora")
    base = tiny_llama()
    llama.save_pretrained(base, str(tmp_path / "base"))
    # 1. ours -> package
    model = mixlora_model(quality_gate=False, lora_dropout=0.05).eval()
    model.adapter_config.base_model_name_or_path = str(tmp_path / "base")
    save_adapter(model, tmp_path / "ours", format="mixlora")
    with torch.no_grad():
        ours = model(IDS).logits
        assert (ours - base(IDS).logits).abs().max() > 1e-2  # the adapter matters
    diff1 = (package_logits(tmp_path / "ours") - ours).abs().max().item()
    # 2. package layout -> ours: random tensors under the reference names, MoE-PEFT's config keys
    g = torch.Generator().manual_seed(3)
    weights = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in adapter_tensors(model).items()}
    os.makedirs(tmp_path / "theirs")
    torch.save(weights, tmp_path / "theirs" / "adapter_model.bin")
    config = {"bias": "none", "peft_type": "MIXLORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
              "routing_strategy": "mixlora", "num_experts": 4, "act_fn": "silu", "top_k": 2,
              "base_model_name_or_path": str(tmp_path / "base"), "task_type": "CAUSAL_LM"}
    json.dump(config, open(tmp_path / "theirs" / "adapter_config.json", "w"))
    loaded = load_adapter(llama.from_pretrained(str(tmp_path / "base")), tmp_path / "theirs").eval()
    with torch.no_grad():
        diff2 = (package_logits(tmp_path / "theirs") - loaded(IDS).logits).abs().max().item()
    print(f"max |logit diff| ours->package {diff1:.2e}, package->ours {diff2:.2e}")
    assert diff1 < 1e-4 and diff2 < 1e-4


@pytest.mark.parametrize("adapter", ["lora", "dora", "mixlora", "mixlora-dynamic", "mixlora-switch", "gate"])
def test_bf16_autocast_matches_fp32(adapter):
    """Under CPU bf16 autocast every adapter trains (finite loss, gradients) and stays close to fp32."""
    model = tiny_llama()
    if adapter in ("lora", "dora"):
        cfg = lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(lora.PROJECTIONS), use_dora=adapter == "dora")
    else:
        cfg = MixLoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(lora.PROJECTIONS), num_experts=4,
                            routing_strategy="mixlora" if adapter == "gate" else adapter, quality_gate=adapter == "gate")
    inject_adapter(model, cfg)
    randomize(model)
    lora.mark_trainable(model)
    model.train()
    ref = model(IDS, attention_mask=MASK.long()).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(IDS, attention_mask=MASK.long()).logits
    loss = out.float().logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert len(grads) > 0 and all(torch.isfinite(g).all() for g in grads)   # unrouted experts may have none
    err = (out.float() - ref).abs().max() / ref.abs().max()                  # bf16 keeps ~3 significant digits
    assert err < 0.03, err
