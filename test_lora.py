"""Tests for lora.py: LoRA / rsLoRA / DoRA layers, injection, merging, PEFT-format adapter files.

Run: python -m pytest -q test_lora.py   (the PEFT interop test needs peft + transformers, e.g. /work/venv-hf)
"""
import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import llama
from lora import (PROJECTIONS, LoraConfig, LoRALinear, inject_lora, load_peft_adapter, lora_layers,
                  lora_plus_param_groups, mark_trainable, merge_adapters, save_merged, save_peft_adapter,
                  unmerge_adapters)


def tiny_llama(seed=0, **overrides):
    """A 2-layer random Llama (GQA 4/2 heads, tied embeddings) in eval mode."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0,
              rms_norm_eps=1e-5)
    return llama.LlamaForCausalLM(llama.LlamaConfig(**{**kw, **overrides})).eval()


def randomize_adapters(model, seed=1):
    """Give every B (and m) non-zero values so adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
            if m.use_dora:
                m.magnitude.mul_(1 + 0.1 * torch.randn(m.magnitude.shape, generator=g))


IDS = torch.tensor([[5, 9, 3, 17, 42, 8, 1, 30], [7, 7, 2, 60, 11, 4, 19, 23]])  # (B=2, T=8), no pad id 0


# ----------------------------------------------------------------------------------------------------
# the layer


@pytest.mark.parametrize("use_dora", [False, True])
def test_noop_at_init(use_dora):
    """LoRA and DoRA layers reproduce the base layer exactly at init (B = 0, m = ||W0||)."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = LoRALinear(base, r=4, lora_alpha=8, lora_dropout=0.0, use_dora=use_dora)
    x = torch.randn(3, 5, 16)
    y = layer(x)
    assert y.shape == (3, 5, 12)
    torch.testing.assert_close(y, base(x), rtol=0, atol=1e-6 if use_dora else 0)


def test_dora_magnitude_init_is_w0_row_norm():
    """DoRA's magnitude starts at the L2 norm over d_in of each row of W0."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = LoRALinear(base, r=4, lora_alpha=8, use_dora=True)
    assert layer.magnitude.shape == (12,)
    torch.testing.assert_close(layer.magnitude.detach(), torch.linalg.norm(base.weight, dim=1))


def hand_layer(r, alpha, A, B, use_rslora=False, use_dora=False):
    """LoRALinear on W0 = [[1, 0], [0, 2]], b = [0.5, -1] with the given A, B."""
    base = nn.Linear(2, 2)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        base.bias.copy_(torch.tensor([0.5, -1.0]))
    layer = LoRALinear(base, r=r, lora_alpha=alpha, use_rslora=use_rslora, use_dora=use_dora)
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor(A))
        layer.lora_B.copy_(torch.tensor(B))
    return layer


def test_hand_computed_lora():
    """r=1, alpha=2 (s=2), x=[1,2]: W0x=[1,4], Ax=3, BAx=[3,6] -> y=[1+0.5+6, 4-1+12]."""
    layer = hand_layer(1, 2, [[1.0, 1.0]], [[1.0], [2.0]])
    y = layer(torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(y, torch.tensor([[1 + 0.5 + 2 * 3, 4 - 1 + 2 * 6]]))


def test_hand_computed_rslora():
    """r=2, alpha=2, rsLoRA s=2/sqrt(2); A=I, B=[[1,0],[1,1]], x=[1,2]: BAx=[1,3]."""
    layer = hand_layer(2, 2, [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]], use_rslora=True)
    assert layer.scaling == pytest.approx(math.sqrt(2))
    y = layer(torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(y, torch.tensor([[1 + 0.5 + math.sqrt(2) * 1, 4 - 1 + math.sqrt(2) * 3]]))


def test_hand_computed_dora():
    """DoRA r=1, s=2, m=[2,1]: W0+sBA=[[3,2],[4,6]], norms sqrt(13), sqrt(52); (W0+sBA)x=[7,16]; y=m/n*[7,16]+b."""
    layer = hand_layer(1, 2, [[1.0, 1.0]], [[1.0], [2.0]], use_dora=True)
    with torch.no_grad():
        layer.magnitude.copy_(torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(layer.weight_norm(), torch.tensor([math.sqrt(13), math.sqrt(52)]))
    y = layer(torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(y, torch.tensor([[2 * 7 / math.sqrt(13) + 0.5, 1 * 16 / math.sqrt(52) - 1]]))


def test_efficient_dora_norm_matches_naive():
    """||W0||^2 + 2s rowsum(B*W0A^T) + s^2 rowsum(B*BAA^T) equals the norm of the materialised W0 + sBA,
    also after W0 changes in place (the ||W0||^2 cache follows the tensor's version counter)."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(40, 24), r=8, lora_alpha=16, use_dora=True)
    nn.init.normal_(layer.lora_B, std=0.2)
    naive = lambda: torch.linalg.norm(layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A, dim=1)
    torch.testing.assert_close(layer.weight_norm(), naive().detach(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        layer.base.weight.mul_(3.0)
    torch.testing.assert_close(layer.weight_norm(), naive().detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_dora", [False, True])
def test_gradients_match_naive_reference(use_dora):
    """Gradients w.r.t. A, B, m and x equal those of the naive (m/||W0+sBA||.detach()) * (W0+sBA) x + b."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(10, 6), r=3, lora_alpha=6, use_dora=use_dora)
    nn.init.normal_(layer.lora_B, std=0.3)
    if use_dora:
        with torch.no_grad():
            layer.magnitude.mul_(torch.rand(6) + 0.5)
    x = torch.randn(2, 10, 4).transpose(1, 2).requires_grad_()  # (2, 4, d_in), not contiguous
    w = torch.randn(2, 4, 6)
    (layer(x) * w).sum().backward()
    names = ["lora_A", "lora_B"] + (["magnitude"] if use_dora else [])
    ours = [getattr(layer, n).grad for n in names] + [x.grad]
    ref = {n: getattr(layer, n).detach().clone().requires_grad_() for n in names}
    x2 = x.detach().clone().requires_grad_()
    V = layer.base.weight + layer.scaling * ref["lora_B"] @ ref["lora_A"]  # (d_out, d_in)
    if use_dora:
        V = (ref["magnitude"] / torch.linalg.norm(V, dim=1).detach())[:, None] * V
    ((F.linear(x2, V) + layer.base.bias) * w).sum().backward()
    for g, r in zip(ours, [ref[n].grad for n in names] + [x2.grad]):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_eval_makes_dropout_deterministic():
    """With lora_dropout > 0, train() outputs vary and eval() outputs are identical and dropout-free."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), r=4, lora_alpha=8, lora_dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(8, 16)
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    expected = layer.base(x) + layer.scaling * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)
    assert torch.equal(layer(x), layer(x))


def test_bf16_base_keeps_fp32_adapters():
    """On a bf16 base the adapter tensors are fp32 and the output keeps the input dtype (bf16)."""
    layer = LoRALinear(nn.Linear(16, 8).to(torch.bfloat16), r=4, lora_alpha=8, use_dora=True)
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.magnitude.dtype == torch.float32
    assert layer(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------
# injection, training, merging


def test_inject_all_projections_and_counts():
    """Injection wraps every targeted projection; mark_trainable trains only adapter tensors."""
    model = tiny_llama()
    inject_lora(model, LoraConfig(r=4, target_modules=list(PROJECTIONS), use_dora=True))
    assert len(lora_layers(model)) == 2 * 7 and model.adapter_config.r == 4
    trainable, total = mark_trainable(model)
    expected = sum(m.lora_A.numel() + m.lora_B.numel() + m.magnitude.numel() for _, m in lora_layers(model))
    assert trainable == expected and total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("use_dora", [False, True])
def test_only_adapters_train(use_dora):
    """After AdamW steps, only adapter tensors got gradients and every base tensor is bit-identical."""
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, LoraConfig(r=4, lora_dropout=0.1, target_modules=list(PROJECTIONS), use_dora=use_dora))
    mark_trainable(model)
    model.train()
    opt = torch.optim.AdamW(lora_plus_param_groups(model, 1e-2, 4.0, 0.01))
    for _ in range(3):
        logits = model(IDS).logits  # (B, T, V)
        F.cross_entropy(logits[:, :-1].reshape(-1, 64), IDS[:, 1:].reshape(-1)).backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == ("lora_" in name or "magnitude" in name), name
        opt.step()
        opt.zero_grad()
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items()}
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert any(m.lora_B.abs().sum() > 0 for _, m in lora_layers(model))


def test_lora_plus_groups():
    """LoRA+ gives lora_B and 1-D magnitudes lr*ratio, lora_A lr; every trainable tensor appears once."""
    model = inject_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    mark_trainable(model)
    groups = lora_plus_param_groups(model, 1e-3, 16.0, 0.1)
    by_id = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert by_id[id(p)]["lr"] == (1e-3 if "lora_A" in name else 1.6e-2), name
    assert sum(len(g["params"]) for g in groups) == 3 * 2
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        lora_plus_param_groups(model, 1e-3, 0.5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_unmerge(use_dora):
    """Merged and unmerged logits agree to 1e-5 (fp32) and unmerge restores W0."""
    model = tiny_llama()
    w0 = model.model.layers[0].self_attn.q_proj.weight.clone()
    inject_lora(model, LoraConfig(r=4, target_modules=list(PROJECTIONS), use_dora=use_dora))
    randomize_adapters(model)
    ref = model(IDS).logits
    merge_adapters(model)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.base.weight, w0)
    torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-5, atol=1e-5)
    unmerge_adapters(model)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.base.weight, w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-5, atol=1e-5)


def test_save_merged_roundtrip(tmp_path):
    """save_merged writes an HF folder that llama.from_pretrained loads with the adapted logits."""
    model = inject_lora(tiny_llama(), LoraConfig(r=4, target_modules=list(PROJECTIONS), use_dora=True))
    randomize_adapters(model)
    ref = model(IDS).logits
    save_merged(model, str(tmp_path / "merged"))
    assert lora_layers(model) and not any(m.merged for _, m in lora_layers(model))
    loaded = llama.from_pretrained(str(tmp_path / "merged"))
    assert not lora_layers(loaded)
    torch.testing.assert_close(loaded(IDS).logits, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# adapter files


@pytest.mark.parametrize("use_dora", [False, True])
def test_save_load_reproduces_logits(tmp_path, use_dora):
    """An adapter saved then loaded into a fresh base model gives bit-identical logits (with a score head)."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=use_dora)
    model = inject_lora(tiny_llama(), cfg)
    randomize_adapters(model)
    model.score = nn.Linear(32, 3, bias=False)
    out = model(IDS)
    save_peft_adapter(model, str(tmp_path / "a"), base_model_name_or_path="tiny")
    config = json.load(open(tmp_path / "a" / "adapter_config.json"))
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    loaded = load_peft_adapter(tiny_llama(), str(tmp_path / "a"))
    out2 = loaded(IDS)
    assert torch.equal(out2.logits, out.logits)
    assert torch.equal(loaded.score(out2.hidden), model.score(out.hidden))
    assert loaded.adapter_config.use_dora == use_dora


def test_load_bin_adapter(tmp_path):
    """An adapter_model.bin (torch.save'd dict, PEFT names, no DoRA magnitudes as the reference writes) loads."""
    cfg = LoraConfig(r=2, target_modules=["k_proj", "up_proj"], use_dora=True)
    model = inject_lora(tiny_llama(), cfg)
    randomize_adapters(model)
    save_peft_adapter(model, str(tmp_path / "a"))
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    torch.save({k: v for k, v in sd.items() if "magnitude" not in k}, tmp_path / "a" / "adapter_model.bin")
    os.remove(tmp_path / "a" / "adapter_model.safetensors")
    loaded = load_peft_adapter(tiny_llama(), str(tmp_path / "a"))
    for (_, m), (_, m2) in zip(lora_layers(model), lora_layers(loaded)):
        assert torch.equal(m.lora_B, m2.lora_B)
        torch.testing.assert_close(m2.magnitude.detach(), m2.weight_norm())  # reference behaviour: m/n = 1


def test_shape_mismatch_names_tensor(tmp_path):
    """Loading into a model of other shapes fails with an error naming the tensor."""
    model = inject_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    save_peft_adapter(model, str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight has shape"):
        load_peft_adapter(tiny_llama(hidden_size=48, head_dim=8), str(tmp_path / "a"))


def test_bad_inputs(tmp_path):
    """Missing config, unknown peft_type, absent target, r <= 0 and too-large r each raise one clear error."""
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft_adapter(tiny_llama(), str(tmp_path))
    model = inject_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    save_peft_adapter(model, str(tmp_path / "a"))
    path = tmp_path / "a" / "adapter_config.json"
    config = json.load(open(path))
    json.dump({**config, "peft_type": "IA3"}, open(path, "w"))
    with pytest.raises(ValueError, match="unknown peft_type 'IA3'"):
        load_peft_adapter(tiny_llama(), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="target module 'c_attn' not found"):
        inject_lora(tiny_llama(), LoraConfig(target_modules=["q_proj", "c_attn"]))
    for r in (0, -3):
        with pytest.raises(ValueError, match="r must be a positive integer"):
            LoraConfig(r=r)
    with pytest.raises(ValueError, match=r"r=40 is larger than min\(d_in, d_out\)=16 of model.layers.0.self_attn.k_proj"):
        inject_lora(tiny_llama(), LoraConfig(r=40, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        inject_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))


# ----------------------------------------------------------------------------------------------------
# PEFT interop (runs only where transformers + peft are installed, e.g. /work/venv-hf/bin/python -m pytest)


def test_peft_interop(tmp_path):
    """PEFT LoRA/DoRA adapters load here with the same logits, and ours load in PEFT with the same logits."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    llama.save_pretrained(tiny_llama(), str(tmp_path / "base"))
    hf_base = lambda cls=transformers.LlamaForCausalLM, **kw: cls.from_pretrained(
        str(tmp_path / "base"), dtype=torch.float32, **kw).eval()
    worst = 0.0
    for use_dora in (False, True):
        # PEFT -> ours
        torch.manual_seed(0)
        pcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=list(PROJECTIONS), use_dora=use_dora)
        pm = peft.get_peft_model(hf_base(), pcfg)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name or "magnitude" in name:
                    p.add_(torch.randn_like(p) * 0.1)
        pm.save_pretrained(str(tmp_path / f"peft{use_dora}"))
        ref = pm.eval()(IDS).logits
        assert (ref - hf_base()(IDS).logits).abs().max() > 1e-3  # the adapter really changes the logits
        ours = load_peft_adapter(llama.from_pretrained(str(tmp_path / "base")), str(tmp_path / f"peft{use_dora}"))
        diff = (ours.eval()(IDS).logits - ref).abs().max().item()
        # ours -> PEFT
        ours2 = inject_lora(llama.from_pretrained(str(tmp_path / "base")),
                            LoraConfig(r=4, lora_alpha=8, target_modules=list(PROJECTIONS), use_dora=use_dora))
        randomize_adapters(ours2)
        save_peft_adapter(ours2, str(tmp_path / f"ours{use_dora}"), base_model_name_or_path=str(tmp_path / "base"))
        pm2 = peft.PeftModel.from_pretrained(hf_base(), str(tmp_path / f"ours{use_dora}")).eval()
        diff2 = (pm2(IDS).logits - ours2.eval()(IDS).logits).abs().max().item()
        assert (pm2(IDS).logits - hf_base()(IDS).logits).abs().max() > 1e-3
        print(f"dora={use_dora}: PEFT->ours max |dlogit| {diff:.2e}, ours->PEFT {diff2:.2e}")
        assert diff < 1e-4 and diff2 < 1e-4
        worst = max(worst, diff, diff2)
    # classification head (modules_to_save ["score"]) both ways; HF pools the last non-pad token
    ours3 = inject_lora(llama.from_pretrained(str(tmp_path / "base")), LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_adapters(ours3)
    ours3.score = nn.Linear(32, 3, bias=False)
    save_peft_adapter(ours3, str(tmp_path / "cls"))
    hf_cls = hf_base(transformers.LlamaForSequenceClassification, num_labels=3)
    pm3 = peft.PeftModel.from_pretrained(hf_cls, str(tmp_path / "cls")).eval()
    ref3 = ours3.score(ours3(IDS).hidden[:, -1])  # (B, C)
    diff3 = (pm3(IDS).logits - ref3).abs().max().item()
    pm3.save_pretrained(str(tmp_path / "cls2"))
    ours4 = load_peft_adapter(llama.from_pretrained(str(tmp_path / "base")), str(tmp_path / "cls2"))
    diff4 = (ours4.score(ours4(IDS).hidden[:, -1]) - pm3(IDS).logits).abs().max().item()
    print(f"SEQ_CLS score head: ours->PEFT {diff3:.2e}, PEFT->ours {diff4:.2e}; worst LM logit diff {worst:.2e}")
    assert diff3 < 1e-4 and diff4 < 1e-4
