"""evaluation.py: what a run measures and prints: evaluation of every source, the per-question
prediction files, the one-line and table summaries, each training step's progress line and log.jsonl
record, and the expert-load reports.

    results = evaluation.evaluate(model, tok, {"arc-e": items}, args, device=device, ctx=ctx, predictions="out/predictions")
    print(evaluation.format_results(results))       # arc-e: accuracy 41.2% (n=250; chance 25.0%, majority 27.6%)

Multiple choice is scored as the reference does (labels: the best of the question's own option tokens
after its prompt, data.py) or as lm-evaluation-harness does (cloze: the options' continuation
log-likelihoods, cloze.py); classification by the head on the last real token (accuracy, F1, MCC; several
labels: every class with a logit > 0); lm data by the mean loss per target token. Each is reported beside
its chance and majority baselines. train.py calls evaluate at step 0, every --eval-every steps and at the
end, and evaluate_only is its --eval-only mode; the per-question records go to predictions/.

Checked in test_all.py: the labels format picks the best of the question's own options on a stub model
whose scores are known (test_scoring_restricted_to_own_options); cloze scores are the continuations'
log-likelihoods, shared prefixes included (test_cloze_*); F1/MCC/baselines by hand (test_metrics); the
prediction files' records in both formats (test_predictions_jsonl).
"""
import json
import math
import os
import time

import torch

import cloze
import data
import losses
from progress import Progress, format_eta, track

SPARK = "▁▂▃▄▅▆▇█"


# ----------------------------------------------------------------------------------------------------
# Metrics: baselines, F1, MCC, multi-label


def f1_score(pred, gold):
    """Binary F1 of class 1 when there are two classes, else macro-F1 over the classes present."""
    classes = sorted(set(gold) | set(pred))
    pos = [1] if set(classes) <= {0, 1} else classes
    f1s = []
    for c in pos:
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(f1s) / len(f1s)


def matthews(pred, gold):
    """Matthews correlation coefficient, multi-class form (Gorodkin 2004); 0 when undefined."""
    classes = sorted(set(gold) | set(pred))
    n = len(gold)
    c = sum(p == g for p, g in zip(pred, gold))
    t = [sum(g == k for g in gold) for k in classes]      # true counts per class
    p = [sum(q == k for q in pred) for k in classes]      # predicted counts per class
    num = c * n - sum(a * b for a, b in zip(t, p))
    den = math.sqrt(n * n - sum(b * b for b in p)) * math.sqrt(n * n - sum(a * a for a in t))
    return num / den if den else 0.0


def multilabel_metrics(pred, gold):
    """pred, gold: lists of sets of class ids. Exact-match accuracy and micro-F1."""
    tp = sum(len(p & g) for p, g in zip(pred, gold))
    fp = sum(len(p - g) for p, g in zip(pred, gold))
    fn = sum(len(g - p) for p, g in zip(pred, gold))
    return {"accuracy": sum(p == g for p, g in zip(pred, gold)) / len(gold),
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0}


def baselines(golds, n_options):
    """Chance (mean of 1/#options) and majority (always the most frequent gold answer) accuracy."""
    chance = sum(1 / k for k in n_options) / len(n_options)
    counts = {}
    for g in golds:
        counts[g] = counts.get(g, 0) + 1
    return chance, max(counts.values()) / len(golds)


# ----------------------------------------------------------------------------------------------------
# Evaluation


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


TRUNCATION_WARNED = set()  # evaluation sources whose truncation was reported


def evaluate_cloze(model, tok, items, args, ctx):
    """Cloze metrics (acc, acc_norm) of one source's choice examples, and one record per question."""
    enc = [cloze.encode_options(tok, e.cloze, args.max_len) for e in track(items, f"tokenise {items[0].task}", unit="questions")]
    if sum(cut for _, cut in enc) and items[0].task not in TRUNCATION_WARNED:  # once, not at every evaluation
        TRUNCATION_WARNED.add(items[0].task)
        print(f"warning: {items[0].task}: {sum(cut for _, cut in enc)} of {len(enc)} evaluation questions have an "
              f"option truncated to --max-len {args.max_len} tokens (on the left)")
    scores = cloze.score_questions(model, [opts for opts, _ in enc], tok.pad_id, args.eval_batch_size, ctx,
                                   what=f"eval {items[0].task}")
    return cloze.cloze_predictions(scores, [e.cloze for e in items], [e.label for e in items], [e.index for e in items])


def write_predictions(folder, name, rows):
    """<folder>/<name>.jsonl, one line per question; written beside and renamed into place."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{os.path.splitext(name)[0]}.jsonl")  # arc-e.jsonl, or mine.jsonl for mine.jsonl
    with open(path + ".tmp", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(path + ".tmp", path)


@torch.no_grad()
def evaluate(model, tok, evals, args, *, device, ctx, predictions=None):
    """{source: metrics}. choice: accuracy of the best own-option token at the last prompt token (labels)
    or acc / acc_norm of the option log-likelihoods (cloze); cls: accuracy/F1/MCC of the head; lm: mean
    loss per target token. Baselines beside them. With `predictions` (a folder), every question's option
    scores, prediction and gold go to <predictions>/<source>.jsonl."""
    model.eval()
    results = {}
    for name, items in evals.items():
        if items[0].kind == "choice" and args.eval_format == "cloze":
            rows, r = evaluate_cloze(model, tok, items, args, ctx)
            chance, majority = baselines([e.label for e in items], [len(e.options) for e in items])
            results[name] = {**r, "chance": chance, "majority": majority, "n": len(items)}
        else:
            results[name], rows = evaluate_source(model, tok, name, items, args, device=device, ctx=ctx)
        if predictions and rows:
            write_predictions(predictions, name, rows)
    model.train()
    return results


def evaluate_source(model, tok, name, items, args, *, device, ctx):
    """(metrics, per-question records) of one source of lm, choice (labels format) or cls examples, batch by
    batch, with a progress line on stderr once it takes more than 2 s."""
    kind, enc = items[0].kind, [data.encode(tok, e, args.max_len, with_answer=items[0].kind == "lm")
                                for e in track(items, f"tokenise {name}", unit="examples")]
    if sum(e["truncated"] for e in enc) and name not in TRUNCATION_WARNED:  # once, not at every evaluation
        TRUNCATION_WARNED.add(name)
        print(f"warning: {name}: {sum(e['truncated'] for e in enc)} of {len(enc)} evaluation examples "
              f"truncated to --max-len {args.max_len} tokens")
    preds, golds, rows, loss_sum, n_tok = [], [], [], 0.0, 0
    bar = Progress(f"eval {name}", len(enc), "examples")  # a stderr line once it takes a while
    for i in range(0, len(enc), args.eval_batch_size):
        chunk = enc[i:i + args.eval_batch_size]
        bar.update(len(chunk))
        batch = data.collate(chunk, tok.pad_id, args.num_labels or None)
        if kind == "lm":
            out, tmask = forward(model, batch, device, ctx)
            loss_sum += losses.lm_loss(out.logits, batch["targets"].to(device)[tmask]).item()
            n_tok += int(tmask.sum())
        else:
            for p, g, row in score_batch(model, tok, chunk, batch, device, ctx):
                preds.append(p)
                golds.append(g)
                rows.append(row)
    bar.close()
    if kind == "lm":
        return {"loss": loss_sum / max(n_tok, 1), "n": len(items)}, rows
    if kind == "cls" and isinstance(golds[0], set):
        return {**multilabel_metrics(preds, golds), "n": len(items)}, rows
    n_opt = [len(e.options) if kind == "choice" else (args.num_labels or 2) for e in items]
    chance, majority = baselines(golds, n_opt)
    r = {"accuracy": sum(p == g for p, g in zip(preds, golds)) / len(golds), "chance": chance,
         "majority": majority, "n": len(items)}
    if kind == "cls":
        r.update(f1=f1_score(preds, golds), mcc=matthews(preds, golds))
    return r, rows


def score_batch(model, tok, chunk, batch, device, ctx):
    """[(prediction, gold, record)] of one batch of choice or cls examples. choice: the LM head at the last
    prompt token, restricted to the question's own option tokens; cls: the head on the last real token
    (several labels: every class whose logit is > 0)."""
    kind, B = chunk[0]["example"].kind, len(chunk)
    last = batch["last"].to(device)
    pick = torch.zeros_like(batch["attention_mask"], dtype=torch.bool).to(device)
    pick[torch.arange(B), last] = kind == "choice"   # one LM-head row per example, in order
    with ctx:
        out = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                    logits_mask=pick)
    scored = []
    if kind == "choice":                             # restricted to the question's own options
        for b, it in enumerate(chunk):
            s = out.logits[b, data.option_token_ids(tok, it["example"].options)].float()  # (options,)
            pred, gold = int(s.argmax()), it["example"].label
            scored.append((pred, gold, {"index": it["example"].index, "scores": s.tolist(),
                                        "scores_norm": torch.log_softmax(s, 0).tolist(), "pred": pred, "gold": gold}))
        return scored
    logits = model.score(out.hidden[torch.arange(B), last].float())  # (B,C)
    multi = isinstance(chunk[0]["example"].label, list)
    for b, it in enumerate(chunk):
        pred = set(torch.nonzero(logits[b] > 0).flatten().tolist()) if multi else int(logits[b].argmax())
        gold = set(it["example"].label) if multi else it["example"].label
        scored.append((pred, gold, {"index": it["example"].index, "scores": logits[b].tolist(),
                                    "pred": sorted(pred) if multi else pred, "gold": sorted(gold) if multi else gold}))
    return scored


def evaluate_only(run):
    """train.py --eval-only, after its stage 3: the model (the base, or --adapter-path), or each of several
    --adapter-path folders and then one results table; predictions/ (predictions/N for the N-th folder) is
    all it writes. Returns {"eval": results}, or {"eval": {folder: results}}."""
    args = run.args
    if len(run.adapters) < 2:  # the base model, or one --adapter-path: loaded into run.model
        folder = os.path.join(args.out, "predictions")
        results = (evaluate(run.model, run.tok, run.evals, args, device=run.device, ctx=run.ctx, predictions=folder)
                   if run.rank == 0 else {})
        run.log(format_results(results))
        return {"eval": results}
    out = {}
    for t in run.adapters if run.rank == 0 else ():
        out[t.name] = evaluate(t.model, run.tok, run.evals, args, device=run.device, ctx=run.ctx, predictions=t.out)
        run.log(f"{t.name}: {format_results(out[t.name])}")
        t.history["eval"].append(out[t.name])
    if out:
        run.log(results_table(run))
    return {"eval": out}


def headline(results):
    """One number to pick the best adapter by: mean accuracy, or minus the mean eval loss."""
    accs = [r["accuracy"] for r in results.values() if "accuracy" in r]
    return sum(accs) / len(accs) if accs else -sum(r["loss"] for r in results.values()) / len(results)


def format_results(results):
    """One line of every source's metrics (loss and perplexity, or accuracy with its baselines), and their average."""
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

# ----------------------------------------------------------------------------------------------------
# Summaries: one line, a table of several adapters, the expert load


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
                + f" | {tok_s:.0f} tok/s | eta {format_eta(eta)}")
        if len(run.adapters) == 1 and stats[0]["loads"]:
            text += f" | {summary}"
        run.log(text)
