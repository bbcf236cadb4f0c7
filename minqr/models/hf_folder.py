"""Hugging Face model folders of minqr's backbones (GPT-2, the Llama family): read and write them
without `transformers`.

A folder holds `config.json` and the weights, first found of: `model.safetensors`; a sharded
`model.safetensors.index.json` with its shards; a legacy `pytorch_model.bin`, which is only ever
read with `torch.load(weights_only=True)` because a full pickle can run code.

Names and layout in the files (Hugging Face's), per family (`LAYOUTS`): the backbone's tensors are
named as minqr's modules, with or without a prefix that the files of the model with a head have
(`transformer.` in GPT2LMHeadModel and GPT2ForSequenceClassification, `model.` in
LlamaForCausalLM, Qwen2ForCausalLM, ...) and those of the bare model (GPT2Model, LlamaModel) have
not. GPT-2's four projections per block (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`)
are Conv1D weights stored `[in, out]`, the transpose of nn.Linear's. Some tensors in the files are
no weights of the backbone and are ignored: GPT-2's `attn.bias` / `attn.masked_bias` (causal-mask
buffers of old checkpoints), the `rotary_emb.inv_freq` of old Llama checkpoints (minqr computes the
frequencies), and `lm_head.weight` (tied to the embedding, or an output layer the backbone has not).

The pieces, from high to low level (the reward model reuses the low-level ones for its
*ForSequenceClassification folders: backbone under `transformer.` or `model.` plus `score.weight`):

    load_gpt2(path, dtype=None, device=None) -> GPT2   (any family: minqr.load_backbone, backbone.py)
    save_gpt2(model, path) -> Path
    load_model(path, model_class, config, dtype=None, device=None) -> the backbone, in eval mode
    check_blocks(model_class, config, tensors, folder)  # config.json's number of blocks is the files'
    read_config(folder) -> dict                          # config.json as it is
    read_tensors(folder) -> dict[str, Tensor]            # every tensor, under the file's names
    load_backbone_tensors(model, tensors, extra_allowed=(), dtype=None, device=None) -> dict
        # checks names and shapes (one error naming every culprit), assigns the backbone's
        # tensors to `model` in place and returns the `extra_allowed` tensors found
    hf_tensors(model, prefix=None) -> dict[str, Tensor]   # HF names and layout (None: the family's prefix)
    write_hf_folder(path, config, tensors, extra_files=None) -> Path  # atomic

Every file is read through one of two readers here, `read_json` and `_read_safetensors` (and
`.bin` through torch.load): whatever is wrong with a file (cut short, garbage, a bad header, a
missing shard) is one MinqrError that names the file, and the tensor where one is to blame.
minqr/training/resume.py reads its state.pt and config.json the same way.

Loading does not hold two copies of the weights: the model is built on the meta device (no
memory, no random init) and the tensors read from the memory-mapped file become its parameters
(`load_state_dict(assign=True)`); only the transposed Conv1D weights and dtype/device
conversions make new tensors.
"""
import collections
import json
import math
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minqr.atomic import atomic_dir
from minqr.errors import MinqrError
from minqr.models.gpt2 import GPT2, GPT2Config
from minqr.models.llama import Llama
from minqr.reading import loads


@dataclass(frozen=True)
class Layout:
    """How a family's backbone is named and laid out in Hugging Face's files."""

    family: str  # its name in messages
    prefix: str  # before the backbone's names in the files of a model with a head
    sizes: tuple  # the config fields that a message about wrong tensors quotes
    layers: tuple  # (the config field of the number of blocks, the blocks' module name in the files)
    transposed: tuple = ()  # name endings of weights stored [in, out], the transpose of nn.Linear's
    ignored: tuple = ()  # name endings of tensors in the files that are no weights of the backbone


LAYOUTS = {
    GPT2: Layout("GPT-2", "transformer.", ("n_layer", "n_embd", "vocab_size", "n_positions"), ("n_layer", "h"),
                 transposed=("c_attn.weight", "c_proj.weight", "c_fc.weight"),  # Conv1D
                 # causal-mask buffers (but "c_attn.bias" is a weight: keep the dot), the tied output layer
                 ignored=(".attn.bias", ".attn.masked_bias", "lm_head.weight")),
    Llama: Layout("the Llama family", "model.",
                  ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                   "head_dim", "intermediate_size", "vocab_size"), ("num_hidden_layers", "layers"),
                  ignored=(".rotary_emb.inv_freq", "lm_head.weight")),  # see the docstring
}
DAMAGED = "the file is damaged or incomplete (a download or copy cut short?): download or save it again"
FOREIGN_PICKLE = "Convert the checkpoint to model.safetensors where you trust it (transformers: save_pretrained)"
# bytes per element of each safetensors dtype, to find the tensor a bad header is wrong about
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
                           "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def _folder(path) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise MinqrError(
            f"model folder {folder} does not exist: give a local Hugging Face model folder "
            "(config.json + model.safetensors)"
        )
    return folder


def read_json(path, fix: str = DAMAGED) -> dict:
    """The JSON object in file `path`; anything else is a MinqrError that names the file and `fix`."""
    path = Path(path)
    try:
        value = loads(path.read_bytes())
    except OSError as e:
        raise MinqrError(f"{path} cannot be read ({e.strerror})") from None
    except ValueError as e:  # not JSON, or not UTF-8 text
        raise MinqrError(f"{path} is not valid JSON ({e}): {fix}") from None
    if not isinstance(value, dict):
        raise MinqrError(f"{path} holds a JSON {type(value).__name__}, not an object: {fix}")
    return value


def read_config(folder) -> dict:
    """The dict in `folder/config.json`."""
    path = _folder(folder) / "config.json"
    if not path.is_file():
        raise MinqrError(f"{path} not found: a Hugging Face model folder has config.json beside its weights")
    return read_json(path)


def backbone_config(config_class, config: dict, folder):
    """`config_class.from_dict(config)` (GPT2Config, LlamaConfig), its refusal naming the folder's
    config.json."""
    try:
        return config_class.from_dict(config)
    except MinqrError as error:
        raise MinqrError(f"{_folder(folder) / 'config.json'}: {error}") from None


def read_tensors(folder) -> dict:
    """Every tensor of the folder's weights, under the names the files use, on the CPU."""
    folder = _folder(folder)
    single, index, legacy = (folder / n for n in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))
    if single.is_file():
        return _read_safetensors(single)
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
            raise MinqrError(f"{index} has no weight_map of tensor names to shard files: {DAMAGED}")
        shards = sorted(set(weight_map.values()))
        outside = [s for s in shards if Path(s).name != s or s in (".", "..")]
        if outside:  # a path would read weights from wherever it points
            raise MinqrError(f"{index} names a shard that is not a file name in the model's folder: {outside[0]!r}; "
                             f"{DAMAGED}")
        absent = [s for s in shards if not (folder / s).is_file()]
        if absent:
            raise MinqrError(f"{index} lists shards that are not in {folder}: {', '.join(absent)}; download them too")
        return _sharded_tensors(index, weight_map, shards)
    if legacy.is_file():
        tensors = read_torch_file(legacy)
        if not (isinstance(tensors, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in tensors.items())):
            raise MinqrError(f"{legacy} holds {type(tensors).__name__}, not a state dict of named tensors: {DAMAGED}")
        return tensors
    raise MinqrError(
        f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json with its "
        "shards, or pytorch_model.bin"
    )


def _sharded_tensors(index: Path, weight_map: dict, shards: list) -> dict:
    """The tensors of the shards, each exactly where the index's weight_map puts it: a tensor that
    a shard holds and the map puts elsewhere (or nowhere) would otherwise be taken silently, the
    last shard read winning."""
    tensors = {}
    for shard in shards:
        for name, tensor in _read_safetensors(index.parent / shard).items():
            if weight_map.get(name) != shard:
                where = f"in {weight_map[name]}" if name in weight_map else "nowhere"
                raise MinqrError(f"{index.parent / shard} holds the tensor {name!r}, which {index.name} puts {where}: "
                                 f"which one the model is made of is not clear; {DAMAGED}")
            tensors[name] = tensor
    missing = [name for name in weight_map if name not in tensors]
    if missing:
        raise MinqrError(f"{index} puts the tensor {missing[0]!r} in {weight_map[missing[0]]}, which does not hold it"
                         f"{f' (nor {len(missing) - 1} more)' if len(missing) > 1 else ''}; {DAMAGED}")
    return tensors


def _read_safetensors(path: Path) -> dict:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise MinqrError(f"{path}: {_safetensors_problem(path, error)}; {DAMAGED}") from None


def _safetensors_problem(path: Path, error: Exception) -> str:
    """What is wrong with a safetensors file that would not load. Its layout: an 8-byte header size
    H (little-endian), H bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}}, then the
    data, where a tensor's bytes lie at 8 + H + [begin, end)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        if size < 8 or 8 + header_size > size:
            return f"not a safetensors file, or cut short: its {size:,} bytes do not hold the header it announces"
        try:
            header = loads(f.read(header_size))
            tensors = {name: (t["dtype"], t["shape"], *t["data_offsets"]) for name, t in header.items()
                       if name != "__metadata__"}
        except (ValueError, TypeError, KeyError, AttributeError):
            return "its header is not the JSON of a safetensors file"
    bad = next((name for name, (dtype, shape, *offsets) in tensors.items()
                if len(offsets) != 2 or not _counts(offsets) or not isinstance(shape, list) or not _counts(shape)), None)
    if bad is not None:
        return f"its header is wrong about tensor {bad}: its shape and data_offsets are not lists of counts"
    data_start = 8 + header_size
    cut = {name: t for name, t in tensors.items() if data_start + t[3] > size}
    if cut:
        first = min(cut, key=lambda name: cut[name][2])
        return (f"cut short at {size:,} bytes: {len(cut)} of its {len(tensors)} tensors end beyond that, the first "
                f"{first}")
    for name, (dtype, shape, begin, end) in tensors.items():
        if end - begin != math.prod(shape) * SAFETENSORS_DTYPE_BYTES.get(dtype, 0):
            return f"its header is wrong about tensor {name} ({dtype} {shape} in bytes {begin}..{end})"
    return f"safetensors cannot read it ({error})"


def _counts(values) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)


def read_torch_file(path, fix: str = DAMAGED, foreign_fix: str = FOREIGN_PICKLE):
    """What `path` holds, read with torch.load(weights_only=True): tensors and plain values only,
    since a full pickle can run code. A failure is one MinqrError that names the file."""
    path = Path(path)
    is_zip = zipfile.is_zipfile(path)
    try:
        # only the zip format (torch >= 1.6) can be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):
            raise MinqrError(f"{path} holds objects other than tensors, and minqr reads it only with "
                             f"torch.load(weights_only=True) since a full pickle can run code. {foreign_fix}") from None
        raise MinqrError(f"{path} is not a file torch.load can read: {fix}") from None  # garbage
    except (OSError, EOFError, RuntimeError) as error:  # a zip cut short, an empty file, ...
        with open(path, "rb") as f:
            cut_zip = f.read(4) == b"PK\x03\x04" and not is_zip  # torch says EINVAL or "internal miniz error"
        detail = "a zip archive cut short" if cut_zip else str(error).split(". ")[0] or "it is empty"
        raise MinqrError(f"{path} is not a file torch.load can read ({detail}): {fix}") from None


def load_backbone_tensors(model, tensors: dict, extra_allowed=(), dtype=None, device=None) -> dict:
    """Make `tensors` (HF names and layout) the parameters of `model`, a GPT2 or Llama (which may be
    on meta).

    Names in `extra_allowed` (full names as in the file, e.g. "score.weight") are not part of the
    backbone: they are returned instead of being reported as unexpected. Anything missing,
    unexpected or mis-shaped is one MinqrError that names every culprit.
    """
    layout = LAYOUTS[type(model)]
    expected = {name: p.shape for name, p in model.state_dict().items()}
    state, extras, unexpected, misshaped, not_float = {}, {}, [], [], []
    for name, tensor in tensors.items():
        key = name.removeprefix(layout.prefix)
        if key.endswith(layout.ignored):
            continue
        if not tensor.is_floating_point():  # weights are floats: an integer tensor would not train nor load
            not_float.append(f"{name} is {str(tensor.dtype).removeprefix('torch.')}")
            expected.pop(key, None)  # reported here, not again as missing
            continue
        if name in extra_allowed:
            extras[name] = tensor
            continue
        if key not in expected:
            unexpected.append(name)
            continue
        transposed = key.endswith(layout.transposed)
        shape = expected[key][::-1] if transposed else expected[key]
        if tensor.shape != shape:
            misshaped.append(f"{name} is {list(tensor.shape)}, expected {list(shape)}")
            expected.pop(key)  # reported here, not again as missing
            continue
        state[key] = (tensor.t() if transposed else tensor).to(device=device, dtype=dtype).contiguous()
    missing = [k for k in expected if k not in state]
    # one precision a model (the layers' matmuls need it), unless `dtype` casts them all: the odd ones named
    counts = collections.Counter(tensor.dtype for tensor in state.values())
    usual = counts.most_common(1)[0][0] if counts else None
    mixed = [] if dtype is not None else [f"{key} is {str(t.dtype).removeprefix('torch.')}, the rest "
                                          f"{str(usual).removeprefix('torch.')}" for key, t in state.items()
                                          if t.dtype != usual]
    problems = [
        f"{label}: {', '.join(items)}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped),
                             ("not floating point", not_float), ("in another precision than the rest", mixed))
        if items
    ]
    if problems:
        sizes = ", ".join(f"{name}={getattr(model.config, name)}" for name in layout.sizes)
        raise MinqrError(
            f"checkpoint tensors do not fit {layout.family} ({sizes}): " + "; ".join(problems)
            + ". Check that config.json belongs to these weights"
        )
    model.load_state_dict(state, assign=True)
    return extras


def check_blocks(model_class, config, tensors: dict, folder) -> None:
    """Before a model is built from config.json: it has as many blocks as the weights hold. A config
    is untrusted input, and building is the one cost it sets that no weight bounds (n_layer = 10**7
    builds ten million modules, even on the meta device, before any shape is compared)."""
    field, module = LAYOUTS[model_class].layers
    found = {int(m.group(1)) for name in tensors if (m := re.search(rf"(?:^|\.){module}\.(\d+)\.", name))}
    said = getattr(config, field)
    if said != len(found):
        raise MinqrError(f"{Path(folder) / 'config.json'} says {field}={said}, but the weights in {folder} hold "
                         f"{len(found)} blocks ({module}.0 ... {module}.{max(found, default=-1)}): the config does not "
                         "belong to these weights")


def load_model(path, model_class, config, dtype=None, device=None):
    """The weights of the Hugging Face folder `path` in a new `model_class(config)` (GPT2, Llama), in
    eval mode (as `from_pretrained` returns it). `dtype=None` keeps the dtype stored in the file."""
    tensors = read_tensors(path)
    check_blocks(model_class, config, tensors, path)
    with torch.device("meta"):
        model = model_class(config)
    load_backbone_tensors(model, tensors, dtype=dtype, device=device)
    return model.eval()


def load_gpt2(path, dtype=None, device=None) -> GPT2:
    """A Hugging Face GPT-2 folder -> minqr GPT2 in eval mode (float32 for the released GPT-2s)."""
    return load_model(path, GPT2, backbone_config(GPT2Config, read_config(path), path), dtype, device)


def hf_tensors(model, prefix: str | None = None) -> dict:
    """The backbone's tensors under Hugging Face's names (after `prefix`, by default the family's)
    and layout (GPT-2's Conv1D weights `[in, out]`, transposed views that `write_hf_folder` packs)."""
    layout = LAYOUTS[type(model)]
    prefix = layout.prefix if prefix is None else prefix
    return {
        prefix + name: t.t() if name.endswith(layout.transposed) else t
        for name, t in model.state_dict().items()
    }


def write_hf_folder(path, config: dict, tensors: dict, extra_files=None) -> Path:
    """Write config.json, model.safetensors and `extra_files` ({name: str or bytes}) atomically:
    `path` is replaced as a whole, and a crash leaves the old folder or the new one. Whether a model
    may go there is the caller's to decide (train's and export's checks, minqr/models/reward.py)."""
    with atomic_dir(path, overwrite=True, kind="a model folder", older=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        # transformers refuses safetensors files without the "format" metadata
        packed = {name: t.contiguous() for name, t in tensors.items()}  # safetensors wants them packed
        save_file(packed, tmp / "model.safetensors", metadata={"format": "pt"})
        for name, content in (extra_files or {}).items():
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content)
    return Path(path)


def save_gpt2(model: GPT2, path) -> Path:
    """Write a folder that transformers' GPT2LMHeadModel and `load_gpt2` both load."""
    config = {**model.config.to_dict(), "architectures": ["GPT2LMHeadModel"]}
    return write_hf_folder(path, config, hf_tensors(model))
