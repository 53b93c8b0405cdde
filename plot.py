"""plot.py: pictures of a train.py run, drawn from the run's log.jsonl.

    python plot.py runs/x            # -> runs/x/loss.png, runs/x/lr.png, runs/x/load.png (MoE adapters)

train.py writes one JSON line per logging step ({"step", "loss", one key per loss term ("task", "aux",
"z", "quality", ...), "lr", "grad_norm", "tok_s", and for MoE adapters "load": the (L, E) share of each
layer's routed assignments that went to each expert}) and one per evaluation ({"step", "eval": {source:
metrics}}). This script draws:

  loss.png  every loss term against the step, each on its own axes (their scales differ by 1000x), the
            evaluation loss (mean per target token, the same scale as "task") over the task term, and
            the evaluation accuracy per source where the data are scored by accuracy;
  lr.png    the learning rate of every step (warmup and schedule);
  load.png  per-layer x per-expert load as share x E (1 = the balanced share 1/E), averaged over each
            quarter of the logged steps: one heat map per quarter, so a collapse shows as it happens.

matplotlib is needed by this script only (`pip install matplotlib`); the project never imports it.
Checked by test_plot_writes_pictures: the three files from a tiny MixLoRA run's log.
"""
import argparse
import json
import os
import sys

import numpy as np


# ----------------------------------------------------------------------------------------------------
# Reading the log

NOT_TERMS = ("step", "loss", "lr", "grad_norm", "tok_s", "load")


def read_log(path):
    """(train rows sorted by step, eval rows sorted by step) of a log.jsonl. A resumed run appends to the
    same file, so a step logged twice keeps its latest line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (expected the log.jsonl of a train.py run)")
    train, evals = {}, {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n}: not a JSON line") from None
            (evals if "eval" in rec else train)[rec["step"]] = rec
    if not train and not evals:
        raise ValueError(f"{path}: no logged steps")
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def loss_terms(train):
    """The loss-term keys of the run, in the order they were logged ("task" first)."""
    keys = dict.fromkeys(k for r in train for k in r if k not in NOT_TERMS)
    return list(keys) or ["loss"]


def load_snapshots(train, parts=4):
    """[(first step, last step, (L, E) mean load x E)] over `parts` consecutive slices of the logged
    steps that carry a load (fewer slices when fewer steps were logged); [] for adapters without routing."""
    rows = [r for r in train if r.get("load")]
    if not rows:
        return []
    parts = min(parts, len(rows))
    out = []
    for chunk in np.array_split(np.arange(len(rows)), parts):
        load = np.mean([rows[i]["load"] for i in chunk], axis=0)             # (L, E)
        out.append((rows[chunk[0]]["step"], rows[chunk[-1]]["step"], load * load.shape[1]))
    return out


# ----------------------------------------------------------------------------------------------------
# Pictures


def plot_losses(plt, train, evals, path):
    terms = loss_terms(train)
    metrics = sorted({k for e in evals for r in e["eval"].values() for k in r if k in ("accuracy", "f1", "mcc")})
    n = len(terms) + bool(metrics)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), squeeze=False)
    steps = [r["step"] for r in train]
    for ax, k in zip(axes[0], terms):
        ax.plot(steps, [r.get(k, np.nan) for r in train], label=f"train {k}", lw=1)
        if k in ("task", "loss"):                # eval loss: mean per target token, the task term's scale
            for src in sorted({s for e in evals for s, r in e["eval"].items() if "loss" in r}):
                pts = [(e["step"], e["eval"][src]["loss"]) for e in evals if "loss" in e["eval"].get(src, {})]
                ax.plot(*zip(*pts), "o-", ms=3, label=f"eval {src}")
        ax.set(title=k, xlabel="step")
        ax.legend(fontsize=7)
    if metrics:
        ax = axes[0][-1]
        for src in sorted({s for e in evals for s in e["eval"]}):
            for m in metrics:
                pts = [(e["step"], 100 * e["eval"][src][m]) for e in evals if m in e["eval"].get(src, {})]
                if pts:
                    ax.plot(*zip(*pts), "o-", ms=3, label=f"{src} {m}")
        ax.set(title="evaluation (%)", xlabel="step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_lr(plt, train, path):
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([r["step"] for r in train], [r["lr"] for r in train], lw=1)
    ax.set(title="learning rate", xlabel="step")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_load(plt, snapshots, path):
    from matplotlib.colors import TwoSlopeNorm
    n = len(snapshots)
    L, E = snapshots[0][2].shape
    top = max(2.0, max(float(s[2].max()) for s in snapshots))
    norm = TwoSlopeNorm(vmin=0, vcenter=1, vmax=top)     # white = 1 = balanced, red over, blue under
    fig, axes = plt.subplots(1, n, figsize=(2.0 + (0.3 * E + 0.7) * n, 2.2 + 0.12 * L), squeeze=False,
                             sharey=True, layout="constrained")
    for ax, (a, b, load) in zip(axes[0], snapshots):
        im = ax.imshow(load, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
        ax.set(title=f"steps {a}-{b}", xlabel="expert", xticks=range(E), yticks=range(0, L, max(1, L // 8)))
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="load share x E", shrink=0.9)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# The script


def main(argv=None):
    ap = argparse.ArgumentParser(description="Draw loss, learning-rate and expert-load pictures of a train.py "
                                 "run (PNG files next to its log.jsonl).")
    ap.add_argument("out", help="the run's output folder (train.py --out), or its log.jsonl")
    args = ap.parse_args(argv)
    log = args.out if args.out.endswith(".jsonl") else os.path.join(args.out, "log.jsonl")
    folder = os.path.dirname(log) or "."
    try:
        import matplotlib
        matplotlib.use("Agg")                     # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: plot.py needs matplotlib (pip install matplotlib); training does not")
    try:
        train, evals = read_log(log)
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e}")
    written = []
    if train:
        plot_losses(plt, train, evals, os.path.join(folder, "loss.png"))
        plot_lr(plt, train, os.path.join(folder, "lr.png"))
        written += ["loss.png", "lr.png"]
    snapshots = load_snapshots(train)
    if snapshots:
        plot_load(plt, snapshots, os.path.join(folder, "load.png"))
        written.append("load.png")
    print(f"wrote {', '.join(written) or 'nothing (no training steps logged)'} in {folder}")
    return [os.path.join(folder, w) for w in written]


if __name__ == "__main__":
    main()
