"""generate.py: the command line that continues a prompt, or answers it as a chat, with a Llama checkpoint and
optionally a trained adapter.

The model (llama.py), the tokenizer (tokenizer.py) and the adapters (adapter_files.load_adapter) are plain
PyTorch; this script loads them and, unless --no-accelerate, converts the loaded model with
kernels.accelerate (the CPU fast paths, same tokens: see kernels.py), as train.py does.

    python generate.py --prompt "The capital of France is"             # the default model, greedy
    python generate.py --model PATH --prompt "What is photosynthesis?" --chat --max-new-tokens 60
    python generate.py --model PATH --adapter runs/demo/last --prompt "..." --temperature 0.7 --top-p 0.9

(`python llama.py ...` runs this same command.) Checked in test_all.py: the printed words equal the Python
API's llama.generate with the adapter loaded (test_cli_adapter_generates_as_the_api), and a bad --model is
one 'error:' line (test_cli_errors_have_no_traceback).
"""
import argparse
import sys

import torch

import checkpoints
import guards
import kernels
import llama
import tokenizer


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
    ap.add_argument("--dtype", default="float32", choices=list(llama.DTYPES), help="weights and compute dtype")
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
        dtype = llama.DTYPES[args.dtype]
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
        out = llama.generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, eos_id=tok.eos_id)
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e}")
    reply = tok.decode(out[0].tolist())
    if args.chat and args.show_template:
        print(text, end="")
    print(reply if args.chat else text + reply)


if __name__ == "__main__":
    main()
