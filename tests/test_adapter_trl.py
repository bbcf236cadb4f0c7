"""minqr.adapters.trl.RewardFunction run by TRL's own GRPOTrainer, two steps on a tiny random policy
made here (offline, CPU), with plain and conversational prompts; every reward TRL received is
checked against the reward model's outputs on the rendered texts, the statistic computed here
in float64 by its definition. Skipped where trl is not installed."""
import re
import warnings

import pytest
import torch
from factories import TINY_VOCAB_SIZE, random_gpt2, tiny_config, transformers_twin, write_tiny_tokenizer
from tiny_reward import statistic_by_definition, tiny_reward_folder

from minqr import MinqrError, load_tokenizer
from minqr.adapters.texts import TextRewards
from minqr.adapters.trl import RewardFunction

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPTS = ["The cat sat", "A bird flew over", "Rain fell on", "Some people say"]


def policy(folder, template=None):
    """A tiny random causal LM (transformers' GPT-2) and its tokenizer, as TRL wants them."""
    tokenizer_folder = write_tiny_tokenizer(folder / "policy_tok", layout="tokenizer.json")
    load_tokenizer(tokenizer_folder).save(tokenizer_folder)  # tokenizer_config.json with EOS and pad
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder)
    if template is not None:
        tokenizer.chat_template = TEMPLATE
    model = transformers_twin(random_gpt2(tiny_config(), seed=3), "GPT2LMHeadModel")
    model.config.vocab_size = TINY_VOCAB_SIZE
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.train(), tokenizer


class Recorder:
    """Wraps a reward function as TRL sees it, keeping what it was given and what it gave."""

    def __init__(self, inner):
        self.inner, self.calls, self.__name__ = inner, [], inner.__name__

    def __call__(self, prompts, completions, **kwargs):
        rewards = self.inner(prompts, completions, **kwargs)
        self.calls.append((prompts, completions, rewards, sorted(kwargs)))
        return rewards


def grpo_config(tmp_path):
    """Two GRPO steps of 4 completions, 2 per prompt, 5 tokens each, on the CPU."""
    return trl.GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=5, max_steps=2, use_cpu=True, report_to="none", logging_steps=1,
                          save_strategy="no", bf16=False, seed=0, dataloader_num_workers=0)


def run_grpo(tmp_path, reward_funcs, dataset, tokenizer, policy_model, **trainer_options):
    trainer = trl.GRPOTrainer(model=policy_model, reward_funcs=reward_funcs, args=grpo_config(tmp_path),
                              train_dataset=dataset, processing_class=tokenizer, **trainer_options)
    trainer.train()
    return trainer


def test_grpo_trains_two_steps_with_group_relative_rewards(tmp_path):
    folder, model, tokenizer = tiny_reward_folder(tmp_path)
    policy_model, policy_tokenizer = policy(tmp_path)
    texts = ["cvar:0.25", "preference"]  # two reward functions in one run, as TRL sums them
    recorders = [Recorder(RewardFunction(str(folder), statistic=text, dtype="float32")) for text in texts]
    trainer = run_grpo(tmp_path, recorders, datasets.Dataset.from_dict({"prompt": PROMPTS}), policy_tokenizer,
                       policy_model)
    assert trainer.state.global_step == 2
    for text, recorder in zip(texts, recorders):
        assert recorder.calls
        for prompts, completions, rewards, kwargs in recorder.calls:
            assert "log_metric" in kwargs and len(rewards) == len(prompts)
            assert all(prompts.count(p) >= 2 for p in prompts)  # TRL gave whole groups of the same prompt
            texts_read = [p + c for p, c in zip(prompts, completions)]
            assert rewards == pytest.approx(statistic_by_definition(model, tokenizer, texts_read, text, prompts),
                                            abs=1e-5)
        name = f"rewards/minqr_{text.replace(':', '_')}/mean"
        assert any(name in entry for entry in trainer.state.log_history)
    logged = [entry for entry in trainer.state.log_history if "minqr/spread" in entry]
    assert logged and all(entry["minqr/spread"] > 0 for entry in logged)


def test_grpo_conversational_prompts_use_the_chat_template(tmp_path):
    folder, model, tokenizer = tiny_reward_folder(tmp_path, template=TEMPLATE)
    policy_model, policy_tokenizer = policy(tmp_path, template=TEMPLATE)
    recorder = Recorder(RewardFunction(str(folder), statistic="mean", dtype="float32"))
    dataset = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]})
    trainer = run_grpo(tmp_path, recorder, dataset, policy_tokenizer, policy_model)
    assert trainer.state.global_step == 2
    for prompts, completions, rewards, _ in recorder.calls:
        assert isinstance(prompts[0], list) and completions[0][0]["role"] == "assistant"
        texts = ["".join(f"<{m['role']}>{m['content']}" for m in p + c) for p, c in zip(prompts, completions)]
        keys = [p[0]["content"] for p in prompts]
        assert rewards == pytest.approx(statistic_by_definition(model, tokenizer, texts, "mean", keys), abs=1e-5)


def test_references_other_than_the_group(tmp_path):
    folder, model, tokenizer = tiny_reward_folder(tmp_path)
    prompts, completions = ["The cat sat", "The cat sat"], [" on a mat", " a bird"]
    reply = RewardFunction(str(folder), statistic="preference", reference_reply=" on a mat", dtype="float32")
    got = reply(prompts=prompts, completions=completions)
    assert got[0] == pytest.approx(0.5) and got[1] != pytest.approx(0.5)  # the first is its own reference
    column = RewardFunction(str(folder), statistic="preference", reference_column="sft", dtype="float32")
    assert column(prompts=prompts, completions=completions, sft=[" on a mat"] * 2) == pytest.approx(got)
    with pytest.raises(MinqrError, match="reference_column='sft': the data set has no such column"):
        column(prompts=prompts, completions=completions, other=[1, 2])
    raw_mean = RewardFunction(str(folder), statistic="mean", reference=None, dtype="float32")
    with torch.no_grad():
        want = [model(torch.tensor([tokenizer.encode(p + c)]))[0].mean().item() for p, c in zip(prompts, completions)]
    assert raw_mean(prompts=prompts, completions=completions) == pytest.approx(want, abs=1e-5)
    with pytest.raises(MinqrError, match=r"statistic cvar:0.25 needs a reference \(reference='group'"):
        RewardFunction(str(folder), statistic="cvar:0.25", reference=None)  # at once, not at TRL's first call
    # a group of one is its own reference: refused, not a constant reward
    with pytest.raises(MinqrError, match="completion 2 is the only one of its prompt in this call"):
        RewardFunction(str(folder), statistic="preference")(prompts=[*prompts, "Hi"], completions=[*completions, " yo"])
    # max_length: the model's positions (64) when it was not trained by minqr train: a long text is cut
    long = RewardFunction(str(folder), statistic="mean", reference=None, dtype="float32")
    assert long.rewards.max_length == model.transformer.config.n_positions
    ids = tokenizer.encode("The cat sat" + " on a mat" * 40)
    assert len(ids) > 64
    with torch.no_grad():
        want = model(torch.tensor([ids[-64:]]))[0].mean().item()
    assert long(prompts=["The cat sat"], completions=[" on a mat" * 40]) == pytest.approx([want], abs=1e-5)
    with pytest.raises(MinqrError, match="not both"):
        RewardFunction(str(folder), reference_column="a", reference_reply="b")
    with pytest.raises(MinqrError, match="unknown statistic"):
        RewardFunction(str(folder), statistic="median")
    # a string mixed with messages is read as training reads such a pair: the HH text of the messages
    mixed = RewardFunction(str(folder), statistic="mean", reference=None, dtype="float32")
    with pytest.warns(UserWarning, match="no chat template"):
        got = mixed(prompts=["The cat"], completions=[[{"role": "assistant", "content": "sat"}]])
    with torch.no_grad():
        want = model(torch.tensor([tokenizer.encode("The cat\n\nAssistant: sat")]))[0].mean().item()
    assert got == pytest.approx([want], abs=1e-5)


def test_conversations_without_a_template_are_read_hh_style_with_a_warning(tmp_path):
    folder, _, _ = tiny_reward_folder(tmp_path)
    rewards = TextRewards.load(folder)
    with pytest.warns(UserWarning, match="no chat template"):
        text, = rewards.texts([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Yo"}])
    assert text == "\n\nHuman: Hi\n\nAssistant: Yo"


def test_a_completion_and_its_reference_are_read_in_one_rendering(tmp_path):
    """With a chat template, message lists throughout go through it; a string reference among them
    makes the completion and the reference both HH text (as training reads such a pair), never one
    of each, and a warning says so."""
    folder, _, _ = tiny_reward_folder(tmp_path, template="{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                                                         "{% endfor %}")
    rewards = TextRewards.load(folder)
    prompt, completion = [{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Yo"}]
    assert rewards.texts(prompt, completion, [{"role": "assistant", "content": "No."}]) == [
        "<user>Hi<assistant>Yo", "<user>Hi<assistant>No."]
    with pytest.warns(UserWarning, match="a string is mixed with message lists"):
        assert rewards.texts(prompt, completion, " No.") == ["\n\nHuman: Hi\n\nAssistant: Yo", "\n\nHuman: Hi No."]
    # a reference reply given as a string (the docs' reference_reply=" I can't help with that.") to
    # conversations is the assistant's message: the same rewards as the message itself, no warning
    prompts = [prompt, [{"role": "user", "content": "Rain?"}]]
    completions = [completion, [{"role": "assistant", "content": "Wet."}]]
    as_message = TextRewards.load(folder, statistic="preference", dtype="float32").statistic_values(
        prompts, completions, references=[[{"role": "assistant", "content": "No."}]] * 2)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        as_string = RewardFunction(str(folder), statistic="preference", reference_reply="No.", dtype="float32")(
            prompts=prompts, completions=completions)
    assert as_string == pytest.approx(as_message.tolist(), abs=1e-6)
    # roles are the template's to judge: a tool turn and a developer message are scored as it renders them
    tool = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Rain?"},
            {"role": "tool", "content": "rain: 80%"}]
    rendered = rewards.texts(tool, [{"role": "assistant", "content": "Yes."}])
    assert rendered == ["<developer>Be brief.<user>Rain?<tool>rain: 80%<assistant>Yes."]
    assert rewards.statistic_values([tool], ["Yes."])[0].tolist() == pytest.approx(
        [rewards.outputs(rendered).double().mean().item()], abs=1e-6)
    # what is neither a string nor messages: one error naming the row and the field, never a TypeError
    for prompts_, completions_, references, words in [
            (["Hi", None], [" a", " b"], None, "completion 1: field 'prompt' must be a string or a list of"),
            (["Hi", "Hi"], [" a", 3], None, "completion 1: field 'completion' must be a string or a list of"),
            (["Hi", "Hi"], [" a", " b"], [" ok", None], "completion 1: field 'reference' must be a string or a list"),
            (["Hi", "Hi"], [" a", " b\ud800"], None, "completion 1: field 'completion' holds a lone surrogate")]:
        with pytest.raises(MinqrError, match=f"^{re.escape(words)}"):
            rewards.statistic_values(prompts_, completions_, references=references)


def test_trl_reading_a_saved_folder_gets_the_expected_reward_never_one_kind(tmp_path):
    """The trap: TRL given a sequence classifier as reward_funcs reads logits[:, 0]. A saved minqr folder
    puts the mean row first, so TRL's reward is the expected reward (what minqr's own mean gives on the
    same completions, in the same steps), not kind 0's raw output; given the folder's path, TRL asks
    for one label and transformers refuses the N + 1 rows."""
    folder, model, tokenizer = tiny_reward_folder(tmp_path)
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    reward_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    policy_model, policy_tokenizer = policy(tmp_path)
    ours = RewardFunction(str(folder), statistic="mean", reference=None, dtype="float32")
    trainer = run_grpo(tmp_path, [classifier, ours], datasets.Dataset.from_dict({"prompt": PROMPTS}),
                       policy_tokenizer, policy_model, reward_processing_classes=[reward_tokenizer, None])
    steps = [entry for entry in trainer.state.log_history if f"rewards/{ours.__name__}/mean" in entry]
    assert len(steps) == 2
    for entry in steps:
        theirs, mean = entry[f"rewards/{folder.name}/mean"], entry[f"rewards/{ours.__name__}/mean"]
        assert theirs == pytest.approx(mean, abs=1e-4)
    # and a single kind would have been another reward: the comparison can tell them apart
    with torch.no_grad():
        outputs = model(torch.tensor([tokenizer.encode("The cat sat on a mat")]))[0]
    assert abs(float(outputs[0] - outputs.mean())) > 1e-2
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        trl.GRPOTrainer(model=policy_model, reward_funcs=str(folder), args=grpo_config(tmp_path),
                        processing_class=policy_tokenizer,
                        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}))



def test_a_template_that_fails_is_one_error_naming_it(tmp_path):
    """The chat template of the reward model is code from its folder: whatever it raises is one
    MinqrError naming the template (minqr/data/chat.py), here as in training and scoring."""
    folder, _, _ = tiny_reward_folder(tmp_path, template="{{ messages[0]['content'] }}{{ 1 / 0 }}")
    rewards = TextRewards.load(folder)
    with pytest.raises(MinqrError, match=r"a prompt and completion: the chat template of .* refuses this conversation "
                                         r"\(ZeroDivisionError: division by zero\)"):
        rewards.texts([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Yo"}])
