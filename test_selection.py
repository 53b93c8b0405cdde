"""Tests of selection.py (Select-MoE scoring and selection): plain pytest, tiny random models, fixed seeds.

Run: python -m pytest -q test_selection.py
"""
import argparse
import json
import math
import os

import pytest
import torch

import data
import llama
import selection
from lora import LoraConfig
from moe_lora import MixLoRAConfig, inject_adapter, load_adapter, save_adapter

WORDS = "the a cat dog sat on mat is red blue big small yes no one two three".split()


def tiny_model(gate=True, seed=0, **cfg):
    """A 2-layer random Llama with a MixLoRA adapter (4 experts) and, by default, quality gates."""
    torch.manual_seed(seed)
    model = llama.LlamaForCausalLM(llama.LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    inject_adapter(model, MixLoRAConfig(r=4, num_experts=4, lora_dropout=0.0, quality_gate=gate,
                                        quality_gate_init_std=0.5, **cfg))
    return model


def tiny_tokenizer(path):
    """A word-level tokenizer folder over WORDS (unknown words -> <unk>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True}, f)
    return llama.load_tokenizer(str(path))


def alpaca_file(path, n=12):
    """n alpaca records with ids and alternating quality labels, as a JSON list."""
    g = torch.Generator().manual_seed(1)
    recs = [{"instruction": " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (1 + k % 5,), generator=g)),
             "input": "", "output": " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (2 + k % 3,), generator=g)),
             "id": f"s{k}", "quality": k % 2} for k in range(n)]
    with open(path, "w") as f:
        json.dump(recs, f)
    return recs


def selection_args(**kw):
    p = argparse.ArgumentParser()
    selection.add_selection_args(p)
    args = p.parse_args([])
    args.data, args.max_len, args.eval_batch_size, args.out = None, 64, 4, "out"
    for k, v in kw.items():
        setattr(args, k, v)
    return args


# ----------------------------------------------------------------------------------------------------
# Pure functions


def test_roc_auc_hand_case():
    """AUC is the share of (positive, negative) pairs ranked right, a tie counting 1/2."""
    assert selection.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(3 / 4)
    assert selection.roc_auc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(3.5 / 4)
    assert selection.roc_auc([3, 2, 1], [1, 1, 0]) == 1.0 and selection.roc_auc([1, 2, 3], [1, 1, 0]) == 0.0
    assert selection.roc_auc([0.7] * 4, [1, 0, 1, 0]) == 0.5


def test_selection_count_rounding():
    """The count is floor(N * fraction), robust to float error, and at least 1."""
    assert selection.selection_count(100, 0.29) == 29
    assert selection.selection_count(10, 0.3) == 3
    assert selection.selection_count(10, 0.35) == 3
    assert selection.selection_count(3, 0.1) == 1
    assert selection.selection_count(7, 1.0) == 7


def test_round_robin_order():
    """Round-robin takes the best of each cluster in ascending cluster id, round after round."""
    q = torch.tensor([0.9, 0.1, 0.5, 0.8, 0.7, 0.3, 0.6])
    clusters = torch.tensor([2, 0, 0, 2, 1, 0, 2])
    # cluster 0: 2 (0.5), 5 (0.3), 1 (0.1); cluster 1: 4; cluster 2: 0 (0.9), 3 (0.8), 6 (0.6)
    assert selection.round_robin(q, clusters, 7) == [2, 4, 0, 5, 3, 1, 6]
    assert selection.round_robin(q, clusters, 4) == [2, 4, 0, 5]
    assert selection.round_robin(q, clusters, 99) == [2, 4, 0, 5, 3, 1, 6]


def test_kmeans_recovers_separable_clusters():
    """Cosine k-means recovers three well-separated directions and is deterministic for a seed."""
    g = torch.Generator().manual_seed(0)
    proto = torch.eye(6)[[0, 2, 4]] + 0.05                            # (3, F) three routing patterns
    truth = torch.arange(60) % 3
    x = proto[truth] * (0.5 + torch.rand(60, 1, generator=g)) + 0.05 * torch.rand(60, 6, generator=g)
    assign, centres = selection.cosine_kmeans(x, k=3, seed=42)
    assert centres.shape == (3, 6)
    for c in range(3):                                                 # each true group is one cluster
        assert len(set(assign[truth == c].tolist())) == 1
    assert len(set(assign.tolist())) == 3
    torch.testing.assert_close(selection.cosine_kmeans(x, k=3, seed=42)[0], assign)
    assert selection.cosine_kmeans(x[:2], k=26)[1].shape[0] == 2        # k cut to N


# ----------------------------------------------------------------------------------------------------
# Scoring


def test_score_equals_hand_recomputation_from_gate_logits():
    """q = mean_l sigmoid(mean over mask-valid tokens of the gate logit); routing = mean softmax; padding ignored."""
    model = tiny_model().eval()
    ids = torch.randint(4, 40, (3, 7), generator=torch.Generator().manual_seed(0))
    am = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    res = selection.score_dataset(model, [{"input_ids": ids, "attention_mask": am}], progress=False)
    for b in range(3):
        n = int(am[b].sum())
        with torch.no_grad():
            aux = model(ids[b:b + 1, :n]).aux                          # the sample alone, no padding
        s = torch.stack([a["gate_logits"][0] for a in aux])            # (L, n)
        torch.testing.assert_close(res["q"][b], torch.sigmoid(s.mean(1)).mean(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["gate_logit_mean"][b], s.mean(1), rtol=1e-5, atol=1e-6)
        p = torch.stack([a["router_logits"].softmax(-1).mean(0) for a in aux])  # (L, E)
        torch.testing.assert_close(res["routing"][b], p, rtol=1e-5, atol=1e-6)
    assert res["routing"].shape == (3, 2, 4) and res["n_tokens"].tolist() == [7, 4, 2]


def test_scores_file_round_trip(tmp_path):
    """Scores written as JSONL or safetensors read back with the same ids, q, routing and labels."""
    s = {"q": torch.rand(5), "gate_logit_mean": torch.randn(5, 2), "routing": torch.rand(5, 2, 4),
         "n_tokens": torch.tensor([3.0, 4, 5, 6, 7])}
    ids, labels = [f"x{i}" for i in range(5)], [1, 0, None, 1, 0]
    for name in ("s.jsonl", "s.safetensors"):
        path = selection.write_scores(str(tmp_path / name), s, ids, labels)
        back = selection.read_scores(path)
        assert back["ids"] == ids
        torch.testing.assert_close(back["q"], s["q"])
        torch.testing.assert_close(back["routing"], s["routing"])
        assert back["label"][:2].tolist() == [1, 0] and math.isnan(back["label"][2])
    row = json.loads(open(tmp_path / "s.jsonl").readline())
    assert set(row) == {"index", "id", "q", "label", "n_tokens", "gate_logit_mean", "routing"}


def test_score_then_select_writes_exact_records(tmp_path):
    """--score writes one line per record with the expected fields; --select writes the exact records."""
    tok, model = tiny_tokenizer(tmp_path), tiny_model()
    recs = alpaca_file(tmp_path / "d.json", 12)
    scores = str(tmp_path / "scores.jsonl")
    args = selection_args(data=str(tmp_path / "d.json"), score=scores, select=0.5,
                          subset=str(tmp_path / "sub.jsonl"), num_clusters=3)
    out = selection.run_selection(args, model, tok, log=lambda *a: None)
    rows = [json.loads(line) for line in open(scores)]
    assert [r["id"] for r in rows] == [r["id"] for r in recs] and [r["label"] for r in rows] == [r["quality"] for r in recs]
    assert len(rows[0]["routing"]) == 2 and len(rows[0]["routing"][0]) == 4 and 0 < rows[0]["q"] < 1
    sub = [r for _, r in data.read_records(str(tmp_path / "sub.jsonl"))]
    assert len(sub) == 6 and all(r in recs for r in sub)               # unchanged records, input format
    assert [r["id"] for r in sub] == [recs[i]["id"] for i in sorted(out["selected"])]
    assert 0 <= out["auc"] <= 1
    summary = json.load(open(str(tmp_path / "sub.jsonl") + ".summary.json"))
    assert summary["selected"] == 6 and sum(summary["cluster_taken"]) == 6
    # select-only again from the file, as a JSON list this time: same choice
    args2 = selection_args(data=str(tmp_path / "d.json"), score=scores, select=0.5,
                           subset=str(tmp_path / "sub.json"), num_clusters=3)
    selection.run_selection(args2, log=lambda *a: None)
    assert json.load(open(tmp_path / "sub.json")) == sub


def test_warmup_gates_train_alone_and_survive_save_load(tmp_path):
    """Gates added to a gate-less MixLoRA adapter: only gates and routers train, and they save/load."""
    model = tiny_model(gate=False)
    selection.add_quality_gates(model, trash_mode="noise")
    n = selection.freeze_for_warmup(model)
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    assert names and all("quality_gate" in k or "moe_gate" in k for k in names)
    assert n == 2 * (32 + 4 * 32)                                      # 2 layers x (gate D + router E*D)
    save_adapter(model, str(tmp_path / "a"))
    torch.manual_seed(0)
    fresh = llama.LlamaForCausalLM(model.config)
    load_adapter(fresh, str(tmp_path / "a"))
    for a, b in zip(selection.ffn_layers(model), selection.ffn_layers(fresh)):
        torch.testing.assert_close(a.quality_gate.weight, b.quality_gate.weight)
        assert b.trash_mode == "noise"


def test_make_corrupted_mix_shuffles_outputs():
    """Corrupted records carry another record's output and label 0; clean ones are unchanged with label 1."""
    recs = [{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(20)]
    mix, rest = selection.make_corrupted_mix(recs, 10, 0.5, seed=3)
    assert len(mix) == 10 and sum(r["quality"] == 0 for r in mix) == 5 and len(rest) == 10
    assert {r["instruction"] for r in mix}.isdisjoint(r["instruction"] for r in rest)
    for r in mix:
        assert (r["output"] == "o" + r["instruction"][1:]) == (r["quality"] == 1)


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_errors_are_one_line_value_errors(tmp_path):
    """Bad fraction, empty data, no gates, no MoE layers, mismatched scores: one-line ValueErrors."""
    for f in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
            selection.run_selection(selection_args(select=f, score="s.jsonl"))
    with pytest.raises(ValueError, match="empty dataset"):
        selection.score_dataset(tiny_model(), [], progress=False)
    with pytest.raises(ValueError, match="empty dataset"):
        selection.selection_count(0, 0.5)
    with pytest.raises(ValueError, match="no quality gates"):
        selection.score_dataset(tiny_model(gate=False), [], progress=False)
    plain = llama.LlamaForCausalLM(tiny_model().config)
    inject_adapter(plain, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="needs MoE layers"):
        selection.add_quality_gates(plain)
    with pytest.raises(ValueError, match="no quality gates"):
        selection.score_dataset(plain, [], progress=False)
    with pytest.raises(ValueError, match="needs MoE layers"):
        MixLoRAConfig(quality_gate=True, target_modules=["q_proj"])
    with open(tmp_path / "empty.json", "w") as f:
        f.write("[]")
    with pytest.raises(ValueError, match="no records"):
        selection.run_selection(selection_args(data=str(tmp_path / "empty.json"), score="s.jsonl", select=0.5))
    alpaca_file(tmp_path / "d.json", 4)
    s = {"q": torch.rand(3), "gate_logit_mean": torch.randn(3, 2), "routing": torch.rand(3, 2, 4), "n_tokens": torch.ones(3)}
    selection.write_scores(str(tmp_path / "s.jsonl"), s, ["a", "b", "c"])
    with pytest.raises(ValueError, match="has 3 samples but"):
        selection.run_selection(selection_args(data=str(tmp_path / "d.json"), score=str(tmp_path / "s.jsonl"), select=0.5))
    with pytest.raises(ValueError, match="labels must be 0/1"):
        selection.roc_auc([0.1, 0.2], [1, 1])


def test_train_warmup_score_select_commands(tmp_path):
    """train.py --warmup trains only gates and routers; --score then --select write scores and the subset."""
    train = pytest.importorskip("train")
    if not hasattr(train, "selection"):
        pytest.skip("train.py has no Select-MoE flags yet")
    model = llama.LlamaForCausalLM(tiny_model().config)
    llama.save_pretrained(model, str(tmp_path / "ckpt"))
    tiny_tokenizer(tmp_path / "ckpt")
    recs = alpaca_file(tmp_path / "d.json", 16)
    ck, d = str(tmp_path / "ckpt"), str(tmp_path / "d.json")
    common = ["--model", ck, "--data", d, "--r", "4", "--num-experts", "4", "--max-len", "32", "--batch-size", "4",
              "--no-eval-before", "--dtype", "float32"]
    train.main(common + ["--out", str(tmp_path / "base"), "--steps", "1"])
    base = load_file_tensors(tmp_path / "base" / "last")
    train.main(common + ["--out", str(tmp_path / "warm"), "--steps", "2", "--lr", "1e-2", "--warmup",
                         "--adapter-path", str(tmp_path / "base" / "last"), "--quality-loss", "bce"])
    warm = load_file_tensors(tmp_path / "warm" / "last")
    moved = {k for k in base if not torch.equal(base[k], warm[k])}
    assert moved and all("moe_gate" in k for k in moved)               # experts and attention LoRA frozen
    assert any("quality_gate" in k for k in warm) and not any("quality_gate" in k for k in base)
    scores, sub = str(tmp_path / "s.jsonl"), str(tmp_path / "sub.jsonl")
    train.main(common + ["--adapter-path", str(tmp_path / "warm" / "last"), "--score", scores])
    assert len(open(scores).readlines()) == 16
    train.main(["--data", d, "--score", scores, "--select", "0.25", "--subset", sub, "--num-clusters", "2"])
    assert all(r in recs for _, r in data.read_records(sub)) and len(data.read_records(sub)) == 4


def load_file_tensors(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "adapter_model.safetensors"))
