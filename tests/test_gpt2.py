"""minqr's GPT-2 against transformers' (parity) and against itself run on the pieces separately."""
import pytest
import torch
import transformers
from factories import (assert_packed_rows_are_alone, padded_batch, random_gpt2, shared_prefix_batch, tiny_config,
                       transformers_twin)

from minqr import GPT2, GPT2Config, MinqrError
from minqr.models.gpt2 import attention_mask_4d

CONFIGS = [
    tiny_config(),
    tiny_config(n_head=2, n_inner=40, activation_function="gelu", layer_norm_epsilon=1e-3),
    tiny_config(n_layer=3, n_embd=48, n_head=6, vocab_size=97, bos_token_id=96, eos_token_id=96,
                activation_function="gelu_pytorch_tanh"),
]


@pytest.mark.parametrize("side", ["none", "right", "left"])
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_hidden_states_and_logits_match_transformers(index, side):
    config = CONFIGS[index]
    model = random_gpt2(config, seed=index)
    hf = transformers_twin(model, "GPT2LMHeadModel")
    ids, mask = padded_batch(config, "left" if side == "left" else "right", seed=10 + index)
    if side == "none":
        mask = torch.ones_like(mask)
    # transformers' GPT2Model numbers positions 0..T-1 whatever the mask: give it the real ones
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hidden = model(ids, None if side == "none" else mask)
        logits = model.lm_logits(hidden)
        hf_hidden = hf.transformer(ids, attention_mask=mask, position_ids=positions).last_hidden_state
        hf_logits = hf(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(hidden[real], hf_hidden[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[real], hf_logits[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_rows_equal_the_rows_run_alone(side):
    config = CONFIGS[1]
    model = random_gpt2(config, seed=3)
    ids, mask = padded_batch(config, side, seed=4)
    with torch.no_grad():
        hidden = model(ids, mask)
        for row in range(len(ids)):
            real = mask[row].bool()
            alone = model(ids[row, real][None])[0]
            torch.testing.assert_close(hidden[row, real], alone, atol=1e-5, rtol=1e-5)


def test_rows_with_nothing_to_attend_stay_finite_forward_and_backward():
    model = random_gpt2(seed=5).train()
    ids, mask = padded_batch(model.config, "left", seed=6, lengths=[0, 3, 9], T=9)
    model(ids, mask).pow(2).sum().backward()
    packed_ids, packed_mask, positions = shared_prefix_batch([(2, 3, 2, 4)])  # 4 pad tokens
    model(packed_ids, packed_mask, positions).pow(2).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_no_query_row_is_fully_masked():
    padding = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    assert attention_mask_4d(padding, 4).any(-1).all()
    nothing = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    assert attention_mask_4d(nothing, 4).any(-1).all()
    assert attention_mask_4d(torch.full((2, 1, 4, 4), float("-inf")), 4).isfinite().any(-1).all()


@pytest.mark.parametrize("additive", [False, True], ids=["bool", "additive"])
@pytest.mark.parametrize("shapes", [
    [(5, 4, 6, 0), (3, 7, 2, 3)],
    [(29, 30, 30, 0)],  # a row wider than n_positions=64 whose positions (< 59) are not
], ids=["padded", "wider-than-n_positions"])
def test_shared_prefix_mask_equals_running_chosen_and_rejected_separately(shapes, additive):
    model = random_gpt2(CONFIGS[0], seed=7)
    ids, mask, positions = shared_prefix_batch(shapes, seed=8, additive=additive)
    packed = model(ids, mask, positions)
    packed_loss, separate_loss = 0.0, 0.0
    alone = assert_packed_rows_are_alone(model, ids, packed, shapes)
    for row, ((p, c, r, pad), (alone_chosen, alone_rejected)) in enumerate(zip(shapes, alone)):
        # a loss on the suffixes: the packed prefix must pass on the gradient of both runs
        weights = torch.randn(c + r, model.config.n_embd)
        packed_loss = packed_loss + (packed[row, p:p + c + r] * weights).sum()
        separate_loss = separate_loss + (alone_chosen[p:] * weights[:c]).sum() + (alone_rejected[p:] * weights[c:]).sum()
    packed_grads = torch.autograd.grad(packed_loss, list(model.parameters()))
    separate_grads = torch.autograd.grad(separate_loss, list(model.parameters()))
    for a, b in zip(packed_grads, separate_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pdrop", ["embd_pdrop", "attn_pdrop", "resid_pdrop"])
def test_dropout_is_active_in_train_mode_only(pdrop):
    model = random_gpt2(tiny_config(**{pdrop: 0.5}), seed=9)
    ids, mask = padded_batch(model.config, "right", seed=10)
    with torch.no_grad():
        evaluated = model(ids, mask)
        torch.testing.assert_close(model(ids, mask), evaluated, atol=0, rtol=0)
        model.train()
        trained = model(ids, mask)
    assert not torch.allclose(trained, evaluated, atol=1e-3)


@pytest.mark.slow  # torch.compile of two graphs: about 4 s of CPU
def test_compiles_as_one_graph_with_and_without_masks():
    model = random_gpt2(seed=11)
    ids, mask = padded_batch(model.config, "left", seed=12)
    packed_ids, packed_mask, positions = shared_prefix_batch([(4, 5, 4, 3)], seed=13)
    # aot_eager traces forward and backward as inductor would, without minutes of C++ compiling
    # (benchmarks/test_gpt2_speed.py runs inductor on the 124M shape)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for args in [(ids,), (ids, mask), (packed_ids, packed_mask, positions)]:
        out = compiled(*args)
        torch.testing.assert_close(out, model(*args), atol=1e-5, rtol=1e-5)
        out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype, monkeypatch):
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def checked_sdpa(q, k, v, attn_mask=None, **kwargs):
        # SDPA's documented contract; CPU kernels forgive a float32 mask, others need not
        assert attn_mask is None or attn_mask.dtype in (torch.bool, q.dtype)
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", checked_sdpa)
    model = random_gpt2(seed=14)
    ids, mask = padded_batch(model.config, "right", seed=15)
    packed_ids, packed_mask, positions = shared_prefix_batch([(4, 5, 4, 3)], seed=16, additive=True)
    for args in [(ids,), (ids, mask), (packed_ids, packed_mask, positions)]:
        with torch.autocast("cpu", dtype=dtype):
            out = model(*args)
            logits = model.lm_logits(out)
        assert logits.dtype == dtype
        logits.float().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        real = slice(None) if len(args) != 2 else mask.bool()
        torch.testing.assert_close(out[real].float(), model(*args)[real], atol=0.1, rtol=0.05)


@pytest.mark.parametrize("name,count", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                        ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_every_gpt2_size_builds_with_the_published_parameter_count(name, count):
    with torch.device("meta"):
        model = GPT2(GPT2Config.preset(name))
    assert sum(p.numel() for p in model.parameters()) == count


def test_config_round_trips_through_transformers():
    config = CONFIGS[1]
    hf_dict = transformers.GPT2Config(**{k: v for k, v in config.to_dict().items() if k != "model_type"}).to_dict()
    assert GPT2Config.from_dict(hf_dict) == config
    assert GPT2Config.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("change,words", [
    ({"model_type": "llama"}, ["not a GPT-2 config", "'llama'"]),
    ({"model_type": None}, ["not a GPT-2 config", "None"]),
    ({"scale_attn_by_inverse_layer_idx": True}, ["does not implement", "scale_attn_by_inverse_layer_idx=True"]),
    ({"add_cross_attention": True}, ["does not implement", "add_cross_attention"]),
    ({"n_embd": 30, "n_head": 4}, ["n_embd=30", "divisible by n_head=4"]),
    ({"activation_function": "relu", "n_layer": 0}, ["'relu'", "n_layer=0"]),
    ({"attn_pdrop": 1.0}, ["attn_pdrop=1.0"]),
    ({"resid_pdrop": "0.1"}, ["resid_pdrop='0.1' must be a number in [0, 1)"]),
    ({"layer_norm_epsilon": -1}, ["layer_norm_epsilon=-1 must be a number > 0"]),
    ({"layer_norm_epsilon": "1e-5"}, ["layer_norm_epsilon='1e-5' must be a number > 0"]),
    ({"eos_token_id": True}, ["eos_token_id=True must be a token id, a list of them, or null"]),
    ({"eos_token_id": 2 ** 40}, ["eos_token_id=1099511627776 must be a token id"]),
])
def test_bad_configs_are_named(change, words):
    with pytest.raises(MinqrError) as error:
        GPT2Config.from_dict({**tiny_config().to_dict(), **change})
    assert all(w in str(error.value) for w in words), str(error.value)


def test_bad_inputs_are_named():
    model = random_gpt2(seed=17)
    with pytest.raises(MinqrError, match="n_positions=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(MinqrError, match=r"\[2, 1, 4\].*\[B, T\] padding mask"):
        model(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 1, 4))
    with pytest.raises(MinqrError, match="gpt2-xl"):
        GPT2Config.preset("gpt3")
