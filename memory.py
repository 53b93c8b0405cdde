"""memory.py: how many examples a training forward pass can take on this machine (train.py's micro-batch).

A training step keeps every layer's activations for the backward pass, so its memory grows with the
tokens of a micro-batch; the weights, the gradients and AdamW's two moments of the adapter are fixed.
train.py picks the largest micro-batch that divides the per-process batch and fits a budget:

    fixed + micro * tokens * bytes_per_token <= budget        budget = 80% of the memory free after loading

tokens is the longest tokenised training example (a micro-batch is padded to its longest row). The
per-token figure is a rule, not a measurement of the run: fitted to bench.py's peak memory on
SmolLM2-135M (fp32, dropout 0.05), it over-estimates rather than under-estimates (see bytes_per_token).
Checked by test_micro_batch_from_budget: a budget under one example is refused, a larger one gives the
largest divisor that fits, and the run equals one with that --micro-batch-size.

Below the rule, how bench.py measures peak memory: `with PeakMemory(device) as m: ...` gives m.mb, the
high-water mark during the block above the level at its start (VmHWM on Linux CPUs, the allocator's on CUDA).
"""
import ctypes
import math
import os
import re

import torch

from routers import STRATEGIES

BUDGET_FRACTION = 0.8      # of the memory free after loading; the rest for the allocator and the OS


def bytes_per_token(model_cfg, adapter_cfg, bf16=False, checkpointing=False):
    """Training memory per token of a micro-batch: a rule fitted to bench.py's peaks on SmolLM2-135M (fp32,
    dropout 0.05; the per-token figures it was fitted to are in the README, section Memory), with 25%
    slack for padding and the allocator:

        floats per token = L * (10 D + 5 I (1 + a) + [DoRA] 3 (D + I))

    a = experts a token passes through at most, the routing strategy's experts_per_token (routers.STRATEGIES:
    k for top-k, 1 for Switch, E for dense and top-p routing, whose near-uniform routers keep most experts
    early on), 0 without experts (LoRA, DoRA). The strategies that route per projection (moe_linear.py) put
    their experts in every targeted projection, not only the FFN: the rule is a rough upper bound there.
    bf16 autocast: x 0.6. With activation checkpointing each layer keeps only its input (D floats per token)
    and one layer at a time the rest.
    L, D, I: layers, hidden size, FFN width of the model's config."""
    L, D, I = model_cfg.num_hidden_layers, model_cfg.hidden_size, model_cfg.intermediate_size
    strategy, E = getattr(adapter_cfg, "routing_strategy", None), getattr(adapter_cfg, "num_experts", 0)
    E = max(E) if isinstance(E, (list, tuple)) else E                    # MoLA: experts per layer
    a = STRATEGIES[strategy].experts_per_token(adapter_cfg, E) if strategy else 0
    layer = 10 * D + 5 * I * (1 + a) + (3 * (D + I) if getattr(adapter_cfg, "use_dora", False) else 0)
    floats = L * D + layer if checkpointing else L * layer
    return 1.25 * 4 * floats * (0.6 if bf16 else 1.0)


def fixed_bytes(model, vocab_size):
    """What a step holds whatever the micro-batch: the trainable tensors' gradients and AdamW moments
    (3 x 4 bytes per parameter) and the fused LM-head loss's chunk of logits and their gradient (512 rows,
    losses.lm_loss_from_hidden, about 3 copies)."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 12 * n + 3 * 4 * 512 * vocab_size


def available_memory(device, local_processes=1):
    """Bytes free to this process now: on CUDA the GPU's free memory, on CPU MemAvailable of
    /proc/meminfo shared among this machine's processes; None where the system does not say."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")) // local_processes
    except (OSError, StopIteration, ValueError):
        return None


def choose_micro_batch(per_process, tokens, per_token, fixed, budget):
    """The largest divisor m of the per-process batch with fixed + m * tokens * per_token <= budget, so
    every step splits into equal micro-batches; ValueError when not even one example fits."""
    one = fixed + tokens * per_token
    if one > budget:
        raise ValueError(f"one training example of {tokens} tokens needs about {one / 1e9:.2f} GB, more than the "
                         f"memory budget of {budget / 1e9:.2f} GB: lower --max-len, add --gradient-checkpointing "
                         "or raise --memory-budget")
    return max(m for m in range(1, per_process + 1) if per_process % m == 0 and fixed + m * tokens * per_token <= budget)


def plan_micro_batch(run, tokens):
    """train.py's micro-batch (stage 4b): --micro-batch-size as given (with a warning when it exceeds the
    budget), else the largest that fits the budget (choose_micro_batch); said before training starts, and a
    run whose one example does not fit is refused. tokens: the longest training example's."""
    args = run.args
    per_process = math.ceil(args.batch_size / run.world)
    # several adapters (multi.py) run every row once per adapter: their per-token figures add up
    per_token = sum(bytes_per_token(run.model.config, t.model.adapter_config, run.bf16,
                                           args.gradient_checkpointing) for t in run.adapters)
    fixed = fixed_bytes(run.model, run.model.config.vocab_size)
    budget, source = args.memory_budget * 1e9, "--memory-budget"
    if not budget:
        free = available_memory(run.device, int(os.environ.get("LOCAL_WORLD_SIZE", run.world)))
        budget, source = (BUDGET_FRACTION * free if free else 0), "80% of the free memory"
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
    args.micro_batch_size = m = choose_micro_batch(per_process, tokens, per_token, fixed, budget)
    run.log(f"micro-batch {m} of {per_process} examples per step: up to {tokens} tokens x {per_token / 1e6:.2f} MB "
            f"+ {fixed / 1e9:.2f} GB = {need(m):.1f} GB estimated, within {budget / 1e9:.1f} GB ({source}); "
            "--micro-batch-size to choose")


# ----------------------------------------------------------------------------------------------------
# Measuring: the peak memory of a block of code (bench.py's peak MB column, what the rule above is fitted to)


def proc_status_kb(key):
    """A field of /proc/self/status in KiB (VmRSS, VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.M).group(1))
    except (OSError, AttributeError):
        return None


def release_freed_memory():
    """glibc malloc_trim: return freed heap memory to the OS, so that the next PeakMemory on the CPU
    counts what a row itself allocates, not memory that earlier rows freed (kept by kernels.keep_freed_memory)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """High-water mark of memory in use during a `with` block, in MB above the level at its start.
    CUDA: the allocator's max_memory_allocated. CPU: VmHWM, reset at entry by writing 5 to
    /proc/self/clear_refs (Linux >= 4.0); None where that is not possible."""

    def __init__(self, device):
        self.device, self.mb = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.start = proc_status_kb("VmRSS")
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mb = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        elif self.start is not None:
            self.mb = (proc_status_kb("VmHWM") - self.start) / 1024
