"""minqr's Llama family (llama, qwen2, mistral) against transformers' (parity), loaded from the folders
transformers writes, and the error for each folder or config minqr cannot load."""
import copy
import dataclasses
import json

import pytest
import torch
import transformers
from factories import (TINY_EOS_ID, assert_packed_rows_are_alone, padded_batch, random_hf_llama, shared_prefix_batch,
                       write_tiny_checkpoint)

import minqr.models.hf_folder
from minqr import GPT2, Llama, LlamaConfig, MinqrError, load_backbone, load_gpt2
from minqr.models.hf_folder import write_hf_folder
from minqr.models.reward import RewardModel

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          # far below the test's positions, so that the scaling changes the result
          "original_max_position_embeddings": 16}
# (model_type, config): grouped-query ratios 1, 2 and 4, tied and untied, several rope_theta
CONFIGS = {
    "llama-mha-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-gqa2-llama3": ("llama", dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3)),
    "llama-gqa4-biases": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8, rope_theta=1000.0,
                                        attention_bias=True, mlp_bias=True)),
    "qwen2-gqa2-tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2-gqa4": ("qwen2", dict(num_key_value_heads=1, num_hidden_layers=3)),
    # transformers keeps these two keys in a qwen2 or mistral config.json but builds no such biases
    "qwen2-bias-keys": ("qwen2", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "mistral-gqa4": ("mistral", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=12, sliding_window=None,
                                     rms_norm_eps=1e-5)),
    "mistral-bias-keys": ("mistral", dict(num_key_value_heads=2, sliding_window=None, attention_bias=True,
                                          mlp_bias=True)),
}


def saved(tmp_path, name, arch="ForCausalLM", seed=0, **save_kwargs):
    """A random transformers model of CONFIGS[name] saved into tmp_path / name: (model, folder)."""
    model_type, config = CONFIGS[name]
    hf = random_hf_llama(model_type, arch, seed=seed, **config)
    hf.save_pretrained(tmp_path / name, **save_kwargs)
    return hf, tmp_path / name


def hf_hidden(hf, ids, mask):
    """transformers' last hidden states, given the positions minqr uses (counted from each row's
    first real token: transformers counts from 0 whatever the mask)."""
    base = hf.model if hasattr(hf, "model") else hf
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return base(ids, attention_mask=mask, position_ids=positions).last_hidden_state


@pytest.mark.parametrize("side", ["none", "right", "left"])
@pytest.mark.parametrize("name", CONFIGS)
def test_hidden_states_match_transformers(tmp_path, name, side):
    seed = list(CONFIGS).index(name)
    hf, folder = saved(tmp_path, name, seed=seed)
    model = load_backbone(folder)
    assert isinstance(model, Llama) and not model.training
    ids, mask = padded_batch(model.config, "left" if side == "left" else "right", seed=100 + seed)
    if side == "none":
        mask = torch.ones_like(mask)
    with torch.no_grad():
        hidden = model(ids, None if side == "none" else mask)
        expected = hf_hidden(hf, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(hidden[real], expected[real], atol=1e-4, rtol=1e-4)


def test_the_comparison_sees_a_wrong_rope(tmp_path):
    """The parity above can fail: without its llama3 scaling the same weights give other states."""
    hf, folder = saved(tmp_path, "llama-gqa2-llama3")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    (folder / "config.json").write_text(json.dumps(config))
    model = load_backbone(folder)
    ids, mask = padded_batch(model.config, "right", seed=7)
    with torch.no_grad():
        difference = (model(ids, mask) - hf_hidden(hf, ids, mask))[mask.bool()].abs().max()
    assert difference > 1e-2


def same_weights(model, hf):
    """minqr's state equals the transformers model's backbone, exactly, with nothing left over."""
    theirs = {k.removeprefix("model."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    ours = model.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k].to(ours[k].dtype), atol=0, rtol=0, msg=k)


@pytest.mark.parametrize("layout", ["ForCausalLM", "Model", "sharded", "old-rotary-buffers"])
def test_loads_every_layout(tmp_path, layout):
    arch = "Model" if layout == "Model" else "ForCausalLM"
    save_kwargs = {"max_shard_size": "20KB"} if layout == "sharded" else {}
    hf, folder = saved(tmp_path, "qwen2-gqa4", arch, **save_kwargs)
    names = minqr.models.hf_folder.read_tensors(folder)
    assert any(n.startswith("model.") for n in names) == (arch == "ForCausalLM")
    if layout == "sharded":
        assert len(list(folder.glob("model-*.safetensors"))) > 2 and not (folder / "model.safetensors").exists()
    if layout == "old-rotary-buffers":  # checkpoints of transformers < 4.31 stored the frequencies
        names.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(4) for i in range(3)})
        # a new folder: minqr replaces only folders it made (minqr.atomic), not transformers' own
        config = json.loads((folder / "config.json").read_text())
        folder = write_hf_folder(folder.with_name("old-rotary"), config, names)
    same_weights(load_backbone(folder), hf)


def test_untied_output_layer_is_skipped_and_weights_are_the_files_tensors(tmp_path, monkeypatch):
    """Loading assigns the tensors read (no second copy) and leaves an untied lm_head out."""
    hf, folder = saved(tmp_path, "llama-gqa2-llama3")
    read = minqr.models.hf_folder.read_tensors(folder)
    assert "lm_head.weight" in read
    monkeypatch.setattr(minqr.models.hf_folder, "read_tensors", lambda path: read)
    model = load_backbone(folder)
    for name, p in model.state_dict().items():
        assert p.data_ptr() == read["model." + name].data_ptr(), name
    same_weights(model, hf)


def test_dtype_conversion_on_load(tmp_path):
    hf, folder = saved(tmp_path, "mistral-gqa4")
    model = load_backbone(folder, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    same_weights(model, hf)
    ids, mask = padded_batch(model.config, "left", seed=8)
    with torch.no_grad():
        hidden = model(ids, mask)
    assert hidden.dtype == torch.bfloat16 and hidden.isfinite().all()


def test_gpt2_folders_load_as_gpt2(tmp_path):
    written = write_tiny_checkpoint(tmp_path)
    model = load_backbone(tmp_path)
    assert isinstance(model, GPT2) and model.config == written.config
    for (name, ours), theirs in zip(model.state_dict().items(), load_gpt2(tmp_path).state_dict().values()):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("additive", [False, True], ids=["bool", "additive"])
def test_shared_prefix_mask_equals_running_chosen_and_rejected_separately(tmp_path, additive):
    _, folder = saved(tmp_path, "llama-gqa4-biases")
    model = load_backbone(folder)
    shapes = [(5, 4, 6, 0), (3, 7, 2, 3)]
    ids, mask, positions = shared_prefix_batch(shapes, seed=9, additive=additive)
    with torch.no_grad():
        assert_packed_rows_are_alone(model, ids, model(ids, mask, positions), shapes)


@pytest.mark.slow  # torch.compile and training: about 3.5 s of CPU
def test_trains_compiled_as_one_graph_and_under_autocast(tmp_path):
    _, folder = saved(tmp_path, "qwen2-gqa2-tied")
    model = load_backbone(folder).train()
    ids, mask = padded_batch(model.config, "left", seed=10)
    packed_ids, packed_mask, positions = shared_prefix_batch([(4, 5, 4, 3)], seed=11, additive=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for args in [(ids,), (ids, mask), (packed_ids, packed_mask, positions)]:
        out = compiled(*args)
        torch.testing.assert_close(out, model(*args), atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(*args)
        (out.sum() + half.float().sum()).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        real = slice(None) if len(args) != 2 else mask.bool()
        torch.testing.assert_close(half[real].float(), out[real].detach(), atol=0.1, rtol=0.05)


def hf_config_dict(model_type, **config):
    """config.json as transformers 5 writes it for a tiny model of `model_type`."""
    fields = dict(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4)
    # deep-copied: transformers writes into the rope dicts it is given
    return transformers.AutoConfig.for_model(model_type, **copy.deepcopy({**fields, **config})).to_dict()


def test_older_config_files_read_as_transformers_5_writes_them():
    """rope_theta beside rope_scaling (whose "rope_type" was "type" once), as Llama 3.1's own file."""
    new = LlamaConfig.from_dict(hf_config_dict("llama", rope_theta=500000.0, rope_scaling=LLAMA3))
    old = hf_config_dict("llama")
    del old["rope_parameters"]
    old.update(rope_theta=500000.0, rope_scaling={**LLAMA3, "type": LLAMA3["rope_type"]})
    del old["rope_scaling"]["rope_type"]
    assert LlamaConfig.from_dict(old) == new
    assert new.rope_theta == 500000.0 and new.rope_scaling == LLAMA3 and new.head_dim == 8


def test_llama3_scaling_defaults_its_original_context_to_max_position_embeddings():
    scaling = {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}
    config = LlamaConfig.from_dict(hf_config_dict("llama", max_position_embeddings=128, rope_parameters=scaling))
    assert config.rope_scaling == {**LLAMA3, "original_max_position_embeddings": 128}


def unfit(config: LlamaConfig, problems: str) -> str:
    return (f"checkpoint tensors do not fit the Llama family (model_type={config.model_type}, "
            f"num_hidden_layers={config.num_hidden_layers}, hidden_size={config.hidden_size}, "
            f"num_attention_heads={config.num_attention_heads}, num_key_value_heads={config.num_key_value_heads}, "
            f"head_dim={config.head_dim}, intermediate_size={config.intermediate_size}, "
            f"vocab_size={config.vocab_size}): {problems}. Check that config.json belongs to these weights")


@pytest.mark.parametrize("broken", ["missing", "unexpected", "wrong shape", "all", "qwen2 weights, llama config"])
def test_bad_checkpoints_name_every_tensor(tmp_path, broken):
    hf, folder = saved(tmp_path, "qwen2-gqa4")
    config = json.loads((folder / "config.json").read_text())
    tensors = dict(minqr.models.hf_folder.read_tensors(folder))
    if broken in ("missing", "all"):
        del tensors["model.layers.1.mlp.up_proj.weight"]
    if broken in ("unexpected", "all"):
        tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)  # Qwen3 has these
    if broken in ("wrong shape", "all"):
        tensors["model.layers.2.self_attn.k_proj.weight"] = torch.zeros(16, 32)  # 2 key/value heads, not 1
    if broken == "qwen2 weights, llama config":
        config["model_type"] = "llama"
    folder = write_hf_folder(folder.with_name("broken"), config, tensors)  # minqr replaces only its own folders
    expected = {
        "missing": "missing: layers.1.mlp.up_proj.weight",
        "unexpected": "unexpected: model.layers.0.self_attn.q_norm.weight",
        "wrong shape": "wrong shape: model.layers.2.self_attn.k_proj.weight is [16, 32], expected [8, 32]",
        "all": "missing: layers.1.mlp.up_proj.weight; unexpected: model.layers.0.self_attn.q_norm.weight; "
               "wrong shape: model.layers.2.self_attn.k_proj.weight is [16, 32], expected [8, 32]",
        "qwen2 weights, llama config": "unexpected: " + ", ".join(f"model.layers.{i}.self_attn.{p}_proj.bias"
                                                                   for i in range(3) for p in "kqv"),
    }[broken]
    with pytest.raises(MinqrError) as error:
        load_backbone(folder)
    assert str(error.value) == unfit(LlamaConfig.from_dict(config), expected)


def test_unknown_model_type_names_the_supported_ones(tmp_path):
    _, folder = saved(tmp_path, "llama-mha-tied")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    with pytest.raises(MinqrError) as error:
        load_backbone(folder)
    assert str(error.value) == (f"{folder / 'config.json'} has model_type 'gemma', which minqr does not implement: "
                                "supported are gpt2, llama, qwen2, mistral")


SLIDING = ("config has an active sliding attention window ({}): minqr attends over the whole sequence and does not "
           'implement sliding windows. Use a checkpoint without one ("sliding_window": null, as Mistral-7B-v0.2 and '
           "later have it)")


@pytest.mark.parametrize("model_type,config,window", [
    ("mistral", {}, "sliding_window=4096"),  # transformers' default for Mistral
    ("mistral", {"sliding_window": 8}, "sliding_window=8"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
     "use_sliding_window=true, sliding_window=8 on layer 1"),
])
def test_an_active_sliding_window_is_refused(tmp_path, model_type, config, window):
    hf = random_hf_llama(model_type, "Model", **config)
    hf.save_pretrained(tmp_path)
    with pytest.raises(MinqrError) as error:
        load_backbone(tmp_path)
    assert str(error.value) == f"{tmp_path / 'config.json'}: {model_type} " + SLIDING.format(window)


def test_a_damaged_layer_count_is_refused_without_listing_its_layers():
    """A qwen2 config of 10^12 layers with a window from layer 2 on: refused at once (the layers
    are counted, not listed: a list of them would take the memory first)."""
    huge = {**hf_config_dict("qwen2"), "num_hidden_layers": 10 ** 12, "use_sliding_window": True, "sliding_window": 8,
            "max_window_layers": 2, "layer_types": None}
    with pytest.raises(MinqrError) as error:
        LlamaConfig.from_dict(huge)
    assert str(error.value) == "qwen2 " + SLIDING.format(
        f"use_sliding_window=true, sliding_window=8 on layers 2 to {10 ** 12 - 1}")


def test_a_mistral_config_without_sliding_window_has_transformers_default():
    mistral = {k: v for k, v in hf_config_dict("mistral", sliding_window=None).items() if k != "sliding_window"}
    with pytest.raises(MinqrError) as error:
        LlamaConfig.from_dict(mistral)
    assert str(error.value) == "mistral " + SLIDING.format("sliding_window=4096")
    assert transformers.MistralConfig(**mistral).sliding_window == 4096


@pytest.mark.parametrize("config", [
    {"use_sliding_window": False, "sliding_window": 8, "max_window_layers": 0},  # Qwen2.5's files
    {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2},  # no layer from 2 on
])
def test_an_inactive_qwen2_window_is_accepted(config):
    assert LlamaConfig.from_dict({**hf_config_dict("qwen2"), **config, "layer_types": None}).model_type == "qwen2"


@pytest.mark.parametrize("change,message", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "llama config uses RoPE of rope_type 'yarn', which minqr does not implement (supported: default, llama3)"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}},
     "invalid llama config: rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': None, "
     "'high_freq_factor': None, 'original_max_position_embeddings': 2048} must be None or {'rope_type': 'llama3', "
     "'factor': ..., 'low_freq_factor': ..., 'high_freq_factor': ..., 'original_max_position_embeddings': ...}"),
    ({"num_key_value_heads": 3},
     "invalid llama config: num_attention_heads=4 must be divisible by num_key_value_heads=3"),
    ({"head_dim": 7, "hidden_act": "gelu"},
     "invalid llama config: head_dim=7 must be even (RoPE turns pairs of dimensions); hidden_act='gelu' is not "
     "supported (the Llama family uses 'silu')"),
    ({"model_type": "gemma"}, "not a Llama-family config: model_type is 'gemma', expected one of 'llama', 'qwen2', "
                              "'mistral'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, "invalid llama config: rope_theta=0 must be a "
                                                                    "number > 0"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "10000"}},
     "invalid llama config: rope_theta='10000' must be a number > 0"),
    ({"rms_norm_eps": "1e-6", "attention_dropout": "0.1"},
     "invalid llama config: attention_dropout='0.1' must be a number in [0, 1); rms_norm_eps='1e-6' must be a number > 0"),
    ({"rope_parameters": ["llama3"]}, "llama config: rope_scaling (or rope_parameters) must be a dict, got ['llama3']"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16, "rope_theta": 1e4}},
     "invalid llama config: rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 0, "
     "'high_freq_factor': 4.0, 'original_max_position_embeddings': 16} must be None or {'rope_type': 'llama3', "
     "'factor': ..., 'low_freq_factor': ..., 'high_freq_factor': ..., 'original_max_position_embeddings': ...}"),
    ({"eos_token_id": -1}, "invalid llama config: eos_token_id=-1 must be a token id, a list of them, or null"),
    # Infinity and bools are no factors (Infinity scaled every position silently; bools failed deep in torch)
    *[({"rope_parameters": {"rope_type": "llama3", "factor": bad, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 16, "rope_theta": 1e4}},
       f"invalid llama config: rope_scaling={{'rope_type': 'llama3', 'factor': {bad!r}, 'low_freq_factor': 1.0, "
       "'high_freq_factor': 4.0, 'original_max_position_embeddings': 16} must be None or {'rope_type': 'llama3', "
       "'factor': ..., 'low_freq_factor': ..., 'high_freq_factor': ..., 'original_max_position_embeddings': ...}")
      for bad in (float("inf"), True)],
    ({"rms_norm_eps": 10 ** 400}, "invalid llama config: rms_norm_eps=" + "1" + "0" * 59 + " must be a number > 0"),
])
def test_bad_configs_are_named(change, message):
    with pytest.raises(MinqrError) as error:
        LlamaConfig.from_dict({**hf_config_dict("llama"), **change})
    assert str(error.value) == message


# ---- a reward model on a Llama-family backbone, saved as transformers' *ForSequenceClassification ----

@pytest.mark.parametrize("name", ["llama-gqa2-llama3", "qwen2-gqa2-tied", "mistral-gqa4"])
def test_reward_model_round_trips_through_transformers_sequence_classification(tmp_path, name):
    model_type, config = CONFIGS[name]
    # qwen2 has no EOS by default, and the reward is read at the last token that is not the pad
    hf_backbone = random_hf_llama(model_type, "ForCausalLM", seed=20, **config, eos_token_id=TINY_EOS_ID)
    hf_backbone.save_pretrained(tmp_path / "backbone")
    model = RewardModel.from_backbone(tmp_path / "backbone", num_quantiles=5)
    with torch.no_grad():
        model.score.weight.normal_(std=0.3)  # distinct rows: a swapped row cannot hide
    model.save_pretrained(tmp_path / "reward")
    config_json = json.loads((tmp_path / "reward" / "config.json").read_text())
    family = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[model_type]
    assert config_json["architectures"] == [f"{family}ForSequenceClassification"]
    assert config_json["pad_token_id"] == TINY_EOS_ID
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward").eval()
    assert type(hf).__name__ == f"{family}ForSequenceClassification"
    ids, mask = padded_batch(model.transformer.config, "right", seed=21)
    ids = ids.masked_fill(ids == TINY_EOS_ID, 0).masked_fill(mask == 0, TINY_EOS_ID)  # only padding is EOS
    loaded = RewardModel.from_pretrained(tmp_path / "reward")
    assert isinstance(loaded.transformer, Llama)  # and its config has the pad now
    assert loaded.transformer.config == dataclasses.replace(model.transformer.config, pad_token_id=TINY_EOS_ID)
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = hf(ids, attention_mask=mask).logits
        assert torch.equal(loaded(ids, mask), ours)
    assert theirs.shape == (len(ids), 6)  # the mean row first, for readers of logits[:, 0]
    torch.testing.assert_close(torch.cat([ours.mean(-1, keepdim=True), ours], dim=1), theirs, atol=1e-4, rtol=1e-4)


def test_a_reward_model_without_pad_or_eos_is_not_saved(tmp_path):
    _, folder = saved(tmp_path, "qwen2-gqa4")  # Qwen2's config names no EOS by default
    model = RewardModel.from_backbone(folder, head="scalar")
    with pytest.raises(MinqrError) as error:
        model.save_pretrained(tmp_path / "reward")
    assert str(error.value) == ("the backbone's config has neither pad_token_id nor eos_token_id, and transformers "
                                "reads a reward at the last token that is not the pad: set pad_token_id in its config")


def test_normalizing_into_the_weights_needs_a_final_norm_with_a_bias(tmp_path):
    """export --normalize folds the shift into GPT-2's ln_f.bias; the Llama family's RMSNorm has none."""
    _, folder = saved(tmp_path, "llama-gqa2-llama3")
    model = RewardModel.from_backbone(folder, head="scalar")
    model.reward_stats = {"mean": 0.5, "std": 2.0}
    with pytest.raises(MinqrError) as error:
        model.normalized()
    assert str(error.value) == ("normalize: the shift goes into the final layer norm's bias, and a Llama backbone's "
                                "final norm has none (nor has its head): score with --normalize instead, or "
                                "normalise the rewards with config.json's minqr.reward_mean and reward_std where you "
                                "use them")


def test_the_saved_pad_is_the_tokenizers(tmp_path):
    """transformers skips config.json's pad_token_id when it pools: with the tokenizer saved beside the
    model, that is the pad the tokenizer pads with, even where it is not the backbone's EOS."""
    from factories import write_tiny_tokenizer

    from minqr import load_tokenizer

    _, folder = saved(tmp_path, "llama-gqa2-llama3")
    tokenizer = load_tokenizer(write_tiny_tokenizer(tmp_path / "tok", layout="tokenizer.json"))
    model = RewardModel.from_backbone(folder, head="scalar")
    assert tokenizer.pad_id not in (model.transformer.config.eos_token_id, model.transformer.config.pad_token_id)
    model.save_pretrained(tmp_path / "reward", tokenizer=tokenizer)
    assert json.loads((tmp_path / "reward" / "config.json").read_text())["pad_token_id"] == tokenizer.pad_id
