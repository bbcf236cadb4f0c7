"""GPT-2's byte-level BPE through the `tokenizers` library (Rust; batches run in parallel).

`load_tokenizer(folder)` reads the first of:
- `tokenizer.json`, the `tokenizers` format (what Hugging Face saves, and what `save` writes);
- `vocab.json` + `merges.txt`, Hugging Face's names for GPT-2's two BPE files;
- `encoder.json` + `vocab.bpe`, OpenAI's original names for the same two files.

`<|endoftext|>` is GPT-2's one special token: end of text, and the pad token of reward models.
Encoding adds nothing: a text is tokenised as it is, so ids agree with transformers'
GPT2TokenizerFast (where "<|endoftext|>" written inside a text also becomes that one id).
"""
import json
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, pre_tokenizers
from tokenizers.models import BPE

from minqr.atomic import atomic_file
from minqr.errors import MinqrError
from minqr.models.hf_folder import DAMAGED

EOS = "<|endoftext|>"
BPE_FILE_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))


class Tokenizer:
    """A thin wrapper that pins down GPT-2 conventions; `backend` is the `tokenizers.Tokenizer`."""

    def __init__(self, backend: tokenizers.Tokenizer):
        # a tokenizer.json may carry truncation or padding settings: a text is encoded as it is
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.eos_id = backend.token_to_id(EOS)
        if self.eos_id is None:
            raise MinqrError(f"the tokenizer has no {EOS} token: it is not a GPT-2 tokenizer")
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts) -> list[list[int]]:
        # the fast batch path skips the offsets that encode_batch would compute and throw away
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

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
        """{file name: content} of a tokenizer folder that minqr and transformers' AutoTokenizer load."""
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "add_prefix_space": False,
            # GPT-2 has no pad token; reward models pad with EOS (and read the last real token)
            **{f"{role}_token": EOS for role in ("bos", "eos", "unk", "pad")},
        }
        return {"tokenizer.json": self.backend.to_str(), "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}

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
    """The GPT-2 tokenizer in folder `path` (see the module docstring for the file layouts)."""
    folder = Path(path)
    if not folder.is_dir():
        raise MinqrError(f"tokenizer folder {folder} does not exist")
    if (folder / "tokenizer.json").is_file():
        return Tokenizer(_read(tokenizers.Tokenizer.from_file, folder / "tokenizer.json"))
    for vocab, merges in BPE_FILE_PAIRS:
        if (folder / vocab).is_file() and (folder / merges).is_file():
            return Tokenizer(byte_level_bpe(_read(BPE.from_file, folder / vocab, folder / merges)))
    raise MinqrError(
        f"no tokenizer in {folder}: expected tokenizer.json, or vocab.json + merges.txt, "
        "or encoder.json + vocab.bpe"
    )


def _read(reader, *paths):
    """`reader(*paths)` of the tokenizers library, whose every failure is a bare Exception."""
    try:
        return reader(*map(str, paths))
    except Exception as error:
        raise MinqrError(f"{' + '.join(map(str, paths))} cannot be read as a tokenizer ({error}): {DAMAGED}") from None
