"""minqr/adapters/verl.py called as verl calls a custom reward function: loaded from its file path,
the config's reward_kwargs merged into the keywords, per sample (verl's "naive" reward manager:
data_source, solution_str, ground_truth, extra_info) and per batch (the "batch" manager:
data_sources, solution_strs, ground_truths, extra_infos). Where verl is installed, its own loader
(verl.utils.import_utils.load_extern_object) loads the file; verl itself pulls in Ray and pins an
older transformers, so elsewhere the file is loaded by path as that loader does."""
import importlib.util
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from tiny_reward import statistic_by_definition, tiny_reward_folder

import minqr.adapters.verl
from minqr import MinqrError

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
FILE = Path(minqr.adapters.verl.__file__)


def load_by_path(name):
    """The function `name` of the adapter file, loaded from its path as verl loads custom rewards."""
    spec = importlib.util.spec_from_file_location(f"custom_module_{abs(hash(str(FILE)))}", FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def verl_loader():
    """verl's load_extern_object, read from its own file without importing verl (whose package
    imports Ray and its trainer); None where verl is not installed."""
    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "import_utils.py"
    utils_spec = importlib.util.spec_from_file_location("verl_import_utils_for_test", path)
    utils = importlib.util.module_from_spec(utils_spec)
    utils_spec.loader.exec_module(utils)
    return utils.load_extern_object


def as_verl_configures(function, reward_kwargs):
    """verl's get_custom_reward_fn: the loaded function with the config's reward_kwargs merged in."""
    def call(*args, **kwargs):
        return function(*args, **{**kwargs, **reward_kwargs})
    return partial(call)


@pytest.fixture
def folder(tmp_path):
    return tiny_reward_folder(tmp_path)


def test_per_sample_as_the_naive_manager_calls_it(folder):
    path, model, tokenizer = folder
    compute_score = as_verl_configures(load_by_path("compute_score"),
                                       {"model": str(path), "statistic": "cvar:0.25", "reference_key": "sft",
                                        "dtype": "float32"})
    extra_info = {"prompt": "The cat sat", "sft": " a bird", "index": 0, "num_turns": None,
                  "rollout_reward_scores": {}}
    result = compute_score(data_source="demo", solution_str=" on a mat", ground_truth="ignored", extra_info=extra_info)
    assert set(result) == {"score", "mean", "spread"} and all(isinstance(v, float) for v in result.values())
    want = statistic_by_definition(model, tokenizer, ["The cat sat on a mat"], "cvar:0.25",
                                   reference_texts=["The cat sat a bird"])
    assert result["score"] == pytest.approx(want[0], abs=1e-5)
    mean = statistic_by_definition(model, tokenizer, ["The cat sat on a mat"], "mean",
                                   reference_texts=["The cat sat a bird"])
    assert result["mean"] == pytest.approx(mean[0], abs=1e-5)
    assert result["spread"] > 0 and result["score"] <= result["mean"] + 1e-9  # the lower tail is below the mean


def test_batch_as_the_batch_manager_calls_it_relative_to_groups(folder):
    path, model, tokenizer = folder
    compute = as_verl_configures(load_by_path("compute_score_batch"),
                                 {"model": str(path), "statistic": "preference", "dtype": "float32"})
    prompts = ["The cat sat", "The cat sat", "Rain fell on", "Rain fell on", "Rain fell on"]
    solutions = [" on a mat", " far", " the roof", " us", " a bird"]
    results = compute(data_sources=["demo"] * 5, solution_strs=solutions, ground_truths=[None] * 5,
                      extra_infos=[{"prompt": p} for p in prompts])
    want = statistic_by_definition(model, tokenizer, [p + s for p, s in zip(prompts, solutions)], "preference",
                                   groups=prompts)
    assert [r["score"] for r in results] == pytest.approx(want, abs=1e-5)
    assert all(math.isfinite(r["spread"]) for r in results)


def test_chat_prompts_and_the_raw_mean(tmp_path):
    path, model, tokenizer = tiny_reward_folder(tmp_path, template=TEMPLATE)
    messages = [{"role": "user", "content": "The cat sat"}]
    result = minqr.adapters.verl.compute_score(data_source="demo", solution_str=" on a mat", ground_truth=None,
                                               extra_info={"prompt": messages}, model=str(path), dtype="float32")
    # the prompt's messages and the response as the assistant's, through the model's chat template
    text = "<user>The cat sat<assistant> on a mat"
    with torch.no_grad():
        raw = model(torch.tensor([tokenizer.encode(text)]))[0].double().mean().item()
    assert set(result) == {"score", "mean"}  # no spread without a reference: the kinds' constants would be in it
    assert result["score"] == pytest.approx(raw, abs=1e-5) and result["mean"] == result["score"]


def test_bad_configuration_is_a_clear_error(folder):
    path = str(folder[0])
    call = partial(minqr.adapters.verl.compute_score, data_source="d", solution_str=" a", ground_truth=None)
    with pytest.raises(MinqrError, match="model is missing"):
        call(extra_info={"prompt": "x"})
    with pytest.raises(MinqrError, match="unknown option modle"):
        call(extra_info={"prompt": "x"}, modle=path)
    with pytest.raises(MinqrError, match="extra_info has no 'question' .*prompt_key.*it has prompt"):
        call(extra_info={"prompt": "x"}, model=path, prompt_key="question")
    with pytest.raises(MinqrError, match="needs a reference.*compute_score_batch"):
        call(extra_info={"prompt": "x"}, model=path, statistic="quantile:0.1")
    with pytest.raises(MinqrError, match="not both"):
        call(extra_info={"prompt": "x"}, model=path, reference_key="a", reference_reply="b")
    # what verl's managers may add is accepted
    assert "score" in call(extra_info={"prompt": "x"}, model=path, reward_router_address=None)
    batch = partial(minqr.adapters.verl.compute_score_batch, data_sources=["d"] * 3, ground_truths=[None] * 3,
                    model=path, statistic="cvar:0.25")
    with pytest.raises(MinqrError, match="3 solution_strs but 2 extra_infos"):
        batch(solution_strs=[" a", " b", " c"], extra_infos=[{"prompt": "x"}] * 2)
    with pytest.raises(MinqrError, match=r"^response 2 is the only response to its prompt in this batch, so there is "
                                         r"no group to read it against: with one response a prompt \(rollout.n = 1\) "
                                         "set reward_kwargs reference_key or reference_reply"):
        batch(solution_strs=[" a", " b", " c"], extra_infos=[{"prompt": "x"}, {"prompt": "x"}, {"prompt": "y"}])
    # a null field of extra_info, or a response that is not a string: named, never a TypeError
    for solutions, infos, words in [([" a", None], [{"prompt": "x"}] * 2, "completion 1: field 'completion' must be"),
                                    ([" a", " b"], [{"prompt": None}] * 2, "completion 0: field 'prompt'")]:
        with pytest.raises(MinqrError, match=f"^{words}"):
            batch(solution_strs=solutions, extra_infos=infos, data_sources=["d"] * 2, ground_truths=[None] * 2)


def test_verl_own_loader_loads_it(folder):
    loader = verl_loader()
    if loader is None:
        pytest.skip("verl is not installed (it needs Ray and an older transformers): loaded by path above instead")
    compute_score = loader(module_path=str(FILE), object_name="compute_score")
    result = compute_score(data_source="d", solution_str=" on a mat", ground_truth=None,
                           extra_info={"prompt": "The cat sat"}, model=str(folder[0]), dtype="float32")
    assert result["score"] == pytest.approx(load_by_path("compute_score")(
        data_source="d", solution_str=" on a mat", ground_truth=None, extra_info={"prompt": "The cat sat"},
        model=str(folder[0]), dtype="float32")["score"])
