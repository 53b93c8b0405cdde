"""adapters.py: stage 3 of train.py, the run's adapters: a fresh one from the flags, one loaded from
--adapter-path (evaluated, trained further, or given quality gates for the Select-MoE warm-up), several
trained together on one frozen base (multi.py), fresh or loaded from --adapter-path A,B, or several loaded
for --eval-only; then what trains is
marked and the model is accelerated (kernels.accelerate, unless --no-accelerate).

Each adapter of the run is a `Trainee`: its flags, its model (the whole model when it trains alone, its
multi.py view among several), and what the loop keeps for it (optimiser, best score, log, expert load).
The configs the flags build are options.py's (adapter_config, parse_adapters, adopt_adapter_settings).

Checked in test_all.py: a fresh adapter per kind (the CLI's config equals the API's default config),
--adapter-path continued with its own kind and rank and a contradicting flag refused, the warm-up
training only gates and routers, several adapters each equal to training it alone
(test_multi_adapter_*), a classification head per adapter.
"""
import argparse
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import data
import kernels
import multi
import selection
from adapter_files import load_adapter
from lora import classification_head, mark_trainable
from moe_lora import inject_adapter
from options import adapter_config, adopt_adapter_settings, parse_adapters


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
# Stage 3: the adapter, or several


def add_adapter(run):
    """---- 3. the adapter: --adapter-path as it is (evaluation), with quality gates added (Select-MoE
    warm-up), or a fresh one; then mark what trains. Several --adapter: add_adapters."""
    args, model = run.args, run.model
    specs = parse_adapters(args)
    if len(adapter_paths(args)) > 1:
        if len(specs) > 1 or ":" in args.adapter:  # would be ignored: each folder brings its own settings
            raise ValueError(f"--adapter {args.adapter} with several --adapter-path folders: each folder's adapter "
                             "keeps its kind and settings from its files; give the run's flags only")
        return (load_adapters if args.eval_only else continue_adapters)(run, adapter_paths(args))
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
        add_warmup_gates(model, args)
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
    if getattr(cfg, "quality_gate", False):
        set_quality_loss(cfg, args)
    if args.warmup:  # Select-MoE stage 1: only the quality gates and the routers learn
        n_train = selection.freeze_for_warmup(model)
        run.log(f"warm-up: quality loss {args.quality_loss} (weight {args.quality_loss_weight:g}) over "
                f"{args.quality_tokens} tokens")
        if args.quality_gate_init_bias is None:  # the reference's gate: why the first loss is higher
            run.log("note: the quality gates start at g = sigmoid(w u) ~ 0.5 (the reference's init), so every FFN "
                    "output starts halved and the first loss is above the adapter's; --quality-gate-init-bias 6 "
                    "starts the warm-up as the adapter it loaded")
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
            ("--adapter-path", args.adapter_path, "to train several loaded adapters further, give only --adapter-path A,B")):
        if given:
            raise ValueError(f"{flag} works with one adapter; --adapter names {len(specs)} ({why})")
    configs = {}
    for n, a in specs:
        try:
            configs[n] = adapter_config(a)
        except ValueError as e:
            hint = "; give the gate to MixLoRA adapters only: mixlora:quality_gate=true" if a.quality_gate else ""
            raise ValueError(f"adapter {n!r}: {e}{hint}") from None

    def add_head(view, name):  # each adapter its own classification head, initialised as it would be alone
        if run.kind == "cls":
            view.score = classification_head(view.config.hidden_size, args.num_labels, run.device)

    run.base = multi.shared_copy(run.model) if run.kind != "cls" else None  # a base model has no class head
    views = multi.add_adapters(run.model, configs, args.seed, add_head)
    start_trainees(run, specs, views)


def continue_adapters(run, paths):
    """---- 3 (several --adapter-path, training). Each folder's adapter is loaded onto its own view of the one
    frozen base (multi.load_views, then multi.wire) and trained further, its kind and settings from its files
    as one --adapter-path's are (options.adopt_adapter_settings); named by its kind (lora, lora2, ...)."""
    args = run.args
    run.base = multi.shared_copy(run.model) if run.kind != "cls" else None
    specs, views = [], {}

    def add_gates(path, view):  # Select-MoE stage 1 on each, as one --warmup --adapter-path: gates added
        try:
            add_warmup_gates(view, args)
        except ValueError as e:
            raise ValueError(f"--warmup --adapter-path {path}: {e}") from None

    for path, view in multi.load_views(run.model, paths, args.seed, add_gates if args.warmup else None).items():
        a = argparse.Namespace(**{**vars(args), "adapter_path": path})
        if args.warmup:  # the flags as given, as one warm-up takes them
            a.adapter = view.adapter_config.routing_strategy
        else:
            adopt_adapter_settings(a, view.adapter_config)
        check_head(run, view, path)
        name, i = a.adapter, 2
        while name in views:
            name, i = f"{a.adapter}{i}", i + 1
        mark_trainable(view.to(run.device))
        specs.append((name, a))
        views[name] = view
    start_trainees(run, specs, multi.wire(run.model, views))


def start_trainees(run, specs, views):
    """The Trainees of several adapters on one base (their flags `specs`, their views), the log line, and
    kernels.accelerate."""
    args = run.args
    run.adapters = [Trainee(n, a, views[n], os.path.join(args.out, n)) for n, a in specs]
    for t in run.adapters:  # each gated MixLoRA adapter: its own quality loss on its slice, the run's settings
        if getattr(t.model.adapter_config, "quality_gate", False):
            set_quality_loss(t.model.adapter_config, t.args)
        if args.warmup:  # after multi.wire: a frozen adapter still acts at its sites
            selection.freeze_for_warmup(t.model)
    run.history = {"eval": [], "adapters": {t.name: t.history for t in run.adapters}}
    n_total = sum(p.numel() for p in run.model.parameters())
    run.log(f"model {args.model}: {len(specs)} adapters on one frozen base, {n_total / 1e6:.1f}M parameters in all: "
            + ", ".join(f"{t.name} ({t.args.adapter}) {sum(p.numel() for p in t.model.parameters() if p.requires_grad) / 1e6:.3f}M"
                        for t in run.adapters)
            + f" trainable; device {run.device}, {'bf16 autocast' if run.bf16 else 'fp32'}, {run.world} process(es)"
            + (f" x {args.threads} threads" if args.threads else ""))
    run.log("plain modules (--no-accelerate)" if args.no_accelerate else kernels.accelerate(run.model))


def add_warmup_gates(model, args):
    """Select-MoE stage 1 on a loaded MixLoRA adapter: quality gates added (selection.add_quality_gates), and
    --router-aux-loss-coef, if given, replacing the adapter's balance coefficient."""
    selection.add_quality_gates(model, trash_mode=args.trash_mode, init_bias=args.quality_gate_init_bias)
    if args.router_aux_loss_coef is not None:
        model.adapter_config.router_aux_loss_coef = args.router_aux_loss_coef


def set_quality_loss(cfg, args):
    """The quality-loss settings of this run, in a gated adapter's config (saved with the adapter)."""
    cfg.quality_loss_type, cfg.quality_loss_weight = args.quality_loss, args.quality_loss_weight
    cfg.sample_wise_averaging = args.sample_wise


def adapter_paths(args):
    """The --adapter-path folders: one, or several separated by commas (--eval-only)."""
    return args.adapter_path.split(",") if args.adapter_path else []


def load_adapters(run, paths):
    """---- 3 (--eval-only with several --adapter-path). Each adapter is loaded from its files onto its own
    view of the one frozen base (multi.load_views), as training evaluates them."""
    run.adapters = []
    for i, (path, view) in enumerate(multi.load_views(run.model, paths).items()):
        check_head(run, view, path)
        if not run.args.no_accelerate:
            kernels.accelerate(view)
        run.adapters.append(Trainee(path, run.args, view.to(run.device), os.path.join(run.args.out, "predictions", f"{i + 1}")))


def check_head(run, view, path):
    """Classification data: the adapter loaded from `path` has a head, with room for every label."""
    if run.kind == "cls" and getattr(view, "score", None) is None:
        raise ValueError(f"{path}: classification data needs an adapter with a classification head")
    if run.kind == "cls":
        data.check_labels([x for v in run.evals.values() for x in v], view.score.out_features, f"the head of {path}")
