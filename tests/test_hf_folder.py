"""Hugging Face GPT-2 folders: written by minqr and by transformers, read back by both."""
import json
import pathlib

import pytest
import torch
import transformers
from factories import random_gpt2, tiny_config, transformers_twin, write_tiny_checkpoint

from minqr import MinqrError, load_gpt2, save_gpt2
from minqr.atomic import MARKER
from minqr.models.gpt2 import GPT2
from minqr.models.hf_folder import DAMAGED, hf_tensors, load_backbone_tensors, read_tensors, write_hf_folder

CONFIG = tiny_config(n_layer=3, n_head=2, n_inner=48, activation_function="gelu")


def assert_same_weights(a: GPT2, b: GPT2):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and sa[name].device == sb[name].device, name
        torch.testing.assert_close(sa[name], sb[name], atol=0, rtol=0, msg=name)


def test_round_trip_minqr_transformers_minqr(tmp_path):
    model = random_gpt2(CONFIG, seed=1)
    save_gpt2(model, tmp_path / "minqr")
    assert json.loads((tmp_path / "minqr" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "minqr").eval()
    ids = torch.randint(CONFIG.vocab_size, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.lm_logits(model(ids)), atol=1e-4, rtol=1e-4)
    hf.save_pretrained(tmp_path / "transformers")
    loaded = load_gpt2(tmp_path / "transformers")
    assert not loaded.training
    assert_same_weights(loaded, model)
    assert loaded.config == model.config


def write_bin(folder, model, with_buffers=True):
    """pytorch_model.bin as old GPT-2 checkpoints have it: causal-mask buffers and lm_head included."""
    tensors = hf_tensors(model)
    T = model.config.n_positions
    for i in range(model.config.n_layer):
        if with_buffers:
            tensors[f"transformer.h.{i}.attn.bias"] = torch.ones(1, 1, T, T).tril()
            tensors[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    tensors["lm_head.weight"] = model.wte.weight.detach()
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
    torch.save(tensors, folder / "pytorch_model.bin")


@pytest.mark.parametrize("layout", ["GPT2LMHeadModel", "GPT2Model", "sharded", "pytorch_model.bin"])
def test_loads_every_layout(tmp_path, layout):
    folder = tmp_path / layout
    model = random_gpt2(CONFIG, seed=2)
    if layout == "pytorch_model.bin":
        write_bin(folder, model)
    elif layout == "sharded":
        transformers_twin(model).save_pretrained(folder, max_shard_size="20KB")
        assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    else:
        transformers_twin(model, layout).save_pretrained(folder)
    names = read_tensors(folder)
    assert any(n.startswith("transformer.") for n in names) == (layout != "GPT2Model")
    assert_same_weights(load_gpt2(folder), model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_conversion_on_load_and_stored_dtype_kept(tmp_path, dtype):
    model = write_tiny_checkpoint(tmp_path / "f32", CONFIG, seed=3)
    loaded = load_gpt2(tmp_path / "f32", dtype=dtype, device="cpu")
    assert_same_weights(loaded, model.to(dtype))
    save_gpt2(loaded, tmp_path / "half")
    assert_same_weights(load_gpt2(tmp_path / "half"), loaded)  # dtype=None keeps what is stored
    hidden = loaded(torch.randint(CONFIG.vocab_size, (2, 8)))
    assert hidden.dtype == dtype and hidden.isfinite().all()


def broken_tensors(model):
    tensors = hf_tensors(model)
    del tensors["transformer.h.1.ln_2.bias"]
    del tensors["transformer.h.2.attn.c_proj.weight"]
    tensors["transformer.h.0.attn.rotary"] = torch.zeros(3)
    tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][:300]
    tensors["transformer.h.0.mlp.c_fc.weight"] = tensors["transformer.h.0.mlp.c_fc.weight"].t()  # nn.Linear layout
    return tensors


@pytest.mark.parametrize("broken", [
    "transformer.h.1.ln_2.bias", "transformer.h.2.attn.c_proj.weight", "transformer.h.0.attn.rotary",
    "transformer.wte.weight", "transformer.h.0.mlp.c_fc.weight", "all",
])
def test_missing_unexpected_and_misshaped_tensors_are_all_named(tmp_path, broken):
    model = random_gpt2(CONFIG, seed=4)
    tensors = hf_tensors(model)
    wrong = broken_tensors(model)
    for name in wrong.keys() | tensors.keys() if broken == "all" else [broken]:
        if name in wrong:
            tensors[name] = wrong[name]
        else:
            del tensors[name]
    write_hf_folder(tmp_path, model.config.to_dict(), tensors)
    with pytest.raises(MinqrError) as error:
        load_gpt2(tmp_path)
    message = str(error.value)
    expected = {
        "transformer.h.1.ln_2.bias": "missing: h.1.ln_2.bias",
        "transformer.h.2.attn.c_proj.weight": "missing: h.2.attn.c_proj.weight",
        "transformer.h.0.attn.rotary": "unexpected: transformer.h.0.attn.rotary",
        "transformer.wte.weight": "transformer.wte.weight is [300, 32], expected [320, 32]",
        "transformer.h.0.mlp.c_fc.weight": "transformer.h.0.mlp.c_fc.weight is [48, 32], expected [32, 48]",
    }
    if broken == "all":
        for fragment in expected.values():
            assert fragment.split(": ")[-1] in message, message
        assert "missing: h.1.ln_2.bias, h.2.attn.c_proj.weight" in message
    else:
        assert expected[broken] in message
    assert "config.json" in message


def test_weights_of_the_wrong_kind_are_named(tmp_path):
    """An integer tensor where a weight belongs, a half-precision one among float32 ones, a
    pytorch_model.bin that holds a list: each named, no error from torch's loader or a forward."""
    model = random_gpt2(CONFIG, seed=5)
    tensors = hf_tensors(model)
    tensors["transformer.h.0.ln_1.weight"] = tensors["transformer.h.0.ln_1.weight"].long()
    tensors["transformer.h.1.attn.c_attn.weight"] = tensors["transformer.h.1.attn.c_attn.weight"].half()
    write_hf_folder(tmp_path / "kinds", model.config.to_dict(), tensors)
    with pytest.raises(MinqrError) as error:
        load_gpt2(tmp_path / "kinds")
    assert "not floating point: transformer.h.0.ln_1.weight is int64" in str(error.value)
    assert "in another precision than the rest: h.1.attn.c_attn.weight is float16, the rest float32" in str(error.value)
    assert "h.0.ln_1.weight" not in str(error.value).split("not floating point")[0]  # not also "missing"
    folder = tmp_path / "bin"
    write_bin(folder, model)
    torch.save([1, 2], folder / "pytorch_model.bin")
    with pytest.raises(MinqrError) as error:
        load_gpt2(folder)
    assert str(error.value) == f"{folder / 'pytorch_model.bin'} holds list, not a state dict of named tensors: {DAMAGED}"


def test_extra_tensors_are_returned_when_allowed(tmp_path):
    model = random_gpt2(CONFIG, seed=5)
    score = torch.randn(3, CONFIG.n_embd)
    write_hf_folder(tmp_path, CONFIG.to_dict(), {**hf_tensors(model), "score.weight": score})
    with torch.device("meta"):
        target = GPT2(CONFIG)
    extras = load_backbone_tensors(target, read_tensors(tmp_path), extra_allowed=("score.weight",))
    assert extras.keys() == {"score.weight"} and torch.equal(extras["score.weight"], score)
    assert_same_weights(target, model)
    with pytest.raises(MinqrError, match="unexpected: score.weight"):
        load_gpt2(tmp_path)


def test_bad_folders_are_explained(tmp_path):
    model = write_tiny_checkpoint(tmp_path / "ok", CONFIG)
    with pytest.raises(MinqrError, match="does not exist"):
        load_gpt2(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MinqrError, match="config.json not found"):
        load_gpt2(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(MinqrError, match="not valid JSON"):
        load_gpt2(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(CONFIG.to_dict()))
    with pytest.raises(MinqrError, match="no weights in .*model.safetensors.*pytorch_model.bin"):
        load_gpt2(tmp_path / "empty")
    for name, change in [("llama", {"model_type": "llama"}), ("bert", {"model_type": "bert", "n_embd": 30})]:
        write_hf_folder(tmp_path / name, {**CONFIG.to_dict(), **change}, hf_tensors(model))
        with pytest.raises(MinqrError, match=f"not a GPT-2 config: model_type is '{name}'"):
            load_gpt2(tmp_path / name)


def test_missing_shards_are_named(tmp_path):
    transformers_twin(random_gpt2(CONFIG)).save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(MinqrError, match=f"shards that are not in .*: {shards[1].name}"):
        load_gpt2(tmp_path)


def test_pickles_with_more_than_tensors_are_refused(tmp_path):
    write_bin(tmp_path / "bin", random_gpt2(CONFIG), with_buffers=False)
    torch.save({"payload": pathlib.PurePosixPath("/etc")}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(MinqrError, match=r"weights_only=True.*model.safetensors"):
        load_gpt2(tmp_path / "bin")


def test_write_hf_folder_replaces_the_folder_atomically(tmp_path):
    model = random_gpt2(CONFIG)
    write_hf_folder(tmp_path / "out", {"a": 1}, hf_tensors(model), extra_files={"stale.txt": "old"})
    write_hf_folder(tmp_path / "out", CONFIG.to_dict(), hf_tensors(model),
                    extra_files={"notes.txt": "hello", "blob.bin": b"\x00\x01"})
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "blob.bin", "config.json", "model.safetensors",
                                                      "notes.txt"]
    assert (out / "notes.txt").read_text() == "hello" and (out / "blob.bin").read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old copies left
    assert_same_weights(load_gpt2(out), model)


# ---- damaged files: one MinqrError that names the file, and the tensor where one is to blame ----

def safetensors_parts(path):
    """(header size, header dict, raw bytes) of a safetensors file: 8-byte size, JSON, data."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return size, json.loads(raw[8:8 + size]), raw


@pytest.mark.parametrize("damage", ["cut short", "garbage", "empty", "header not JSON", "header wrong about a tensor",
                                    "offsets of strings", "one offset", "three offsets"])
def test_a_damaged_safetensors_file_is_one_error_that_names_it(tmp_path, damage):
    write_tiny_checkpoint(tmp_path, CONFIG)
    path = tmp_path / "model.safetensors"
    header_size, header, raw = safetensors_parts(path)
    tensors = {name: t for name, t in header.items() if name != "__metadata__"}
    if damage == "cut short":  # the last byte lost: the tensor stored last is cut off
        path.write_bytes(raw[:-1])
        last = max(tensors, key=lambda name: tensors[name]["data_offsets"][1])
        problem = f"cut short at {len(raw) - 1:,} bytes: 1 of its {len(tensors)} tensors end beyond that, the first {last}"
    elif damage in ("garbage", "empty"):
        data = bytes(range(256)) * 20 if damage == "garbage" else b""
        path.write_bytes(data)
        problem = f"not a safetensors file, or cut short: its {len(data):,} bytes do not hold the header it announces"
    elif damage == "header not JSON":
        path.write_bytes(raw[:8] + b"#" * header_size + raw[8 + header_size:])
        problem = "its header is not the JSON of a safetensors file"
    elif damage in ("offsets of strings", "one offset", "three offsets"):  # what the explainer itself read
        offsets = {"offsets of strings": ["0", "8"], "one offset": [0], "three offsets": [0, 8, 9]}[damage]
        header["transformer.wte.weight"]["data_offsets"] = offsets
        text = json.dumps(header, separators=(",", ":")).encode()
        path.write_bytes(raw[:8] + text.ljust(header_size) + raw[8 + header_size:])
        problem = ("its header is wrong about tensor transformer.wte.weight: its shape and data_offsets are not "
                   "lists of counts")
    else:  # a shape that does not fit the tensor's bytes, the header kept at its length
        header["transformer.wte.weight"]["shape"] = [320, 31]
        text = json.dumps(header, separators=(",", ":")).encode()
        path.write_bytes(raw[:8] + text.ljust(header_size) + raw[8 + header_size:])
        begin, end = header["transformer.wte.weight"]["data_offsets"]
        problem = f"its header is wrong about tensor transformer.wte.weight (F32 [320, 31] in bytes {begin}..{end})"
    with pytest.raises(MinqrError) as caught:
        load_gpt2(tmp_path)
    assert str(caught.value) == f"{path}: {problem}; {DAMAGED}"


@pytest.mark.parametrize("damage", ["index not JSON", "index without weight_map", "shard cut short",
                                    "a tensor in two shards", "a shard outside the folder", "a tensor in no shard"])
def test_a_damaged_sharded_checkpoint_is_one_error_that_names_the_file(tmp_path, damage):
    transformers_twin(random_gpt2(CONFIG)).save_pretrained(tmp_path, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    if damage == "index not JSON":
        index.write_text('{"weight_map": {')
        expected = f"{index} is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 17 " \
                   f"(char 16)): {DAMAGED}"
    elif damage == "index without weight_map":
        index.write_text('{"metadata": {}}')
        expected = f"{index} has no weight_map of tensor names to shard files: {DAMAGED}"
    elif damage == "shard cut short":
        shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
        shard.write_bytes(shard.read_bytes()[:100])
        expected = f"{shard}: not a safetensors file, or cut short: its 100 bytes do not hold the header it announces; " \
                   f"{DAMAGED}"
    else:
        from safetensors.torch import save_file

        content = json.loads(index.read_text())
        weight_map = content["weight_map"]
        name, first = next(iter(weight_map.items()))
        if damage == "a tensor in two shards":  # read first, and taken silently before: the last shard won
            save_file({name: torch.zeros(3), "x": torch.zeros(1)}, tmp_path / "extra.safetensors")
            weight_map["x"] = "extra.safetensors"
            expected = (f"{tmp_path / 'extra.safetensors'} holds the tensor {name!r}, which {index.name} puts in "
                        f"{first}: which one the model is made of is not clear; {DAMAGED}")
        elif damage == "a shard outside the folder":
            weight_map[name] = "../elsewhere/model.safetensors"
            expected = (f"{index} names a shard that is not a file name in the model's folder: "
                        f"'../elsewhere/model.safetensors'; {DAMAGED}")
        else:
            weight_map["ghost"] = first
            expected = f"{index} puts the tensor 'ghost' in {first}, which does not hold it; {DAMAGED}"
        index.write_text(json.dumps(content))
    with pytest.raises(MinqrError) as caught:
        load_gpt2(tmp_path)
    assert str(caught.value) == expected


@pytest.mark.parametrize("damage", ["cut short", "garbage", "empty"])
def test_a_damaged_pytorch_model_bin_is_one_error_that_names_it(tmp_path, damage):
    folder = tmp_path / "bin"
    write_bin(folder, random_gpt2(CONFIG))
    path = folder / "pytorch_model.bin"
    raw = path.read_bytes()
    path.write_bytes({"cut short": raw[:len(raw) // 2], "garbage": bytes(range(256)) * 20, "empty": b""}[damage])
    detail = {"cut short": " (a zip archive cut short)",
              "garbage": "", "empty": " (it is empty)"}[damage]
    with pytest.raises(MinqrError) as caught:
        load_gpt2(folder)
    assert str(caught.value) == f"{path} is not a file torch.load can read{detail}: {DAMAGED}"


@pytest.mark.parametrize("content, problem", [
    (b"\x80garbage", "is not valid JSON ('utf-8' codec can't decode byte 0x80 in position 0: invalid start byte)"),
    (b"[1, 2]", "holds a JSON list, not an object"),
])
def test_a_damaged_config_json_is_one_error_that_names_it(tmp_path, content, problem):
    write_tiny_checkpoint(tmp_path, CONFIG)
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(MinqrError) as caught:
        load_gpt2(tmp_path)
    assert str(caught.value) == f"{tmp_path / 'config.json'} {problem}: {DAMAGED}"
