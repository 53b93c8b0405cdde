"""Tests of data.py and train.py on a tiny random Llama with a tiny word-level tokenizer (fast, CPU)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers

import data
import llama
import train

HERE = os.path.dirname(os.path.abspath(__file__))
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }} : {{ m['content'] }} </s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant :{% endif %}")
CORPUS = ("### Instruction Input Output : \n Answer Which word is a an animal fruit color tool body part country "
          "or , ? true false A B C D E Please choose the correct answer to question ( ) great movie bad film "
          "the cat sat on mat dog runs fast user assistant hello hi there what name my is bob good awful "
          "x y z one two three four five six seven eight nine ten")


def word_list():
    words = CORPUS.split()
    for ws in data.CATEGORIES.values():
        words += ws
    return list(dict.fromkeys(words))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run far faster on one thread, and the CPU is shared with other processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random Llama checkpoint folder with a word-level tokenizer and a chat template."""
    path = str(tmp_path_factory.mktemp("tiny") / "ckpt")
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + word_list())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    torch.manual_seed(0)
    cfg = llama.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    llama.save_pretrained(llama.LlamaForCausalLM(cfg), path)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True,
                   "chat_template": CHAT_TEMPLATE}, f)
    return path


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft_rows(n=24):
    words = word_list()[20:]
    return [{"instruction": f"what is {words[i % len(words)]}", "input": "x" if i % 2 else "",
             "output": " ".join(words[(i + j) % len(words)] for j in range(1 + i % 5))} for i in range(n)]


def run(ckpt, out, *extra):
    """train.main with small, deterministic defaults."""
    return train.main(["--model", ckpt, "--out", str(out), "--r", "4", "--num-experts", "4", "--lr", "1e-3",
                       "--no-eval-before", "--log-every", "100", *extra])


def adapter_tensors(folder):
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


# ----------------------------------------------------------------------------------------------------
# data.py: formats, masking, truncation, tasks, metrics


def test_data_formats(ckpt, tmp_path):
    """Alpaca (JSON list and JSONL), chat, text and classification records become the right examples."""
    tok = llama.load_tokenizer(ckpt)
    rows = sft_rows(3)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    jl = write_jsonl(tmp_path / "a.jsonl", rows)
    for path in (str(tmp_path / "a.json"), jl):
        ex = data.load_data(path, tok)
        assert [e.kind for e in ex] == ["lm"] * 3 and ex[1].prompt == data.alpaca_prompt(rows[1]["instruction"], "x")
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hello"},
                                                            {"role": "assistant", "content": "hi there"}]}])
    e = data.load_data(chat, tok)[0]
    assert e.prompt == "<s>user : hello </s><s>assistant :" and e.answer == "<s>assistant : hi there </s>"[len("<s>assistant :"):]
    enc = data.encode(tok, e, 64)
    assert enc["ids"][0] == tok.bos_id and enc["labels"][-1] == tok.eos_id  # template's BOS only, answer ends in </s>
    text = data.load_data(write_jsonl(tmp_path / "t.jsonl", [{"text": "the cat sat"}]), tok)[0]
    assert data.encode(tok, text, 64)["labels"] == data.encode(tok, text, 64)["ids"]
    cls = data.load_data(write_jsonl(tmp_path / "s.jsonl", [{"sentence": "great movie", "label": 1},
                                                            {"sentence": "bad film", "label": [0, 2]}]), tok)
    assert [c.kind for c in cls] == ["cls", "cls"] and cls[1].label == [0, 2]
    pair = data.load_data(write_jsonl(tmp_path / "p.jsonl", [{"sentence1": "the cat", "sentence2": "the dog", "label": 0}]), tok)[0]
    assert data.encode(tok, pair, 64)["ids"] == tok.encode("the cat") + tok.encode("the dog")  # BOS s1 BOS s2


def test_prompt_masking_and_collate(ckpt):
    """Only answer tokens are targets by default; --train-on-prompt adds the prompt; padding never is one."""
    tok = llama.load_tokenizer(ckpt)
    ex = data.Example(data.alpaca_prompt("what is cat"), "dog runs", eos=True)
    enc = data.encode(tok, ex, 64)
    n_prompt = len(tok.encode(ex.prompt))
    assert enc["labels"][:n_prompt] == [data.IGNORE] * n_prompt
    assert enc["labels"][n_prompt:] == tok.encode("dog runs", add_bos=False) + [tok.eos_id]
    full = data.encode(tok, ex, 64, train_on_prompt=True)
    assert full["labels"] == full["ids"]
    short = data.encode(tok, data.Example("the cat", "dog"), 64)
    b = data.collate([enc, short], tok.pad_id)
    ids, t = b["input_ids"], b["targets"]
    assert ids.shape == (2, len(enc["ids"])) and int(b["last"][1]) == len(short["ids"]) - 1
    m = t != data.IGNORE
    assert torch.equal(t[:, :-1][m[:, :-1]], ids[:, 1:][m[:, :-1]])  # position t predicts token t+1
    assert int(m[1].sum()) == 1 and not m[1, len(short["ids"]) - 1:].any()  # no target on or after padding


def test_truncation_keeps_prompt_end_and_answer():
    """Over-long examples keep the answer's start and the prompt's end, and are flagged."""
    p, a, cut = data.truncate(list(range(100)), [7, 8], 10)
    assert cut and a == [7, 8] and p == list(range(92, 100))
    p, a, cut = data.truncate([1, 2], list(range(50)), 10)
    assert cut and p == [1, 2] and a == list(range(8))
    assert data.truncate([1], [2], 10) == ([1], [2], False)


def test_task_prompts_are_the_reference():
    """Task prompts follow the reference templates and the gold answer is one of the options."""
    ex = data.load_task("arc-e", "train")[0]
    assert ex.prompt == ("Please choose the correct answer to the question: Which technology was developed most "
                         "recently? (A) cellular telephone (B) television (C) refrigerator (D) airplane\nAnswer:")
    assert ex.answer == " A" and ex.options == ("A", "B", "C", "D")
    b = data.load_task("boolq", "train")[0]
    assert b.prompt.startswith("Please answer the following question with true or false: ") and b.answer == " false"
    for name in data.TASKS:
        e = data.load_task(name, "test")[0]
        assert e.answer == " " + e.options[e.label] and e.prompt.endswith(":")


class LastTokenStub(torch.nn.Module):
    """A 'model' whose logits at every position are a fixed vector (to test the scoring rule alone)."""

    def __init__(self, scores):
        super().__init__()
        self.scores = scores

    def forward(self, input_ids, attention_mask=None, logits_mask=None):
        M = int(logits_mask.sum())
        return llama.LlamaOutput(self.scores.expand(M, -1), [], torch.zeros(*input_ids.shape, 4))


def test_scoring_restricted_to_own_options(ckpt):
    """The prediction is the highest-logit label token AMONG the question's options, not over all labels."""
    tok = llama.load_tokenizer(ckpt)
    scores = torch.zeros(tok.vocab_size)
    scores[tok.encode("E", add_bos=False)[0]] = 9.0    # best overall, but not an option
    scores[tok.encode("C", add_bos=False)[0]] = 5.0
    scores[tok.encode("B", add_bos=False)[0]] = 3.0
    q = [data.Example("which is x ?\nAnswer:", " B", "choice", ("A", "B"), 1, task="t"),
         data.Example("which is y ?\nAnswer:", " C", "choice", ("A", "B", "C", "D"), 2, task="t")]
    args = train.parser.parse_args(["--max-len", "64"])
    r = train.evaluate(LastTokenStub(scores), tok, {"t": q}, args, "cpu", train.nullcontext())["t"]
    assert r["accuracy"] == 1.0 and r["chance"] == pytest.approx((1 / 2 + 1 / 4) / 2)


def test_demo_task_disjoint():
    """The built-in task's train and test questions are disjoint and every answer is an option."""
    tr, te = data.demo_task()
    assert len(tr) == 256 and len(te) == 128 and not {e.prompt for e in tr} & {e.prompt for e in te}
    assert all(e.options[e.label] == e.answer.strip() for e in tr + te)


def test_metrics():
    """Accuracy baselines, binary F1 and Matthews correlation match hand computations."""
    gold, pred = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert data.f1_score(pred, gold) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert data.matthews(gold, gold) == pytest.approx(1.0) and data.matthews([1 - g for g in gold], gold) == pytest.approx(-1.0)
    assert data.matthews(pred, gold) == pytest.approx((2 * 1 - 1 * 1) / (3 * 2 * 2 * 3) ** 0.5)
    assert data.baselines([0, 0, 1], [2, 2, 4]) == (pytest.approx((0.5 + 0.5 + 0.25) / 3), pytest.approx(2 / 3))
    assert data.multilabel_metrics([{0}, {1, 2}], [{0}, {1}]) == {"accuracy": 0.5, "f1": pytest.approx(0.8)}


# ----------------------------------------------------------------------------------------------------
# train.py: heads, equivalences, resume, DDP


def test_classification_heads(ckpt, tmp_path):
    """Single- and multi-label heads train, are saved with the adapter and evaluate the same after reload."""
    words = ["great movie", "bad film", "good cat", "awful dog", "great dog", "bad cat"]
    single = write_jsonl(tmp_path / "s.jsonl", [{"sentence": w, "label": i % 2} for i, w in enumerate(words * 3)])
    out = tmp_path / "s"
    h = run(ckpt, out, "--data", single, "--eval-data", single, "--adapter", "lora", "--steps", "3", "--batch-size", "6")
    assert set(h["eval"][-1][os.path.basename(single)]) >= {"accuracy", "f1", "mcc", "chance", "majority"}
    assert adapter_tensors(out / "last")["base_model.model.score.weight"].shape == (2, 32)
    again = train.main(["--model", ckpt, "--data", single, "--eval-data", single, "--eval-only",
                        "--adapter-path", str(out / "last")])["eval"]
    assert again == h["eval"][-1]
    multi = write_jsonl(tmp_path / "m.jsonl", [{"sentence": w, "label": [i % 3, 3]} for i, w in enumerate(words * 2)])
    h = run(ckpt, tmp_path / "m", "--data", multi, "--eval-data", multi, "--steps", "2", "--batch-size", "4")
    assert set(h["eval"][-1][os.path.basename(multi)]) == {"accuracy", "f1", "n"}
    assert load_file(str(tmp_path / "m" / "last" / "adapter_model.safetensors"))["classifier"].shape == (4, 32)


def record_grads(monkeypatch):
    """Patch AdamW.step to keep a copy of the gradients it is given."""
    grads, step = [], torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        grads.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        return step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    return grads


def test_accumulation_equivalence(ckpt, tmp_path, monkeypatch):
    """One batch of 8 and 4 micro-batches of 2 give the same losses and the same gradients."""
    d = write_jsonl(tmp_path / "d.jsonl", sft_rows())
    common = ["--data", d, "--steps", "2", "--batch-size", "8", "--lora-dropout", "0", "--router-aux-loss-coef", "0"]
    grads = record_grads(monkeypatch)
    h1 = run(ckpt, tmp_path / "a", *common, "--micro-batch-size", "8")
    h2 = run(ckpt, tmp_path / "b", *common, "--micro-batch-size", "2")
    torch.testing.assert_close(torch.tensor(h1["loss"]), torch.tensor(h2["loss"]), rtol=1e-5, atol=1e-5)
    assert len(grads) == 4
    g1, g2 = grads[:2], grads[2:]
    for s1, s2 in zip(g1, g2):
        for a, b in zip(s1, s2):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_resume_equivalence(ckpt, tmp_path, monkeypatch):
    """Interrupting (Ctrl-C) after 2 of 5 steps and resuming gives the uninterrupted run's losses."""
    d = write_jsonl(tmp_path / "d.jsonl", sft_rows())
    common = ["--data", d, "--steps", "5", "--batch-size", "4", "--micro-batch-size", "2", "--schedule", "cosine",
              "--warmup-ratio", "0.4", "--lora-dropout", "0.1", "--lora-plus-ratio", "4", "--log-every", "1"]
    full = run(ckpt, tmp_path / "full", *common)["loss"]
    real = data.step_indices

    def interrupt_at_2(n, step, *a):
        if step == 2:
            raise KeyboardInterrupt
        return real(n, step, *a)
    monkeypatch.setattr(data, "step_indices", interrupt_at_2)
    with pytest.raises(SystemExit):
        run(ckpt, tmp_path / "part", *common)
    monkeypatch.setattr(data, "step_indices", real)
    rest = run(ckpt, tmp_path / "part", *common, "--resume")["loss"]
    torch.testing.assert_close(torch.tensor(rest), torch.tensor(full[2:]))
    lines = [json.loads(l) for l in open(tmp_path / "part" / "log.jsonl")]
    assert [l["step"] for l in lines if "loss" in l] == [1, 2, 3, 4, 5] and "load" in lines[0]


def _ddp_worker(rank, world, port, argv, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    h = train.main(argv)
    if rank == 0:
        json.dump(h["loss"], open(out, "w"))
    torch.distributed.destroy_process_group()


def test_ddp_equivalence(ckpt, tmp_path):
    """2 processes (gloo) give the same losses as 1 process with the same global batch."""
    d = write_jsonl(tmp_path / "d.jsonl", sft_rows())
    argv = ["--model", ckpt, "--data", d, "--steps", "3", "--batch-size", "8", "--micro-batch-size", "2",
            "--lora-dropout", "0", "--router-aux-loss-coef", "0", "--r", "4", "--num-experts", "4",
            "--lr", "1e-3", "--no-eval-before", "--log-every", "100"]
    one = train.main(argv + ["--out", str(tmp_path / "one")])["loss"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = str(tmp_path / "two.json")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, argv + ["--out", str(tmp_path / "two")], res), nprocs=2)
    torch.testing.assert_close(torch.tensor(json.load(open(res))), torch.tensor(one))


# ----------------------------------------------------------------------------------------------------
# Errors: one line, naming the file / line / flag


def test_errors_in_process(ckpt, tmp_path):
    """Bad --model, malformed or empty lines, empty files and unknown tasks raise one-line errors."""
    with pytest.raises(FileNotFoundError, match="smollm2_checkpoint.py"):
        train.main(["--model", str(tmp_path / "nope")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        run(ckpt, tmp_path / "o", "--data", str(bad))
    bad.write_text('{"text": "the cat"}\n\n{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: empty line"):
        run(ckpt, tmp_path / "o", "--data", str(bad))
    bad.write_text('{"instruction": "x", "output": ""}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'output'"):
        run(ckpt, tmp_path / "o", "--data", str(bad))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: empty file"):
        run(ckpt, tmp_path / "o", "--data", str(tmp_path / "empty.jsonl"))
    with pytest.raises(ValueError, match="unknown task 'arc-x'"):
        run(ckpt, tmp_path / "o", "--task", "arc-x")
    with pytest.raises(FileNotFoundError, match="--resume"):
        run(ckpt, tmp_path / "fresh", "--resume")


def test_cli_errors_are_one_line(ckpt, tmp_path):
    """From the command line, a missing checkpoint or a malformed file gives one line and exit status 1."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    for argv in (["--model", str(tmp_path / "nope")], ["--data", str(bad), "--model", ckpt]):
        p = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *argv], capture_output=True, text=True)
        assert p.returncode == 1 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
        assert p.stderr.startswith("error: ")
