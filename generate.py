"""generate.py: KV-cached generation with the Llama of llama.py (greedy, or top-k / top-p sampling), and the
command line that continues a prompt, or answers it as a chat, with a checkpoint and optionally a trained adapter.

    new_ids = generate.generate(model, input_ids, max_new_tokens, temperature=0.7, top_p=0.9, eos_id=...)

The model (llama.py), the tokenizer (tokenizer.py) and the adapters (adapter_files.load_adapter) are plain
PyTorch; the command line loads them and, unless --no-accelerate, converts the loaded model with
kernels.accelerate (the CPU fast paths, same tokens: see kernels.py), as train.py does.

    python generate.py --prompt "The capital of France is"             # the default model, greedy
    python generate.py --model PATH --prompt "What is photosynthesis?" --chat --max-new-tokens 60
    python generate.py --model PATH --adapter runs/demo/last --prompt "..." --temperature 0.7 --top-p 0.9

(`python llama.py ...` runs this same command.) Checked in test_all.py (TestGenerate): cached decoding of
left-padded batches gives exactly the tokens of re-running the whole sequence (use_cache=False), EOS and
seeded sampling; the printed words equal the Python API's generate with the adapter loaded
(test_cli_adapter_generates_as_the_api), and a bad --model is one 'error:' line
(test_cli_errors_have_no_traceback). Shape legend: B batch, T prompt length, V vocab.
"""
import argparse
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import checkpoints
import guards
import kernels
import llama
import tokenizer


# ----------------------------------------------------------------------------------------------------
# Generation with a KV cache

def sample_next(logits, temperature=0.0, top_k=None, top_p=None):
    """logits (B,V) -> next ids (B,). Greedy at temperature 0; else top-k, then top-p (nucleus), then sample."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]   # (B,1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, idx = logits.sort(-1, descending=True)                     # (B,V)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p                           # keep the crossing token
        logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1)[:, 0]


@torch.no_grad()
def generate(model, input_ids, max_new_tokens, *, temperature=0.0, top_k=None, top_p=None, eos_id=None,
             attention_mask=None, use_cache=True):
    """Return only the new ids (B, n_new). Batched prompts are left-padded (attention_mask 0 on the left).
    Rows that hit eos_id keep emitting it; decoding stops once every row has. use_cache=False re-runs the
    full sequence every step (the slow reference that the cached path must match token for token)."""
    B, T = input_ids.shape
    if T + max_new_tokens > model.config.context_length:
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the model's context ({model.config.context_length})")
    am = attention_mask  # None: no padding, so the forward skips building masks and positions from it
    p = next(model.parameters())
    cache = llama.KVCache(model.config, B, T + max_new_tokens, p.dtype, p.device) if use_cache else None
    ids, new = input_ids, []
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    step_ids = input_ids
    # cuDNN's attention builds a new plan for every new key length (CPU time on every decoding step, see
    # the README's GPU figures), so decoding leaves it out; the other kernels need no plan.
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        for _ in range(max_new_tokens):
            x = step_ids if use_cache else ids
            last = torch.zeros(x.shape, dtype=torch.bool, device=x.device)             # (B,T)
            last[:, -1] = True  # LM head at the last position only (prompts are left-padded), not all T
            logits = model(x, attention_mask=am, logits_mask=last, cache=cache).logits  # (B,V)
            nxt = sample_next(logits, temperature, top_k, top_p)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            new.append(nxt)
            step_ids = nxt[:, None]                                                   # (B,1)
            ids = torch.cat([ids, step_ids], 1)
            am = torch.cat([am, torch.ones_like(step_ids)], 1) if am is not None else None
            if eos_id is not None and bool(done.all()):
                break
    return torch.stack(new, 1)                                                        # (B,n_new)


# ----------------------------------------------------------------------------------------------------
# The command line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_parser():
    ap = argparse.ArgumentParser(description="Generate text with a Llama-family checkpoint folder, with or "
                                 "without a trained adapter.", formatter_class=guards.HelpFormatter)
    ap.add_argument("--model", help="checkpoint folder, .gguf file or Hub id (default: SmolLM2-135M-Instruct, fetched "
                    "once, see checkpoints.py)")
    ap.add_argument("--adapter", metavar="DIR", help="adapter folder to apply: PEFT LoRA/DoRA, MixLoRA (ours or the "
                    "reference's), e.g. a train.py run's best/ or last/")
    ap.add_argument("--prompt", default="The capital of France is", help="text to continue (with --chat: the user message)")
    ap.add_argument("--chat", action="store_true", help="send the prompt as a user message through the checkpoint's "
                    "chat template and print only the reply")
    ap.add_argument("--show-template", action="store_true", help="with --chat: print the rendered template (system "
                    "prompt, role markers) before the reply")
    ap.add_argument("--max-new-tokens", type=int, default=40, help="number of tokens to generate")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights and compute dtype")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default, one per core)")
    ap.add_argument("--no-accelerate", action="store_true",
                    help="keep the plain modules: skip kernels.accelerate (the CPU fast paths; same tokens, slower)")
    ap.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    return ap


def main(argv=None):
    """Load, (accelerate,) encode, generate, print: the prompt and its continuation, or with --chat the reply."""
    args = make_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        torch.manual_seed(args.seed)
        args.model = checkpoints.resolve_model(args.model)
        dtype = DTYPES[args.dtype]
        model = llama.from_pretrained(args.model, dtype=dtype, device=args.device)
        if args.adapter:
            import adapter_files  # the model itself knows nothing of adapters
            adapter_files.load_adapter(model, args.adapter)
            model.to(device=args.device, dtype=dtype).eval()
        if not args.no_accelerate:
            print(kernels.accelerate(model), file=sys.stderr)  # stdout holds only the text
        tok = tokenizer.load_tokenizer(args.model)
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
        ids = torch.tensor([tok.encode(text, add_bos=None if not args.chat else False)], device=args.device)
        out = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, eos_id=tok.eos_id)
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e}")
    reply = tok.decode(out[0].tolist())
    if args.chat and args.show_template:
        print(text, end="")
    print(reply if args.chat else text + reply)


if __name__ == "__main__":
    main()
