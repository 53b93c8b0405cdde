"""moe-lora tests: plain pytest functions, tiny random checkpoints written in the Hugging Face layout,
plus the real SmolLM2-135M checkpoint when MOE_LORA_CHECKPOINT names its folder (.ci/run builds it).

Run: python -m pytest -q test_all.py
"""
# ----------------------------------------------------------------------------------------------------
# llama.py: tiny checkpoints written in the Hugging Face layout, the golden file, bad input

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import llama

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "..", "shared", "golden", "smollm2-135m-instruct.json")
CKPT = os.environ.get("MOE_LORA_CHECKPOINT")
needs_ckpt = pytest.mark.skipif(not (CKPT and os.path.isdir(CKPT)), reason="set MOE_LORA_CHECKPOINT to a SmolLM2-135M-Instruct folder (python ../shared/tools/smollm2_checkpoint.py --out DIR)")

TINY_WORDS = "the a cat dog sat on mat is red blue big small yes no one two three four five six seven eight nine ten A B C D E answer question true false".split()


def tiny_config(**overrides):
    cfg = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(overrides)
    return llama.LlamaConfig(**cfg)


def write_tiny_tokenizer(path):
    """A word-level tokenizer.json (+ tokenizer_config.json with a chat template) over TINY_WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in TINY_WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(os.path.join(path, "tokenizer.json"))
    template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}{% if add_generation_prompt %}answer {% endif %}"
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True, "chat_template": template}, f)


def write_tiny_checkpoint(path, seed=0, **overrides):
    """Random tiny Llama saved as config.json + model.safetensors + tokenizer files; returns the model."""
    torch.manual_seed(seed)
    model = llama.LlamaForCausalLM(tiny_config(**overrides))
    for name, p in model.named_parameters():
        if "bias" in name:
            torch.nn.init.normal_(p, std=0.1)   # non-zero biases, so a dropped bias is seen
    os.makedirs(path, exist_ok=True)
    llama.save_pretrained(model, str(path))
    write_tiny_tokenizer(str(path))
    return model.eval()


def test_golden_parity():
    """On the real SmolLM2 checkpoint, fp32 logits match transformers to 1e-3, mean NLL to 1e-4, greedy exactly."""
    if not (CKPT and os.path.isdir(CKPT)):
        pytest.skip("set MOE_LORA_CHECKPOINT to a SmolLM2-135M-Instruct folder (python ../shared/tools/smollm2_checkpoint.py --out DIR)")
    golden = json.load(open(GOLDEN))
    model, tok = llama.from_pretrained(CKPT), llama.load_tokenizer(CKPT)
    for p in golden["prompts"]:
        text = tok.apply_chat_template(p["messages"]) if p["kind"] == "chat" else p["text"]
        assert tok.encode(text) == p["input_ids"], p["name"]
        ids = torch.tensor([p["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0]                                           # (T,V)
        for lp in p["last_positions"]:
            torch.testing.assert_close(logits[lp["position"], lp["top_ids"]], torch.tensor(lp["top_logits"]), atol=1e-3, rtol=0)
        logp = torch.log_softmax(logits.double(), -1)
        nll = -logp[:-1].gather(1, ids[0, 1:, None]).mean().item()
        assert abs(nll - p["mean_nll"]) < 1e-4, (p["name"], nll)
        assert llama.generate(model, ids, p["greedy"]["steps"])[0].tolist() == p["greedy"]["ids"], p["name"]


@needs_ckpt
def test_golden_bf16_close():
    """bf16 weights on CPU still rank the golden top-1 token first at the last positions of the text prompt."""
    golden = json.load(open(GOLDEN))
    model = llama.from_pretrained(CKPT, dtype=torch.bfloat16)
    p = golden["prompts"][0]
    with torch.no_grad():
        logits = model(torch.tensor([p["input_ids"]])).logits[0].float()
    assert logits.dtype == torch.float32 and next(model.parameters()).dtype == torch.bfloat16
    for lp in p["last_positions"]:
        assert logits[lp["position"]].argmax().item() == lp["top_ids"][0]


@pytest.mark.parametrize("overrides", [
    dict(),                                                        # GQA, untied
    dict(tie_word_embeddings=True, num_key_value_heads=4),         # tied head, MHA
    dict(attention_bias=True, mlp_bias=True, head_dim=16),         # biases, explicit head_dim != D/H
    dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2"),  # bias on q/k/v only
    dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    dict(rope_scaling={"type": "linear", "factor": 2.0}, architectures=["MistralForCausalLM"], model_type="mistral"),
])
def test_roundtrip_and_shapes(tmp_path, overrides):
    """A saved tiny checkpoint loads back with identical logits of shape (B,T,V), for each supported variant."""
    ref = write_tiny_checkpoint(tmp_path, **overrides)
    model = llama.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 48, (2, 7))
    with torch.no_grad():
        out = model(ids)
        torch.testing.assert_close(out.logits, ref(ids).logits, atol=0, rtol=0)
    assert out.logits.shape == (2, 7, 48) and out.hidden.shape == (2, 7, 32) and len(out.aux) == 2
    if overrides.get("model_type") == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None and model.model.layers[0].self_attn.o_proj.bias is None
    if overrides.get("tie_word_embeddings"):
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_sharded_loading(tmp_path):
    """A checkpoint split into two shards with model.safetensors.index.json loads like the single file."""
    from safetensors.torch import load_file, save_file
    ref = write_tiny_checkpoint(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fn, keys in shards.items():
        save_file({k: sd[k] for k in keys}, tmp_path / fn)
    json.dump({"metadata": {}, "weight_map": {k: fn for fn, keys in shards.items() for k in keys}}, open(tmp_path / "model.safetensors.index.json", "w"))
    os.remove(tmp_path / "model.safetensors")
    ids = torch.randint(0, 48, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(llama.from_pretrained(str(tmp_path))(ids).logits, ref(ids).logits, atol=0, rtol=0)


def test_llama3_inv_freq_formula():
    """llama3 rope scaling equals the Llama 3.1 formula evaluated element by element in plain Python."""
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = tiny_config(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=rs)
    expected = []
    for i in range(0, 64, 2):
        f = 1.0 / 500000.0 ** (i / 64)
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4.0:
            expected.append(f)                      # high frequency: unchanged
        elif wavelen > 8192 / 1.0:
            expected.append(f / 8.0)                # low frequency: divided by factor
        else:
            s = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append((1 - s) * f / 8.0 + s * f)
    torch.testing.assert_close(llama.rope_inv_freq(cfg), torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_equivalence(tmp_path, side):
    """A padded row gives the same logits at its real tokens as that row alone, with left or right padding."""
    model = write_tiny_checkpoint(tmp_path)
    short, long = torch.randint(3, 48, (1, 5)), torch.randint(3, 48, (1, 9))
    pad = torch.zeros(1, 4, dtype=torch.long)
    row = torch.cat([pad, short], 1) if side == "left" else torch.cat([short, pad], 1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1) if side == "left" else torch.cat([torch.ones(1, 5), torch.zeros(1, 4)], 1)
    batch, am = torch.cat([row, long]), torch.cat([mask, torch.ones(1, 9)]).long()
    with torch.no_grad():
        out = model(batch, attention_mask=am).logits
        real = out[0, 4:] if side == "left" else out[0, :5]
        torch.testing.assert_close(real, model(short).logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], model(long).logits[0], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(out).all()


def test_logits_mask_selects_positions(tmp_path):
    """logits_mask computes the LM head only at the chosen positions, equal to those rows of the full logits."""
    model = write_tiny_checkpoint(tmp_path)
    ids = torch.randint(0, 48, (2, 6))
    sel = torch.zeros(2, 6, dtype=torch.bool)
    sel[0, 3:], sel[1, 5] = True, True
    with torch.no_grad():
        part = model(ids, logits_mask=sel).logits                       # (M,V)
        torch.testing.assert_close(part, model(ids).logits[sel])
    assert part.shape == (4, 48)


def test_kv_cache_greedy_equals_full_reforward(tmp_path):
    """Cached greedy decoding of left-padded batched prompts gives exactly the full re-forward tokens."""
    model = write_tiny_checkpoint(tmp_path)
    ids = torch.randint(3, 48, (3, 6))
    am = torch.ones(3, 6, dtype=torch.long)
    am[1, :2], am[2, :4] = 0, 0
    fast = llama.generate(model, ids, 12, attention_mask=am)
    slow = llama.generate(model, ids, 12, attention_mask=am, use_cache=False)
    assert fast.shape == (3, 12) and torch.equal(fast, slow)
    alone = llama.generate(model, ids[2:, 4:], 12)                        # the padded row on its own
    assert torch.equal(fast[2], alone[0])


def test_generate_eos_and_sampling(tmp_path):
    """Rows that emit EOS keep emitting it; top-k=1 sampling equals greedy; sampling is seeded."""
    model = write_tiny_checkpoint(tmp_path)
    ids = torch.randint(3, 48, (2, 4))
    greedy = llama.generate(model, ids, 8)
    eos = greedy[0, 2].item()
    out = llama.generate(model, ids, 8, eos_id=eos)
    first = (out[0] == eos).nonzero()[0, 0]
    assert (out[0, first:] == eos).all()
    assert torch.equal(llama.generate(model, ids, 8, temperature=1.0, top_k=1), greedy)
    torch.manual_seed(3)
    a = llama.generate(model, ids, 8, temperature=1.0, top_p=0.9)
    torch.manual_seed(3)
    assert torch.equal(a, llama.generate(model, ids, 8, temperature=1.0, top_p=0.9))


def test_tokenizer_special_tokens_and_chat(tmp_path):
    """BOS/EOS/PAD come from tokenizer_config.json; encode/decode round-trip; the chat template renders."""
    write_tiny_checkpoint(tmp_path)
    tok = llama.load_tokenizer(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    ids = tok.encode("the cat sat on the mat")
    assert ids[0] == 1 and tok.encode("the cat", add_bos=False) == ids[1:3]
    assert tok.decode(ids) == "the cat sat on the mat"
    chat = tok.apply_chat_template([{"role": "user", "content": "is the cat red"}])
    assert chat == "user is the cat red </s> answer "


def test_hf_transformers_oracle(tmp_path):
    """Tiny Llama, Qwen2 and llama3-scaled checkpoints give transformers' logits (optional oracle)."""
    transformers = pytest.importorskip("transformers")
    for overrides in [dict(), dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
                      dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32})]:
        d = tmp_path / str(len(os.listdir(tmp_path)))
        ours = write_tiny_checkpoint(d, **overrides)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(d), torch_dtype=torch.float32).eval()
        ids = torch.randint(0, 48, (2, 20))
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)


# Bad input: one line naming the file/key, a non-zero exit, no traceback.

def _corrupt(tmp_path, how):
    write_tiny_checkpoint(tmp_path)
    from safetensors.torch import load_file, save_file
    fn = tmp_path / "model.safetensors"
    if how == "no_config":
        os.remove(tmp_path / "config.json")
    elif how == "bad_json":
        open(tmp_path / "config.json", "w").write("{not json")
    elif how == "arch":
        cfg = json.load(open(tmp_path / "config.json"))
        cfg["architectures"] = ["GPT2LMHeadModel"]
        json.dump(cfg, open(tmp_path / "config.json", "w"))
    elif how == "rope":
        cfg = json.load(open(tmp_path / "config.json"))
        cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
        json.dump(cfg, open(tmp_path / "config.json", "w"))
    elif how == "truncated":
        data = open(fn, "rb").read()
        open(fn, "wb").write(data[: len(data) // 2])
    else:
        sd = load_file(fn)
        if how == "missing":
            sd.pop("model.norm.weight")
        elif how == "extra":
            sd["model.layers.9.mlp.up_proj.weight"] = torch.zeros(1)
        elif how == "shape":
            sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(3, 32)
        save_file(sd, fn)
    return str(tmp_path)


@pytest.mark.parametrize("how,words", [
    ("no_config", "no config.json"), ("bad_json", "not valid JSON"), ("arch", "GPT2LMHeadModel"),
    ("rope", "'yarn'"), ("truncated", "safetensors"), ("missing", "model.norm.weight"),
    ("extra", "model.layers.9.mlp.up_proj.weight"), ("shape", "model.layers.1.self_attn.k_proj.weight"),
])
def test_bad_checkpoint_errors(tmp_path, how, words):
    """Each broken checkpoint stops with a one-line error that names the problem."""
    path = _corrupt(tmp_path, how)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        llama.from_pretrained(path)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_prompt_longer_than_context(tmp_path):
    """A prompt longer than max_position_embeddings is refused with a clear error."""
    model = write_tiny_checkpoint(tmp_path, max_position_embeddings=16)
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="context"):
        llama.generate(model, torch.zeros(1, 10, dtype=torch.long), 10)


def test_cli_errors_have_no_traceback(tmp_path):
    """python llama.py with a missing folder exits non-zero with one 'error:' line and no traceback."""
    r = subprocess.run([sys.executable, os.path.join(HERE, "llama.py"), "--model", str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_generates(tmp_path):
    """The demo prints the prompt followed by generated words."""
    write_tiny_checkpoint(tmp_path)
    r = subprocess.run([sys.executable, os.path.join(HERE, "llama.py"), "--model", str(tmp_path), "--prompt", "the cat", "--max-new-tokens", "4"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("the cat") and len(r.stdout.split()) > 2
