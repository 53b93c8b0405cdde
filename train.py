"""
train.py: fine-tune a Llama checkpoint with LoRA, DoRA, MixLoRA, LoRAMoE or MoLA, evaluate it, and save
the adapter.

One flat script, read top to bottom like nanoGPT's train.py: the state of a run (`Run`, with one
adapters.Trainee per adapter), then one function per stage, numbered as main calls them: 1. processes
and device, 2. model, tokenizer and data, 3. the adapter (adapters.py; then --eval-only branches off to
evaluation.evaluate_only), 4. the tokenised training set and the micro-batch, 5. optimiser (the schedule
is lr_scale), 6. resume (resume.py), 7. the loop (train_step: micro-batches, gradient sync, AdamW; then
evaluation.log_step's line), 8. final evaluation and saving. Beside it: the flags, their defaults and the
adapter and data they name in options.py, evaluation (the --eval-only mode too) and the printed summaries
in evaluation.py, the micro-batch from a memory budget in memory.py, several adapters on one base in
multi.py; the data side (formats, scoring, collation) in data.py, the tasks and their prompts in tasks.py,
the losses in losses.py.

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
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

import adapters
import checkpoints
import data
import guards
import llama
import losses
import memory
import multi
import options
import resume
import selection
import tokenizer
from adapter_files import save_adapter
from evaluation import evaluate, evaluate_only, format_results, forward, headline, load_report, log_step, results_table
from lora import adamw, lora_plus_param_groups
from progress import track
from routers import router_stats

SMALL_EVAL = 50            # fewer evaluation examples than this: a warning that the figures are noisy


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


# ----------------------------------------------------------------------------------------------------
# The stages, in the order main calls them


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
    run.model = llama.from_pretrained(args.model, dtype=torch.float32, device=run.device)
    run.tok = tokenizer.load_tokenizer(args.model)
    run.log(f"loaded {args.model} in {time.time() - t0:.1f}s")
    run.model.gradient_checkpointing = args.gradient_checkpointing
    args.max_len = min(args.max_len, run.model.config.context_length)
    train_items, run.evals = options.load_sources(args, run.tok)
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


def encode_training_set(run, train_items):
    """---- 4. tokenise the training set once; count truncation instead of hiding it. Sets run.total_steps."""
    args = run.args
    if not train_items:
        raise ValueError("no training examples (check --task / --data / --max-train)")
    enc = [data.encode(run.tok, e, args.max_len, args.train_on_prompt, fmt=args.train_format)
           for e in track(train_items, "tokenise the training set", unit="examples")]
    n_cut = sum(e["truncated"] for e in enc)
    empty = [e["example"] for e in enc if e["example"].kind != "cls" and all(l == data.IGNORE for l in e["labels"][1:])]
    if empty:  # nothing to predict: a batch of these would divide a zero loss by zero targets
        raise ValueError(f"{empty[0].where or empty[0].task}: a training example has no target token "
                         f"(--max-len {args.max_len}); {len(empty)} such example(s)")
    gated = any(getattr(getattr(t.model, "adapter_config", None), "quality_gate", False) for t in run.adapters)
    if gated and args.quality_loss == "bce" and any(
            getattr(e, "quality", None) is None for e in train_items):
        raise ValueError("--quality-loss bce needs a 'quality' label (1 good, 0 bad) on every record of --data")
    if n_cut:
        run.log(f"warning: {n_cut} of {len(enc)} training examples truncated to --max-len {args.max_len} tokens")
    run.total_steps = args.steps or math.ceil(args.epochs * len(enc) / args.batch_size)
    if args.batch_size < run.world:
        raise ValueError(f"--batch-size {args.batch_size} is smaller than the number of processes ({run.world})")
    memory.plan_micro_batch(run, max(len(e["ids"]) for e in enc))
    return enc


def make_optimizer(run):
    """---- 5. optimiser: for each adapter its own AdamW on its parameters only, LoRA+ groups (lr * ratio
    for lora_B); each group keeps its peak lr as base_lr, which lr_scale multiplies."""
    for t in run.adapters:
        a = t.args
        t.params = [p for p in t.model.parameters() if p.requires_grad]
        groups = lora_plus_param_groups(t.model, a.lr, a.lora_plus_ratio, a.weight_decay)
        for g in groups:
            g["base_lr"] = g["lr"]
        t.opt = adamw(groups, lr=a.lr, weight_decay=a.weight_decay)


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


def run_eval(run, step):
    """Evaluate each adapter (rank 0), log the results, and save its OUT/best when its headline improves.
    Several adapters: step 0 evaluates the base model once (each starts from it). A non-finite adapter is
    never scored."""
    resume.check_adapters(run, step)
    if run.rank == 0 and step == 0 and run.base is not None:
        folder = os.path.join(run.args.out, "predictions", "step0")
        results = evaluate(run.base, run.tok, run.evals, run.args, device=run.device, ctx=run.ctx, predictions=folder)
        run.log(f"eval step 0, base model: {format_results(results)}")
        run.history["eval"].append(results)
    elif run.rank == 0:
        for t in run.adapters:
            folder = os.path.join(t.out, "predictions", f"step{step}")  # one folder per evaluation
            results = evaluate(t.model, run.tok, run.evals, run.args, device=run.device, ctx=run.ctx, predictions=folder)
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
    args, trainees = run.args, run.adapters
    # dropout / jitter randomness is a function of (seed, step, rank), so resuming repeats it
    torch.manual_seed(args.seed + 1_000_003 * step + run.rank)
    if len(trainees) > 1:  # each adapter draws from its own copy of that stream, as it would alone
        run.model.streams.fork(run.device)
    scales = [lr_scale(step, run.total_steps, t.args) for t in trainees]
    for t, scale in zip(trainees, scales):
        for g in t.opt.param_groups:
            g["lr"] = g["base_lr"] * scale
    batches, count = step_batches(run, enc, step)
    terms, loads = [{} for _ in trainees], [[] for _ in trainees]
    for b in batches:
        per_adapter = micro_batch_losses(run, b, count)
        loss = sum(task + sum(extra.values()) for task, extra, _ in per_adapter)
        loss.backward()
        for k, (task, extra, load) in enumerate(per_adapter):
            for key, v in {"task": task, **extra}.items():
                terms[k][key] = terms[k].get(key, 0.0) + v.detach()
            loads[k] = loads[k] + [load] if load.numel() else loads[k]
        run.tokens_seen += int(b["attention_mask"].sum()) * len(trainees)
    params = [p for t in trainees for p in t.params]
    for t, step_loads in zip(trainees, loads):  # this step's mean load, summed for the end-of-run table
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
              for t in trainees]
    # a NaN/inf stops the run before AdamW applies it; an update that overflows the weights shows as a
    # NaN loss one step later, or is caught before any evaluation or save (resume.check_adapters)
    for t, tk, gnorm in zip(trainees, terms, gnorms):
        guards.check_finite(step + 1 if len(trainees) == 1 else f"{step + 1} ({t.name})", loss=sum(tk.values()),
                            grad_norm=gnorm, saved=resume.last_good(run))
    stats = []
    for t, scale, tk, ld, gnorm in zip(trainees, scales, terms, loads, gnorms):
        t.opt.step()
        t.opt.zero_grad(set_to_none=True)
        stats.append({"terms": {k: float(v) for k, v in tk.items()}, "lr": t.args.lr * scale,
                      "grad_norm": float(gnorm), "loads": ld})
    return stats


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
            resume.checkpoint(run, done)


def interrupted(run, why):
    """Ctrl-C or SIGTERM: a checkpoint at the last whole step (the interrupted step's partial gradients
    are dropped; an interrupted final evaluation runs again on --resume), then exit 130 / 143."""
    resume.checkpoint(run, run.completed)
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
        resume.checkpoint(run, run.total_steps, finished=True)
        if len(run.adapters) > 1:
            run.log(results_table(run))
        where = args.out if len(run.adapters) == 1 else os.path.join(args.out, "{" + ",".join(t.name for t in run.adapters) + "}")
        run.log(f"saved {where}/last (best: {where}/best) in {time.time() - run.t0:.0f}s")
        for t in run.adapters:
            t.log_file.close()


# ----------------------------------------------------------------------------------------------------
# The script


def main(argv=None):
    """Parse the flags and run the stages in order; returns {"loss": [per step], "eval": [results]}
    ({"eval": results} with --eval-only)."""
    args = options.parser.parse_args(argv)
    guards.check_ranges(args)
    options.set_defaults(args)
    run = setup_processes(args)
    writes = run.rank == 0 and not args.eval_only  # --eval-only writes only predictions/ into --out
    with guards.claim(args.out, args.resume, args.overwrite) if writes else nullcontext():  # lock, no reuse
        train_items = load_model_and_data(run)
        adapters.add_adapter(run)
        if args.eval_only:  # the one mode that does not train
            return evaluate_only(run)
        enc = encode_training_set(run, train_items)
        make_optimizer(run)
        resume.restore(run)
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
