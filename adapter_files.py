"""Adapter files: how every adapter of the project is written to a folder and read back, in the layouts
that PEFT and the reference implementation (MoE-PEFT, the `mixlora` package) read and write.

Every adapter folder is an adapter_config.json beside one weights file:

  LoRA, DoRA (PEFT's layout; peft_type "LORA"):
      adapter_config.json   the keys of PEFT's LoraConfig (r, lora_alpha, target_modules, use_dora, ...)
      adapter_model.safetensors (PEFT's adapter_model.bin, a torch.save'd dict, loads too), the tensors
      named as PEFT's PeftModel -> LoraModel wraps our module tree (PEFT_PREFIX):
          base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight          (r, d_in)
          base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight          (d_out, r)
          base_model.model.model.layers.{i}.self_attn.q_proj.lora_magnitude_vector  (d_out,) DoRA's m
          base_model.model.score.weight       (C, D) a classification head (modules_to_save, SEQ_CLS)
  MixLoRA, LoRAMoE, MoLA (the reference's tensor names; peft_type "MIXLORA", "LORAMOE", "MOLA"):
      adapter_config.json   MixLoRAConfig.to_dict, or the moe_linear config's: the reference's keys
      the tensors: model.layers.{i}.X -> mixlora.layers.{i}.X (loramoe., mola.), ".weight" appended to
      lora_A / lora_B, `score.weight` -> `classifier`:
          mixlora.layers.{i}.mlp.up_proj.experts.{e}.lora_A.weight                  (r, D)
          mixlora.layers.{i}.mlp.moe_gate.weight                                    (E, D)
          mixlora.layers.{i}.self_attn.q_proj.lora_A.weight                         (r, D)
      format="peft" (ours, the default) writes adapter_model.safetensors; format="mixlora" (the
      reference's) adapter_model.bin (torch.save of CPU fp32 tensors) with the config values of
      ../shared/reference/mixlora.md sec. 8. Both carry our extras (quality_gate, DoRA magnitudes),
      which the `mixlora` package ignores.

save_adapter and load_adapter are the one entry point for every adapter (load_adapter reads peft_type).
Every save goes through guards.atomic_folder (the previous version stays whole until the new one is in
place); every load checks each tensor's name, shape and values, with one-line errors naming the file.

Checked by test_all.py (TestAdapterFiles): exact save/load round trips of every adapter in both layouts,
corrupt files as one-line errors, and, where peft or mixlora are importable, the same logits as PEFT and
the `mixlora` package in both directions (test_peft_interop, test_mixlora_package_interop; LoRAMoE and
MoLA against MoE-PEFT: test_moe_peft_parity). Shape legend: r rank, d_in/d_out layer sizes, D hidden,
E experts, C classes.
"""

import json
import os
import re

import torch
from safetensors.torch import load_file, save_file

import guards  # atomic_folder, recover_folder
from lora import ADAPTER_KEYS, PROJECTIONS, LoraConfig, LoRALinear, classification_head, inject_lora, lora_layers
from moe_linear import ExpertLoRAConfig, LoRAMoEConfig, MoLAConfig
from moe_lora import ExpertProjection, MixLoRAConfig, inject_adapter

PEFT_PREFIX = "base_model.model."  # PEFT's PeftModel -> LoraModel -> our module tree
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MOE_CONFIGS = {"MIXLORA": MixLoRAConfig, "LORAMOE": LoRAMoEConfig, "MOLA": MoLAConfig}  # by peft_type

# ----------------------------------------------------------------------------------------------------
# PEFT's layout: LoRA and DoRA


def peft_config_dict(cfg, base_model_name_or_path="", task_type=None, modules_to_save=None):
    """adapter_config.json contents that PEFT's LoraConfig reads (peft_type "LORA")."""
    alpha = int(cfg.lora_alpha) if float(cfg.lora_alpha).is_integer() else cfg.lora_alpha
    return {
        "peft_type": "LORA", "task_type": task_type or cfg.task_type,
        "base_model_name_or_path": base_model_name_or_path, "r": cfg.r, "lora_alpha": alpha,
        "lora_dropout": cfg.lora_dropout, "target_modules": list(cfg.target_modules), "bias": cfg.bias,
        "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True if cfg.init_lora_weights == "original" else cfg.init_lora_weights,
        "modules_to_save": modules_to_save, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def config_from_peft(d, where="adapter_config.json"):
    """LoraConfig from a PEFT adapter_config.json dict; rejects the PEFT features this file does not implement."""
    if d.get("peft_type") != "LORA":
        raise ValueError(f"{where}: unknown peft_type {d.get('peft_type')!r}, expected 'LORA'")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "fan_in_fan_out", "lora_bias",
                "exclude_modules", "layer_replication", "target_parameters", "trainable_token_indices"):
        if d.get(key):  # PEFT writes these as null / {} / false when unused
            raise ValueError(f"{where}: {key}={d[key]!r} is not supported")
    init = d.get("init_lora_weights", True)
    target = d.get("target_modules")
    if isinstance(target, str) and target != "all-linear" and target not in PROJECTIONS:
        raise ValueError(f"{where}: regex target_modules {target!r} is not supported; list the module names")
    try:
        return LoraConfig(r=d.get("r"), lora_alpha=d.get("lora_alpha", 8), lora_dropout=d.get("lora_dropout", 0.0),
                          target_modules=target or [], use_rslora=bool(d.get("use_rslora", False)),
                          use_dora=bool(d.get("use_dora", False)), bias=d.get("bias", "none"),
                          init_lora_weights="gaussian" if init == "gaussian" else "original",
                          task_type=d.get("task_type") or "CAUSAL_LM")
    except (TypeError, ValueError) as e:  # a value of the wrong type or range
        raise ValueError(f"{where}: {e}") from None


def adapter_state_dict(model):
    """PEFT tensor names -> fp32 CPU tensors: lora_A.weight, lora_B.weight, lora_magnitude_vector, score."""
    out = {}
    for name, m in lora_layers(model):
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A  # (r, d_in)
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B  # (d_out, r)
        if m.use_dora:
            out[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = m.magnitude  # (d_out,)
    if getattr(model, "score", None) is not None:
        out[f"{PEFT_PREFIX}score.weight"] = model.score.weight  # (C, D), PEFT modules_to_save layout
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def save_peft_adapter(model, path, cfg=None, base_model_name_or_path=""):
    """Write `path`/adapter_config.json + adapter_model.safetensors, PEFT layout, atomically (write_adapter)."""
    cfg = cfg or model.adapter_config
    has_score = getattr(model, "score", None) is not None
    config = peft_config_dict(cfg, base_model_name_or_path, "SEQ_CLS" if has_score else None,
                              ["score"] if has_score else None)
    write_adapter(path, config, adapter_state_dict(model))


def write_adapter(path, config, tensors, weights="adapter_model.safetensors"):
    """Write `path`/adapter_config.json + `weights` (safetensors, or torch.save for the .bin name) with
    guards.atomic_folder: the previous version stays whole until the new one is in place. Other files in
    the folder are kept; the other weights format is dropped (read_adapter_files prefers safetensors)."""
    with guards.atomic_folder(path, keep_others=True, drop=ADAPTER_WEIGHTS) as tmp:
        if weights.endswith(".bin"):
            torch.save(tensors, os.path.join(tmp, weights))
        else:
            save_file(tensors, os.path.join(tmp, weights), metadata={"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)


def read_adapter_files(path):
    """(config dict, tensors dict) of an adapter folder: adapter_model.safetensors, else adapter_model.bin."""
    guards.recover_folder(path)  # an interrupted save left the previous version as path.prev
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found (is {path!r} an adapter folder?)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got a {type(config).__name__}")
    st, bin_ = os.path.join(path, "adapter_model.safetensors"), os.path.join(path, "adapter_model.bin")
    fn = st if os.path.isfile(st) else bin_
    if not os.path.isfile(fn):
        raise FileNotFoundError(f"{path}: neither adapter_model.safetensors nor adapter_model.bin found")
    try:  # many published adapters are torch.save'd dicts; weights_only refuses any pickled code
        tensors = load_file(fn) if fn == st else torch.load(fn, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and pickle raise their own types for truncated or foreign files
        raise ValueError(f"{fn}: not a readable adapter file ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not (isinstance(tensors, dict) and all(isinstance(t, torch.Tensor) for t in tensors.values())):
        raise ValueError(f"{fn}: expected a dict of tensors")
    return config, tensors


def copy_adapter_tensors(params, tensors, path, optional=None):
    """Copy the file's tensors into the model's adapter parameters {name: Parameter}: every file tensor
    must have a parameter and every parameter a tensor of its shape (names ending in `optional` may be
    absent: DoRA magnitudes, which the reference never saves). NaN, inf or integer tensors are refused."""
    for key in tensors:
        if key not in params:
            raise ValueError(f"{path}: tensor {key} has no matching module in the model")
    with torch.no_grad():
        for key, p in params.items():
            if key not in tensors:
                if optional and key.endswith(optional):
                    continue
                raise ValueError(f"{path}: tensor {key} missing from the adapter file")
            if tuple(tensors[key].shape) != tuple(p.shape):
                raise ValueError(f"{path}: tensor {key} has shape {tuple(tensors[key].shape)}, expected {tuple(p.shape)}")
            if not tensors[key].is_floating_point():
                raise ValueError(f"{path}: tensor {key} has dtype {tensors[key].dtype}, expected floating point")
            if not bool(torch.isfinite(tensors[key]).all()):  # a NaN adapter is never evaluated
                raise ValueError(f"{path}: tensor {key} holds NaN or inf values")
            p.copy_(tensors[key].to(p.dtype))


def load_peft_adapter(model, path):
    """Inject the adapter described by `path`/adapter_config.json into a loaded base model and load its
    tensors (PEFT names); recreates a `score` head. Every file tensor must match a model tensor by name and
    shape. NOTE: a DoRA file without magnitudes (as the reference writes) gets m = ||W0 + sBA||, which is
    what the reference does on load."""
    config, tensors = read_adapter_files(path)
    cfg = config_from_peft(config, os.path.join(path, "adapter_config.json"))
    if lora_layers(model):
        raise ValueError(f"model already has LoRA adapters; load {path} into a fresh base model")
    score_key = f"{PEFT_PREFIX}score.weight"
    if score_key in tensors:
        C, D = tensors[score_key].shape  # (C, D): the number of classes comes from the file
        emb = model.model.embed_tokens.weight  # (V, D)
        if D != emb.shape[1]:
            raise ValueError(f"{score_key}: shape {(C, D)} in file, expected (num_labels, {emb.shape[1]})")
        model.score = classification_head(D, C, emb.device)
    inject_lora(model, cfg)
    params = {}
    for name, m in lora_layers(model):
        params[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A
        params[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B
        if m.use_dora:
            params[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = m.magnitude
    if score_key in tensors:
        params[score_key] = model.score.weight
    tensors = {k.replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector"): v for k, v in tensors.items()}
    copy_adapter_tensors(params, tensors, path, optional="lora_magnitude_vector")  # m: filled in below from A, B
    with torch.no_grad():
        for name, m in lora_layers(model):
            if m.use_dora and f"{PEFT_PREFIX}{name}.lora_magnitude_vector" not in tensors:
                m.magnitude.copy_(m.weight_norm())
    model.adapter_config = cfg
    return model


# ----------------------------------------------------------------------------------------------------
# The reference's layout: MixLoRA, LoRAMoE, MoLA; the entry points for every adapter


def adapter_tensors(model):
    """{reference tensor name: parameter} for every adapter parameter of a MixLoRA, LoRAMoE or MoLA model."""
    prefix = getattr(model.adapter_config, "peft_type", "MIXLORA").lower()
    out = {}
    for name, p in model.named_parameters():
        if not any(k in name for k in ADAPTER_KEYS):
            continue
        key = "classifier" if name == "score.weight" else re.sub(r"^model\.layers\.", f"{prefix}.layers.", name)
        out[key + ".weight" if key.endswith(("lora_A", "lora_B")) else key] = p
    return out


def save_adapter(model, path, format="peft"):
    """Write the model's adapter to the folder `path` (atomically: written next to it, then renamed).

    LoRA/DoRA: PEFT layout (save_peft_adapter). MixLoRA, LoRAMoE, MoLA: format="peft" (default) writes
    the native adapter_config.json + adapter_model.safetensors; format="mixlora" the reference layout
    (adapter_model.bin + a config following mixlora.md sec. 8, peft_type MIXLORA / LORAMOE / MOLA) that
    MoE-PEFT (and, for MixLoRA, the `mixlora` package) load."""
    cfg = getattr(model, "adapter_config", None)
    if cfg is None:
        raise ValueError("model has no adapter: call inject_adapter or load_adapter first")
    if format not in ("peft", "mixlora"):
        raise ValueError(f"format: expected 'peft' or 'mixlora', got {format!r}")
    moe = isinstance(cfg, (MixLoRAConfig, ExpertLoRAConfig))
    base = (cfg.base_model_name_or_path if moe else "") or getattr(model, "path", "")
    if not moe:
        if format == "mixlora":
            raise ValueError("format='mixlora' needs a MixLoRA, LoRAMoE or MoLA adapter; this model has a plain LoRA")
        save_peft_adapter(model, path, cfg, base_model_name_or_path=base)
        return path
    config = cfg.to_dict(reference=format == "mixlora")
    config.update(base_model_name_or_path=base, task_type="SEQ_CLS" if getattr(model, "score", None) is not None
                  else cfg.task_type or "CAUSAL_LM")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter_tensors(model).items()}
    write_adapter(path, config, tensors, ADAPTER_WEIGHTS[format == "mixlora"])
    return path


def load_adapter(model, path, trash_expert=None):
    """Inject and load the adapter folder `path` into a freshly loaded base model; returns the model.

    Recognises PEFT LoRA/DoRA folders (load_peft_adapter), our native MixLoRA, LoRAMoE and MoLA folders
    and the reference's (peft_type "MIXLORA", "LORAMOE", "MOLA", adapter_model.bin). Every file tensor must
    match an adapter tensor by name and shape; the expert count must agree with the config. DoRA magnitudes
    absent from the file (the reference never stores them) are set to ||W0 + sBA||, as the reference does."""
    config, tensors = read_adapter_files(path)
    if config.get("peft_type") not in MOE_CONFIGS:
        return load_peft_adapter(model, path)
    where = os.path.join(path, "adapter_config.json")
    try:
        cfg = MOE_CONFIGS[config["peft_type"]].from_dict(config)
        L = len(model.model.layers)
        counts = cfg.layer_experts(L) if isinstance(cfg, ExpertLoRAConfig) else [cfg.num_experts] * L
    except (TypeError, ValueError) as e:  # a value of the wrong type or range
        raise ValueError(f"{where}: {e}") from None
    for key, t in tensors.items():
        layer, m = re.search(r"\.layers\.(\d+)\.", key), re.search(r"\.experts\.(\d+)\.", key)
        if layer is None or int(layer.group(1)) >= L:
            continue                                                # copy_adapter_tensors names it
        E = counts[int(layer.group(1))]
        if key.endswith("moe_gate.weight") and t.shape[0] != E or m and int(m.group(1)) >= E:
            n = t.shape[0] if key.endswith("moe_gate.weight") else f"at least {int(m.group(1)) + 1}"
            raise ValueError(f"{where}: num_experts={E} but the weights hold {n} experts ({key})")
    if "classifier" in tensors and getattr(model, "score", None) is None:
        C, D = tensors["classifier"].shape                          # (C, D): classes from the file
        model.score = classification_head(D, C, model.model.embed_tokens.weight.device)
    inject_adapter(model, cfg, trash_expert)
    params = adapter_tensors(model)
    copy_adapter_tensors(params, tensors, path, optional="magnitude")  # m: filled in below from A, B
    with torch.no_grad():
        for name, m in model.named_modules():                       # reference DoRA files: m = ||W0 + sBA||
            key = f"{config['peft_type'].lower()}." + name.removeprefix("model.") + ".magnitude"
            if isinstance(m, LoRALinear) and m.use_dora and key not in tensors:
                m.magnitude.copy_(m.weight_norm())
            if isinstance(m, ExpertProjection) and m.use_dora:
                for e, ex in enumerate(m.experts):
                    if key.replace(".magnitude", f".experts.{e}.magnitude") not in tensors:
                        ex.magnitude.copy_(m.weight_norm(e))
    return model
