"""Tiny models, checkpoints and tokenizers for tests: `from factories import ...` (pytest puts
tests/ on sys.path). Everything is made here, offline, in well under a second.

    tiny_config(**overrides) -> GPT2Config           2 layers, n_embd 32, 4 heads, vocab 320, no dropout
    random_gpt2(config=None, seed=0) -> GPT2         eval mode; every tensor random (see below)
    transformers_twin(model, arch="GPT2LMHeadModel", **config_overrides)
                                                     the same weights in a transformers model (eval)
    write_tiny_checkpoint(folder, config=None, seed=0, writer="minqr", **save_kwargs) -> GPT2
                                                     a HF folder written by minqr's save_gpt2 or by
                                                     transformers' save_pretrained (save_kwargs, e.g.
                                                     max_shard_size); returns the model written
    random_hf_llama(model_type="llama", arch="ForCausalLM", seed=0, **config)
                                                     a tiny transformers model of the Llama family
                                                     (Llama/Qwen2/Mistral + arch), eval, eager attention,
                                                     every tensor random
    write_tiny_tokenizer(folder, layout="vocab.json") -> Path
                                                     a byte-level BPE (~300 ids, EOS the last one) as
                                                     vocab.json + merges.txt, "encoder.json"
                                                     (+ vocab.bpe) or "tokenizer.json"
    padded_batch(config, side, seed, lengths=LENGTHS, T=16) -> (ids, mask)
                                                     random ids [B, T] and a [B, T] right or left padding
                                                     mask, a row per length
    shared_prefix_batch(shapes, vocab_size=320, seed=0, additive=False) -> (ids, mask, positions)
                                                     packed [prefix, chosen, rejected, pad] rows with the
                                                     training code's [B, 1, T, T] pattern and positions
    ended_writer() -> str                            `pid@host` of a process that has ended, as the
                                                     temporaries of a killed writer name it (minqr.atomic)
    load_tool(name) -> click.Command                 tools/NAME.py's command (tools/ is not a package)
"""
import copy
import importlib.util
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from minqr.models.gpt2 import GPT2, GPT2Config
from minqr.models.hf_folder import hf_tensors, save_gpt2
from minqr.models.tokenizer import EOS

ROOT = Path(__file__).resolve().parents[1]

TINY_VOCAB_SIZE = 320  # >= the tiny tokenizer's vocabulary, so its ids fit tiny models
TINY_EOS_ID = 300  # the tiny tokenizer's EOS (its last id)

SENTENCES = [
    "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "\n\nHuman: Can you help me write a poem about the sea?\n\nAssistant: Of course! Waves roll in.",
    "\n\nHuman: How do I bake bread at home?\n\nAssistant: Mix flour, water, salt and yeast, then wait.",
    "\n\nHuman: Tell me something rude.\n\nAssistant: I'd rather not, but I can tell you a joke.",
    "The quick brown fox jumps over the lazy dog. Émilie paid 12.50 € for 3 cafés — naïve? 🙂",
]


def tiny_config(**overrides) -> GPT2Config:
    fields = dict(vocab_size=TINY_VOCAB_SIZE, bos_token_id=TINY_EOS_ID, eos_token_id=TINY_EOS_ID,
                  n_positions=64, n_embd=32, n_layer=2, n_head=4,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2Config(**{**fields, **overrides})


def random_gpt2(config: GPT2Config | None = None, seed: int = 0) -> GPT2:
    """A GPT2 whose every tensor is random, layer-norm weights and all biases included, so that a
    swapped or transposed tensor cannot hide behind default init (ones, zeros). Weights have
    std 0.2, large enough that attention is far from uniform and a wrong mask shows."""
    torch.manual_seed(seed)
    model = GPT2(config or tiny_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_ln_weight = p.dim() == 1 and ".ln_" in f".{name}" and name.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if is_ln_weight else 0.0))
    return model.eval()


def transformers_twin(model: GPT2, arch: str = "GPT2LMHeadModel", **config_overrides):
    """`model`'s weights in transformers' `arch` (GPT2Model, GPT2LMHeadModel, ...), in eval mode,
    with eager attention so the reference does not share minqr's SDPA path. Weights `arch` has and
    minqr has not (e.g. `score.weight`) keep transformers' init: set them yourself."""
    import transformers

    fields = {**model.config.to_dict(), **config_overrides}
    del fields["model_type"]
    config = transformers.GPT2Config(**fields, attn_implementation="eager")
    twin = getattr(transformers, arch)(config)
    prefix = "" if arch == "GPT2Model" else "transformer."
    missing, unexpected = twin.load_state_dict(hf_tensors(model, prefix), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight", "score.weight"}, (missing, unexpected)
    return twin.eval()


def write_tiny_checkpoint(folder, config=None, seed=0, writer="minqr", **save_kwargs) -> GPT2:
    model = random_gpt2(config, seed)
    if writer == "minqr":
        save_gpt2(model, folder)
    elif writer == "transformers":
        transformers_twin(model).save_pretrained(folder, **save_kwargs)
    else:
        raise ValueError(f"writer must be 'minqr' or 'transformers', not {writer!r}")
    return model


def assert_packed_rows_are_alone(model, ids, packed, shapes) -> list:
    """Each shared-prefix row of `packed` (the model's outputs on `ids`, made by shared_prefix_batch
    with `shapes`) equals the model run on prefix + chosen and on prefix + rejected alone; returns
    those [(alone chosen, alone rejected)] per row."""
    alone = []
    for row, (p, c, r, pad) in enumerate(shapes):
        prefix, chosen, rejected = ids[row, :p], ids[row, p:p + c], ids[row, p + c:p + c + r]
        alone_chosen = model(torch.cat([prefix, chosen])[None])[0]
        alone_rejected = model(torch.cat([prefix, rejected])[None])[0]
        torch.testing.assert_close(packed[row, :p + c], alone_chosen, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[row, p + c:p + c + r], alone_rejected[p:], atol=1e-5, rtol=1e-5)
        alone.append((alone_chosen, alone_rejected))
    return alone


def random_hf_llama(model_type: str = "llama", arch: str = "ForCausalLM", seed: int = 0, **config):
    """transformers' `LlamaForCausalLM`, `Qwen2Model`, ... (model_type "llama", "qwen2" or "mistral"
    and `arch`), 2 layers, hidden_size 32, 4 heads unless `config` says otherwise, in eval mode with
    eager attention (not minqr's SDPA path). Every tensor is random as in random_gpt2: norm weights
    around 1, biases included."""
    import transformers

    fields = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, attn_implementation="eager")
    # deep-copied: transformers writes into the rope dicts it is given
    hf_config = transformers.AutoConfig.for_model(model_type, **copy.deepcopy({**fields, **config}))
    torch.manual_seed(seed)
    family = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[model_type]
    model = getattr(transformers, family + arch)(hf_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("norm.weight") else 0.0))
    return model.eval()


def write_tiny_tokenizer(folder, layout: str = "vocab.json") -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    tok.add_special_tokens([AddedToken(EOS, special=True)])  # the next id: the last, as in GPT-2
    if layout == "tokenizer.json":
        tok.save(str(folder / "tokenizer.json"))
        return folder
    files = {"vocab.json": ("vocab.json", "merges.txt"), "encoder.json": ("encoder.json", "vocab.bpe")}
    if layout not in files:
        raise ValueError(f"layout must be 'vocab.json', 'encoder.json' or 'tokenizer.json', not {layout!r}")
    vocab_name, merges_name = files[layout]
    model_vocab, merges = tok.model.save(str(folder))  # the model's vocab lacks the added EOS
    Path(model_vocab).unlink()
    Path(merges).rename(folder / merges_name)
    (folder / vocab_name).write_text(json.dumps(tok.get_vocab()))
    return folder


LENGTHS = [13, 7, 1, 16]  # one row unpadded, one a single token


def padded_batch(config, side, seed, lengths=LENGTHS, T=16):
    """Random ids [B, T] below config.vocab_size, and a padding mask with `lengths` real tokens on
    the `side` ("right" or "left")."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(config.vocab_size, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, T - n:] = 1
    return ids, mask


def shared_prefix_batch(shapes, vocab_size=320, seed=0, additive=False):
    """Rows `[prefix, chosen, rejected, pad]` for (prefix, chosen, rejected, pad) lengths, with the
    pattern the training code builds: the rejected suffix sees the prefix and itself, never the
    chosen suffix; its positions restart where the prefix ends; pads see nothing."""
    g = torch.Generator().manual_seed(seed)
    T = sum(shapes[0])
    ids = torch.randint(vocab_size, (len(shapes), T), generator=g)
    mask = torch.zeros(len(shapes), 1, T, T, dtype=torch.bool)
    positions = torch.zeros(len(shapes), T, dtype=torch.long)
    for row, (p, c, r, pad) in enumerate(shapes):
        assert p + c + r + pad == T
        segment = torch.tensor([0] * p + [1] * c + [2] * r + [3] * pad)
        query, key = segment[:, None], segment[None, :]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask[row, 0] = causal & ((key == 0) | (key == query)) & (query != 3)
        positions[row, : p + c + r] = torch.cat([torch.arange(p + c), torch.arange(p, p + r)])
    if additive:
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    return ids, mask, positions


def sigint_at_default() -> None:
    """A child process's preexec_fn: SIGINT at its default, so that Python in the child takes
    Ctrl-C whatever this process inherited (a shell ignores SIGINT for a script's background jobs,
    and a child of one would keep ignoring it, minqr/training/interrupt.py)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def ended_writer() -> str:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return f"{process.pid}@{socket.gethostname()}"


def load_tool(name: str):
    """tools/NAME.py's click command, `main` (tools/ is not a package, so it is loaded by path)."""
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main
