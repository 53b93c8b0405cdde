"""tokenizer.py: a checkpoint folder's tokenizer and chat template, without `transformers`.

tokenizer.json is read by the `tokenizers` library (the same Rust code transformers uses); the special
tokens come from tokenizer_config.json, special_tokens_map.json and generation_config.json (later files
win), and the chat template is rendered with jinja2 as transformers renders it (trim_blocks, lstrip_blocks,
a sandboxed environment). Whether BOS is prepended by default is read off the tokenizer itself (Llama 2/3:
yes; SmolLM2: no).

    tok = tokenizer.load_tokenizer(path)        # a checkpoint folder (or a .gguf file: converted once)
    ids = tok.encode("The capital of France is")                    # add_bos=None: as the tokenizer does
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])   # ends with the assistant's turn

Checked against: the token ids transformers gave for the golden file's prompts on SmolLM2-135M-Instruct,
chat template included (test_golden_parity); special tokens, BOS and a template on a tiny tokenizer
(test_tokenizer_special_tokens_and_chat); one-line errors for broken files (test_bad_tokenizer_errors).
"""
import json
import os

import checkpoints  # a .gguf path: its converted folder
import llama        # read_json_object, and config.json's vocab_size for the id check


class Tokenizer:
    """tokenizer.json (the `tokenizers` library) with the BOS/EOS/PAD ids and the chat template that the
    checkpoint's tokenizer_config.json, special_tokens_map.json and generation_config.json give."""

    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer
        fn = os.path.join(path, "tokenizer.json")
        if not os.path.exists(fn):
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        try:
            self.tok = HFTokenizer.from_file(fn)
        except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
            raise ValueError(f"{fn}: not a valid tokenizer file ({str(e).splitlines()[0][:120]})") from None
        conf = {}
        for name in ("special_tokens_map.json", "generation_config.json", "tokenizer_config.json"):
            if os.path.exists(os.path.join(path, name)):  # later files win
                conf.update({k: v for k, v in llama.read_json_object(os.path.join(path, name)).items() if v is not None})
        self.conf = conf
        self.bos_id = self._token_id(conf.get("bos_token"), conf.get("bos_token_id"))
        self.eos_id = self._token_id(conf.get("eos_token"), conf.get("eos_token_id"))
        self.pad_id = self._token_id(conf.get("pad_token"), conf.get("pad_token_id"))
        if self.pad_id is None:
            self.pad_id = self.eos_id if self.eos_id is not None else 0
        self.bos_token = self.tok.id_to_token(self.bos_id) if self.bos_id is not None else ""
        self.eos_token = self.tok.id_to_token(self.eos_id) if self.eos_id is not None else ""
        # Does this tokenizer put BOS in front by default? (Llama 2/3: yes; SmolLM2: no)
        probe = self.tok.encode("a", add_special_tokens=True).ids
        self.add_bos_default = conf.get("add_bos_token", bool(probe) and probe[0] == self.bos_id)
        template = conf.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template = template

    def _token_id(self, token, token_id):
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and self.tok.token_to_id(token) is not None:
            return self.tok.token_to_id(token)
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        return token_id

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size()

    def encode(self, text, add_bos=None):
        ids = self.tok.encode(text, add_special_tokens=False).ids
        add = self.add_bos_default if add_bos is None else add_bos
        return ([self.bos_id] if add and self.bos_id is not None else []) + ids

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        """Render the checkpoint's Jinja chat template as transformers does (trim/lstrip blocks)."""
        if not self.chat_template:
            raise ValueError("tokenizer_config.json has no chat_template (this checkpoint is not a chat model)")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise ValueError(f"chat template: {msg}")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token)


def load_tokenizer(path):
    """The folder's tokenizer. With a config.json beside it, every token id (and BOS/EOS/PAD) must have a
    row in the model's embedding: a larger id would fail at the first batch that holds it."""
    path = checkpoints.gguf_folder(path)
    tok = Tokenizer(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        vocab = llama.LlamaConfig.from_json(os.path.join(path, "config.json")).vocab_size
        top = max(tok.tok.get_vocab(with_added_tokens=True).values(), default=0)
        if top >= vocab:
            raise ValueError(f"{path}: tokenizer.json has token ids up to {top}, but config.json vocab_size={vocab}")
        for what, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)):
            if not (isinstance(i, int) and 0 <= i < vocab) and i is not None:
                raise ValueError(f"{path}: {what} token id {i!r} is not in [0, vocab_size={vocab})")
    return tok
