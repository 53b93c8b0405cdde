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

The flags, the scores file and the subset are described in selection_cli.py, which holds this command
line (its files, and the end-to-end check's data); this file holds the method.

How well q separates clean from corrupted records on the end-to-end check (ROC AUC) is in the README's
results, with the commands that made it.

Checked in test_all.py (TestSelection): q equals a hand recomputation from the gate logits (over all
valid tokens; with --quality-tokens answer over exactly the answer positions, prompt gate logits and
padding changing nothing), k-means recovers separable clusters, round-robin order and rounding, AUC on
a hand-worked case, the warm-up's gates, the error paths; the command line in TestSelectionCli.
Shape legend: N samples, B batch, T time, L layers, E experts.
"""

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import data
from progress import Progress

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
def score_dataset(model, batches, *, device="cpu", ctx=None, total=None, progress=True, tokens="all"):
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


# ----------------------------------------------------------------------------------------------------
# Stage 2b: selection


def select(q, routing, fraction, num_clusters=26, max_iters=300, seed=42):
    """(selected indices in the order taken, cluster ids (N,)): cosine k-means of the flattened routing
    features (N, L*E), then round-robin over the clusters by descending quality q (N,)."""
    n = selection_count(len(q), fraction)
    clusters, _ = cosine_kmeans(routing.reshape(len(q), -1), num_clusters, max_iters, seed)
    return round_robin(q, clusters, n), clusters


if __name__ == "__main__":   # `python selection.py ...`: the command line, in selection_cli.py
    import selection_cli
    selection_cli.run()
