"""
cloze.py: likelihood ("cloze") evaluation of multiple-choice questions, as lm-evaluation-harness does it.

Each option i of a question is a pair (context_i, choice_i); the model reads context_i and is scored on
the continuation " " + choice_i. The score is the continuation's log-likelihood and acc_norm divides it
by the choice's length in characters (lm-evaluation-harness, lm_eval/api/task.py, process_results of
output_type multiple_choice: `completion_len = len(choice)`, `pred_norm = argmax(lls / completion_len)`):

    s_i      = sum_{t=1..n_i} log p(c_t | context_i, c_<t)     c = tokens of the continuation
    acc      = [argmax_i s_i == gold]                           (ties: the first option, as np.argmax)
    acc_norm = [argmax_i s_i / len(choice_i) == gold]

The context and continuation strings per task are the harness's task definitions (lm_eval/tasks/ at
commit 4e7e0d4, Aug 2026): arc/arc_easy.yaml (ARC-e and ARC-c), openbookqa/openbookqa.yaml,
super_glue/boolq/default.yaml (with its passage), piqa/piqa.yaml, siqa/siqa.yaml, hellaswag/utils.py
(its text preprocessing), winogrande/preprocess_winogrande.py (partial scoring: the option is put into
the sentence, and the part after the blank is the continuation scored, the same for both options).

Tokenisation is the harness's (lm_eval/api/model.py, _encode_pair): trailing spaces of the context move
to the continuation, context_ids = encode(context), continuation_ids = encode(context + continuation)
with the first len(context_ids) ids cut off, and the model reads context_ids + continuation_ids. Where
the joint tokenisation merges tokens across the boundary this is not encode(context + continuation);
the harness accepts that and so do we. Sequences longer than max_len (train.py's --max-len; the
harness's is the model's window) lose tokens on the left, as in the harness.

The options of one question share their context, so the fast path (`score_questions`) runs the longest
common prefix of a question's options once, caches its keys and values, and runs only each option's
remainder against that cache; a batch holds several questions (left-padded prefixes, right-padded
remainders), and the LM head runs only at the positions that predict a continuation token. Checked
against `score_plain` (one full-sequence forward per option, log-softmax over the vocabulary) by
test_cloze_shared_prefix_equals_plain in test_all.py.

Shape legend: Q questions in a batch, N their options, P longest prefix, R longest remainder, D hidden,
M continuation tokens of the batch, V vocab.
"""

import re
from contextlib import nullcontext

import torch

from llama import KVCache
from progress import Progress

HEAD_CHUNK = 512  # rows of the LM head at a time: 512 x 49152 fp32 logits = 100 MB for SmolLM2

# ----------------------------------------------------------------------------------------------------
# Task definitions: record -> [(context, choice) per option], in the option order of tasks.py's reference
# prompts (so one gold index serves both formats). The continuation scored is " " + choice (the
# harness's default target_delimiter " ").


def arc(r):
    """arc_easy.yaml (arc_challenge.yaml includes it): "Question: {{question}}\\nAnswer:", the choice texts."""
    c = r["choices"]
    return [(f"Question: {r['question']}\nAnswer:", t) for t in c["text"]]


def obqa(r):
    """openbookqa.yaml: the bare question stem as context."""
    c = r["choices"]
    return [(r["question_stem"], t) for t in c["text"]]


def boolq(r):
    """super_glue/boolq/default.yaml: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:", choices yes / no."""
    ctx = f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"
    # NOTE: the harness lists ["no", "yes"]; yes comes first here as true does in the reference's prompt.
    return [(ctx, "yes"), (ctx, "no")]


def piqa(r):
    """piqa.yaml: "Question: {{goal}}\\nAnswer:", the two solutions."""
    ctx = f"Question: {r['goal']}\nAnswer:"
    return [(ctx, r["sol1"]), (ctx, r["sol2"])]


def siqa(r):
    """siqa.yaml: "Q: {{context}} {{question}}\\nA:", the three answers."""
    ctx = f"Q: {r['context']} {r['question']}\nA:"
    return [(ctx, r[k]) for k in ("answerA", "answerB", "answerC")]


def hellaswag_preprocess(text):
    """hellaswag/utils.py preprocess: drop WikiHow's bracketed artefacts ("[title]" becomes ". ")."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag(r):
    """hellaswag/utils.py process_docs: query = activity_label + ": " + ctx_a + " " + ctx_b.capitalize()."""
    # str.capitalize also lower-cases the rest of ctx_b: that is the harness's string, kept as is.
    ctx = hellaswag_preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
    return [(ctx, hellaswag_preprocess(e)) for e in r["endings"]]


def winogrande(r):
    """preprocess_winogrande.py, partial scoring: context_i = sentence up to the blank + option_i, and
    the continuation is the rest of the sentence after the blank (the same for both options)."""
    s = r["sentence"]
    cut = s.index("_")
    rest = s[cut + 1:].strip()
    # NOTE: the harness reports no acc_norm for WinoGrande (its formula would divide by the length of the
    # partial contexts); ours divides by the common continuation, so acc_norm equals acc here.
    return [(s[:cut] + r["option1"], rest), (s[:cut] + r["option2"], rest)]


TASKS = {"arc-e": arc, "arc-c": arc, "boolq": boolq, "obqa": obqa, "piqa": piqa, "siqa": siqa,
         "hellaswag": hellaswag, "winogrande": winogrande}


def question_pairs(question, texts):
    """A user's multiple-choice question in the ARC format of the harness: one context, the option texts."""
    return [(f"Question: {question}\nAnswer:", t) for t in texts]


# ----------------------------------------------------------------------------------------------------
# Tokenisation (the harness's _encode_pair) and truncation


def encode_pair(tok, context, choice):
    """(context_ids, continuation_ids) of context + " " + choice, tokenised as the harness does."""
    continuation = " " + choice
    n = len(context) - len(context.rstrip())
    if n:                                           # "Answer: " + "x" -> "Answer:" + " " + " x"
        context, continuation = context[:-n], context[-n:] + continuation
    if not context:                                 # the harness conditions on a prefix token instead
        prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
        return [prefix], tok.encode(continuation, add_bos=False)
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    return ctx, whole[len(ctx):]


def encode_options(tok, pairs, max_len):
    """One question -> ([(input_ids, first scored position, target ids)] per option, any truncated).

    input_ids = (context_ids + continuation_ids)[:-1]: the last token is only predicted. Position p of
    the input predicts token p + 1, so the continuation is predicted from len(context_ids) - 1 on. An
    input over max_len keeps its last max_len tokens (the harness's left truncation).
    """
    out, cut = [], False
    for context, choice in pairs:
        ctx, cont = encode_pair(tok, context, choice)
        if not cont:
            raise ValueError(f"option {choice!r} has no tokens after its context; it cannot be scored")
        if len(cont) > max_len:
            raise ValueError(f"option {choice[:40]!r}... has {len(cont)} tokens, more than --max-len {max_len}")
        seq = ctx + cont
        drop = max(0, len(seq) - 1 - max_len)
        cut |= drop > 0
        out.append((seq[drop:-1], len(ctx) - drop - 1, cont))
    return out, cut


# ----------------------------------------------------------------------------------------------------
# Scoring: a plain reference, and the shared-prefix batched path that must equal it


@torch.no_grad()
def score_plain(model, options):
    """Sum of log p(continuation) per option, one full-sequence forward each: the slow reference."""
    dev = next(model.parameters()).device
    scores = []
    for ids, start, cont in options:
        x = torch.tensor([ids + cont[-1:]], device=dev)                           # (1,T)
        logp = torch.log_softmax(model(x).logits[0].double(), -1)                 # (T,V)
        pos = torch.arange(start, start + len(cont), device=dev)
        scores.append(float(logp[pos, torch.tensor(cont, device=dev)].sum()))
    return scores


def common_prefix(seqs):
    """Length of the longest common prefix of lists of ids."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _prefix_pass(model, prefixes, dtype, dev, pad_id):
    """Run the questions' shared prefixes (left-padded) once; return (hidden (Q,P,D), mask (Q,P), cache)."""
    Q, P = len(prefixes), max(1, max(len(p) for p in prefixes))   # P >= 1: a row of padding is harmless
    ids = torch.full((Q, P), pad_id, dtype=torch.long, device=dev)
    am = torch.zeros(Q, P, dtype=torch.long, device=dev)
    for q, p in enumerate(prefixes):
        if p:
            ids[q, P - len(p):] = torch.tensor(p, device=dev)
            am[q, P - len(p):] = 1
    cache = KVCache(model.config, Q, P, dtype, dev)
    out = model(ids, attention_mask=am, logits_mask=torch.zeros_like(am, dtype=torch.bool), cache=cache)
    return out.hidden, am, cache                                                  # (Q,P,D), (Q,P)


def _remainder_pass(model, rems, owner, pam, pcache, dtype, dev, pad_id):
    """Run each option's remainder against its question's cached prefix; return hidden (N,R,D)."""
    N, P, R = len(rems), pam.shape[1], max(len(r) for r in rems)
    cache = KVCache(model.config, N, P + R, dtype, dev)
    for i in range(model.config.num_hidden_layers):   # each option gets a copy of its question's prefix
        cache.k[i][:, :, :P] = pcache.k[i].index_select(0, owner)
        cache.v[i][:, :, :P] = pcache.v[i].index_select(0, owner)
    cache.length = P
    ids = torch.full((N, R), pad_id, dtype=torch.long, device=dev)
    ram = torch.zeros(N, R, dtype=torch.long, device=dev)
    for n, r in enumerate(rems):
        if r:
            ids[n, :len(r)] = torch.tensor(r, device=dev)
            ram[n, :len(r)] = 1
    am = torch.cat([pam.index_select(0, owner), ram], 1)                         # (N,P+R)
    return model(ids, attention_mask=am, logits_mask=torch.zeros_like(ram, dtype=torch.bool), cache=cache).hidden


@torch.no_grad()
def score_batch(model, questions, pad_id, ctx):
    """questions: [options from encode_options]; return [[score per option] per question].

    A question's prefix (the longest common prefix of its options' inputs) runs once; each option's
    remainder runs with the prefix's keys and values. Input position p of an option lies in the prefix
    when p < L (its question's prefix length), else in the remainder at p - L.
    """
    dev = next(model.parameters()).device
    L = [common_prefix([o[0] for o in opts]) for opts in questions]
    with ctx:
        # the cache holds what the projections return: the autocast dtype under autocast, else the weights'
        auto = torch.is_autocast_enabled(dev.type)
        dtype = torch.get_autocast_dtype(dev.type) if auto else next(model.parameters()).dtype
        ph, pam, pcache = _prefix_pass(model, [opts[0][0][:n] for opts, n in zip(questions, L)], dtype, dev, pad_id)
        Q, P, D = ph.shape
        flat = [(q, o) for q, opts in enumerate(questions) for o in opts]
        rems = [o[0][L[q]:] for q, o in flat]
        hidden, R = ph.reshape(Q * P, D), 0                                       # rows of the prefixes
        if any(rems):
            owner = torch.tensor([q for q, _ in flat], device=dev)
            rh = _remainder_pass(model, rems, owner, pam, pcache, dtype, dev, pad_id)  # (N,R,D)
            R = rh.shape[1]
            hidden = torch.cat([hidden, rh.reshape(-1, D)])                       # then the remainders'
        rows, targets, which = [], [], []
        for n, (q, (ids, start, cont)) in enumerate(flat):
            for j, p in enumerate(range(start, start + len(cont))):
                rows.append(q * P + P - L[q] + p if p < L[q] else Q * P + n * R + p - L[q])
                targets.append(cont[j])
                which.append(n)
        rows, targets = torch.tensor(rows, device=dev), torch.tensor(targets, device=dev)
        logp = torch.empty(len(rows), device=dev)                                 # (M,)
        for i in range(0, len(rows), HEAD_CHUNK):  # never the whole (M, V) logits at once
            lg = model.lm_head(hidden[rows[i:i + HEAD_CHUNK]]).float()            # (chunk,V)
            logp[i:i + HEAD_CHUNK] = lg.gather(1, targets[i:i + HEAD_CHUNK, None])[:, 0] - lg.logsumexp(-1)
    sums = torch.zeros(len(flat), dtype=torch.double, device=dev)
    sums = sums.index_add_(0, torch.tensor(which, device=dev), logp.double()).tolist()   # (N,)
    sizes = [len(opts) for opts in questions]
    return [sums[sum(sizes[:q]):sum(sizes[:q + 1])] for q in range(len(questions))]


def score_questions(model, questions, pad_id, batch_size=16, ctx=None, what="cloze"):
    """Scores of every option of every question, batch_size questions per forward, longest first (so a
    batch holds questions of similar length and pads little). Same order as `questions`. A progress
    line named `what` (stderr) once it takes a while."""
    order = sorted(range(len(questions)), key=lambda q: -sum(len(o[0]) for o in questions[q]))
    out = [None] * len(questions)
    with Progress(what, len(order), "questions") as bar:
        for i in range(0, len(order), batch_size):
            chunk = order[i:i + batch_size]
            for q, s in zip(chunk, score_batch(model, [questions[q] for q in chunk], pad_id, ctx or nullcontext())):
                out[q] = s
            bar.update(len(chunk))
    return out


# ----------------------------------------------------------------------------------------------------
# Metrics and per-question records


def argmax(xs):
    """Index of the first largest value (np.argmax's tie rule)."""
    return max(range(len(xs)), key=xs.__getitem__)     # max keeps the first of equal keys


def cloze_predictions(scores, pairs, golds, indices):
    """Per-question records (index in its file, scores, scores / characters, predictions, gold) and the
    task's acc and acc_norm."""
    rows = []
    for s, prs, g, idx in zip(scores, pairs, golds, indices):
        norm = [v / max(1, len(choice)) for v, (_, choice) in zip(s, prs)]
        rows.append({"index": idx, "scores": s, "scores_norm": norm, "pred": argmax(s),
                     "pred_norm": argmax(norm), "gold": g})
    n = max(1, len(rows))
    return rows, {"accuracy": sum(r["pred"] == r["gold"] for r in rows) / n,
                  "acc_norm": sum(r["pred_norm"] == r["gold"] for r in rows) / n}
