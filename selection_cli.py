"""
selection_cli.py: the command line of Select-MoE stages 2 and 2b (selection.py holds the method), its
files (the scores file, the subset and its summary) and the end-to-end check's data. It runs as
`python selection.py ...` (the commands in selection.py's docstring and the README); `python
selection_cli.py ...` is the same command.

    --score FILE          with --adapter-path: score every record of --data, write FILE (.jsonl: one line per
                          sample {"index", "id", "q", "quality_tokens", "label"?, "n_tokens" (pooled),
                          "gate_logit_mean" [L], "routing" [L][E]}; .safetensors: the same as tensors,
                          ids and quality_tokens in the metadata).
                          Without: the scores file that --select reads.
    --select FRACTION     choose floor(N * FRACTION) samples (0 < FRACTION <= 1); the reference uses
                          0.0125 (stage_2_selection.yaml) or 0.05 (continue_selection.yaml)
    --subset FILE         where the subset goes (default out/selected.jsonl); the records are the
                          input's, unchanged, in file order; a summary goes to FILE.summary.json
    --quality-tokens all|answer  positions L_q and q pool over (default all, the reference's)
    --num-clusters 26, --kmeans-iters 300, --selection-seed 42: the reference's defaults
    --make-mix OUT, --auc SCORES  the end-to-end check's clean/corrupted mix, and the ROC AUC of a scores file

Checked in test_all.py (TestSelectionCli): the scores file round trip in both formats, the subset holds
the exact records, the corrupted mix, the command line (warm-up, score, select), usage and errors.
Shape legend: N samples, L layers, E experts.
"""

import argparse
import json
import os
import random
import sys
import time
from contextlib import nullcontext

import torch
from safetensors.torch import load_file, save_file

import checkpoints
import data
import guards
import kernels
import llama
import tokenizer
from adapter_files import load_adapter
from progress import track
from selection import FRACTION_ERROR, QUALITY_TOKENS, roc_auc, score_dataset, select

# ----------------------------------------------------------------------------------------------------
# Files: the scores and the subset


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


def score_records(args, records, model, tok, *, device="cpu", ctx=None, log=print):
    """Stage 2: score the records of --data, longest first as the reference batches them, and write
    --score in file order; returns the path."""
    # targets as the warm-up's (answer tokens, or all with --train-on-prompt) for --quality-tokens answer
    items = [data.encode(tok, data.record_to_example(r, where, tok, "score"), args.max_len, args.train_on_prompt)
             for where, r in track(records, f"tokenise {args.data}", unit="records")]
    order = sorted(range(len(items)), key=lambda i: -len(items[i]["ids"]))  # longest first, as the reference
    bs = args.batch_size
    batches = (data.collate([items[i] for i in order[j:j + bs]], tok.pad_id) for j in range(0, len(order), bs))
    t0 = time.time()
    s = score_dataset(model, batches, device=device, ctx=ctx, total=len(items), tokens=args.quality_tokens)
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
        result["scores"] = score_records(args, records, model, tok, device=device, ctx=ctx, log=log)
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


def run(argv=None):
    """main with a user's mistake as one line `error: ...` and exit status 1, no traceback."""
    try:
        return main(argv)
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


if __name__ == "__main__":
    run()
