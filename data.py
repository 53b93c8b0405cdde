"""
data.py: what train.py trains and evaluates on, from records to batches: data files in every format,
sequence classification data, tokenisation with target masking, collation, the order of the examples.
The eight commonsense tasks and the built-in demo task are in tasks.py, the metrics in evaluation.py.

Every source becomes a list of `Example`s of one of three kinds:

    "lm"      prompt + answer text; the loss is on the answer tokens (alpaca, chat, plain text)
    "choice"  a multiple-choice question in two formats. labels (the reference's): trained as prompt +
              " " + label (causal LM), scored by the label token with the highest logit at the last
              prompt token, restricted to that question's own options. cloze (lm-evaluation-harness's):
              each option a (context, choice) pair scored by the log-likelihood of " " + choice, see
              cloze.py; trained on the correct option's continuation. (Tasks, demo, multiple-choice files)
    "cls"     sequence classification: a head on the last real token (sentence / sentence pairs)

Data formats, detected from the keys of each record (a JSON list, or JSONL with one object a line):

    {"instruction", "input"?, "output"}          Alpaca; prompt template of MoE-PEFT's Prompter
    {"messages": [{"role", "content"}, ...]}     chat, rendered with the checkpoint's chat template
    {"text"}                                     plain text, every token is a target
    {"sentence" | "text", "label"}               classification; "label" an int, or a list of ints
    {"sentence1", "sentence2", "label"}          for multi-label; pairs as in GLUE
    {"question", "choices": {"label", "text"},   multiple choice, the ARC schema
     "answerKey"}
    {"question", "options": [...], "answer"}     multiple choice, plain: answer an index or a label (A, B..)

Reference: MixLoRA / MoE-PEFT, ../shared/reference/mixlora.md section 7 (prompts, scoring, classification
head) and section 9 (cutoff, shuffling). Prompts are the reference's, word for word.
Checked in test_all.py (TestData: each format, masking, scoring rule, truncation, errors naming file:line).

Shape legend: B batch, T time (longest sequence in the batch), C classes.
"""

import json
import os
from dataclasses import dataclass

import torch

import cloze
import task_data  # where the named data files (alpaca-demo, sentiment-*) come from

CHAT_ROLES = ("system", "user", "assistant", "tool")
IGNORE = -100  # target value of a position with no loss (PyTorch's cross-entropy convention)


@dataclass
class Example:
    prompt: str              # conditioning text; no loss on it unless --train-on-prompt
    answer: str = ""         # target text (lm, choice) appended to the prompt
    kind: str = "lm"         # "lm" | "choice" | "cls"
    options: tuple = ()      # choice: option labels ("A", "B", ...) scored as the tokens of " " + label
    label: object = None     # choice: gold option index; cls: class id, or list of class ids (multi-label)
    prompt2: str = None      # cls: second sentence of a pair
    task: str = ""           # name reported in the metrics ("arc-e", "demo", file name)
    bos: bool = True         # prepend BOS as the tokenizer does by default (False: the chat template has it)
    eos: bool = False        # append EOS after the answer, so generation learns to stop
    where: str = ""          # "file:line" of the record, for error messages
    cloze: tuple = ()        # choice: (context, choice text) per option, the cloze format (cloze.py)
    index: int = None        # position of the record in its file (for predictions.jsonl)


# ----------------------------------------------------------------------------------------------------
# Reading files: a JSON list or JSONL, with errors that name the file and line


def read_records(path):
    """Return [(where, record dict)]; `where` is "file:line" (JSONL) or "file[item]" (JSON list). A named
    file (alpaca-demo, sentiment-train, sentiment-test) is fetched once by task_data.py."""
    path = task_data.data_file(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: data file does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte {raw[e.start]:#04x})") from None
    if not text.strip():
        raise ValueError(f"{path}: empty file, expected a JSON list or JSON lines")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        records = [(f"{path}[{i}]", r) for i, r in enumerate(items)]
    else:
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                raise ValueError(f"{path}:{i}: empty line (JSONL needs one JSON object per line)")
            try:
                records.append((f"{path}:{i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    if not records:
        raise ValueError(f"{path}: no records")
    for where, r in records:
        if not isinstance(r, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(r).__name__}")
    return records


def _text(r, key, where, required=True):
    v = r.get(key, "")
    if not isinstance(v, str) or (required and not v.strip()):
        raise ValueError(f"{where}: field {key!r} must be a non-empty string")
    return v


def alpaca_prompt(instruction, inp=""):
    """MoE-PEFT's default ("moe_peft") Prompter template."""
    return f"### Instruction:\n{instruction}\n\n" + (f"### Input:\n{inp}\n\n" if inp else "") + "### Output:\n"


def choice_prompt(question, labels, texts):
    """The reference's multiple-choice prompt (mixlora.md section 7): the question, then each option as
    "(label) text"; also the prompt of the ARC and OpenBookQA tasks (tasks.py)."""
    opts = " ".join(f"({l}) {t}" for l, t in zip(labels, texts))
    return f"Please choose the correct answer to the question: {question} {opts}\nAnswer:"


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def choice_record(r, where, task):
    """A multiple-choice record, ARC schema (choices {label, text}, answerKey) or plain (options, answer as
    an index or a label A, B, ...) -> a "choice" Example with both formats: the reference's prompt with
    the labels, and the harness's ARC cloze pairs."""
    question = _text(r, "question", where)
    if "choices" in r:
        c = r["choices"]
        texts = c.get("text") if isinstance(c, dict) else None
        labels = [str(x) for x in c.get("label", [])] if isinstance(c, dict) and isinstance(c.get("label"), list) else []
        answer = r.get("answerKey")
        gold = labels.index(answer) if answer in labels else None
        if isinstance(texts, list) and len(labels) != len(texts):
            raise ValueError(f"{where}: 'choices' has {len(labels)} labels for {len(texts)} texts")
    else:
        texts, answer = r.get("options"), r.get("answer")
        labels = list(LETTERS[:len(texts)]) if isinstance(texts, list) else []
        if isinstance(texts, list) and len(texts) > len(LETTERS):
            raise ValueError(f"{where}: {len(texts)} options, at most {len(LETTERS)} (labels A-Z)")
        if isinstance(answer, int) and not isinstance(answer, bool):
            gold = answer if 0 <= answer < len(labels) else None
        else:
            gold = labels.index(answer) if answer in labels else None
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"{where}: no options: expected 'choices': {{label: [...], text: [...]}} or 'options': "
                         "[...], a non-empty list of non-empty strings")
    if gold is None:
        raise ValueError(f"{where}: answer {answer!r} is not among the options (labels {', '.join(labels)}"
                         + (f", or an index 0-{len(labels) - 1})" if "options" in r else ")"))
    return Example(choice_prompt(question, labels, texts), " " + labels[gold], "choice", tuple(labels), gold, task=task,
                   cloze=tuple(cloze.question_pairs(question, texts)), where=where)


def schema(r, ex):
    """The schema of a record, to refuse files that mix them."""
    if ex.kind == "choice":
        return "ARC-schema multiple-choice" if "choices" in r else "plain multiple-choice"
    return {"lm": "language-modelling", "cls": "classification"}[ex.kind]


def record_to_example(r, where, tokenizer, task):
    """One record of any supported format -> Example (format detected from its keys)."""
    if any(k in r for k in ("choices", "options", "answerKey")) or ("question" in r and "answer" in r):
        return choice_record(r, where, task)
    if "label" in r:                                       # classification
        lab = r["label"]
        ok = isinstance(lab, int) or (isinstance(lab, list) and all(isinstance(x, int) for x in lab))
        if not ok or isinstance(lab, bool) or min(lab if isinstance(lab, list) else [lab], default=0) < 0:
            raise ValueError(f"{where}: 'label' must be a class id >= 0 or a list of them, got {lab!r}")
        if "sentence1" in r:
            return Example(_text(r, "sentence1", where), kind="cls", label=lab, task=task,
                           prompt2=_text(r, "sentence2", where))
        key = "sentence" if "sentence" in r else "text"
        return Example(_text(r, key, where), kind="cls", label=lab, task=task)
    if "instruction" in r:                                 # alpaca
        # NOTE: we append EOS so the model learns to stop; the reference appends "\n" and no EOS.
        return Example(alpaca_prompt(_text(r, "instruction", where), _text(r, "input", where, False)),
                       _text(r, "output", where), task=task, eos=True)
    if "messages" in r:                                    # chat
        msgs = r["messages"]
        if (not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m and
                                                                   isinstance(m.get("content"), str) for m in msgs)):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        unknown = [m["role"] for m in msgs if m["role"] not in CHAT_ROLES]
        if unknown:
            raise ValueError(f"{where}: unknown chat role {unknown[0]!r} (expected one of {', '.join(CHAT_ROLES)})")
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"{where}: the last message must have role 'assistant' (it is the target)")
        # NOTE: only the last assistant turn is a target; earlier turns are context.
        prompt = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ValueError(f"{where}: the chat template does not render the prompt as a prefix of the dialogue")
        return Example(prompt, full[len(prompt):], task=task, bos=False)
    if "text" in r:                                        # plain text: all of it is the target
        return Example("", _text(r, "text", where), task=task)
    raise ValueError(f"{where}: unknown record format (keys {sorted(r)}); expected instruction/output, "
                     "messages, text, sentence/label, or question/choices/answerKey or question/options/answer")


def check_labels(examples, num_labels, source):
    """Every class id of classification examples must be below num_labels (from `source`, a flag or an
    adapter's head): checked when the data loads, not at the first batch that holds a bad one."""
    for e in (e for e in examples if e.kind == "cls"):
        bad = [l for l in (e.label if isinstance(e.label, list) else [e.label]) if l >= num_labels]
        if bad:
            raise ValueError(f"{e.where or e.task}: label {bad[0]} is out of range for {num_labels} classes ({source})")


def load_data(path, tokenizer):
    """Read a data file into Examples; every record must have the same kind."""
    task = os.path.splitext(os.path.basename(path))[0]
    examples, first = [], None
    for i, (where, r) in enumerate(read_records(path)):
        ex = record_to_example(r, where, tokenizer, task)
        ex.index, ex.where, s = i, where, schema(r, ex)
        first = first or s
        if s != first:
            raise ValueError(f"{where}: a {s} record in a file of {first} records; use one schema per file")
        examples.append(ex)
    return examples


# ----------------------------------------------------------------------------------------------------
# Tokenisation, target masking, truncation, collation


def option_token_ids(tokenizer, options):
    """The token scored for each option: the last id of encode(" " + option), the reference's rule.

    Byte-level BPEs split " 1" into " " + "1" (SmolLM2 does), so the last id is the one that tells the
    options apart; for one-token labels (" A", " true") it is the only id.
    """
    ids = [tokenizer.encode(" " + o, add_bos=False)[-1] for o in options]
    if len(set(ids)) != len(ids):
        raise ValueError(f"options {list(options)} do not end in distinct tokens; they cannot be scored")
    return ids


def truncate(prompt, answer, max_len):
    """Fit prompt + answer ids into max_len. The answer keeps its start and the prompt keeps its end (so
    a task prompt keeps "Answer:"); the prompt gets at least half the budget when it needs it.

    NOTE: the reference keeps the first cutoff_len tokens, so an over-long prompt loses its "Answer:"
    suffix and is scored at the wrong position.
    """
    if len(prompt) + len(answer) <= max_len:
        return prompt, answer, False
    a = answer[:max(max_len - len(prompt), max_len // 2)]      # what the prompt leaves, at least half
    keep = max_len - len(a)
    p = prompt[len(prompt) - keep:] if keep > 0 else []         # the prompt's tail (a leading BOS is lost)
    return p, a, True


def encode(tokenizer, ex, max_len, train_on_prompt=False, with_answer=True, fmt="labels"):
    """Example -> {"ids": [int], "labels": [int] (token id where it is a target, else IGNORE), ...}.

    labels are aligned with ids (not shifted); collate() shifts them. Answer tokens are targets; with
    train_on_prompt the prompt tokens are too (except a leading BOS, which nothing predicts). A choice
    example in fmt "cloze" is the correct option's context and continuation, tokenised as cloze.py
    scores them, so the target tokens are exactly the ones the cloze evaluation sums over.
    NOTE: the reference trains on every token, prompt and padding included; we never train on padding.
    """
    prompt = tokenizer.encode(ex.prompt, add_bos=None if ex.bos else False) if ex.prompt or ex.bos else []
    if ex.kind == "cls" and ex.prompt2 is not None:
        # The reference tokenises each field with BOS and concatenates: BOS s1 BOS s2.
        prompt = prompt + tokenizer.encode(ex.prompt2, add_bos=None)
    answer = []
    if ex.kind == "choice" and fmt == "cloze":
        prompt, answer = cloze.encode_pair(tokenizer, *ex.cloze[ex.label])
        answer = answer if with_answer else []
    elif with_answer and ex.kind == "choice":
        # NOTE: the reference trains on all tokens of " " + label and scores the last one at the last
        # prompt position; we train exactly that token at that position, so training and scoring agree
        # when " " + label is several tokens (SmolLM2: " 1" = " ", "1").
        answer = [option_token_ids(tokenizer, ex.options)[ex.label]]
    elif with_answer and ex.kind == "lm":
        answer = tokenizer.encode(ex.answer, add_bos=False)
        if ex.eos and tokenizer.eos_id is not None:
            answer = answer + [tokenizer.eos_id]
    prompt, answer, cut = truncate(prompt, answer, max_len)
    ids = prompt + answer
    if not ids:
        raise ValueError(f"{ex.task}: an example has no tokens: {ex.prompt[:40]!r}")
    labels = [IGNORE] * len(prompt) + answer
    if train_on_prompt or not ex.prompt:
        labels = list(ids)
    if ex.kind == "cls":
        labels = [IGNORE] * len(ids)
    return {"ids": ids, "labels": labels, "truncated": cut, "example": ex}


def collate(items, pad_id, num_labels=None):
    """Right-pad a list of encode() outputs into tensors.

    input_ids (B,T), attention_mask (B,T) 1 = token, targets (B,T): the token to predict AT position t
    (labels shifted left by one, IGNORE where none), last (B,) index of the last real token,
    labels (B,) long or (B,C) float multi-hot for classification.
    """
    B, T = len(items), max(len(it["ids"]) for it in items)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it["ids"])
        input_ids[b, :n] = torch.tensor(it["ids"])
        attention_mask[b, :n] = 1
        targets[b, :n - 1] = torch.tensor(it["labels"][1:])   # position t predicts token t+1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets,
             "last": attention_mask.sum(1) - 1}
    exs = [it["example"] for it in items]
    if exs[0].kind == "cls":
        if isinstance(exs[0].label, list):
            multi = torch.zeros(B, num_labels)                   # (B,C) multi-hot
            for b, e in enumerate(exs):
                multi[b, e.label] = 1.0
            batch["labels"] = multi
        else:
            batch["labels"] = torch.tensor([e.label for e in exs])  # (B,)
    return batch


def step_indices(n, step, batch_size, seed):
    """Indices of the examples of optimiser step `step` (a global batch) in a stream of epochs, each a
    fresh permutation seeded by (seed, epoch). Position = step * batch_size, so resuming needs only
    the step. NOTE: the reference shuffles once and reuses that order every epoch."""
    out, pos = [], step * batch_size
    while len(out) < batch_size:
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        take = min(batch_size - len(out), n - i)
        out += perm[i:i + take].tolist()
        pos += take
    return out

