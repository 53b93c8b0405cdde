"""bench_multi.py: bench.py's multi-* rows: K = 3 adapters (LoRA, DoRA, MixLoRA) trained by train.py in
one process (`--adapter lora,dora,mixlora`, multi.py), in three processes one after another, and in
three processes at once (the cores shared among them).

    python bench.py --only multi [--multi-steps 8]     # or --multi beside the other rows

Each run is a fresh train.py process on 64 short sentences (--multi-steps steps of 8 examples, model
loading and a final evaluation of 8 included). ms = wall time; tok/s = the three adapters' training tokens
(padding excluded, counted as data.step_indices draws the examples) / wall time; peak MB = the processes'
peak resident memory (ru_maxrss): the largest one after another, the sum of the three at once. These rows
are not interleaved with the others: they run after them. Checked by TestBench (the rows on a tiny
checkpoint); the figures are in the README.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

import data
import tokenizer

MULTI, MULTI_STEPS, MULTI_BATCH = ("lora", "dora", "mixlora"), 8, 8   # the adapters, steps and batch of each run


def multi_rows(model, device, steps=MULTI_STEPS):
    """The multi-* rows: three adapters trained together, one after another, and three processes at once;
    {row name: {tok_s, ms, peak_mb}}."""
    cores = torch.get_num_threads()
    runs = {}
    with tempfile.TemporaryDirectory() as out:
        tokens = len(MULTI) * multi_tokens(model, multi_data(os.path.join(out, "data.jsonl")), steps)
        runs["multi-together"] = train_processes(model, [",".join(MULTI)], cores, device,
                                                 os.path.join(out, "together"), steps)
        walls, peaks = zip(*(train_processes(model, [a], cores, device, os.path.join(out, a), steps)
                             for a in MULTI))
        runs["multi-sequential"] = (sum(walls), [max(p[0] for p in peaks)])
        runs["multi-parallel"] = train_processes(model, list(MULTI), max(1, cores // len(MULTI)),
                                                 device, os.path.join(out, "parallel"), steps)
    return {name: {"tok_s": tokens / wall, "ms": 1e3 * wall, "peak_mb": sum(peaks)}
            for name, (wall, peaks) in runs.items()}


def multi_data(path):
    """The multi-* rows' training file: 64 short sentences (the text format: every token is a target)."""
    words = "cat dog bird fish red blue green big small old new sat ran saw ate".split()
    with open(path, "w") as f:
        for i in range(64):
            f.write(json.dumps({"text": " ".join(words[(i * k + k) % len(words)] for k in range(1, 9 + i % 8))}) + "\n")
    return path


def train_processes(model, adapters, threads, device, out, steps):
    """Start one train.py process per entry of `adapters` (all at once, writing to out/p0, out/p1, ...; the
    data file beside `out`), each training `steps` steps; wait for them; returns
    (wall seconds, [peak resident MB of each])."""
    here = os.path.dirname(os.path.abspath(__file__))
    procs, peaks = [], []
    t0 = time.perf_counter()
    d = os.path.join(os.path.dirname(out), "data.jsonl")
    for i, a in enumerate(adapters):
        cmd = [sys.executable, os.path.join(here, "train.py"), "--model", model, "--data", d, "--eval-data", d,
               "--adapter", a, "--steps", str(steps), "--batch-size", str(MULTI_BATCH), "--max-eval", "8",
               "--no-eval-before", "--log-every", str(steps), "--threads", str(threads), "--device", device,
               "--dtype", "float32", "--out", os.path.join(out, f"p{i}")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, status, usage = os.wait4(p.pid, 0)                             # ru_maxrss: KB on Linux
        if os.waitstatus_to_exitcode(status) != 0:
            raise ValueError(f"train.py --adapter failed: {p.stderr.read().strip().splitlines()[-1:]}")
        p.returncode = 0
        peaks.append(usage.ru_maxrss / 1024)
    return time.perf_counter() - t0, peaks


def multi_tokens(model, path, steps):
    """Training tokens (padding excluded) of one adapter in the multi-* rows: the examples of each step as
    data.step_indices draws them (seed 42, train.py's default) from the file in order (--eval-data given)."""
    tok = tokenizer.load_tokenizer(model)
    enc = [data.encode(tok, e, 512) for e in data.load_data(path, tok)]
    return sum(len(enc[j]["ids"]) for s in range(steps) for j in data.step_indices(len(enc), s, MULTI_BATCH, 42))
