"""
selection.py: Select-MoE data selection. Warm up the quality gates and routers of a MixLoRA adapter,
score every sample of a data file by its quality gate, cluster the samples by how they are routed,
and keep the best of each cluster: a subset in the input's own format that train.py trains on.

Reference: FGinfinite/Qualitiy-Gate ("MyGO", no paper), specified in ../shared/reference/select_moe.md
sec. 4 (stage 1 warm-up, stage 2 scoring, stage 2b selection), sec. 5 (what is saved), sec. 8 (the
mapping onto MixLoRA). The gate itself (g = sigmoid(w_q u), y = g y_moe + (1 - g) y_trash) lives in
moe_lora.py, its losses in losses.py.

    stage 1  warm-up: train only the quality gates and the routers (everything else frozen), on an
             existing MixLoRA adapter (--adapter-path) or fresh experts, with
             loss = CE + router_aux_loss_coef * (L_LB + quality_loss_weight * L_q)
    stage 2  scoring, one no-grad pass:  a_{i,l} = mean over pooled tokens t of s_{i,l,t}
                                         q_i     = (1/L) sum_l sigmoid(a_{i,l})
                                         P_{i,l} = mean over valid tokens of softmax(z_{i,l,t})  (E,)
    stage 2b selection: cosine k-means (k = 26) on x_i = flatten(P_i) (L*E), then round-robin over
             the clusters by descending q until floor(N * fraction) samples are taken

    pooled tokens (--quality-tokens, quality_token_mask): the tokens L_q averages over in stage 1 and a_{i,l}
             in stage 2: `all` valid tokens (the reference) or `answer`, the positions that predict an answer
             token. NOTE: `answer` is ours: a bad response leaves the prompt tokens as they are, so the gate
             cannot tell them apart and per-sample labels on them are noise (the README's end-to-end check).

Commands (stage 1 is training, so it is train.py's --warmup; stages 2 and 2b are this file's):

    python train.py --model PATH --data D.json --adapter-path ADAPTER --warmup --quality-loss bce \\
                    --quality-tokens answer --out runs/warm           # stage 1 -> runs/warm/last
    python selection.py --model PATH --data D.json --adapter-path runs/warm/last --score scores.jsonl \\
                        --quality-tokens answer                       # stage 2
    python selection.py --data D.json --score scores.jsonl --select 0.05 --subset subset.jsonl   # 2b
    python train.py --model PATH --data subset.jsonl ...              # stage 3: fine-tune on the subset
    python selection.py --make-mix mix.jsonl --n 200                  # the end-to-end check's data (README)
    python selection.py --auc scores.jsonl                            # ROC AUC of q against the labels

    --score FILE          with --model: score every record of --data, write FILE (.jsonl: one line per
                          sample {"index", "id", "q", "quality_tokens", "label"?, "n_tokens" (pooled),
                          "gate_logit_mean" [L], "routing" [L][E]}; .safetensors: the same as tensors,
                          ids and quality_tokens in the metadata).
                          Without --model: the scores file that --select reads.
    --select FRACTION     choose floor(N * FRACTION) samples (0 < FRACTION <= 1); the reference uses
                          0.0125 (stage_2_selection.yaml) or 0.05 (continue_selection.yaml)
    --subset FILE         where the subset goes (default out/selected.jsonl); the records are the
                          input's, unchanged, in file order; a summary goes to FILE.summary.json
    --quality-tokens all|answer  positions L_q and q pool over (default all, the reference's)
    --num-clusters 26, --kmeans-iters 300, --selection-seed 42: the reference's defaults

How well q separates clean from corrupted records on the end-to-end check (ROC AUC) is in the README's
results, with the commands that made it.

Checked in test_all.py (the selection.py tests): q equals a hand recomputation from the gate logits
(over all valid tokens; with --quality-tokens answer over exactly the answer positions, prompt gate
logits and padding changing nothing), k-means recovers separable clusters, round-robin order and
rounding, the subset holds the exact records, AUC on a hand-worked case, the command line (warm-up,
score, select), the error paths. Shape legend: N samples, B batch, T time, L layers, E experts.
"""

import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import checkpoints
import data
import guards
import kernels
import llama
import tokenizer
from adapter_files import load_adapter
from progress import Progress, track

FRACTION_ERROR = "--select: the fraction must be in (0, 1], got {}"
QUALITY_TOKENS = ("all", "answer")                                     # see quality_token_mask

# ----------------------------------------------------------------------------------------------------
# Small pure functions: ROC AUC, the selection count, round-robin


def roc_auc(scores, labels):
    """Area under the ROC curve of `scores` separating labels 1 (positive) from 0, rank-based.

    AUC = (sum of the positives' ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)   (Mann-Whitney U),
    ranks 1..N in ascending score order, tied scores sharing their average rank (so a tie counts 1/2).
    """
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels, dtype=torch.float64).flatten()
    if s.numel() != y.numel():
        raise ValueError(f"roc_auc: {s.numel()} scores but {y.numel()} labels")
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if n_pos + n_neg != y.numel() or not n_pos or not n_neg:
        raise ValueError("roc_auc: labels must be 0/1 with at least one of each")
    order = torch.argsort(s, stable=True)
    srt = s[order]
    ranks = torch.empty_like(s)
    i = 0
    while i < len(srt):                       # a run of equal scores i..j-1 gets the mean rank
        j = i
        while j < len(srt) and srt[j] == srt[i]:
            j += 1
        ranks[order[i:j]] = (i + 1 + j) / 2   # mean of ranks i+1 .. j
        i = j
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def quality_token_mask(batch, tokens="all"):
    """(B, T) bool: the positions the quality gate's loss (warm-up) and score q pool over.

    "all"    every token of the attention mask (prompt, answer, EOS; not padding): the reference's
    "answer" the positions that predict a target token (targets != IGNORE, data.collate), i.e. where
             train.py computes the LM loss: the last prompt token and the answer tokens but the last
             (the whole text with --train-on-prompt or for plain 'text' records)
    NOTE: "answer" departs from the reference. When a record is bad because of its response (the
    end-to-end check's shuffled outputs), its prompt tokens are exactly those of a good record (causal
    attention: they never see the answer), so a gate trained on them with per-sample labels learns
    label noise, and a score averaged over them is diluted by tokens that carry no signal.
    """
    if tokens not in QUALITY_TOKENS:
        raise ValueError(f"--quality-tokens: expected one of {', '.join(QUALITY_TOKENS)}, got {tokens!r}")
    if tokens == "all":
        return batch["attention_mask"].bool()                          # (B, T)
    if "targets" not in batch:
        raise ValueError("--quality-tokens answer needs the batch's targets (data.collate of data.encode output)")
    return batch["targets"] != data.IGNORE                             # (B, T)


def selection_count(n, fraction):
    """floor(n * fraction) (the reference's target_count), at least 1.
    NOTE: the 1e-9 guards floating error (100 * 0.29 = 28.999...); the reference has no minimum of 1."""
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(FRACTION_ERROR.format(fraction))
    if n < 1:
        raise ValueError("empty dataset: nothing to select from")
    return max(1, math.floor(n * fraction + 1e-9))


def round_robin(q, clusters, n):
    """Indices of n samples: each cluster sorted by descending q, then one from each cluster in
    ascending cluster id, round after round; exhausted clusters are skipped (select_moe.md sec. 4).
    Ties in q keep file order. Returns the indices in the order they were taken."""
    q, clusters = torch.as_tensor(q), torch.as_tensor(clusters)
    queues = []
    for c in torch.unique(clusters).tolist():                          # ascending cluster ids
        idx = torch.nonzero(clusters == c).flatten()
        queues.append(idx[torch.argsort(-q[idx], stable=True)].tolist())
    out, rnd = [], 0
    while len(out) < min(n, len(q)):
        for queue in queues:
            if rnd < len(queue) and len(out) < n:
                out.append(queue[rnd])
        rnd += 1
    return out


def cosine_kmeans(x, k=26, max_iters=300, seed=42, tol=1e-4):
    """Cosine k-means of the rows of x (N, F) -> (cluster id (N,), centres (k, F)), the reference's.

    init: k-means++ variant: the first centre uniform at random, each next one drawn with probability
          proportional to D(x) = 1 - max_c cos(x, c) (NOT D^2), generator seeded with `seed`
    assign: argmax_c cos(x, c), i.e. on L2-normalised rows and centres
    update: the arithmetic mean of the assigned RAW rows; an empty cluster keeps its centre
    stop: max_c (1 - cos(new_c, old_c)) < tol, or max_iters. k larger than N is cut to N.
    """
    x = x.float()
    N, k = x.shape[0], min(k, x.shape[0])
    xn = F.normalize(x, dim=1)                                         # (N, F) unit rows
    g = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(N, (1,), generator=g))]
    for _ in range(1, k):
        d = (1 - (xn @ xn[chosen].t()).max(1).values).clamp(min=0)    # (N,) distance to nearest centre
        d[chosen] = 0
        if d.sum() <= 0:                                               # duplicates only: any unused row
            d = torch.ones(N)
            d[chosen] = 0
        chosen.append(int(torch.multinomial(d, 1, generator=g)))
    centres = x[chosen].clone()                                        # (k, F)
    for _ in range(max_iters):
        assign = (xn @ F.normalize(centres, dim=1).t()).argmax(1)      # (N,)
        counts = torch.bincount(assign, minlength=k).float()           # (k,)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)      # (k, F)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
        shift = (1 - F.cosine_similarity(new, centres, dim=1)).max()
        centres = new
        if shift < tol:
            break
    return (xn @ F.normalize(centres, dim=1).t()).argmax(1), centres


# ----------------------------------------------------------------------------------------------------
# Stage 1: warm-up helpers (train.py --warmup)


def ffn_layers(model):
    """The model's MoE FFNs (modules with a router `moe_gate`), in layer order."""
    return [m for m in model.modules() if hasattr(m, "moe_gate")]


def add_quality_gates(model, trash_mode="zero", init_bias=None):
    """Give every MixLoRA FFN that lacks one a quality gate (MixLoRAFFN.add_quality_gate, init from the
    adapter config's quality_gate_init_mean/std; init_bias: a gate bias so that the model starts as the
    loaded adapter, see there) and set the trash mode of all of them; record the settings in
    model.adapter_config so that save_adapter/load_adapter keep the gates."""
    layers = ffn_layers(model)
    if not layers:
        raise ValueError("a quality gate needs MoE layers: load or create a MixLoRA adapter first")
    if trash_mode not in ("zero", "noise"):
        raise ValueError(f"--trash-mode: expected zero or noise, got {trash_mode!r} (custom needs code)")
    cfg = model.adapter_config
    for m in layers:
        if m.quality_gate is None:
            m.add_quality_gate(cfg.quality_gate_init_mean, cfg.quality_gate_init_std, init_bias)
        m.trash_mode = trash_mode
    cfg.quality_gate, cfg.trash_expert_mode = True, trash_mode
    cfg.quality_gate_init_bias = init_bias
    return model


def freeze_for_warmup(model):
    """Train only the quality gates and the routers (the reference's stage 1: names containing
    "quality_gate" or the router's "moe_gate"); return the number of trainable parameters."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_("quality_gate" in name or "moe_gate" in name)
        n += p.numel() if p.requires_grad else 0
    return n


def attach_quality(examples, path):
    """Copy each record's per-sample "quality" label (1 clean, 0 bad) onto its data.Example, as
    `example.quality` (None when absent), for the bce quality loss. data.load_data keeps file order."""
    records = data.read_records(path)
    for e, (where, r) in zip(examples, records):
        v = r.get("quality")
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"{where}: 'quality' must be a number in [0, 1], got {v!r}")
        e.quality = None if v is None else float(v)
    return examples


# ----------------------------------------------------------------------------------------------------
# Stage 2: scoring


@torch.no_grad()
def score_dataset(model, batches, device="cpu", ctx=None, total=None, progress=True, tokens="all"):
    """One no-grad pass; per sample (in batch order) returns {"q": (N,), "gate_logit_mean": (N, L),
    "routing": (N, L, E), "n_tokens": (N,)} as float32 CPU tensors.

    batches: collated dicts with "input_ids", "attention_mask" (B, T), right-padded, and for
    tokens="answer" "targets" (data.collate). q is pooled over quality_token_mask(batch, tokens):
    with "all" (the reference's choice, select_moe.md P3) every token of the attention mask, prompt,
    answer, EOS (and BOS where the tokenizer adds one); with "answer" only the positions that predict a
    target token. Padding is excluded either way. Warm up and score with the same `tokens` (train.py
    --quality-tokens), so the score measures what the warm-up taught; n_tokens counts those positions
    (a sample with none gets a = 0, q = 0.5). q_i = mean_l sigmoid(mean_t s_{i,l,t}) (the sigmoid of
    the MEAN logit, the reference's score, not the mean sigmoid, P6); routing = mean_t softmax(z_{i,l,t})
    over all E and over ALL valid tokens whatever `tokens` is: the clusters group samples by what they
    are (the prompt says much of that), as in the reference.
    NOTE: the text is the training template (data.encode), not the reference's "role: content" (P5).
    """
    if not any(getattr(m, "quality_gate", None) is not None for m in ffn_layers(model)):
        raise ValueError("the model has no quality gates: scoring needs a MixLoRA adapter warmed up "
                         "with a quality gate (train.py --warmup, then --adapter-path)")
    was_training = model.training
    model.eval()
    out = {"q": [], "gate_logit_mean": [], "routing": [], "n_tokens": []}
    done, bar = 0, Progress("score", total, "samples", after=0 if progress else float("inf"))
    for batch in batches:
        ids, am = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        m = am.float()                                                 # (B, T) 1 = valid token
        n = m.sum(1).clamp(min=1)                                      # (B,)
        mq = quality_token_mask(batch, tokens).to(device).float()      # (B, T) 1 = token q pools over
        nq = mq.sum(1)                                                 # (B,)
        with ctx or nullcontext():
            res = model(ids, attention_mask=am, logits_mask=torch.zeros_like(am, dtype=torch.bool))
        aux = [a for a in res.aux if a and "gate_logits" in a]
        s = torch.stack([a["gate_logits"].float() for a in aux], 1)    # (B, L, T)
        a_mean = (s * mq[:, None]).sum(-1) / nq.clamp(min=1)[:, None]  # (B, L) mean logit over pooled t
        B, T = m.shape
        p = torch.stack([a["router_logits"].float().softmax(-1).view(B, T, -1) for a in aux], 1)  # (B, L, T, E)
        routing = (p * m[:, None, :, None]).sum(2) / n[:, None, None]  # (B, L, E)
        out["q"].append(torch.sigmoid(a_mean).mean(1).cpu())           # (B,)
        out["gate_logit_mean"].append(a_mean.cpu())
        out["routing"].append(routing.cpu())
        out["n_tokens"].append(nq.cpu())
        done += B
        bar.update(B)
    bar.close()
    model.train(was_training)
    if not done:
        raise ValueError("empty dataset: nothing to score")
    return {k: torch.cat(v) for k, v in out.items()}


def record_ids(records):
    """A sample id per record: its "id" field when it has one, else its position in the file."""
    return [str(r["id"]) if "id" in r else str(i) for i, (_, r) in enumerate(records)]


def write_scores(path, scores, ids, labels=None, tokens="all"):
    """Write scores (score_dataset's dict, samples in file order) next to the sample ids, atomically:
    JSONL one object a line, or safetensors (tensors + ids in the metadata) by the file extension.
    `tokens` (which positions q was pooled over, --quality-tokens) goes on every JSONL line and into
    the safetensors metadata, so a scores file says how it was made."""
    N = len(ids)
    labels = labels if labels is not None else [None] * N
    tmp = path + ".tmp"
    if path.endswith(".safetensors"):
        tensors = {k: v.contiguous() for k, v in scores.items()}
        tensors["index"] = torch.arange(N)
        tensors["label"] = torch.tensor([float("nan") if v is None else v for v in labels])  # NaN: none
        save_file(tensors, tmp, metadata={"ids": json.dumps(ids), "format": "pt",
                                                       "quality_tokens": tokens})
    else:
        with open(tmp, "w") as f:
            for i in range(N):
                row = {"index": i, "id": ids[i], "q": float(scores["q"][i]), "quality_tokens": tokens}
                if labels[i] is not None:
                    row["label"] = labels[i]
                row.update(n_tokens=int(scores["n_tokens"][i]), gate_logit_mean=scores["gate_logit_mean"][i].tolist(),
                           routing=scores["routing"][i].tolist())
                f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def read_scores(path):
    """Inverse of write_scores: {"ids": [str], "q": (N,), "routing": (N, L, E), "label": (N,) NaN = none,
    "quality_tokens": str ("all" for files written before the option existed), ...}, in file order."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: scores file does not exist (write it with --score first)")
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        out = load_file(path)
        out["ids"], out["quality_tokens"] = json.loads(meta["ids"]), meta.get("quality_tokens", "all")
    else:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if not rows:
            raise ValueError(f"{path}: empty scores file")
        rows.sort(key=lambda r: r["index"])
        out = {"ids": [r["id"] for r in rows], "index": torch.tensor([r["index"] for r in rows]),
               "q": torch.tensor([r["q"] for r in rows]), "routing": torch.tensor([r["routing"] for r in rows]),
               "label": torch.tensor([r.get("label", float("nan")) for r in rows], dtype=torch.float32),
               "quality_tokens": rows[0].get("quality_tokens", "all")}
    if not torch.equal(out["index"], torch.arange(len(out["ids"]))):
        raise ValueError(f"{path}: sample indices are not 0..N-1; score the whole data file")
    return out


# ----------------------------------------------------------------------------------------------------
# Stage 2b: selection


def select(q, routing, fraction, num_clusters=26, max_iters=300, seed=42):
    """(selected indices in the order taken, cluster ids (N,)): cosine k-means of the flattened routing
    features (N, L*E), then round-robin over the clusters by descending quality q (N,)."""
    n = selection_count(len(q), fraction)
    clusters, _ = cosine_kmeans(routing.reshape(len(q), -1), num_clusters, max_iters, seed)
    return round_robin(q, clusters, n), clusters


def write_subset(path, records, indices):
    """Write the chosen records, unchanged and in file order: a JSON list if `path` ends in .json,
    else JSONL (both are what data.py reads, so the subset can be trained on directly)."""
    chosen = [records[i][1] for i in sorted(indices)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        if path.endswith(".json"):
            json.dump(chosen, f, ensure_ascii=False, indent=2)
        else:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen)
    os.replace(path + ".tmp", path)
    return path


# ----------------------------------------------------------------------------------------------------
# The end-to-end check's data: clean records and corrupted copies (outputs shuffled across examples)


def make_corrupted_mix(records, n, corrupt_fraction=0.5, seed=0):
    """(mix, rest): n alpaca records, a `corrupt_fraction` of them given the output of ANOTHER record of
    that group (a derangement), each tagged "quality": 1 (clean) or 0 (corrupted) and "id":
    "alpaca_<position in the source>", shuffled; rest: the source records not drawn, untouched."""
    rng = random.Random(seed)
    drawn = rng.sample(range(len(records)), n)
    pick = [dict(records[i], id=f"alpaca_{i:04d}", quality=1) for i in drawn]
    bad = rng.sample(range(n), round(n * corrupt_fraction))
    outs = [pick[i]["output"] for i in bad]
    for j, i in enumerate(bad):                                        # rotate by one: nobody keeps its own
        pick[i]["output"], pick[i]["quality"] = outs[(j + 1) % len(bad)], 0
    rng.shuffle(pick)
    return pick, [r for i, r in enumerate(records) if i not in set(drawn)]


# ----------------------------------------------------------------------------------------------------
# Stages 2 and 2b from the command line


def load_model(args):
    """--model with the warmed-up adapter of --adapter-path on --device, and the autocast context of
    --dtype (train.py's rule: bf16 on a GPU that supports it, else fp32)."""
    if not args.adapter_path:
        raise ValueError("--score with --model needs --adapter-path: a MixLoRA adapter warmed up with quality "
                         "gates (train.py --warmup)")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cpu":  # as train.py's --threads 0: one thread on a busy machine, else all cores
        cores = os.cpu_count() or 1
        torch.set_num_threads(args.threads or (1 if os.getloadavg()[0] >= cores else cores))
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    args.model = checkpoints.resolve_model(args.model)   # a folder as given; a GGUF or a Hub id fetched
    model = llama.from_pretrained(args.model, dtype=torch.float32, device=device)
    tok = tokenizer.load_tokenizer(args.model)
    args.max_len = min(args.max_len, model.config.context_length)
    load_adapter(model, args.adapter_path)
    print("plain modules (--no-accelerate)" if args.no_accelerate else kernels.accelerate(model), file=sys.stderr)
    return model, tok, device, torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def load_records(args):
    """The records of the single --data file (scoring and selection need the file, not a task)."""
    if not args.data or "," in args.data:
        raise ValueError("--score/--select need exactly one --data file")
    return data.read_records(args.data)


def score_records(args, records, model, tok, device="cpu", ctx=None, log=print):
    """Stage 2: score the records of --data, longest first as the reference batches them, and write
    --score in file order; returns the path."""
    # targets as the warm-up's (answer tokens, or all with --train-on-prompt) for --quality-tokens answer
    items = [data.encode(tok, data.record_to_example(r, where, tok, "score"), args.max_len, args.train_on_prompt)
             for where, r in track(records, f"tokenise {args.data}", unit="records")]
    order = sorted(range(len(items)), key=lambda i: -len(items[i]["ids"]))  # longest first, as the reference
    bs = args.batch_size
    batches = (data.collate([items[i] for i in order[j:j + bs]], tok.pad_id) for j in range(0, len(order), bs))
    t0 = time.time()
    s = score_dataset(model, batches, device, ctx, total=len(items), tokens=args.quality_tokens)
    inv = torch.argsort(torch.tensor(order))                           # back to file order
    s = {k: v[inv] for k, v in s.items()}
    write_scores(args.score, s, record_ids(records), [r.get("quality") for _, r in records], args.quality_tokens)
    if (s["n_tokens"] == 0).any():
        log(f"warning: {int((s['n_tokens'] == 0).sum())} samples have no {args.quality_tokens} tokens; their q is 0.5")
    log(f"scored {len(items)} samples over {args.quality_tokens} tokens in {time.time() - t0:.0f}s -> {args.score}: q mean {s['q'].mean():.4f} "
        f"std {s['q'].std():.4f} min {s['q'].min():.4f} max {s['q'].max():.4f}")
    return args.score


def select_records(args, records, sc, log=print):
    """Stage 2b: select from the scores `sc` (read_scores), write --subset and its summary beside it;
    returns (the indices in the order taken, the subset's path)."""
    chosen, clusters = select(sc["q"], sc["routing"], args.select, args.num_clusters, args.kmeans_iters,
                              args.selection_seed)
    path = args.subset
    write_subset(path, records, chosen)
    sizes = torch.bincount(clusters).tolist()
    taken = torch.bincount(clusters[chosen], minlength=len(sizes)).tolist()
    summary = {"data": args.data, "scores": args.score, "quality_tokens": sc["quality_tokens"],
               "fraction": args.select, "n": len(records),
               "selected": len(chosen), "clusters": len(sizes), "cluster_sizes": sizes, "cluster_taken": taken,
               "q_mean_all": float(sc["q"].mean()), "q_mean_selected": float(sc["q"][chosen].mean()),
               "selected_ids": [sc["ids"][i] for i in chosen]}
    with open(path + ".summary.json.tmp", "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(path + ".summary.json.tmp", path + ".summary.json")
    log(f"selected {len(chosen)} of {len(records)} ({args.select:g}) over {len(sizes)} clusters -> {path}; "
        f"mean q {summary['q_mean_selected']:.4f} (all {summary['q_mean_all']:.4f})")
    return chosen, path


def run_selection(args, model=None, tok=None, device="cpu", ctx=None, log=print):
    """--score (with a model: write it; without: read it), the AUC when the records have quality labels,
    then --select; returns {"scores": path, "auc": float, "subset": path, "selected": [index], ...}."""
    if args.select is not None and not (0 < args.select <= 1):
        raise ValueError(FRACTION_ERROR.format(args.select))
    if not args.score:
        raise ValueError("--select needs --score FILE (the scores to select by)")
    records, result = load_records(args), {}
    if model is not None:
        result["scores"] = score_records(args, records, model, tok, device, ctx, log)
    sc = read_scores(args.score)
    if len(sc["ids"]) != len(records):
        raise ValueError(f"{args.score} has {len(sc['ids'])} samples but {args.data} has {len(records)} records; "
                         "score this data file first")
    lab = sc["label"]
    if (lab == 1).any() and (lab == 0).any():
        keep = ~lab.isnan()
        result["auc"] = roc_auc(sc["q"][keep], lab[keep])
        log(f"ROC AUC of q against the records' quality labels: {result['auc']:.4f} ({int(keep.sum())} labelled)")
    if args.select is not None:
        result["selected"], result["subset"] = select_records(args, records, sc, log)
    return result


# ----------------------------------------------------------------------------------------------------
# Command line

parser = argparse.ArgumentParser(description="Select-MoE stages 2 and 2b: score the records of a data file by "
                                 "the quality gates of a warmed-up MixLoRA adapter (train.py --warmup), select a "
                                 "subset; and the end-to-end check's data and its ROC AUC.",
                                 formatter_class=guards.HelpFormatter)
arg = parser.add_argument
# stage 2: scoring
arg("--model", help="checkpoint folder, .gguf file or Hub id the adapter was trained on (default: the default "
    "model, checkpoints.py)")
arg("--adapter-path", help="MixLoRA adapter folder with quality gates (train.py --warmup writes <out>/last)")
arg("--data", help="the one data file to score and select from (alpaca JSON/JSONL, chat 'messages', 'text')")
arg("--score", metavar="FILE", help="with --adapter-path: score every record of --data with its quality gate "
    "and write FILE (.jsonl or .safetensors); without: the scores --select reads")
arg("--quality-tokens", default="all", choices=QUALITY_TOKENS, help="positions the score q pools over: all valid "
    "tokens (reference) or answer, those that predict a target token; the same as the warm-up's")
arg("--train-on-prompt", action="store_true", help="targets over the whole text, as a warm-up with it (for answer)")
arg("--max-len", type=int, default=512, help="truncate records to this many tokens (train.py's default)")
arg("--batch-size", type=int, default=16, help="records per scoring forward pass (longest first)")
arg("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
    help="autocast dtype; auto = bfloat16 on a GPU that supports it, else float32. Weights stay fp32")
arg("--device", default="auto", help="auto, cpu, cuda or cuda:N")
arg("--threads", type=int, default=0, help="CPU threads; 0 = all cores, or 1 when the machine is already busy")
arg("--no-accelerate", action="store_true", help="keep the plain modules: skip kernels.accelerate (same scores, slower)")
# stage 2b: selection
arg("--select", type=float, metavar="FRACTION", help="choose floor(N * FRACTION) samples of --data by quality, "
    "round-robin over routing clusters (reference: 0.0125 or 0.05)")
arg("--subset", metavar="FILE", default=os.path.join("out", "selected.jsonl"),
    help="where --select writes the chosen records (.json: a JSON list, else JSONL)")
arg("--num-clusters", type=int, default=26, help="k of the cosine k-means on routing features (reference: 26)")
arg("--kmeans-iters", type=int, default=300, help="maximum k-means iterations (reference: 300)")
arg("--selection-seed", type=int, default=42, help="seed of the k-means++ initialisation (reference: 42)")
# the end-to-end check
arg("--make-mix", metavar="OUT", help="write a clean/corrupted alpaca mix as JSONL to OUT")
arg("--source", default="alpaca-demo", help="alpaca file to mix (default: LLaMA-Factory's demo file, fetched "
    "once by task_data.py)")
arg("--n", type=int, default=300, help="records in the mix")
arg("--corrupt-fraction", type=float, default=0.5, help="share of corrupted records")
arg("--rest", metavar="OUT", help="with --make-mix: write the source records not drawn to OUT")
arg("--auc", metavar="SCORES", help="print the ROC AUC of q in SCORES against its labels")


def main(argv=None):
    """--make-mix, then --score (with --adapter-path: written) and --select, then --auc; no task at all prints
    the usage."""
    args = parser.parse_args(argv)
    if not (args.make_mix or args.score or args.select is not None or args.auc):
        parser.error("nothing to do: give --score (with --adapter-path to write it), --select, --make-mix or --auc")
    result = {}
    if args.make_mix:
        mix, rest = make_corrupted_mix([r for _, r in data.read_records(args.source)], args.n, args.corrupt_fraction)
        write_subset(args.make_mix, [(None, r) for r in mix], range(len(mix)))
        print(f"wrote {len(mix)} records ({sum(r['quality'] == 0 for r in mix)} corrupted) to {args.make_mix}")
        if args.rest:
            write_subset(args.rest, [(None, r) for r in rest], range(len(rest)))
            print(f"wrote the {len(rest)} records not drawn to {args.rest}")
    if args.score or args.select is not None:
        model, tok, device, ctx = load_model(args) if args.model or args.adapter_path else (None, None, "cpu", None)
        result = run_selection(args, model, tok, device, ctx)
    if args.auc:
        sc = read_scores(args.auc)
        keep = ~sc["label"].isnan()
        result["auc"] = roc_auc(sc["q"][keep], sc["label"][keep])
        print(f"ROC AUC {result['auc']:.4f} over {int(keep.sum())} labelled samples")
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
