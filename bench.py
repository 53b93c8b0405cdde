"""Speed and memory benchmark: the base model, generation, loading and the adapters, side by side.

One command, every method in one run, each row both plain and accelerated (kernels.accelerate) side by
side. Every row is prepared first, then the rows are timed in turns (one call of each row in each
variant per round, a warm-up round, then `--repeats` rounds) and each figure is the median:

    python bench.py [--model PATH] [--only ROWS] [--repeats 3] [--device cpu|cuda] [--dtype float32]
                    [--variants plain,accelerated] [--no-keep-freed-memory] [--json FILE]

Variants: `plain` (the modules as llama.py / lora.py / moe_lora.py build them), `accelerated`
(kernels.accelerate(model) as the tools call it), and for A/B checks `accelerated-lora`,
`accelerated-dropout`, `accelerated-linear`, `accelerated-mixlora`, `accelerated-swiglu` (one measure
left out) and `accelerated+onednn` (the oneDNN linear in every regime instead of the measured choice). The process setting keep_freed_memory cannot
be switched per call; it applies to the whole run (off: --no-keep-freed-memory).

How to read the table. First the machine's measured matmul peak (a 2048^3 matmul in the compute dtype,
GFLOP/s = 2 n^3 / time); every GFLOP/s figure below is printed beside its fraction of that peak.
    forward               batch 4 x 256, no grad. FLOPs = 2 * (weights of every nn.Linear, LM head
                          included even when tied) * tokens + causal attention 2 * 2 * B * H * hd * T(T+1)/2
                          per layer (QK^T and AV, upper triangle not counted).
    generate-cached/-uncached  greedy, batch 1, 64-token prompt, 64 new tokens (prefill included): the KV
                          cache vs re-running the whole sequence each step (generate.generate(use_cache=False)).
    load-float32/-bfloat16  peak resident memory while loading, measured in a fresh subprocess: the
                          high-water mark (VmHWM) minus the RSS after `import torch, llama`, divided by the
                          size of the weights in that dtype (target <= 1.2x: no second copy of the weights).
    train-<method>        one training step (forward, backward, AdamW) at 4 x 256 with the adapter on all 7
                          projections, r=16: LoRA, DoRA, MixLoRA E=8 for each router (top-2, dynamic top-p,
                          switch). Loss = LM cross-entropy (+ router losses for MixLoRA, as train.py).
                          GFLOP/s counts 2x the forward (forward + input gradients through the frozen base;
                          the adapters' own FLOPs are ignored), so it is a lower bound.
                          "/fwd" = step time / base forward time, "/LoRA" = step time / LoRA step time.
    train-frozen          the same step with no adapter: forward, loss and backward through the frozen model
                          down to the embeddings' output (no optimizer), the floor under every adapter row:
                          train-<method> minus train-frozen is what the adapter itself costs.
    train-lora-answer16   the LoRA step with targets only at the last 16 tokens of each row, so the LM head
                          runs on 64 positions instead of 1024 (llama's logits_mask); "x" = speed-up.
    train-lora-bf16       the LoRA step under torch.autocast(bfloat16) (fp32 weights and adapters, bf16
                          products: AVX-512-BF16 / AMX on CPUs that have them).
    eval-<method>         the adapted model's no-grad forward at 4 x 256 (dropout off), vs the base forward.
    multi-together/-sequential/-parallel  (with --multi or --only multi) K = 3 adapters (LoRA, DoRA, MixLoRA) trained by
                          train.py in one process, three processes one after another, three at once: the
                          rows, their columns and their data are described in bench_multi.py. Not
                          interleaved: these rows run after the others.
Columns: the median ms of each variant, "x" = first variant's time / last one's, then tok/s, GFLOP/s,
%peak, peak MB and the notes of the last variant. The peak-memory column is the resident (CPU) or allocated
(CUDA) high-water mark during the row's warm-up call (memory.PeakMemory), above what was in use when it
started (model weights excluded; on the CPU freed memory is handed back to the OS first, so a row is not
credited with memory that earlier rows freed).

Results and the machine they were measured on are in the README; the transformers comparison of issue 2
was measured outside the project (the project never imports transformers).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import bench_multi
import checkpoints
import generate
import guards
import kernels
import llama
import lora
import losses
import memory
import onednn
import routers

B, T = 4, 256                 # training / forward batch
PROMPT, NEW = 64, 64          # generation: prompt length, new tokens
ANSWER = 16                   # answer-only targets: the last 16 tokens of each row
ADAPTERS = ("lora", "dora", *routers.STRATEGIES)  # a train-<method> row each: every adapter train.py builds


# ----------------------------------------------------------------------------------------------------
# Small helpers: timing, FLOPs (the peak memory: memory.PeakMemory)

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats, device):
    """Seconds per call: one warm-up call, then `repeats` timed calls; returns the list of times."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def matmul_peak(device, dtype, repeats, n=2048):
    """Measured matmul throughput in GFLOP/s: 2 n^3 / median time of an (n,n) x (n,n) F.linear product
    (torch's default library: MKL on CPU)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / statistics.median(timed(lambda: F.linear(a, b), max(repeats, 5), device)) / 1e9


def forward_flops(model, batch, seq):
    """2 * linear weights * tokens + causal attention (QK^T and AV over the lower triangle)."""
    cfg = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    attn = 2 * 2 * batch * cfg.num_attention_heads * cfg.head_dim * seq * (seq + 1) // 2
    return 2 * linear * batch * seq + cfg.num_hidden_layers * attn


# ----------------------------------------------------------------------------------------------------
# Adapters and one training step (imports of lora.py / moe_lora.py are deferred: rows skip without them)

def adapter_config(method, dropout):
    """The adapter of a train-<method> row: what `train.py --adapter METHOD` builds (options.adapter_config)
    with r=16, alpha 32, 8 experts, top-2, on all 7 projections; every other setting the strategy's default."""
    import options
    args = options.parser.parse_args(["--adapter", method, "--r", "16", "--lora-alpha", "32", "--lora-dropout", str(dropout),
                                      "--num-experts", "8", "--top-k", "2", "--target-modules", ",".join(lora.PROJECTIONS)])
    return options.adapter_config(args)


def train_step_fn(model, ids, answer_only, autocast=False):
    """A closure running forward + backward + AdamW on ids (B, T+1): inputs ids[:, :-1], targets ids[:, 1:];
    autocast: the forward and loss under torch.autocast(bfloat16)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = lora.adamw([dict(params=params)], lr=1e-4) if params else None            # none for train-frozen
    x, y = ids[:, :-1], ids[:, 1:]                                          # (B,T) each
    mask = torch.ones_like(x, dtype=torch.bool)
    if answer_only:
        mask[:, :-ANSWER] = False                                           # (B,T) M = B * ANSWER
    targets = y[mask]                                                       # (M,)
    no_head = torch.zeros_like(mask)                                        # the loss applies the LM head

    def step():
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x, logits_mask=no_head)
            ce = losses.lm_loss_from_hidden(out.hidden[mask], model.lm_head.weight, targets, "mean")
            loss = ce + sum(losses.adapter_losses(out.aux, None, getattr(model, "adapter_config", None)).values())
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


# ----------------------------------------------------------------------------------------------------
# The rows. Each returns a dict: tok_s, ms, gflops, peak_mb, extra fields for the notes.

class Bench:
    """Every timed row is prepared first (its model built and kept), then the rows are timed in turns:
    one call of each row per round, `repeats` rounds after a warm-up round. On a shared machine whose
    speed drifts by 10-20% over minutes, interleaving keeps the ratios between rows (step / forward,
    DoRA / LoRA) fair: every row sees the same slow and fast moments."""

    def __init__(self, args):
        self.args, self.device, self.dtype = args, torch.device(args.device), generate.DTYPES[args.dtype]
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 49152, (B, T + 1), generator=g)        # (B,T+1) random tokens
        self.prompt = torch.randint(0, 49152, (1, PROMPT), generator=g)     # (1,PROMPT)
        self.models = {}                                                    # method -> model, kept
        self.peak = None
        self.summaries = {}                                                 # row -> what accelerate applied

    def model(self, method="base"):
        """The base model, or one with `method`'s adapter injected (built once per method)."""
        if method not in self.models:
            m = llama.from_pretrained(self.args.model, dtype=self.dtype, device=self.device)
            if method == "frozen":  # no adapter; the backward still runs down to the embeddings' output
                m.requires_grad_(False)
                m.model.embed_tokens.register_forward_hook(lambda mod, args, out: out.requires_grad_())
            elif method != "base":
                import moe_lora
                moe_lora.inject_adapter(m, adapter_config(method, self.args.lora_dropout))
            self.models[method] = m
        m = self.models[method]
        return m, self.ids.clamp(max=m.config.vocab_size - 1).to(self.device)

    # Each prepare_* returns (fn, tokens per call, FLOPs per call or None, extra fields, model).

    def prepare_forward(self, method="base"):
        model, ids = self.model(method)
        x = ids[:, :-1]

        def fn():
            model.eval()
            with torch.inference_mode():
                model(x)
        return fn, x.numel(), forward_flops(model, B, T), {}, model

    def prepare_generate(self, use_cache):
        model, _ = self.model()
        p = self.prompt.clamp(max=model.config.vocab_size - 1).to(self.device)

        def fn():
            model.eval()
            with torch.inference_mode():
                generate.generate(model, p, NEW, use_cache=use_cache)
        return fn, NEW, None, {}, model

    def prepare_train(self, method, answer_only=False, autocast=False):
        model, ids = self.model(method)
        step = train_step_fn(model, ids, answer_only, autocast)

        def fn():
            model.train()
            step()
        return fn, B * T, 2 * forward_flops(model, B, T), {}, model

    def load(self, dtype):
        """Peak RSS of loading, in a fresh interpreter so nothing else is resident."""
        cmd = [sys.executable, os.path.abspath(__file__), "--model", self.args.model, "--load-child", dtype]
        cmd += ["--no-keep-freed-memory"] if self.args.no_keep_freed_memory else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    def rows(self):
        """(name, prepare) for the interleaved rows, in table order."""
        rows = [("forward", self.prepare_forward), ("generate-cached", lambda: self.prepare_generate(True)),
                ("generate-uncached", lambda: self.prepare_generate(False))]
        rows.append(("train-frozen", lambda: self.prepare_train("frozen")))
        for m in ADAPTERS:
            rows.append((f"train-{m}", lambda m=m: self.prepare_train(m)))
            if m == "lora":
                rows.append(("train-lora-answer16", lambda: self.prepare_train("lora", answer_only=True)))
                rows.append(("train-lora-bf16", lambda: self.prepare_train("lora", autocast=True)))
            if m in ("lora", "mixlora"):
                rows.append((f"eval-{m}", lambda m=m: self.prepare_forward(m)))
        return rows

    def run(self, only):
        """Prepare the selected rows, time them in interleaved rounds, then the load rows; {name: result}."""
        want = lambda name: not only or any(name.startswith(p) for p in only)
        res, ready = {}, {}
        for name, prepare in self.rows():
            if want(name):
                try:
                    ready[name] = prepare()
                except (ImportError, AttributeError, TypeError) as e:  # an adapter API not ready / changed
                    res[name] = {"skipped": f"{type(e).__name__}: {e}"}
        variants = self.args.variants
        times = {(n, v): [] for n in ready for v in variants}
        peaks = {}
        for rnd in range(self.args.repeats + 1):                         # round 0 is the warm-up
            for name, (fn, *_, model) in ready.items():
                for v in variants:
                    summary = switch(model, v)
                    if rnd == 0 and summary and v == variants[-1]:
                        self.summaries[name] = summary
                    if rnd == 0:
                        memory.release_freed_memory()  # peak memory is read in round 0, from the live tensors up
                    with memory.PeakMemory(self.device) as mem:
                        sync(self.device)
                        t0 = time.perf_counter()
                        fn()
                        sync(self.device)
                        dt = time.perf_counter() - t0
                    if rnd:
                        times[name, v].append(dt)
                    else:
                        peaks[name, v] = mem.mb
            print(f"  round {rnd}/{self.args.repeats} done", file=sys.stderr, flush=True)
        for name, (fn, tokens, flops, extra, model) in ready.items():
            r = {}
            for v in variants:                                           # the last variant's fields are kept
                t = statistics.median(times[name, v])
                r = {"tok_s": tokens / t, "ms": 1e3 * t, "times_ms": [round(1e3 * x, 1) for x in times[name, v]],
                     **extra, "peak_mb": peaks[name, v], "variants": {**r.get("variants", {}), v: 1e3 * t},
                     "variant_peaks_mb": {**r.get("variant_peaks_mb", {}), v: peaks[name, v]}}
            if flops:
                r["gflops"] = flops / (r["ms"] / 1e3) / 1e9
                r["pct_peak"] = 100 * r["gflops"] / self.peak
            if name.startswith("generate"):
                r["ms_per_token"] = r["ms"] / NEW
            res[name] = r
        for d in ("float32", "bfloat16"):
            if want(f"load-{d}"):
                try:
                    res[f"load-{d}"] = self.load(d)
                except subprocess.CalledProcessError as e:
                    res[f"load-{d}"] = {"skipped": f"load subprocess failed: {e.stderr.strip().splitlines()[-1:]}"}
        if self.args.multi or any(p.startswith("multi") for p in only):
            res.update(bench_multi.multi_rows(self.args.model, self.args.device, self.args.multi_steps))
        order = [n for n, _ in self.rows()] + ["multi-together", "multi-sequential", "multi-parallel"]
        order[3:3] = ["load-float32", "load-bfloat16"]                    # after generation, as before
        return {n: res[n] for n in order if n in res}


VARIANTS = {"plain": None, "accelerated": {}, "accelerated-lora": dict(lora_product=False),
            "accelerated-dropout": dict(dropout=False), "accelerated-linear": dict(linear="mkl"),
            "accelerated-mixlora": dict(mixlora=False), "accelerated-swiglu": dict(swiglu_product=False),
            "accelerated+onednn": dict(linear="onednn")}


def switch(model, variant):
    """Put the model into `variant`: its plain modules, then kernels.accelerate with the variant's options
    (the process setting keep_freed_memory is the run's, not the variant's)."""
    kernels.restore(model)
    if VARIANTS[variant] is not None:
        return kernels.accelerate(model, keep_memory=False, **VARIANTS[variant])


def load_child(path, dtype):
    """Run in the subprocess: print {peak_mb, weights_mb, ratio, ms} of from_pretrained as JSON."""
    base = memory.proc_status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:                           # VmHWM := current RSS
        f.write("5")
    t0 = time.perf_counter()
    model = llama.from_pretrained(path, dtype=generate.DTYPES[dtype])
    ms = 1e3 * (time.perf_counter() - t0)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20  # tied counted once
    peak = (memory.proc_status_kb("VmHWM") - base) / 1024
    print(json.dumps({"ms": ms, "peak_mb": peak, "weights_mb": weights, "ratio": peak / weights}))


# ----------------------------------------------------------------------------------------------------
# Ratios and the table

def add_notes(res):
    """Fill each row's `note` with the ratios that make it readable on its own."""
    fwd, lora = res.get("forward"), res.get("train-lora")
    for name, r in res.items():
        if "skipped" in r:
            r["note"] = "skipped: " + r["skipped"]
            continue
        parts = []
        if name == "generate-cached" and "generate-uncached" in res:
            parts.append(f"{r['tok_s'] / res['generate-uncached']['tok_s']:.1f}x uncached")
        if name.startswith("generate"):
            parts.append(f"{r['ms_per_token']:.1f} ms/token")
        if name.startswith("load"):
            parts.append(f"{r['ratio']:.2f}x the {r['weights_mb']:.0f} MB of weights (target <= 1.2)")
        if name.startswith("train") and fwd and "ms" in fwd:
            parts.append(f"/fwd {r['ms'] / fwd['ms']:.2f}")
        if name.startswith("train") and lora and "ms" in lora and name != "train-lora":
            parts.append(f"/LoRA {r['ms'] / lora['ms']:.2f}")
        if name == "train-lora-answer16" and lora and "ms" in lora:
            parts = [f"{lora['ms'] / r['ms']:.2f}x faster than full logits"]
        if name.startswith("multi") and "multi-together" in res and name != "multi-together":
            t = res["multi-together"]
            parts.append(f"together: {t['ms'] / r['ms']:.2f}x the time, {t['peak_mb'] / r['peak_mb']:.2f}x the memory")
        if name.startswith("eval") and fwd and "ms" in fwd:
            parts.append(f"{r['ms'] / fwd['ms']:.2f}x base forward time")
        r["note"] = ", ".join(parts)


def fmt(v, spec):
    """Format a number, or a right-aligned "-" of the same width when it is missing."""
    return format(v, spec) if v is not None else "-".rjust(int(re.match(r"\d+", spec).group()))


def print_table(res, header, variants):
    print(header)
    w = max(9, *(len(v) for v in variants))
    print(f"{'row':22} " + " ".join(f"{v + ' ms':>{w + 3}}" for v in variants)
          + f" {'x':>5} {'tok/s':>8} {'GFLOP/s':>8} {'%peak':>6} {'peak MB':>8}  note")
    for name, r in res.items():
        ms = [r.get("variants", {}).get(v, r.get("ms") if "variants" not in r and v == variants[-1] else None)
              for v in variants]
        x = ms[0] / ms[-1] if len(ms) > 1 and ms[0] and ms[-1] else None
        print(f"{name:22} " + " ".join(fmt(m, f"{w + 3}.1f") for m in ms) + f" {fmt(x, '5.2f')} "
              f"{fmt(r.get('tok_s'), '8.1f')} {fmt(r.get('gflops'), '8.1f')} "
              f"{fmt(r.get('pct_peak'), '5.0f')}{'%' if 'pct_peak' in r else ' '} "
              f"{fmt(r.get('peak_mb'), '8.0f')}  {r.get('note', '')}")


# ----------------------------------------------------------------------------------------------------
# CLI

def main(argv=None):
    ap = argparse.ArgumentParser(description="Benchmark the Llama, generation, loading and the adapters side by side.",
                                 formatter_class=guards.HelpFormatter)
    ap.add_argument("--model", help="checkpoint folder, .gguf file or Hub id (default: SmolLM2-135M-Instruct, "
                    "fetched once, see checkpoints.py)")
    ap.add_argument("--only", default="", help="comma-separated row-name prefixes, e.g. forward,train-mixlora,load")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (after one warm-up); medians are reported")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=list(generate.DTYPES), help="weights and compute dtype")
    ap.add_argument("--lora-dropout", type=float, default=0.0,
                    help="LoRA dropout of the adapter rows (PEFT's default 0; train.py's 0.05 adds the masks' RNG cost)")
    ap.add_argument("--variants", default="plain,accelerated",
                    help=f"comma-separated columns, each row timed in each: {', '.join(VARIANTS)}")
    ap.add_argument("--no-keep-freed-memory", action="store_true",
                    help="leave glibc's malloc as it is for the whole run (kernels.accelerate sets keep_freed_memory)")
    ap.add_argument("--multi", action="store_true",
                    help="also run the multi-* rows: 3 adapters trained together vs in turn vs at once (7 train.py runs)")
    ap.add_argument("--multi-steps", type=int, default=bench_multi.MULTI_STEPS,
                    help="training steps of each train.py run in the multi-* rows")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--load-child", default=None, help=argparse.SUPPRESS)  # internal: one load measurement
    args = ap.parse_args(argv)
    kept = not args.no_keep_freed_memory and kernels.keep_freed_memory()
    args.variants = [v for v in args.variants.split(",") if v]
    try:
        if args.load_child:
            return load_child(args.model, args.load_child)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available")
        args.model = checkpoints.resolve_model(args.model)
        if not os.path.exists(os.path.join(args.model, "config.json")):
            raise FileNotFoundError(f"{args.model}: no config.json (expected a Hugging Face checkpoint folder)")
        bad = [v for v in args.variants if v not in VARIANTS]
        if bad or not args.variants:
            raise ValueError(f"--variants: unknown {bad or '(none)'}, expected names from {', '.join(VARIANTS)}")
        bench = Bench(args)
        dev = bench.device
        peak32 = matmul_peak(dev, torch.float32, args.repeats)
        bench.peak = peak32 if bench.dtype == torch.float32 else matmul_peak(dev, bench.dtype, args.repeats)
        header = (f"# {args.model} | {args.device} {args.dtype} | {onednn.cpu_model()} | {torch.get_num_threads()} "
                  f"threads | torch {torch.__version__} | keep freed memory {kept} | "
                  f"fp32 matmul peak {peak32:.1f} GFLOP/s"
                  + (f" | {args.dtype} peak {bench.peak:.1f}" if bench.dtype != torch.float32 else "")
                  + f" | LoRA dropout {args.lora_dropout} | medians of {args.repeats} interleaved rounds | load avg {os.getloadavg()[0]:.1f}")
        only = [p for p in args.only.split(",") if p]
        res = bench.run(only)
        add_notes(res)
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e}")
    print_table(res, header, args.variants)
    print("# load average at the end: {:.1f} {:.1f} {:.1f} (1, 5, 15 min)".format(*os.getloadavg()))
    if bench.summaries:
        print(f"# {args.variants[-1]}, train-lora row: {bench.summaries.get('train-lora', next(iter(bench.summaries.values())))}")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"header": header, "fp32_peak_gflops": peak32, "rows": res}, f, indent=2)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
