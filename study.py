"""
study.py: the multi-task study. One adapter trained on all eight commonsense tasks at once (as in the
MixLoRA paper), for each method and seed, evaluated on a fixed subset of every task's test set in both
formats (cloze and the reference's labels); mean and standard deviation over seeds, chance and majority
baselines, trainable parameters, wall time per run, a table and a plot.

    python study.py --model PATH --out runs/study                  # every run, then the report
    python study.py --model PATH --out runs/study --report         # the report from the finished runs

Methods: the base model (zero-shot), LoRA r=16, DoRA r=16, MixLoRA (8 experts, top-2, r=8) and a LoRA
whose rank gives about MixLoRA's trainable parameter count (counted on a meta-device model), so that
"more parameters" is told apart from "a mixture". Every run is a train.py command, printed before it
starts, with its output in its own folder (<out>/<method>-s<seed>/: log.jsonl, predictions/, stdout.log,
wall.json); `--jobs` of them run at a time with `--threads` each. A run whose wall.json exists is not
run again, so an interrupted study continues where it stopped.

Training: --train-format cloze (the correct option's continuation after its cloze context), the same
--max-train questions of each task's train.jsonl for every method (a random subset drawn with the seed),
one cosine schedule. Evaluation: the same --max-eval questions of each test.jsonl for every run (train.py
draws them with seed 0), in cloze at the end of training and, for the --labels-seeds, in labels from the
saved adapter. Runs go seed by seed (every method's seed 0 first), so a study cut short has every method.
Every figure is recomputed from the runs' predictions/*.jsonl, so any of them can be checked question
by question.

Outputs: <out>/results.json (every run's metrics and wall time), <out>/table.md, <out>/study.png
(per-task accuracy with error bars, training-loss curves; needs matplotlib, which only this script
uses: `pip install matplotlib`; without it the table is still written).
"""

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import time

import torch

import evaluation
import guards
import llama
import options
from lora import LoraConfig, inject_lora, mark_trainable
from moe_lora import MixLoRAConfig, inject_adapter

TASKS = ["arc-e", "arc-c", "boolq", "obqa", "piqa", "siqa", "hellaswag", "winogrande"]
HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------------
# Command line

parser = argparse.ArgumentParser(description="Base vs LoRA vs DoRA vs MixLoRA on the eight commonsense tasks.",
                                 formatter_class=guards.HelpFormatter)
arg = parser.add_argument
arg("--model", help="checkpoint folder (as train.py --model)")
arg("--out", default="runs/study", help="study folder: one sub-folder per run, results.json, table.md, study.png")
arg("--task-root", help="folder with <task>/{train,test}.jsonl (default: train.py's)")
arg("--methods", default="base,lora,dora,mixlora,lora-match", help="comma-separated subset of the methods")
arg("--seeds", default="0,1,2", help="comma-separated training seeds")
arg("--labels-seeds", help="seeds whose adapters are also evaluated in the labels format (default: every seed)")
arg("--max-train", type=int, default=32, help="training questions per task (8 tasks at once)")
arg("--max-eval", type=int, default=200, help="test questions per task, the same for every run")
arg("--max-len", type=int, default=256, help="tokens per sequence in training and evaluation")
arg("--epochs", type=float, default=1, help="passes over the training questions")
arg("--batch-size", type=int, default=16, help="questions per optimiser step")
arg("--lr", type=float, default=1e-3, help="peak learning rate (cosine, 10%% warmup)")
arg("--jobs", type=int, default=2, help="runs at a time")
arg("--threads", type=int, default=1, help="CPU threads per run")
arg("--extra", default="", help="more train.py flags for every run, e.g. '--device cuda --dtype bfloat16'")
arg("--report", action="store_true", help="only write results.json, table.md and study.png from finished runs")
arg("--dry-run", action="store_true", help="print the commands and exit")


# ----------------------------------------------------------------------------------------------------
# Methods and their trainable parameter counts


def count_trainable(model_path, method_args):
    """Trainable parameters of an adapter, counted on a meta-device model (no weights are read)."""
    args = options.parser.parse_args(["--model", model_path] + method_args)   # train.py's defaults for the rest
    common = dict(r=args.r, lora_alpha=args.lora_alpha, target_modules=args.target_modules.split(","))
    with torch.device("meta"):
        model = llama.LlamaForCausalLM(llama.LlamaConfig.from_json(os.path.join(model_path, "config.json")))
        if args.adapter in ("lora", "dora"):
            inject_lora(model, LoraConfig(**common, use_dora=args.adapter == "dora"))
        else:
            inject_adapter(model, MixLoRAConfig(**common, num_experts=args.num_experts, top_k=args.top_k))
    return mark_trainable(model)[0]


def methods(model_path):
    """{name: train.py adapter flags}; lora-match's rank gives about MixLoRA's trainable count."""
    m = {"lora": ["--adapter", "lora", "--r", "16", "--lora-alpha", "32"],
         "dora": ["--adapter", "dora", "--r", "16", "--lora-alpha", "32"],
         "mixlora": ["--adapter", "mixlora", "--r", "8", "--lora-alpha", "16", "--num-experts", "8", "--top-k", "2"]}
    per_rank = count_trainable(model_path, ["--adapter", "lora", "--r", "1"])   # LoRA's count is linear in r
    r = round(count_trainable(model_path, m["mixlora"]) / per_rank)
    m["lora-match"] = ["--adapter", "lora", "--r", str(r), "--lora-alpha", str(2 * r)]
    return m


# ----------------------------------------------------------------------------------------------------
# The runs: train.py commands, a few at a time


def plan(a):
    """[(run folder, command)] in the order they run: the base model first, then every method's first
    seed, then every method's second seed, ... (so a study cut short still has every method)."""
    py = [sys.executable, os.path.join(HERE, "train.py"), "--model", a.model, "--task", ",".join(TASKS),
          "--max-eval", str(a.max_eval), "--max-len", str(a.max_len),
          "--threads", str(a.threads)] + (["--task-root", a.task_root] if a.task_root else []) + a.extra.split()
    wanted = a.methods.split(",")
    runs = []
    if "base" in wanted:
        for fmt in ("cloze", "labels"):
            out = os.path.join(a.out, "base", fmt)
            runs.append((out, py + ["--eval-only", "--eval-format", fmt, "--out", out]))
    labels_seeds = (a.labels_seeds or a.seeds).split(",")
    for seed in a.seeds.split(","):
        for name, flags in methods(a.model).items():
            if name not in wanted:
                continue
            out = os.path.join(a.out, f"{name}-s{seed}")
            runs.append((out, py + flags + [
                "--out", out, "--seed", seed, "--max-train", str(a.max_train), "--epochs", str(a.epochs),
                "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--schedule", "cosine", "--warmup-ratio",
                "0.1", "--train-format", "cloze", "--eval-format", "cloze", "--no-eval-before"]))
            if seed in labels_seeds:
                runs.append((os.path.join(out, "labels"), py + [
                    "--eval-only", "--eval-format", "labels", "--adapter-path", os.path.join(out, "last"),
                    "--out", os.path.join(out, "labels")]))
    return runs


def run_all(runs, jobs):
    """Run the commands, `jobs` at a time; a labels evaluation waits for its training run."""
    pending = [r for r in runs if not os.path.exists(os.path.join(r[0], "wall.json"))]
    active = {}
    while pending or active:
        for out, cmd in list(pending):
            parent = os.path.dirname(out) if out.endswith("labels") and "base" not in out else None
            if len(active) >= jobs or (parent and not os.path.exists(os.path.join(parent, "wall.json"))):
                continue
            os.makedirs(out, exist_ok=True)
            print(" ".join(cmd), flush=True)
            log = open(os.path.join(out, "stdout.log"), "w")
            env = {**os.environ, "OMP_NUM_THREADS": cmd[cmd.index("--threads") + 1]}
            active[out] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time(), log)
            pending.remove((out, cmd))
        time.sleep(2)
        for out, (p, t0, log) in list(active.items()):
            if p.poll() is None:
                continue
            log.close()
            del active[out]
            if p.returncode:
                sys.exit(f"error: {out} failed (exit {p.returncode}); see {out}/stdout.log")
            with open(os.path.join(out, "wall.json"), "w") as f:
                json.dump({"wall_s": time.time() - t0}, f)
            print(f"done {out} in {time.time() - t0:.0f}s", flush=True)


# ----------------------------------------------------------------------------------------------------
# The report: metrics from the predictions, mean and std over seeds, a table and a plot


def metrics(folder):
    """{task: {acc, acc_norm?, chance, majority, n}} from <folder>/<task>.jsonl prediction files."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.jsonl"))):
        rows = [json.loads(line) for line in open(path)]
        golds = [r["gold"] for r in rows]
        chance, majority = evaluation.baselines(golds, [len(r["scores"]) for r in rows])
        m = {"acc": sum(r["pred"] == r["gold"] for r in rows) / len(rows), "chance": chance, "majority": majority,
             "n": len(rows)}
        if "pred_norm" in rows[0]:
            m["acc_norm"] = sum(r["pred_norm"] == r["gold"] for r in rows) / len(rows)
        out[os.path.basename(path)[:-len(".jsonl")]] = m
    return out


def final_predictions(run):
    """The predictions folder of a run's last evaluation."""
    steps = glob.glob(os.path.join(run, "predictions", "step*"))
    return max(steps, key=lambda s: int(s.rsplit("step", 1)[1])) if steps else os.path.join(run, "predictions")


def mean_std(xs):
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def collect(a):
    """{method: {"cloze": {task: [acc per seed]}, "cloze_norm", "labels", "wall_s", "params", "loss"}}."""
    res = {}
    for run in sorted(glob.glob(os.path.join(a.out, "*"))):
        name = os.path.basename(run)
        if not os.path.isdir(run):
            continue
        method = "base" if name == "base" else name.rsplit("-s", 1)[0]
        cl_dir, lb_dir = (os.path.join(run, "cloze"), os.path.join(run, "labels")) if method == "base" else (run, os.path.join(run, "labels"))
        if not os.path.exists(os.path.join(cl_dir, "wall.json")):
            continue
        r = res.setdefault(method, {"cloze": {}, "cloze_norm": {}, "labels": {}, "wall_s": [], "loss": []})
        cl = metrics(final_predictions(cl_dir))
        for t in cl:
            r["cloze"].setdefault(t, []).append(cl[t]["acc"])
            r["cloze_norm"].setdefault(t, []).append(cl[t]["acc_norm"])
        if os.path.exists(os.path.join(lb_dir, "wall.json")):                   # only the --labels-seeds
            for t, m in metrics(final_predictions(lb_dir)).items():
                r["labels"].setdefault(t, []).append(m["acc"])
        r["baselines"] = {t: (cl[t]["chance"], cl[t]["majority"], cl[t]["n"]) for t in cl}
        r["wall_s"].append(json.load(open(os.path.join(cl_dir, "wall.json")))["wall_s"])
        log = os.path.join(run, "log.jsonl")
        if os.path.exists(log):
            r["loss"].append([(x["step"], x["loss"]) for x in map(json.loads, open(log)) if "loss" in x])
    order = ["base", "lora", "dora", "mixlora", "lora-match"]                   # the table's row order
    return dict(sorted(res.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def table(res, params):
    """Markdown: one row per method, mean +- std over seeds per task and for the average, per format."""
    tasks = [t for t in TASKS if any(t in r["cloze"] for r in res.values())]
    lines = []
    for fmt, title in (("cloze", "cloze acc"), ("cloze_norm", "cloze acc_norm"), ("labels", "labels acc")):
        lines += [f"\n{title} (%, mean ± std over seeds)\n", "| method | trainable | runs | wall per run (min) | "
                  + " | ".join(tasks) + " | average |", "|" + "---|" * (len(tasks) + 5)]
        base = next(iter(res.values()))["baselines"]
        lines.append("| chance / majority | | | | " + " | ".join(
            f"{100 * base[t][0]:.1f} / {100 * base[t][1]:.1f}" for t in tasks) + " | |")
        for method, r in res.items():
            seeds = len(r[fmt].get(tasks[0], []))                     # runs evaluated in this format
            if not seeds:
                continue
            avg = [sum(r[fmt][t][s] for t in tasks) / len(tasks) for s in range(seeds)]
            cells = [f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in (mean_std(r[fmt][t]) for t in tasks)]
            w = mean_std([x / 60 for x in r["wall_s"]])
            lines.append(f"| {method} | {params.get(method, 0) / 1e6:.2f}M | {seeds} | {w[0]:.1f} ± {w[1]:.1f} | "
                         + " | ".join(cells) + " | {:.1f} ± {:.1f} |".format(*(100 * x for x in mean_std(avg))))
    return "\n".join(lines) + "\n"


def plot(res, path):
    """Per-task cloze and labels accuracy with error bars (std over seeds) for every method, and the mean
    training-loss curve of each method."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    tasks = [t for t in TASKS if any(t in r["cloze"] for r in res.values())] + ["average"]
    fig, axes = plt.subplots(3, 1, figsize=(12, 12))
    width = 0.8 / len(res)
    for ax, fmt in zip(axes[:2], ("cloze", "labels")):
        for i, (method, r) in enumerate(res.items()):
            seeds = len(r[fmt].get(tasks[0], []))                     # runs evaluated in this format
            if not seeds:
                continue
            per = [r[fmt][t] for t in tasks[:-1]] + [[sum(r[fmt][t][s] for t in tasks[:-1]) / (len(tasks) - 1)
                                                       for s in range(seeds)]]
            ms = [mean_std(v) for v in per]
            ax.bar([k + i * width for k in range(len(tasks))], [100 * m for m, _ in ms], width,
                   yerr=[100 * s for _, s in ms], capsize=2, label=method)
        base = next(iter(res.values()))["baselines"]
        ax.scatter([k + 0.4 - width / 2 for k in range(len(tasks) - 1)], [100 * base[t][0] for t in tasks[:-1]],
                   marker="_", s=1500, c="k",
                   label="chance", zorder=3)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(tasks))], tasks)
        ax.set_ylabel(f"{fmt} accuracy (%)")
        ax.legend(ncol=6, fontsize=8)
    for method, r in res.items():
        if r["loss"]:
            n = min(len(c) for c in r["loss"])
            axes[2].plot([c[0] for c in r["loss"][0][:n]], [sum(c[j][1] for c in r["loss"]) / len(r["loss"])
                                                            for j in range(n)], label=method)
    axes[2].set_xlabel("optimiser step")
    axes[2].set_ylabel("training loss (mean over seeds)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def report(a):
    res = collect(a)
    if not res:
        sys.exit(f"error: {a.out}: no finished runs")
    params = {"base": 0, **{m: count_trainable(a.model, f) for m, f in methods(a.model).items()}}
    md = table(res, params)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"args": vars(a), "params": params, "results": res}, f, indent=1)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(md)
    print(md)
    plot(res, os.path.join(a.out, "study.png"))


def main(argv=None):
    a = parser.parse_args(argv)
    if not a.model:  # no model: the usage, as every script without its required arguments (exit 2)
        parser.error("--model is required (a checkpoint folder, as train.py --model)")
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        sys.exit(f"error: --model: {a.model} is not a checkpoint folder with config.json")
    if not a.report:
        runs = plan(a)
        if a.dry_run:
            print("\n".join(" ".join(c) for _, c in runs))
            return
        run_all(runs, a.jobs)
    report(a)


if __name__ == "__main__":
    main()
