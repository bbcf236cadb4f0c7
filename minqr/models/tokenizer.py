"""Tokenizers through the `tokenizers` library (Rust; batches run in parallel): GPT-2's byte-level BPE
and any `tokenizer.json` (Llama 3, Qwen2, Mistral: byte-level BPE or SentencePiece-like models).

`load_tokenizer(folder)` reads the first of:
- `tokenizer.json`, the `tokenizers` format (what Hugging Face saves, and what `save` writes);
- `vocab.json` + `merges.txt`, Hugging Face's names for GPT-2's two BPE files;
- `encoder.json` + `vocab.bpe`, OpenAI's original names for the same two files.

The end-of-text token (EOS) is the `eos_token` of the folder's `tokenizer_config.json` (a string or
an AddedToken dict), else the first `eos_token_id` of its `config.json`, else `<|endoftext|>`,
GPT-2's, which its original files name nowhere. The pad token is `pad_token`, else EOS (GPT-2 has
none; minqr's pooling reads masks, so the pad id only fills the padding). A `chat_template` in
`tokenizer_config.json` (or in a `chat_template.jinja` file beside it, as newer transformers save
it) renders conversations (minqr/data/chat.py).

Encoding adds nothing: a text is tokenised as it is, no BOS in front and no EOS behind, so ids agree
with transformers' tokenizer called with `add_special_tokens=False` (where a special token written
inside a text, "<|endoftext|>" or Llama 3's "<|begin_of_text|>", also becomes its one id). A BOS is
thus in a text only when the text holds it: a chat template that starts with `{{ bos_token }}`
writes it, as transformers' `apply_chat_template` does; HH-style strings get none.
"""
import json
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, pre_tokenizers
from tokenizers.models import BPE

from minqr.atomic import atomic_file
from minqr.errors import MinqrError
from minqr.models.chat_template import ChatTemplate
from minqr.models.hf_folder import DAMAGED, read_json

EOS = "<|endoftext|>"  # GPT-2's end of text, and the pad token of its reward models
BPE_FILE_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# the special tokens transformers passes to a chat template by name, as tokenizer_config.json names them
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_config.json for GPT-2, which ships none: GPT-2 has no pad token, and reward models pad
# with EOS (and read the last real token)
GPT2_CONFIG = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
               **{f"{role}_token": EOS for role in ("bos", "eos", "unk", "pad")}}


class Tokenizer:
    """A thin wrapper that pins down minqr's conventions; `backend` is the `tokenizers.Tokenizer`.

    eos_token and pad_token (None: EOS) are token strings the backend must have; `config` is the
    tokenizer_config.json that `files` writes back (None: GPT-2's); `chat_template`, a
    minqr.models.chat_template.ChatTemplate or None."""

    def __init__(self, backend: tokenizers.Tokenizer, eos_token: str = EOS, pad_token: str | None = None,
                 config: dict | None = None, chat_template: ChatTemplate | None = None):
        # a tokenizer.json may carry truncation or padding settings: a text is encoded as it is
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.eos_token, self.pad_token = eos_token, pad_token or eos_token
        self.eos_id = self._id(self.eos_token, "end of text")
        self.pad_id = self._id(self.pad_token, "pad")
        self.config = GPT2_CONFIG if config is None else config
        self.chat_template = chat_template
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    def _id(self, token: str, role: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise MinqrError(f"the tokenizer has no {token} token, its {role} token: name one it has")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts, max_length: int | None = None) -> list[list[int]]:
        """Ids of each text; with `max_length`, cut from the left to that many tokens, as minqr reads
        a text: the end, where the reply and its reward are, survives."""
        if max_length is not None and max_length < 1:  # ids[-0:] would keep every token
            raise MinqrError(f"max_length must be at least 1 (tokens kept of each text), got {max_length}")
        # the fast batch path skips the offsets that encode_batch would compute and throw away
        encodings = self.backend.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids if max_length is None else e.ids[-max_length:] for e in encodings]

    def encode_batch_marked(self, texts, marks) -> tuple[list[list[int]], list[int]]:
        """Ids of each text, and for each the index of the token that holds character `marks[k]`
        (len(ids), past the last token, when the mark is at the end of the text)."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        starts = []
        for encoding, text, mark in zip(encodings, texts, marks):
            # the first character at or after the mark that a token holds
            token = next((t for t in map(encoding.char_to_token, range(mark, len(text))) if t is not None), None)
            starts.append(len(encoding.ids) if token is None else token)
        return [e.ids for e in encodings], starts

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def files(self) -> dict:
        """{file name: content} of a tokenizer folder that minqr and transformers' AutoTokenizer load:
        tokenizer.json, and tokenizer_config.json with the EOS and pad minqr used (and the chat template)."""
        config = {**self.config, "eos_token": self.eos_token, "pad_token": self.pad_token}
        # a list of named templates stays as it is (its "default" is the one minqr renders with): a
        # tool-use template beside it is the user's, for transformers' apply_chat_template
        if self.chat_template is not None and not isinstance(config.get("chat_template"), list):
            config["chat_template"] = self.chat_template.source
        return {"tokenizer.json": self.backend.to_str(), CONFIG_FILE: json.dumps(config, indent=2) + "\n"}

    def save(self, folder) -> Path:
        """Write `files()` into `folder` (created if needed; other files there are left alone)."""
        folder = Path(folder)
        for name, content in self.files().items():
            with atomic_file(folder / name) as tmp:
                tmp.write_text(content)
        return folder


def byte_level_bpe(bpe: BPE, train_texts=None, trainer=None) -> tokenizers.Tokenizer:
    """GPT-2's tokenizer around the BPE model `bpe`: byte-level pre-tokenizer and decoder, and EOS
    as its special token. With `train_texts`, `trainer` (a BpeTrainer) first learns the BPE from
    them, through the pre-tokenizer, as GPT-2's was learnt."""
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if train_texts is not None:
        backend.train_from_iterator(train_texts, trainer)
    # GPT-2's vocab.json already holds EOS (50256): this marks it special; a vocabulary without
    # it gets it as a new last id (hence after training, which would otherwise take that id)
    backend.add_special_tokens([AddedToken(EOS, special=True)])
    return backend


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer in folder `path`, with its EOS, pad and chat template (the module docstring)."""
    folder = Path(path)
    if not folder.is_dir():
        raise MinqrError(f"tokenizer folder {folder} does not exist")
    backend = _backend(folder)
    config = read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else None
    _honour_prefix_space(backend, config)
    tokens = {name: _token(config, name, folder) for name in TEMPLATE_TOKENS}
    eos = _eos_token(folder, backend, tokens["eos_token"])
    source = _chat_template(folder, config)
    template = None if source is None else ChatTemplate(source, {k: v for k, v in tokens.items() if v}, str(folder))
    try:
        return Tokenizer(backend, eos, tokens["pad_token"], config, template)
    except MinqrError as error:  # a named token the tokenizer lacks
        raise MinqrError(f"{folder}: {error}") from None


def _honour_prefix_space(backend: tokenizers.Tokenizer, config: dict | None) -> None:
    """tokenizer_config.json's `add_prefix_space`, on a byte-level pre-tokenizer (GPT-2's), as
    transformers' GPT2Tokenizer applies it in a GPT-2 model folder: true reads "Hello" as " Hello"."""
    wanted = config.get("add_prefix_space") if isinstance(config, dict) else None
    if not isinstance(wanted, bool) or backend.pre_tokenizer is None:
        return
    state = json.loads(backend.pre_tokenizer.__getstate__())  # the pre-tokenizer's alone, not the whole vocabulary's
    if state.get("type") == "ByteLevel" and state.get("add_prefix_space") != wanted:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=wanted,
                                                         use_regex=state.get("use_regex", True),
                                                         trim_offsets=state.get("trim_offsets", True))


def _backend(folder: Path) -> tokenizers.Tokenizer:
    if (folder / "tokenizer.json").is_file():
        return _read(tokenizers.Tokenizer.from_file, folder / "tokenizer.json")
    for vocab, merges in BPE_FILE_PAIRS:
        if (folder / vocab).is_file() and (folder / merges).is_file():
            return byte_level_bpe(_read(BPE.from_file, folder / vocab, folder / merges))
    raise MinqrError(
        f"no tokenizer in {folder}: expected tokenizer.json, or vocab.json + merges.txt, "
        "or encoder.json + vocab.bpe"
    )


def _token(config: dict | None, name: str, folder: Path) -> str | None:
    """The token string that tokenizer_config.json gives as `name` ("eos_token", ...): a string, or
    an AddedToken dict with its "content"; None when it names none."""
    value = None if config is None else config.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise MinqrError(f"{folder / CONFIG_FILE}: {name} must be a token string or an AddedToken "
                         f'{{"content": ...}}, not {value!r:.60}')
    return value


def _eos_token(folder: Path, backend: tokenizers.Tokenizer, named: str | None) -> str:
    """The end-of-text token: tokenizer_config.json's, else config.json's first eos_token_id, else GPT-2's."""
    if named is not None:
        return named
    model_config = folder / "config.json"
    eos_ids = read_json(model_config).get("eos_token_id") if model_config.is_file() else None
    eos_id = eos_ids[0] if isinstance(eos_ids, list) and eos_ids else eos_ids
    # a bool is an int to Python (true would be token 1), and an id out of range an OverflowError
    if (isinstance(eos_id, int) and not isinstance(eos_id, bool)
            and 0 <= eos_id < backend.get_vocab_size(with_added_tokens=True) and backend.id_to_token(eos_id) is not None):
        return backend.id_to_token(eos_id)
    if backend.token_to_id(EOS) is not None:
        return EOS
    raise MinqrError(f"no end-of-text token in {folder}: tokenizer_config.json names no eos_token, config.json no "
                     f"eos_token_id the tokenizer has, and the tokenizer has no {EOS} token (GPT-2's); write the "
                     f"token that ends a text as eos_token into {folder / CONFIG_FILE}")


def _chat_template(folder: Path, config: dict | None) -> str | None:
    """The Jinja source of the folder's chat template: chat_template.jinja (newer transformers'
    file), else tokenizer_config.json's chat_template, a string or a list of {"name", "template"}
    of which minqr, as transformers, takes "default"; None when there is none."""
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        try:
            return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise MinqrError(f"{folder / CHAT_TEMPLATE_FILE} is not UTF-8 text ({error.reason} at byte "
                             f"{error.start}): {DAMAGED}") from None
    template = None if config is None else config.get("chat_template")
    if isinstance(template, list):  # without a "default" it stays a list, and the error below says why
        template = next((entry.get("template") for entry in template
                         if isinstance(entry, dict) and entry.get("name") == "default"), template)
    if template is not None and not isinstance(template, str):
        raise MinqrError(f"{folder / CONFIG_FILE}: chat_template must be a Jinja string, or a list of "
                         '{"name", "template"} with one named "default"')
    return template


def _read(reader, *paths):
    """`reader(*paths)` of the tokenizers library, whose every failure is a bare Exception."""
    try:
        return reader(*map(str, paths))
    except Exception as error:
        raise MinqrError(f"{' + '.join(map(str, paths))} cannot be read as a tokenizer ({error}): {DAMAGED}") from None
